"""One U-Net for 2D and 3D EM, with per-level widths, kernels and pooling factors.

Levels run fine to coarse. Level i has `widths[i]` channels and `kernel_sizes[i]`; between level
i and i+1 the features are pooled by `pool_factors[i]` per axis. Anisotropic serial-section EM
(DeepEM3D-style hybrid 2D-3D) is a 3D U-Net whose first levels use kernels (1, 3, 3) and pooling
(1, 2, 2) and whose deeper levels are isotropic. The encoder is a submodule named 'encoder'
(a plain/residual conv encoder, or the ResNet of resnet.py) so pretrained encoders copy in.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxem.errors import UserError
from jaxem.models import layers, resnet
from jaxem.models.heads import SegmentationHead


class ConvEncoder(nn.Module):
    """U-Net encoder: level i = (max-pool by pool_factors[i-1] if i > 0) -> ConvBlock(widths[i]).

    (B, *S, C) -> list of features per level, fine to coarse, level i of shape
    (B, *S / prod(pool_factors[:i]), widths[i]).
    """

    widths: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    pool_factors: tuple[tuple[int, ...], ...]
    convs: int = 2
    residual: bool = False
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    dtype: Any = jnp.float32
    remat: bool = False
    conv_form: str = "xla"  # how 3D convs run (layers.CONV_FORMS); models.build picks it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        block = layers.maybe_remat(layers.ConvBlock, self.remat)
        features = []
        for i, (width, kernel) in enumerate(zip(self.widths, self.kernel_sizes)):
            if i > 0:
                x = layers.max_pool(x, self.pool_factors[i - 1])
            x = block(width, kernel, self.convs, self.residual, norm=self.norm, groups=self.groups,
                      act=self.act, dtype=self.dtype, conv_form=self.conv_form, name=f"level{i}")(x, train)
            features.append(x)
        return features


class UNet(nn.Module):
    """U-Net: encoder -> optional dilated/ASPP bottleneck -> decoder with skips -> 1x1 head.

    __call__(x (B, *S, C_in) float32, train) -> (logits (B, *S, out_channels) float32, aux dict);
    with deep_supervision aux["deep_supervision"] lists the aux logits at decoder levels 1..n-2,
    fine to coarse, each of the spatial shape of its level; otherwise aux is {}. S must be divisible by the product of
    pool_factors per axis (see jaxem.models.check_input_shape).
    """

    encoder: nn.Module
    ndim: int
    out_channels: int
    widths: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    pool_factors: tuple[tuple[int, ...], ...]
    convs: int = 2
    residual: bool = False
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    bottleneck: str = "none"
    dilations: tuple[int, ...] = (2, 4)
    deep_supervision: bool = False
    dtype: Any = jnp.float32
    remat: bool = False
    conv_form: str = "xla"  # how 3D convs run (layers.CONV_FORMS); models.build picks it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        features = self.encoder(x.astype(self.dtype), train)
        kw = dict(norm=self.norm, groups=self.groups, act=self.act, dtype=self.dtype, conv_form=self.conv_form)
        y = self._bottleneck(features[-1], train, kw)
        block = layers.maybe_remat(layers.ConvBlock, self.remat)
        aux = []
        for i in reversed(range(len(self.widths) - 1)):
            factors = self.pool_factors[i]
            y = layers.UpConv(self.widths[i], factors, dtype=self.dtype, name=f"up{i}")(y)
            y = jnp.concatenate([features[i], y], axis=-1)
            y = block(self.widths[i], self.kernel_sizes[i], self.convs, self.residual, **kw, name=f"dec{i}")(y, train)
            if self.deep_supervision and 0 < i:
                aux.append(SegmentationHead(self.out_channels, self.dtype, name=f"aux{i}")(y))
        logits = SegmentationHead(self.out_channels, self.dtype, name="head")(y)
        return logits, ({"deep_supervision": aux[::-1]} if self.deep_supervision else {})

    def _bottleneck(self, y: jax.Array, train: bool, kw: dict) -> jax.Array:
        kernel = self.kernel_sizes[-1]
        if self.bottleneck == "dilated":
            return layers.DilatedBottleneck(kernel, self.dilations, **kw, name="bottleneck")(y, train)
        if self.bottleneck == "aspp":
            return layers.ASPP(kernel, self.dilations, **kw, name="bottleneck")(y, train)
        return y


def default_config(ndim: int) -> ml_collections.ConfigDict:
    """Every field of the U-Net; `()` for kernel_sizes/pool_factors means 3 and 2 on every axis."""
    return ml_collections.ConfigDict(dict(
        name="unet",
        ndim=ndim,
        out_channels=1,
        widths=(16, 32, 64, 128),
        kernel_sizes=(),    # per level: int or ndim-tuple; () = 3 everywhere; (k,) = k at every level
        pool_factors=(),    # per level transition (len(widths) - 1); () = 2 everywhere
        convs_per_block=2,
        block="plain",      # 'plain' | 'residual'
        norm="group",       # 'batch' | 'group' | 'instance' | 'layer' | 'none'
        groups=8,           # GroupNorm groups (clipped to a divisor of the width)
        activation="relu",
        bottleneck="none",  # 'none' | 'dilated' | 'aspp'
        dilations=(2, 4),   # rates of the dilated / ASPP bottleneck
        deep_supervision=False,
        encoder="conv",     # 'conv' | 'resnet' (ResNet encoder, transferable from the 'resnet' model)
        resnet_depth=18,    # 18 | 34 | 50 when encoder == 'resnet'
        resnet_blocks=(),   # blocks per level; () = the depth's standard counts
        dtype="float32",    # compute dtype: 'float32' | 'bfloat16' (params stay float32)
        remat=False,
    ))


def from_config(cfg: ml_collections.ConfigDict, conv_form: str = "xla") -> UNet:
    """Builds the UNet (and its encoder) from a model config, its 3D convs in `conv_form`."""
    ndim, widths = layers.check_ndim(cfg.ndim), tuple(int(w) for w in cfg.widths)
    if not widths:
        raise UserError("model.widths must list at least one level width.")
    if cfg.block not in ("plain", "residual"):
        raise UserError(f"model.block must be 'plain' or 'residual', got {cfg.block!r}.")
    if cfg.bottleneck not in ("none", "dilated", "aspp"):
        raise UserError(f"model.bottleneck must be 'none', 'dilated' or 'aspp', got {cfg.bottleneck!r}.")
    kernels = layers.per_level(cfg.kernel_sizes, len(widths), ndim, 3, "kernel_sizes")
    pools = pool_factors(cfg)
    dtype = layers.compute_dtype(cfg.dtype)
    common = dict(norm=cfg.norm, groups=cfg.groups, act=cfg.activation, dtype=dtype, conv_form=conv_form)
    layers.activation(cfg.activation)
    if cfg.norm not in layers.NORMS:
        raise UserError(f"model.norm must be one of {', '.join(layers.NORMS)}, got {cfg.norm!r}.")
    if cfg.encoder == "conv":
        encoder = ConvEncoder(widths, kernels, pools, cfg.convs_per_block, cfg.block == "residual",
                              remat=cfg.remat, **common)
    elif cfg.encoder == "resnet":
        encoder = resnet.encoder_from_config(cfg, conv_form)
    else:
        raise UserError(f"model.encoder must be 'conv' or 'resnet', got {cfg.encoder!r}.")
    return UNet(encoder, ndim, cfg.out_channels, widths, kernels, pools, cfg.convs_per_block,
                cfg.block == "residual", bottleneck=cfg.bottleneck, dilations=tuple(cfg.dilations),
                deep_supervision=cfg.deep_supervision, remat=cfg.remat, **common)


pool_factors = layers.pool_factors
input_divisor = layers.pooled_input_divisor
divisor_reason = layers.pooling_reason
