"""Blockwise prediction overhead: `jaxem predict`'s path (jaxem.infer.device.predict_volume: reading,
the jitted window per block, writing) vs the pure model forward on the same tiles.

    python benchmarks/inference.py --small          # seconds
    python benchmarks/inference.py --gib 0.02       # a few minutes on a 2-core CPU
    python benchmarks/inference.py --gib 1.0        # >= 1 GiB of float32 input (GPU machines)
    python benchmarks/inference.py --monai          # MONAI sliding_window_inference side by side (optional):
                                                    # (a) volume in device memory, (b) zarr -> zarr by blocks
    python benchmarks/inference.py --device-blocks 4 9  # also blocks of N^3 output chunks (recompute at block borders)
    python benchmarks/inference.py --block-gib 0.25     # the byte budget of a block's window (predict.block_gib)

Prints JSON: the blockwise wall time; the forward time on the same number of tiles (measured
separately on pre-loaded in-memory batches, so it is the model's cost alone); the overhead
fraction (IO, normalisation, blending, writing, bookkeeping not hidden behind compute);
voxels/s; and two factors that multiply the model cost but are not overhead:
  halo_factor       voxels through the model per output voxel if every tile runs once:
                    tile_count * prod(block) / prod(volume) ~ prod(block / (block - 2 halo)).
                    It is the price of context at tile borders; larger blocks lower it.
  recompute_factor  tiles predicted / distinct tiles: > 1 when the volume is cut into several
                    blocks (tiles touching two blocks run in both; see device.chunks_per_block).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time

import numpy as np

from jaxem import xla


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--gib", type=float, default=1.0, help="input size in GiB of float32")
    parser.add_argument("--block-gib", type=float, default=0.0,
                        help="a block's window on the device (predict.block_gib; 0 = auto, as jaxem predict: 1 GiB on a CPU, "
                             "1/8 of a GPU's memory up to 16 GiB)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--block", type=int, nargs=3, default=None, help="tile (default 32 64 64; 16 32 32 with --small)")
    parser.add_argument("--halo", type=int, nargs=3, default=None, help="halo (default block / 8)")
    parser.add_argument("--batch", type=int, default=2, help="tiles per device per forward")
    parser.add_argument("--monai", action="store_true", help="also MONAI sliding_window_inference on the same volume")
    parser.add_argument("--repeat", type=int, default=1, help="time each zarr -> zarr variant N times, keep the best")
    parser.add_argument("--monai-block", type=int, nargs=3, default=(128, 256, 256),
                        help="(b) MONAI zarr -> zarr: the block core read (with the halo around it) per sliding window")
    parser.add_argument("--device-blocks", type=int, nargs="*", default=(),
                        help="also time jaxem.infer.device zarr -> zarr with blocks of N^3 output chunks, per N given")
    parser.add_argument("--xla-conv", action="store_true", help="XLA's own 3D conv (slow on CPUs) instead of jaxem's")
    parser.add_argument("--uint8", action="store_true",
                        help="a uint8 input (as EM is), sent to the device raw and normalised there, as `jaxem predict` does")
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxem.data.volume import create_volume
    from jaxem.infer.device import block_budget_bytes, chunks_per_block, forward_fn, make_block_fn, predict_blocks
    from jaxem.infer.tiling import make_tiling
    from jaxem.models import layers

    class Net(nn.Module):
        """3 convs of `width` + a 1x1 conv, through jaxem's conv (XLA's own conv with --xla-conv)."""
        width: int
        xla_conv: bool = False

        @nn.compact
        def __call__(self, x, train=False):
            conv = nn.Conv if self.xla_conv else layers.Conv
            for _ in range(3):
                x = nn.relu(conv(self.width, (3, 3, 3))(x))
            return conv(1, (1, 1, 1))(x)

    block = tuple(args.block or ((16, 32, 32) if args.small else (32, 64, 64)))
    halo = tuple(args.halo or (b // 8 for b in block))
    width = 4 if args.small else args.width
    voxels = 2**18 if args.small else int(args.gib * 2**30 / 4)
    side = int(round((voxels / 4) ** (1 / 3)))
    shape = (side, 2 * side, 2 * side)
    net = Net(width, args.xla_conv)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, *block, 1)))
    dtype = np.uint8 if args.uint8 else np.float32
    forward = forward_fn(lambda x: net.apply(variables, x)[0], normalize=(127.5, 64.0) if args.uint8 else None)
    fn = jax.jit(forward)
    with tempfile.TemporaryDirectory() as tmp:
        src = create_volume(f"{tmp}/in", shape, dtype, (1.0, 1.0, 1.0), chunks=(32, 128, 128))
        for z in range(0, shape[0], 32):
            slab = np.random.default_rng(z).random((min(32, shape[0] - z), *shape[1:]), dtype=np.float32)
            src.write((slab * 255).astype(dtype) if args.uint8 else slab, (z, 0, 0))
        tiling = make_tiling(shape, None, block, halo, blend="gaussian")
        x = np.random.default_rng(0).random((args.batch, *block, 1), dtype=np.float32)
        x = (x * 255).astype(dtype) if args.uint8 else x
        fn(x).block_until_ready()  # compile
        # what device.predict_volume (jaxem predict) runs, with the window compiled once, before timing
        budget = block_budget_bytes(args.block_gib)
        per_block = chunks_per_block(tiling, budget, channels_in=1, in_itemsize=np.dtype(dtype).itemsize,
                                     channels_out=1, out_itemsize=2)
        block_fn = make_block_fn(forward, tiling.block, args.batch, np.float16)
        predict_blocks(block_fn, src, zarr_output(f"{tmp}/out.zarr", shape, tiling.chunk), tiling, per_block)
        batches = -(-tiling.tile_count() // args.batch)
        before = time_forward(fn, x, batches // 2)  # half before and half after the blockwise run,
        stats = {}                                  # so slow drifts of the machine cancel

        def blockwise() -> float:
            out = zarr_output(f"{tmp}/out.zarr", shape, tiling.chunk)  # a fresh output: nothing done
            t0 = time.perf_counter()
            stats.update(predict_blocks(block_fn, src, out, tiling, per_block))
            return time.perf_counter() - t0

        wall = best(blockwise, args.repeat)
        tiles = stats["tiles_predicted"]
        after = time_forward(fn, x, batches - batches // 2)
        model_s = (before + after) * (-(-tiles // args.batch)) / batches  # per batch, times the batches run
        result = {
            "shape": shape, "gib_input": float(np.prod(shape) * 4 / 2**30), "block": block, "halo": halo, "tiles": tiles,
            "blockwise_s": round(wall, 3), "forward_same_tiles_s": round(model_s, 3),
            "forward_s_per_batch_before_after": [round(before / max(batches // 2, 1), 4), round(after / max(batches - batches // 2, 1), 4)],
            "overhead": round(wall / model_s - 1, 4), "halo_factor": round(tiling.halo_factor(), 3),
            "recompute_factor": stats["recompute_factor"], "blocks": stats["blocks"],
            "chunks_per_block": stats["chunks_per_block"], "block_gib": round(budget / 2**30, 3),
            "voxels_per_s": round(float(np.prod(shape)) / wall), "width": width, "xla_conv": args.xla_conv,
            "input_dtype": np.dtype(dtype).name,
            "device": str(jax.devices()[0].platform),
            "devices": jax.device_count(),
        }
        if args.device_blocks:
            result["device_block"] = [time_device_blocks(forward, src, tiling, args.batch, n,
                                                         f"{tmp}/out_device.zarr", args.repeat) for n in args.device_blocks]
        if args.monai:
            result["monai"] = monai_side_by_side(width, shape, block, halo, args.batch, result["voxels_per_s"], src,
                                                 tiling.chunk, args.monai_block, args.uint8, f"{tmp}/out_monai.zarr",
                                                 args.repeat)
    print(json.dumps(result))


def time_forward(fn, x, batches: int) -> float:
    """Seconds for `batches` forward passes on the pre-loaded batch `x`."""
    t0 = time.perf_counter()
    for _ in range(batches):
        np.asarray(fn(x))  # the result back on the host, as a block's output comes back
    return time.perf_counter() - t0


def best(timed, repeat: int) -> float:
    """The least of `repeat` calls of `timed() -> seconds` (the machine is shared: noise only adds)."""
    return min(timed() for _ in range(max(repeat, 1)))


def zarr_output(path, shape, chunk):
    """A float16 (1, *shape) OME-Zarr output with chunks (1, *chunk), as jaxem predict writes."""
    from jaxem.infer.output import create_output

    return create_output(path, (1, *shape), np.float16, (1.0,) * 3, (1, *chunk), ("c", "z", "y", "x"), (0, 0, 0), {}, True)[0]


def time_device_blocks(forward, src, tiling, batch, n, path, repeat=1) -> dict:
    """jaxem.infer.device.predict_blocks zarr -> zarr with blocks of n^3 output chunks (instead of
    the byte budget's): tiles at block borders run once per block touching them (recompute_factor)."""
    from jaxem.infer.device import make_block_fn, predict_blocks

    fn = make_block_fn(forward, tiling.block, batch, np.float16)
    stats = {}
    predict_blocks(fn, src, zarr_output(path, tiling.shape, tiling.chunk), tiling, (n,) * 3)  # compiles

    def timed() -> float:
        out = zarr_output(path, tiling.shape, tiling.chunk)
        t0 = time.perf_counter()
        stats.update(predict_blocks(fn, src, out, tiling, (n,) * 3))
        return time.perf_counter() - t0

    seconds = best(timed, repeat)
    return {"seconds": round(seconds, 3), "blocks": stats["blocks"], "chunks_per_block": n ** 3,
            "tiles": stats["tiles_predicted"], "recompute_factor": stats["recompute_factor"],
            "voxels_per_s": round(float(np.prod(tiling.shape)) / seconds)}


def monai_side_by_side(width, shape, block, halo, batch, jaxem_voxels_per_s, src=None, chunk=None,
                       monai_block=(128, 256, 256), uint8=False, path=None, repeat=1) -> dict | str:
    """MONAI's sliding_window_inference with the same net (3 convs of `width`, 1x1 conv, sigmoid),
    tile, overlap (2 * halo / block), tiles per forward and Gaussian blend (sigma = block / 8):
    (a) on the volume already in (GPU or CPU) memory, output left there: no reading or writing;
    (b) as a user runs it on a volume that does not fit: blocks of `monai_block` (+ `halo` of
    context, clamped to the volume) read from the same zarr `src`, sent to the device, slid over,
    cropped and written as float16 to a zarr with jaxem's output chunks (`chunk`), one after the
    other. Needs torch and monai (not jaxem dependencies: pip install torch monai)."""
    try:
        import torch
        from monai.inferers import sliding_window_inference
    except ImportError:
        return "not measured: torch/monai not installed (optional; pip install torch monai)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    layers = []
    for i in range(3):
        layers += [torch.nn.Conv3d(1 if i == 0 else width, width, 3, padding=1), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Conv3d(width, 1, 1), torch.nn.Sigmoid()).to(device).eval()
    overlap = [2 * h / b for h, b in zip(halo, block)]

    def run(x):
        out = sliding_window_inference(x, block, batch, net, overlap=overlap, mode="gaussian", sigma_scale=0.125)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        run(torch.rand(1, 1, *(2 * b for b in block), device=device))  # warm-up (cudnn autotuning)
        x = torch.rand(1, 1, *shape, device=device)

        def in_memory() -> float:
            t0 = time.perf_counter()
            run(x)
            return time.perf_counter() - t0

        seconds = best(in_memory, repeat)
        del x
        blockwise = (best(lambda: monai_zarr_to_zarr(run, src, chunk, monai_block, halo, uint8, path, device), repeat)
                     if src is not None else None)
    voxels_per_s = float(np.prod(shape)) / seconds
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "monai_s": round(seconds, 3), "monai_voxels_per_s": round(voxels_per_s),
              "jaxem_over_monai": round(jaxem_voxels_per_s / voxels_per_s, 3), "monai_in_memory": True}
    if blockwise is not None:
        result.update({"monai_zarr_s": round(blockwise, 3), "monai_zarr_block": list(monai_block),
                       "monai_zarr_voxels_per_s": round(float(np.prod(shape)) / blockwise),
                       "jaxem_over_monai_zarr": round(jaxem_voxels_per_s * blockwise / float(np.prod(shape)), 3)})
    return result


def monai_zarr_to_zarr(run, src, chunk, core, halo, uint8, path, device) -> float:
    """Seconds for (b): per block core (raster order) read core + halo from `src`, normalise
    like jaxem (uint8: (x - 127.5) / 64), slide `run` over it, crop the core, write float16."""
    import torch

    shape = src.shape
    out = zarr_output(path, shape, chunk)
    t0 = time.perf_counter()
    for lo in itertools.product(*(range(0, n, c) for n, c in zip(shape, core))):
        hi = [min(a + c, n) for a, c, n in zip(lo, core, shape)]
        r0 = [max(a - h, 0) for a, h in zip(lo, halo)]
        r1 = [min(b + h, n) for b, h, n in zip(hi, halo, shape)]
        x = np.asarray(src.store[tuple(slice(a, b) for a, b in zip(r0, r1))].read().result())
        x = torch.from_numpy(x).to(device)[None, None].float()
        if uint8:
            x = (x - 127.5) / 64.0
        y = run(x)[0][(slice(None),) + tuple(slice(a - r, b - r) for a, b, r in zip(lo, hi, r0))]
        out.write(y.half().cpu().numpy(), (0, *lo))
    return time.perf_counter() - t0


if __name__ == "__main__":
    xla.set_default_flags()  # the XLA flags `jaxem` commands run with, before JAX starts
    main()
