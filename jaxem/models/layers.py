"""Building blocks shared by every model: norms, conv blocks, ASPP, per-level settings.

All layers work on channels-last arrays of any spatial rank: (B, *spatial, C) with 2 or 3
spatial axes. Kernel sizes, strides and dilations are tuples with one entry per spatial axis,
so anisotropic (1, 3, 3) levels and isotropic (3, 3, 3) levels use the same code. Parameters
are float32; `dtype` is the compute dtype (float32 or bfloat16).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxem.errors import UserError

NORMS = ("batch", "group", "instance", "layer", "none")
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "leaky_relu": lambda x: nn.leaky_relu(x, 0.01),
    "elu": nn.elu,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """Maps the config's dtype string to a jnp dtype."""
    if name not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def activation(name: str):
    """Maps the config's activation string to a function."""
    if name not in ACTIVATIONS:
        raise UserError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}.")
    return ACTIVATIONS[name]


def per_axis(value: int | Sequence[int], ndim: int, field: str) -> tuple[int, ...]:
    """An int (same on every axis) or an ndim-tuple -> ndim-tuple of ints."""
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise UserError(f"model.{field} entry {value} has {len(value)} axes, expected {ndim} (ndim={ndim}).")
    return value


def per_level(value: Sequence, n: int, ndim: int, default: int, field: str) -> tuple[tuple[int, ...], ...]:
    """Resolves a per-level setting to n tuples of ndim ints.

    `()` means `default` on every axis of every level, a 1-tuple repeats its entry at every level,
    otherwise there must be exactly n entries; each entry is an int or an ndim-tuple.
    """
    value = tuple(value)
    if not value:
        value = (default,)
    if len(value) == 1:
        value = value * n
    if len(value) != n:
        raise UserError(f"model.{field} has {len(value)} entries, expected {n} (one per level) or 1 or ().")
    return tuple(per_axis(v, ndim, field) for v in value)


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of `channels` that is <= `groups` (GroupNorm needs an exact split)."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


# ---------------------------------------------------------------- CPU fast paths for 3D convolutions
# XLA's CPU backend has fast 2D convolutions but a slow generic path for 3D ones (a 3x3x3 conv of
# 2 x 32x64x64 x 4 channels: 172 ms vs 14 ms as 2D convs; a 2x2x2 transposed conv of 16 channels:
# 550 ms vs 14 ms as a matmul). Transposed convs with kernel == stride run as a matmul plus a
# reshape everywhere; 3D convs of a model in conv form 'slices' run as a sum of 2D convs over z
# slices (one per z tap). `jaxem.models.build` picks the form once (`default_conv_form`: 'slices'
# on the CPU) and stores it in the modules' `conv_form` field. Same parameters and the same results
# up to float rounding.


CONV_FORMS = ("xla", "slices")  # how 3D convolutions run: XLA's own, or 2D convs per z tap


def default_conv_form() -> str:
    """'slices' on the CPU, 'xla' on accelerators: what `jaxem.models.build` gives a model."""
    return "slices" if jax.default_backend() == "cpu" else "xla"


def check_conv_form(form: str) -> str:
    """`form` when it is one of CONV_FORMS, else ValueError."""
    if form not in CONV_FORMS:
        raise ValueError(f"conv_form must be one of {', '.join(CONV_FORMS)}, got {form!r}")
    return form


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """lax's 'SAME' padding of one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, slices: bool = False):
    """`lax.conv_general_dilated` for flax's channels-last nn.Conv (lhs (B, *S, C), rhs (*K, C / groups, F)).

    A 1x1 convolution runs as a matmul on every backend (no layout changes around cuDNN on GPUs);
    with `slices` a 3D convolution runs as kz 2D convolutions over z slices (conv form 'slices')."""
    dilation = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
    plain = lhs_dilation is None or all(d == 1 for d in lhs_dilation)
    pointwise = all(k == 1 for k in rhs.shape[:-2]) and all(s == 1 for s in window_strides)
    if pointwise and plain and feature_group_count == 1 and padding in ("SAME", "VALID"):
        return jnp.einsum("...c,cf->...f", lhs, rhs.reshape(rhs.shape[-2:]), precision=precision)
    if lhs.ndim != 5 or not plain or not slices or (isinstance(padding, str) and padding not in ("SAME", "VALID")):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision)
    kz, sz, dz = rhs.shape[0], window_strides[0], dilation[0]
    if isinstance(padding, str):
        zpad = _same_pads(lhs.shape[1], kz, sz, dz) if padding == "SAME" else (0, 0)
        yx_pad = padding
    else:
        zpad, yx_pad = tuple(padding[0]), [tuple(p) for p in padding[1:]]
    x = jnp.pad(lhs, ((0, 0), zpad, (0, 0), (0, 0), (0, 0)))
    out_z = (x.shape[1] - (kz - 1) * dz - 1) // sz + 1
    if out_z <= 0:  # the kernel does not fit: XLA's empty result
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision)
    # Accumulate the taps in float32 whatever the compute dtype (XLA's CPU convs, the form's home,
    # output float32 from bfloat16 directly).
    total = None
    for i in range(kz):
        taps = x[:, i * dz: i * dz + (out_z - 1) * sz + 1: sz]
        y = jax.lax.conv_general_dilated(taps.reshape(-1, *taps.shape[2:]), rhs[i], window_strides[1:], yx_pad,
                                         rhs_dilation=dilation[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=feature_group_count, precision=precision,
                                         preferred_element_type=jnp.float32)
        y = y.astype(jnp.float32)
        total = y if total is None else total + y
    return total.astype(lhs.dtype).reshape(lhs.shape[0], out_z, *total.shape[1:])


def Conv(*args, conv_form: str = "xla", **kwargs) -> nn.Conv:
    """flax nn.Conv (same parameters) whose 3D convolutions take `conv_form` (CONV_FORMS)."""
    slices = check_conv_form(conv_form) == "slices"
    return nn.Conv(*args, conv_general_dilated=functools.partial(conv_general_dilated, slices=slices), **kwargs)


class UpConv(nn.Module):
    """Transposed convolution with kernel == stride = `factors` (each input voxel paints its own
    block of output voxels): (B, *S, C) -> (B, *S * factors, features). Parameters as flax's
    nn.ConvTranspose(features, factors, strides=factors): kernel (*factors, C, features), bias."""

    features: int
    factors: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.factors, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return _paint_blocks(x, kernel) + bias


def _paint_blocks(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_transpose(x, kernel, strides=kernel size, 'SAME')` as one matmul on every backend:
    output block (i, j, k) of input voxel (z, y, x) is x[z, y, x] @ kernel[-1 - i, -1 - j, -1 - k]
    (lax flips the kernel). As a convolution, its kernel gradient took 230 ms of a 290 ms 3D U-Net
    step on an H200 (cuDNN's fallback for a 2x2x2 window over the whole volume); as a matmul, <1 ms."""
    n = x.ndim - 2
    factors = kernel.shape[:n]
    flipped = kernel[(slice(None, None, -1),) * n].reshape(-1, *kernel.shape[n:])  # (prod(factors), C, F)
    y = jnp.einsum("...c,kcf->...kf", x, flipped).reshape(*x.shape[:-1], *factors, -1)
    # (B, S1..Sn, f1..fn, F) -> (B, S1, f1, ..., Sn, fn, F) -> (B, S1 f1, ..., Sn fn, F)
    order = [0] + [a for i in range(n) for a in (1 + i, 1 + n + i)] + [1 + 2 * n]
    return y.transpose(order).reshape(x.shape[0], *(s * f for s, f in zip(x.shape[1:-1], factors)), -1)


BATCH_NORM_MOMENTUM = 0.9  # running average = 0.9 * running + 0.1 * batch


class Norm(nn.Module):
    """Normalisation over channels-last features; batch statistics live in 'batch_stats'.

    kind: 'batch' (running averages, momentum 0.9), 'group' (`groups` groups), 'instance'
    (per channel over space), 'layer' (over channels at each voxel, as in ConvNeXt) or 'none'.
    Statistics are computed in float32 even when `dtype` is bfloat16.
    """

    kind: str = "group"
    groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.kind == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, dtype=self.dtype)(x)
        if self.kind == "group":
            return nn.GroupNorm(num_groups=group_count(x.shape[-1], self.groups), dtype=self.dtype)(x)
        if self.kind == "instance":
            return nn.GroupNorm(num_groups=None, group_size=1, dtype=self.dtype)(x)
        if self.kind == "layer":
            return nn.LayerNorm(dtype=self.dtype)(x)
        if self.kind == "none":
            return x
        raise UserError(f"model.norm must be one of {', '.join(NORMS)}, got {self.kind!r}.")


class ConvNormAct(nn.Module):
    """conv (SAME padding) -> norm -> activation. (B, *S, C) -> (B, *S / strides, features)."""

    features: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    use_act: bool = True
    dtype: Any = jnp.float32
    conv_form: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, self.kernel, strides=self.strides, kernel_dilation=self.dilation,
                 padding="SAME", use_bias=self.norm == "none", dtype=self.dtype, conv_form=self.conv_form)(x)
        x = Norm(self.norm, self.groups, self.dtype)(x, train)
        return activation(self.act)(x) if self.use_act else x


class ConvBlock(nn.Module):
    """`convs` ConvNormAct layers at one resolution; residual adds a (projected) shortcut.

    (B, *S, C) -> (B, *S, features). The residual form is conv-norm-act ... conv-norm, plus the
    input (1x1 conv + norm where the width changes), then the activation (ResNet v1 / V-Net style).
    """

    features: int
    kernel: tuple[int, ...]
    convs: int = 2
    residual: bool = False
    dilation: tuple[int, ...] | None = None
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    dtype: Any = jnp.float32
    conv_form: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = x
        for i in range(self.convs):
            last = i == self.convs - 1
            y = ConvNormAct(self.features, self.kernel, dilation=self.dilation, norm=self.norm,
                            groups=self.groups, act=self.act, use_act=not (self.residual and last),
                            dtype=self.dtype, conv_form=self.conv_form)(y, train)
        if not self.residual:
            return y
        if x.shape[-1] != self.features:
            x = ConvNormAct(self.features, (1,) * (x.ndim - 2), norm=self.norm, groups=self.groups,
                            use_act=False, dtype=self.dtype, conv_form=self.conv_form)(x, train)
        return activation(self.act)(x + y)


def dilate(kernel: tuple[int, ...], rate: int) -> tuple[int, ...]:
    """Dilation `rate` on the axes the kernel spans (none on axes with kernel size 1)."""
    return tuple(rate if k > 1 else 1 for k in kernel)


class DilatedBottleneck(nn.Module):
    """Residual stack of dilated convs, one per rate, to widen the receptive field (B, *S, C)."""

    kernel: tuple[int, ...]
    rates: tuple[int, ...] = (2, 4)
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    dtype: Any = jnp.float32
    conv_form: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for rate in self.rates:
            x = x + ConvNormAct(x.shape[-1], self.kernel, dilation=dilate(self.kernel, rate), norm=self.norm,
                                groups=self.groups, act=self.act, dtype=self.dtype, conv_form=self.conv_form)(x, train)
        return x


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3): 1x1, dilated convs per rate and a global-pool
    branch, concatenated and projected back. (B, *S, C) -> (B, *S, C)."""

    kernel: tuple[int, ...]
    rates: tuple[int, ...] = (2, 4)
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    dtype: Any = jnp.float32
    conv_form: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width, ones = x.shape[-1], (1,) * (x.ndim - 2)
        kw = dict(norm=self.norm, groups=self.groups, act=self.act, dtype=self.dtype, conv_form=self.conv_form)
        branches = [ConvNormAct(width, ones, **kw)(x, train)]
        for rate in self.rates:
            branches.append(ConvNormAct(width, self.kernel, dilation=dilate(self.kernel, rate), **kw)(x, train))
        # Image-level branch: norms over a single voxel are degenerate, so conv + activation only.
        pooled = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
        pooled = activation(self.act)(Conv(width, ones, dtype=self.dtype)(pooled))
        branches.append(jnp.broadcast_to(pooled, x.shape[:-1] + (width,)))
        return ConvNormAct(width, ones, **kw)(jnp.concatenate(branches, axis=-1), train)


def max_pool(x: jax.Array, factors: tuple[int, ...]) -> jax.Array:
    """Max pooling with window = stride = factors. (B, *S, C) -> (B, *S / factors, C)."""
    factors = tuple(int(f) for f in factors)
    if all(f == 1 for f in factors):
        return x
    if any(n % f for n, f in zip(x.shape[1:-1], factors)):  # floor like lax's reduce_window
        return nn.max_pool(x, factors, strides=factors)
    return _window_max(x, factors)


def _windows(x: jax.Array, factors: tuple[int, ...]) -> jax.Array:
    """(B, *S, C) -> (B, S0/f0, f0, S1/f1, f1, ..., C): a free reshape that puts each window
    offset on its own axis, channels still last."""
    split = [x.shape[0]]
    for size, f in zip(x.shape[1:-1], factors):
        split += [size // f, f]
    return x.reshape(*split, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_max(x: jax.Array, factors: tuple[int, ...]) -> jax.Array:
    """The pooled max; its gradient goes to each window's first maximum (in C order of offsets).

    Written as an elementwise max over the prod(factors) strided slices and, backwards, one
    broadcast compare: both keep channels last and fuse into single loops. XLA's reduce_window
    gradient (select-and-scatter) was 8.6x slower on the CPU, and a max over a transposed window
    axis spent 10 % of the 3D U-Net step on an H100 (docs/models.md). Not jnp.max's own gradient
    either: that finds the maxima by comparing the input with the output, and where XLA computes
    the input twice (fused into both uses) and the copies differ in the last bit, nothing matches
    and the gradient is 0 / 0 = NaN (seen on CPUs at optimisation level 0)."""
    return _window_max_fwd(x, factors)[0]


def _window_max_fwd(x, factors):
    windows = _windows(x, factors)
    best = first = None
    for k, offset in enumerate(itertools.product(*map(range, factors))):
        value = windows[(slice(None),) + sum(((slice(None), o) for o in offset), ()) + (slice(None),)]
        if best is None:
            best, first = value, jnp.zeros(value.shape, jnp.int8 if math.prod(factors) < 128 else jnp.int32)
            continue
        better = (value > best) | jnp.isnan(value)  # NaN propagates, as in jnp.max
        best, first = jnp.where(better, value, best), jnp.where(better, jnp.asarray(k, first.dtype), first)
    return best, first


def _window_max_bwd(factors, first, g):
    n = len(factors)
    offset_axes = tuple(range(2, 2 * n + 1, 2))
    codes = np.arange(math.prod(factors)).reshape([1] + sum(([1, f] for f in factors), []) + [1])
    chosen = jnp.expand_dims(first, offset_axes) == codes
    grad = jnp.where(chosen, jnp.expand_dims(g, offset_axes), jnp.zeros((), g.dtype))
    spatial = [s * f for s, f in zip(g.shape[1:-1], factors)]
    return (grad.reshape(g.shape[0], *spatial, g.shape[-1]),)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def maybe_remat(module_cls, remat: bool):
    """`nn.remat(module_cls)` (recompute activations in the backward pass) when `remat` is set.

    The wrapped module must take `(x, train)`; `train` is static (argnum 2 counts `self`).
    """
    return nn.remat(module_cls, static_argnums=(2,)) if remat else module_cls


def prod(values: Sequence[int]) -> int:
    return math.prod(values)


# ---------------------------------------------------------------- geometry of pooled encoders (U-Net, ResNet)


def check_ndim(ndim: int) -> int:
    """`ndim` when it is 2 or 3, else UserError naming model.ndim."""
    if ndim not in (2, 3):
        raise UserError(f"model.ndim must be 2 or 3, got {ndim!r}.")
    return ndim


def pool_factors(cfg) -> tuple[tuple[int, ...], ...]:
    """The resolved per-transition pooling factors of a model config with `widths`, `pool_factors`
    and `ndim`: len(widths) - 1 tuples of ndim ints."""
    n = len(cfg.widths) - 1
    if n == 0:
        return ()
    return per_level(cfg.pool_factors, n, check_ndim(cfg.ndim), 2, "pool_factors")


def pooled_input_divisor(cfg) -> tuple[int, ...]:
    """Per axis, the product of the pooling factors: every input size must be a multiple."""
    divisor = [1] * check_ndim(cfg.ndim)
    for factors in pool_factors(cfg):
        divisor = [d * f for d, f in zip(divisor, factors)]
    return tuple(divisor)


def pooling_reason(cfg) -> str:
    """Why input sizes must be multiples of `pooled_input_divisor(cfg)`, for error messages."""
    pools, divisor = pool_factors(cfg), pooled_input_divisor(cfg)
    if len(set(pools)) == 1:
        return f"cannot pass {len(pools)} poolings by {pools[0]}"
    return f"cannot pass poolings {', '.join(map(str, pools))} (sizes must be multiples of {divisor})"
