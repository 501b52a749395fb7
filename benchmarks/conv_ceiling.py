"""What one 3D convolution reaches on this chip: the ceiling a 3D U-Net's MFU is measured against.

    python benchmarks/conv_ceiling.py                 # the 3D U-Net's levels at 2 x 64x128x128
    python benchmarks/conv_ceiling.py --small         # a CPU smoke run

For each level of the reference 3D U-Net (widths 32-64-128-256, input halved per level) times a
3x3x3 'SAME' convolution width -> width in bfloat16 with its input and kernel gradients (what a
training step runs per conv: 3 convolutions), channels-last as flax lays them out. FLOPs are
counted by hand (2 * 27 * Cin * Cout per output voxel, 3 passes), so the MFU is the convolution
library's, free of everything else the model does. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxem import xla

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.models import peak_flops  # noqa: E402


def conv_step(x, w):
    """Forward 3x3x3 conv and both gradients of sum(y * y) / 2: (B, Z, Y, X, C) -> scalar, dx, dw."""
    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))  # bf16 out, as in the models
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


def time_level(batch: int, spatial: tuple[int, ...], width: int, dtype, steps: int) -> dict:
    key = jax.random.key(width)
    x = jax.random.normal(key, (batch, *spatial, width), dtype)
    w = (jax.random.normal(key, (3, 3, 3, width, width), jnp.float32) / (27 * width) ** 0.5).astype(dtype)
    step = jax.jit(conv_step)
    jax.block_until_ready(step(x, w))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step(x, w)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / steps
    voxels = batch * spatial[0] * spatial[1] * spatial[2]
    flop = 3 * 2 * 27 * width * width * voxels
    peak = peak_flops(jax.devices()[0])
    return {"input": [batch, *spatial, width], "seconds": seconds, "tflops": flop / seconds / 1e12,
            "mfu": flop / seconds / peak if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    batch, spatial, widths = (1, (8, 16, 16), (4, 8)) if args.small else (2, (64, 128, 128), (32, 64, 128, 256))
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    levels = []
    for level, width in enumerate(widths):
        shape = tuple(s >> level for s in spatial)
        levels.append(dict(level=level, **time_level(batch, shape, width, dtype, args.steps)))
        print(json.dumps(levels[-1]), flush=True, file=__import__("sys").stderr)
    device = jax.devices()[0]
    print(json.dumps({"benchmark": "conv_ceiling", "device": device.device_kind, "host": platform.node(),
                      "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "levels": levels}, indent=2))


if __name__ == "__main__":
    xla.set_default_flags()  # the XLA flags `jaxem` commands run with, before JAX starts
    main()
