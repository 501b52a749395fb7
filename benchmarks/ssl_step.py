"""Self-supervised pretraining step throughput (MoCo v2 / SimCLR / DenseCL), beside the supervised
step of the same U-Net: what contrastive pretraining costs per crop on this machine.

    python benchmarks/ssl_step.py                          # configs/pretrain.py: 2D, MoCo and SimCLR
    python benchmarks/ssl_step.py --config pretrain:3d --steps 5
    python benchmarks/ssl_step.py --small                  # a smoke run (tiny sizes)
    python benchmarks/ssl_step.py --methods moco densecl   # any of moco, simclr, densecl

One step is what `jaxem pretrain` runs: two views per crop (random resized crop + augmentation) on
device, encoder + projection forward/backward (SimCLR on both views, MoCo on one plus a key-encoder
forward on the other; DenseCL adds its dense head, matching and dense loss), the optimizer update,
MoCo's momentum update and enqueue; jitted over all devices on random crops already on device.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import ml_collections

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxem import xla  # noqa: E402


def time_steps(step, state, batch, steps: int) -> tuple[float, object]:
    """Seconds per step after one warm-up (compile) step."""
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps, state


def config_spec(base: str, *options: str) -> str:
    """`base` (FILE[:ARGS]) with more comma-separated ARGS: config_spec('pretrain:3d', 'moco')."""
    name, _, arg = base.partition(":")
    args = [a for a in arg.split(",") if a] + [o for o in options if o]
    return name + (":" + ",".join(args) if args else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pretrain")
    parser.add_argument("--methods", nargs="+", default=["moco", "simclr"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="tiny sizes (checks the script)")
    args, overrides = parser.parse_known_args()

    from jaxem.config import apply_overrides, load_config
    from jaxem.ssl.pretrain import build_pretraining
    from jaxem.train import parallel
    from jaxem.train.trainer import build_training

    mesh = parallel.make_mesh(0)
    sharding = parallel.data_sharding(mesh)
    results = []
    for method in args.methods:
        config = apply_overrides(load_config(config_spec(args.config, method, "tiny" if args.small else "")), overrides)
        shape = (config.data.batch_size, *config.data.crop_shape, 1)
        image = jax.device_put(jax.random.normal(jax.random.key(0), shape), sharding)
        state, step = build_pretraining(config, mesh)
        seconds, _ = time_steps(step, state, {"image": image}, args.steps)
        voxels = config.data.batch_size * math.prod(config.data.crop_shape)
        results.append({"method": method, "ndim": config.model.ndim, "batch": config.data.batch_size,
                        "crop": list(config.data.crop_shape), "widths": list(config.model.widths),
                        "step_s": seconds, "crops_per_s": config.data.batch_size / seconds,
                        "voxels_per_s": voxels / seconds})
    # The supervised step of the same U-Net on the same crops (boundary target, the loop's step).
    supervised = ml_collections.ConfigDict(config.to_dict())
    del supervised["ssl"]
    _, state, step, _ = build_training(supervised, mesh)
    batch = {"image": image, "labels": jax.device_put(jax.numpy.ones(shape[:-1], jax.numpy.int32), sharding),
             "mask": jax.device_put(jax.numpy.ones(shape[:-1]), sharding)}
    seconds, _ = time_steps(step, state, batch, args.steps)
    results.append({"method": "supervised", "ndim": supervised.model.ndim, "batch": supervised.data.batch_size,
                    "crop": list(supervised.data.crop_shape), "step_s": seconds,
                    "crops_per_s": supervised.data.batch_size / seconds})
    print(json.dumps({"benchmark": "ssl_step", "config": args.config, "overrides": overrides, "steps": args.steps,
                      "results": results,
                      "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()],
                                  "device_kind": jax.devices()[0].device_kind}}, indent=2))


if __name__ == "__main__":
    xla.set_default_flags()  # the XLA flags `jaxem` commands run with, before JAX starts
    main()
