"""Training-step throughput of the model zoo: voxels/s, FLOPs, and MFU on accelerators.

    python benchmarks/models.py --small                       # a smoke run: under a minute on a CPU
    python benchmarks/models.py                                # realistic patches (GPU/TPU)
    python benchmarks/models.py --models unet3d --batch 2 --dtype bfloat16 --remat
    python benchmarks/models.py --models unet3d --set norm=none    # what the norm layers cost

One step = forward + backward of a BCE loss + an SGD update, jitted, on a random batch. Model FLOPs
are the multiply-adds of the step's convolutions and matmuls counted from its jaxpr
(`flops.matmul_flops`: the same on every backend; XLA's cost analysis, also reported, leaves out
the convolutions it hands to cuDNN on GPUs); MFU = model FLOPs / step time / the chip's peak dense
bf16 FLOP/s (table below, by jax device_kind). Prints one JSON object with a record per model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxem import xla
from jaxem import models
from jaxem.models import flops

# Peak dense (no sparsity) bf16 FLOP/s by device_kind substring, from vendor spec sheets.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100": 989e12,          # SXM / HBM3
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,          # fp16 tensor cores (no bf16)
    "T4": 65e12,             # fp16
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}

# name -> (preset, realistic batch); --small replaces sizes with tiny ones.
MODELS = {
    "unet2d": ("unet2d", 8),
    "unet2d_demo": ("unet2d_demo", 4),
    "unet3d": ("unet3d", 2),
    "unet3d_wide": ("unet3d_wide", 2),
    "unet3d_aniso": ("unet3d_aniso", 2),
    "unet3d_resnet18": ("unet3d_resnet18", 2),
    "resnet50_2d": ("resnet50_2d", 32),
    "vit_base_3d": ("vit_base_3d", 2),
    "unetr_base_3d": ("unetr_base_3d", 2),
}
SMALL = {  # fields and input sizes for --small
    "unet": (dict(widths=(4, 8, 16), resnet_blocks=(1, 1, 1)), {2: (32, 32), 3: (4, 16, 16)}),
    "resnet": (dict(widths=(4, 8), blocks=(1, 1)), {2: (32, 32), 3: (4, 16, 16)}),
    "vit": (dict(hidden=32, depth=1, heads=2), {2: (32, 32), 3: (16, 16, 16)}),
    "unetr": (dict(hidden=32, depth=1, heads=2, feature_size=4), {2: (32, 32), 3: (16, 16, 16)}),
}


# --convs: how 3D convolutions run. auto: XLA's (cuDNN) on accelerators, 2D slices on CPUs.
CONVS = {"auto": None, "xla": "xla", "slices": "slices"}  # -> models.build(cfg, conv_form)


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (None for CPUs and unknown chips)."""
    kind = device.device_kind
    for key, peak in PEAK_BF16.items():
        if key.lower() in kind.lower():
            return peak
    return None


def config_for(name: str, small: bool, dtype: str, remat: bool, fields: dict | None = None):
    cfg, spatial = flops.preset(MODELS[name][0])
    cfg.update(fields or {})
    batch = MODELS[name][1]
    if small:
        fields, shapes = SMALL[cfg.name]
        cfg.update(fields)
        if cfg.name == "unet" and cfg.kernel_sizes:
            cfg.kernel_sizes, cfg.pool_factors = cfg.kernel_sizes[-3:], cfg.pool_factors[-2:]
        spatial, batch = shapes[cfg.ndim], 2
    cfg.dtype, cfg.remat = dtype, remat
    return cfg, tuple(spatial), batch


def make_step(model, tx):
    """(params, stats, opt_state, x, y) -> same, loss: one SGD step of BCE on the main output."""
    def loss_fn(params, stats, x, y):
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        logits, _ = out
        return optax.sigmoid_binary_cross_entropy(logits, y).mean(), updates.get("batch_stats", stats)

    def step(params, stats, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss
    return step


def training_setup(cfg, spatial: tuple[int, ...], batch: int, conv_form: str | None = None):
    """(jitted step, step function, args): the jitted training step of `cfg`'s model (3D convs in
    `conv_form`; None: the backend's default) and its arguments (params, stats, opt_state,
    x (batch, *spatial, 1), y random 0/1 targets shaped like the output)."""
    model = models.build(cfg, conv_form)
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, *spatial, 1), jnp.float32)
    variables = jax.jit(lambda x: model.init(key, x, train=False))(x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    out = out[0]  # targets shaped like the main output
    y = (jax.random.uniform(key, out.shape) > 0.5).astype(jnp.float32)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(1e-3, momentum=0.9)
    step_fn = make_step(model, tx)
    return jax.jit(step_fn, donate_argnums=(0, 1, 2)), step_fn, (params, stats, tx.init(params), x, y)


def bench(name: str, small: bool, dtype: str, remat: bool, steps: int, batch: int | None, fields: dict | None = None,
          convs: str = "auto") -> dict:
    cfg, spatial, default_batch = config_for(name, small, dtype, remat, fields)
    batch = batch or default_batch
    step, _, (params, stats, opt_state, x, y) = training_setup(cfg, spatial, batch, CONVS[convs])
    xla_step_fn = make_step(models.build(cfg, conv_form="xla"), optax.sgd(1e-3, momentum=0.9))
    model_flops = flops.matmul_flops(xla_step_fn, params, stats, opt_state, x, y)  # the model's own convs
    t0 = time.perf_counter()
    # --small is a smoke run: XLA's CPU backend would spend minutes optimising 8 tiny models.
    options = {"xla_backend_optimization_level": 0} if small and jax.devices()[0].platform == "cpu" else None
    lowered = step.lower(params, stats, opt_state, x, y)
    compiled = lowered.compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    step_flops = flops.cost_flops(compiled.cost_analysis())
    traced_flops = flops.cost_flops(lowered.cost_analysis())  # before XLA's rewrites (a cross-check on GPUs)
    params, stats, opt_state, loss = compiled(params, stats, opt_state, x, y)  # warm-up
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        params, stats, opt_state, loss = compiled(params, stats, opt_state, x, y)
    jax.block_until_ready((params, loss))
    step_s = (time.perf_counter() - t0) / steps
    voxels = batch * int(np.prod(spatial))
    peak = peak_flops(jax.devices()[0])
    return {
        "model": name, "convs": convs, "config": cfg.name, "ndim": cfg.ndim, "input": [batch, *spatial], "dtype": dtype,
        "remat": remat, "params": flops.count_params({"params": params}), "step_s": step_s,
        "voxels_per_s": voxels / step_s, "model_flops": model_flops, "model_flops_per_voxel": model_flops / voxels,
        "achieved_flops_per_s": model_flops / step_s, "mfu": (model_flops / step_s / peak) if peak else None,
        "xla_step_flops": step_flops, "xla_traced_step_flops": traced_flops, "compile_s": compile_s,
        "loss": float(loss),
    }


def parse_field(text: str) -> tuple[str, object]:
    """'norm=none' -> ('norm', 'none'); values are Python literals where they parse as one."""
    import ast

    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny widths and inputs, unoptimised CPU compiles: a smoke run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, 3 with --small)")
    parser.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a model config field for every model, e.g. --set norm=none (repeatable)")
    parser.add_argument("--convs", default="auto", choices=list(CONVS),
                        help="3D convolutions as XLA's convs, or as 2D convs per z tap (the CPU default)")
    args = parser.parse_args()
    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    steps = args.steps or (2 if args.small else 20)
    fields = dict(parse_field(f) for f in args.set)
    results = [dict(bench(m, args.small, dtype, args.remat, steps, args.batch, fields, args.convs), set=fields)
               for m in args.models]
    print(json.dumps({
        "benchmark": "models", "device": device.device_kind, "platform": device.platform,
        "devices": jax.device_count(), "host": platform.node(), "jax": jax.__version__,
        "peak_bf16_flops_per_s": peak_flops(device), "small": args.small, "results": results,
    }, indent=2))


if __name__ == "__main__":
    xla.set_default_flags()  # the XLA flags `jaxem` commands run with, before JAX starts
    main()
