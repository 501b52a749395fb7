"""Input-pipeline overhead: demo training with the real tensorstore/grain loader vs one in-memory batch.

    python benchmarks/pipeline_overhead.py [--steps 60] [--workers 0] [--config demo] [--config.x=y ...]

Both runs execute the same jitted train step (augmentation and targets on device); the in-memory
run reuses one device-resident batch, so the difference is what reading crops costs the step.
Goal: the real pipeline costs at most 5% of step time. Prints JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def timed_steps(step_fn, state, next_batch, steps: int):
    """Seconds per step over `steps` steps after two warm-up (compile) steps."""
    import jax

    for _ in range(2):
        state, metrics = step_fn(state, next_batch())
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, next_batch())
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--config", default="demo")
    args, overrides = parser.parse_known_args()

    import jax

    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.config import apply_overrides, load_config
    from jaxem.data import pipeline
    from jaxem.train import parallel
    from jaxem.train.trainer import build_training

    config = apply_overrides(load_config(args.config), overrides + [f"--config.data.num_workers={args.workers}"])
    with tempfile.TemporaryDirectory() as tmp:
        config = with_data_paths(config, write_synthetic_data(config, Path(tmp)))
        mesh = parallel.make_mesh(config.train.num_devices)
        _, state, train_step, _ = build_training(config, mesh)
        loader = pipeline.make_loader(config.data, mesh=mesh, ndim=config.model.ndim, seed=config.seed)
        fixed = next(loader)
        state, in_memory = timed_steps(train_step, state, lambda: fixed, args.steps)
        state, real = timed_steps(train_step, state, lambda: next(loader), args.steps)
        loader.close()
    print(json.dumps({
        "benchmark": "pipeline_overhead", "config": args.config, "overrides": overrides, "workers": args.workers,
        "batch_size": config.data.batch_size, "crop_shape": list(config.data.crop_shape), "steps": args.steps,
        "seconds_per_step_in_memory": in_memory, "seconds_per_step_real_pipeline": real,
        "overhead_fraction": real / in_memory - 1.0,
        "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]},
    }, indent=2))


if __name__ == "__main__":
    main()
