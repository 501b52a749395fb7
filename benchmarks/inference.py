"""Blockwise prediction overhead: tiling + IO + blending + writing vs the pure model forward.

    python benchmarks/inference.py --small          # seconds
    python benchmarks/inference.py --gib 0.02       # a few minutes on a 2-core CPU
    python benchmarks/inference.py --gib 1.0        # >= 1 GiB of float32 input (GPU machines)
    python benchmarks/inference.py --monai          # GPU: MONAI sliding_window_inference side by side (optional)

Prints JSON: the blockwise wall time; the forward time on the same number of tiles (measured
separately on pre-loaded in-memory batches, so it is the model's cost alone); the overhead
fraction (IO, normalisation, blending, writing, bookkeeping not hidden behind compute);
voxels/s; and two factors that multiply the model cost but are not overhead:
  halo_factor       voxels through the model per output voxel if every tile runs once:
                    tile_count * prod(block) / prod(volume) ~ prod(block / (block - 2 halo)).
                    It is the price of context at tile borders; larger blocks lower it.
  recompute_factor  tiles predicted / distinct tiles: > 1 when the capped tile cache evicted a
                    tile that a later chunk needed (see blockwise.plan).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--gib", type=float, default=1.0, help="input size in GiB of float32")
    parser.add_argument("--cache-tiles", type=int, default=None, help="tile cache cap in tiles (default: 2 GiB of tiles)")
    parser.add_argument("--read-cache-mib", type=int, default=256, help="decoded input chunk cache; 0 = none")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--monai", action="store_true")
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxem.data.volume import create_volume
    from jaxem.infer.blockwise import make_predict_fn, predict_volume
    from jaxem.infer.output import create_output
    from jaxem.infer.tiling import make_tiling

    class Net(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x, train=False):
            for _ in range(3):
                x = nn.relu(nn.Conv(self.width, (3, 3, 3))(x))
            return nn.Conv(1, (1, 1, 1))(x)

    block, halo = ((16, 32, 32), (2, 4, 4)) if args.small else ((32, 64, 64), (4, 8, 8))
    width = 4 if args.small else args.width
    voxels = 2**18 if args.small else int(args.gib * 2**30 / 4)
    side = int(round((voxels / 4) ** (1 / 3)))
    shape = (side, 2 * side, 2 * side)
    net = Net(width)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, *block, 1)))
    fn = make_predict_fn(lambda x: net.apply(variables, x), batch_size=2)
    with tempfile.TemporaryDirectory() as tmp:
        src = create_volume(f"{tmp}/in", shape, np.float32, (1.0, 1.0, 1.0), chunks=(32, 128, 128))
        for z in range(0, shape[0], 32):
            slab = np.random.default_rng(z).random((min(32, shape[0] - z), *shape[1:]), dtype=np.float32)
            src.write(slab, (z, 0, 0))
        tiling = make_tiling(shape, None, block, halo, blend="gaussian")
        out, _ = create_output(f"{tmp}/out.zarr", (1, *shape), np.float16, (1.0,) * 3, (1, *tiling.chunk), ("c", "z", "y", "x"), (0, 0, 0), {}, True)
        x = np.random.default_rng(0).random((fn.batch, *block, 1), dtype=np.float32)
        fn(x)  # compile
        batches = -(-tiling.tile_count() // fn.batch)
        before = time_forward(fn, x, batches // 2)  # half before and half after the blockwise run,
        t0 = time.perf_counter()                    # so slow drifts of the machine cancel
        stats = predict_volume(fn, src, out, tiling, out_dtype=np.float16, cache_tiles=args.cache_tiles,
                               read_cache_bytes=args.read_cache_mib << 20, progress=False)
        wall = time.perf_counter() - t0
        tiles = stats["tiles_predicted"]
        after = time_forward(fn, x, batches - batches // 2)
        forward = (before + after) * (-(-tiles // fn.batch)) / batches  # per batch, times the batches run
    result = {
        "shape": shape, "gib_input": float(np.prod(shape) * 4 / 2**30), "block": block, "halo": halo, "tiles": tiles,
        "blockwise_s": round(wall, 3), "forward_same_tiles_s": round(forward, 3),
        "forward_s_per_batch_before_after": [round(before / max(batches // 2, 1), 4), round(after / max(batches - batches // 2, 1), 4)],
        "overhead": round(wall / forward - 1, 4), "halo_factor": stats["halo_factor"],
        "recompute_factor": stats["recompute_factor"], "cache_tiles": stats["cache_tiles"], "peak_cached_tiles": stats["peak_cached_tiles"],
        "forward_in_loop_s": round(stats["forward_s"], 3),
        "voxels_per_s": round(float(np.prod(shape)) / wall), "device": str(jax.devices()[0].platform),
        "devices": jax.device_count(),
    }
    if args.monai:
        result["monai"] = monai_side_by_side(args.width, block)
    print(json.dumps(result))


def time_forward(fn, x, batches: int) -> float:
    """Seconds for `batches` forward passes on the pre-loaded batch `x`."""
    t0 = time.perf_counter()
    for _ in range(batches):
        fn(x)
    return time.perf_counter() - t0


def monai_side_by_side(width, block):
    """MONAI sliding_window_inference on a same-width torch net; needs torch + monai and a GPU."""
    try:
        import torch
        from monai.inferers import sliding_window_inference
    except ImportError:
        return "not measured: torch/monai not installed (optional)"
    net = torch.nn.Sequential(*[m for i in range(3) for m in (torch.nn.Conv3d(1 if i == 0 else width, width, 3, padding=1), torch.nn.ReLU())],
                              torch.nn.Conv3d(width, 1, 1)).cuda().eval()
    x = torch.rand(1, 1, 128, 256, 256, device="cuda")
    with torch.no_grad():
        sliding_window_inference(x, block, 4, net, overlap=0.25, mode="gaussian")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sliding_window_inference(x, block, 4, net, overlap=0.25, mode="gaussian")
        torch.cuda.synchronize()
    return {"voxels_per_s": round(x.numel() / (time.perf_counter() - t0))}


if __name__ == "__main__":
    main()
