"""ResNet encoder (2D/3D; ResNet-18/34/50 block counts), shared by the 'resnet' model and the U-Net.

Adapted to dense EM prediction: the stem is one stride-1 conv (no 4x stem downsampling, which
small EM patches cannot afford); level i > 0 starts with a block strided by pool_factors[i-1]
(per axis, so anisotropic (1, 2, 2) stages work). With the default four levels and pooling 2, the
block counts and widths are those of ResNet-18/34/50. The 'resnet' model holds this encoder as
the submodule 'encoder', exactly like UNet(encoder='resnet'), so pretrained weights copy across
with `jaxem.models.transfer_encoder_params` when both configs agree on ndim, widths, kernels,
pooling, depth/blocks and norm.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxem.errors import UserError
from jaxem.models.heads import PooledEncoder
from jaxem.models import layers

DEPTHS = {  # depth -> (bottleneck blocks?, blocks per level)
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
}
EXPANSION = 4  # bottleneck blocks output 4x their width


class ResidualBlock(nn.Module):
    """Basic (two k-convs) or bottleneck (1x1, k, 1x1 x4) residual block, optionally strided.

    (B, *S, C) -> (B, *S / strides, width or 4 * width); the shortcut is a strided 1x1 conv + norm
    where the shape changes.
    """

    width: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    bottleneck: bool = False
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    dtype: Any = jnp.float32
    conv_form: str = "xla"  # how 3D convs run (layers.CONV_FORMS); models.build picks it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(norm=self.norm, groups=self.groups, act=self.act, dtype=self.dtype, conv_form=self.conv_form)
        ones = (1,) * len(self.kernel)
        if self.bottleneck:
            out = self.width * EXPANSION
            y = layers.ConvNormAct(self.width, ones, **kw)(x, train)
            y = layers.ConvNormAct(self.width, self.kernel, strides=self.strides, **kw)(y, train)
            y = layers.ConvNormAct(out, ones, use_act=False, **kw)(y, train)
        else:
            out = self.width
            y = layers.ConvNormAct(out, self.kernel, strides=self.strides, **kw)(x, train)
            y = layers.ConvNormAct(out, self.kernel, use_act=False, **kw)(y, train)
        if x.shape[-1] != out or any(s != 1 for s in self.strides):
            x = layers.ConvNormAct(out, ones, strides=self.strides, use_act=False, **kw)(x, train)
        return layers.activation(self.act)(x + y)


class ResNet(nn.Module):
    """Stem conv, then per level `blocks[i]` residual blocks of `widths[i]` (first one strided).

    (B, *S, C) -> list of features per level, fine to coarse; level i has shape
    (B, *S / prod(pool_factors[:i]), widths[i] * (4 if bottleneck else 1)).
    """

    widths: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    pool_factors: tuple[tuple[int, ...], ...]
    blocks: tuple[int, ...]
    bottleneck: bool = False
    norm: str = "group"
    groups: int = 8
    act: str = "relu"
    dtype: Any = jnp.float32
    remat: bool = False
    conv_form: str = "xla"  # how 3D convs run (layers.CONV_FORMS); models.build picks it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        kw = dict(norm=self.norm, groups=self.groups, act=self.act, dtype=self.dtype, conv_form=self.conv_form)
        block = layers.maybe_remat(ResidualBlock, self.remat)
        x = layers.ConvNormAct(self.widths[0], self.kernel_sizes[0], name="stem", **kw)(x.astype(self.dtype), train)
        features = []
        for i, (width, kernel) in enumerate(zip(self.widths, self.kernel_sizes)):
            for j in range(self.blocks[i]):
                strides = self.pool_factors[i - 1] if i > 0 and j == 0 else (1,) * len(kernel)
                x = block(width, kernel, strides, self.bottleneck, **kw, name=f"level{i}_block{j}")(x, train)
            features.append(x)
        return features


def default_config(ndim: int) -> ml_collections.ConfigDict:
    """Every field of the 'resnet' model (ResNet-18 widths, GroupNorm like the U-Net default)."""
    return ml_collections.ConfigDict(dict(
        name="resnet",
        ndim=ndim,
        out_channels=0,     # 0: return pooled features (B, D); > 0: linear head to out_channels
        depth=18,           # 18 | 34 | 50
        blocks=(),          # blocks per level; () = the depth's standard counts (needs 4 levels)
        widths=(64, 128, 256, 512),
        kernel_sizes=(),    # per level: int or ndim-tuple; () = 3 everywhere
        pool_factors=(),    # per level transition; () = 2 everywhere
        norm="group",
        groups=8,
        activation="relu",
        dtype="float32",
        remat=False,
    ))


def build_resnet(cfg: ml_collections.ConfigDict, depth: int, blocks: tuple[int, ...], conv_form: str = "xla") -> ResNet:
    """The ResNet encoder that `cfg` describes, with `depth`/`blocks` from the caller's field names."""
    if depth not in DEPTHS:
        raise UserError(f"ResNet depth must be one of {', '.join(map(str, DEPTHS))}, got {depth!r}.")
    bottleneck, standard = DEPTHS[depth]
    widths = tuple(int(w) for w in cfg.widths)
    blocks = tuple(int(b) for b in blocks) or standard
    if len(blocks) != len(widths):
        raise UserError(f"ResNet-{depth} has {len(blocks)} levels of blocks {blocks} but model.widths has "
                        f"{len(widths)}; set the blocks field to one count per level.")
    if cfg.norm not in layers.NORMS:
        raise UserError(f"model.norm must be one of {', '.join(layers.NORMS)}, got {cfg.norm!r}.")
    layers.activation(cfg.activation)
    kernels = layers.per_level(cfg.kernel_sizes, len(widths), cfg.ndim, 3, "kernel_sizes")
    pools = layers.per_level(cfg.pool_factors, len(widths) - 1, cfg.ndim, 2, "pool_factors") if len(widths) > 1 else ()
    return ResNet(widths, kernels, pools, blocks, bottleneck, norm=cfg.norm, groups=cfg.groups,
                  act=cfg.activation, dtype=layers.compute_dtype(cfg.dtype), remat=cfg.remat, conv_form=conv_form)


def encoder_from_config(unet_cfg: ml_collections.ConfigDict, conv_form: str = "xla") -> ResNet:
    """The U-Net's ResNet encoder (fields resnet_depth, resnet_blocks)."""
    return build_resnet(unet_cfg, unet_cfg.resnet_depth, unet_cfg.resnet_blocks, conv_form)


def from_config(cfg: ml_collections.ConfigDict, conv_form: str = "xla") -> PooledEncoder:
    if cfg.ndim not in (2, 3):
        raise UserError(f"model.ndim must be 2 or 3, got {cfg.ndim!r}.")
    return PooledEncoder(build_resnet(cfg, cfg.depth, cfg.blocks, conv_form), cfg.out_channels)


input_divisor = layers.pooled_input_divisor  # strides, as the U-Net's poolings: sizes must be multiples
divisor_reason = layers.pooling_reason
