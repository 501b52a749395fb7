"""Parameter counts and FLOPs (from XLA's cost analysis) for the model table in docs/models.md.

    python -m jaxem.models.flops            # prints the Markdown table docs/models.md shows

FLOPs are what XLA's cost analysis of the compiled function reports (a multiply-add counts 2;
zero padding is not counted), for the forward pass in inference mode, divided by the number of
input voxels. Compiling is enough: nothing is run, so realistic sizes cost only compile time.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxem import models


def count_params(variables: Any) -> int:
    """Number of scalars in the 'params' collection."""
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(variables["params"])))


def xla_flops(fn, *args) -> float:
    """FLOPs of jax.jit(fn)(*args) from XLA's cost analysis (args may be ShapeDtypeStructs)."""
    return cost_flops(jax.jit(fn).lower(*args).compile().cost_analysis())


def cost_flops(cost) -> float | None:
    """The 'flops' entry of a lowered or compiled function's cost_analysis() (None where the
    backend reports none)."""
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_flops(fn, *args) -> float:
    """Multiply-add FLOPs (2 per MAC) of every convolution and dot product in jax.make_jaxpr(fn)(*args),
    sub-computations (jit, remat, custom derivatives, scans) included: the "model FLOPs" of MFU.

    Unlike XLA's cost analysis this is the same on every backend (on GPUs XLA hands convolutions to
    cuDNN and its cost analysis leaves them out). Only taps that meet a real input element count:
    not those on zero padding, nor on zeros inserted by input dilation (gradients of strided and
    transposed convolutions). Count a model built with conv_form='xla' (`models.build(cfg, 'xla')`):
    the 'slices' form pads z explicitly, and taps on that padding would count.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif eqn.primitive.name == "dot_general":
            lhs = eqn.invars[0].aval
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs.shape[d] for d in contract])
        repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeats * _jaxpr_flops(sub)
    return total


def _conv_flops(eqn) -> float:
    """2 x batch x out features x in features per group x (output, tap) pairs that meet real input."""
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    pairs = 1.0
    for i in range(len(lhs_spec) - 2):
        n_in, k, n_out = lhs.shape[lhs_spec[2 + i]], rhs.shape[rhs_spec[2 + i]], out.shape[out_spec[2 + i]]
        pos = (np.arange(n_out)[:, None] * p["window_strides"][i] - p["padding"][i][0]
               + np.arange(k)[None, :] * p["rhs_dilation"][i])
        dil = p["lhs_dilation"][i]
        pairs *= np.count_nonzero((pos >= 0) & (pos <= (n_in - 1) * dil) & (pos % dil == 0))
    return 2.0 * out.shape[out_spec[0]] * out.shape[out_spec[1]] * rhs.shape[rhs_spec[1]] * pairs


def model_cost(cfg: ml_collections.ConfigDict, spatial: Sequence[int], batch: int = 1,
               in_channels: int = 1) -> dict:
    """{'params', 'flops', 'flops_per_voxel'} of the inference forward pass at (batch, *spatial)."""
    model = models.build(cfg, conv_form="xla")  # the model's own convolutions, not the CPU's 2D-slice form
    x = jax.ShapeDtypeStruct((batch, *spatial, in_channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    flops = xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
    voxels = batch * int(np.prod(spatial))
    return {"params": count_params(variables), "flops": flops, "flops_per_voxel": flops / voxels}


def preset(name: str) -> tuple[ml_collections.ConfigDict, tuple[int, ...]]:
    """Named reference models with their stated input size (also used by benchmarks/models.py)."""
    def cfg(model, ndim, **fields):
        c = models.default_config(model, ndim)
        c.update(fields)
        return c

    aniso = dict(widths=(32, 64, 128, 256), kernel_sizes=((1, 3, 3), (1, 3, 3), 3, 3),
                 pool_factors=((1, 2, 2), (1, 2, 2), 2))
    table = {
        "unet2d": (cfg("unet", 2, widths=(32, 64, 128, 256, 512)), (512, 512)),
        "unet2d_demo": (cfg("unet", 2, widths=(16, 32, 64, 128)), (256, 256)),
        "unet3d": (cfg("unet", 3, widths=(32, 64, 128, 256)), (64, 128, 128)),
        "unet3d_wide": (cfg("unet", 3, widths=(64, 128, 256, 512)), (64, 128, 128)),
        "unet3d_aniso": (cfg("unet", 3, **aniso), (32, 128, 128)),
        "unet3d_residual_aspp": (cfg("unet", 3, block="residual", bottleneck="aspp", widths=(32, 64, 128, 256)),
                                 (64, 128, 128)),
        "resnet18_2d": (cfg("resnet", 2), (256, 256)),
        "resnet50_2d": (cfg("resnet", 2, depth=50), (256, 256)),
        "resnet18_3d": (cfg("resnet", 3, widths=(32, 64, 128, 256)), (64, 64, 64)),
        "unet3d_resnet18": (cfg("unet", 3, encoder="resnet", widths=(32, 64, 128, 256)), (64, 128, 128)),
        "vit_small_2d": (cfg("vit", 2, size="small"), (512, 512)),
        "vit_base_3d": (cfg("vit", 3, size="base"), (96, 96, 96)),
        "unetr_base_3d": (cfg("unetr", 3, size="base"), (96, 96, 96)),
    }
    return table[name]


PRESETS = ("unet2d", "unet2d_demo", "unet3d", "unet3d_wide", "unet3d_aniso", "unet3d_residual_aspp", "resnet18_2d",
           "resnet50_2d", "resnet18_3d", "unet3d_resnet18", "vit_small_2d", "vit_base_3d", "unetr_base_3d")


def markdown_table(names: Sequence[str] = PRESETS) -> str:
    """The docs/models.md table: model, input, parameters, forward GFLOPs, FLOPs per voxel."""
    rows = ["| preset | model | input (B=1) | parameters | forward GFLOP | FLOPs / voxel |",
            "|---|---|---|---:|---:|---:|"]
    for name in names:
        cfg, spatial = preset(name)
        cost = model_cost(cfg, spatial)
        rows.append(f"| {name} | {cfg.name} {cfg.ndim}D | {'x'.join(map(str, spatial))} | "
                    f"{cost['params']:,} | {cost['flops'] / 1e9:,.1f} | {cost['flops_per_voxel']:,.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table(sys.argv[1:] or PRESETS))
