"""UNETR: ViT encoder + convolutional decoder on its intermediate token grids (Hatamizadeh 2022).

With patch size 2^L per axis the decoder has L + 1 levels. Level 0 is a conv block on the input;
level l in 1..L-1 takes the hidden state of block depth * l / L and up-samples it (L - l) times
by transposed conv + conv; level L is the final hidden state. The decoder then climbs from level L
to 0, concatenating each level's features (width feature_size * 2^l). Patch sizes may differ per
axis (e.g. (4, 16, 16) for anisotropic EM): an axis with patch 2^k up-samples in the k finest
steps only. The encoder may be any ViT variant (jaxem, timm, sam: docs/foundation.md); its states
are token grids without class tokens, the last one after SAM's neck for 'sam'.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxem.errors import UserError
from jaxem.models import layers, vit
from jaxem.models.heads import SegmentationHead


def up_factors(patch: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per decoder transition s (0 = finest), the factor per axis: 2 while s < log2(patch)."""
    logs = [int(math.log2(p)) for p in patch]
    return tuple(tuple(2 if s < k else 1 for k in logs) for s in range(max(logs)))


class UNETR(nn.Module):
    """(B, *S, C_in) float32 -> logits (B, *S, out_channels) float32; S a multiple of patch_size."""

    encoder: vit.ViT
    out_channels: int
    feature_size: int = 16
    kernel: tuple[int, ...] = (3, 3)
    norm: str = "instance"
    groups: int = 8
    act: str = "relu"
    dtype: Any = jnp.float32
    remat: bool = False
    conv_form: str = "xla"  # how 3D convs run (layers.CONV_FORMS); models.build picks it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        x = x.astype(self.dtype)
        states = self.encoder(x, train)
        factors = up_factors(self.encoder.patch_size)
        levels = len(factors)
        width = lambda level: self.feature_size * 2 ** level  # noqa: E731
        kw = dict(norm=self.norm, groups=self.groups, act=self.act, dtype=self.dtype, conv_form=self.conv_form)
        block = layers.maybe_remat(layers.ConvBlock, self.remat)
        skips = [block(width(0), self.kernel, 2, True, **kw, name="skip0")(x, train)]
        depth = len(states)
        for level in range(1, levels):
            y = states[max(depth * level // levels - 1, 0)]
            for s in reversed(range(level, levels)):  # grid (level L) down to this level
                y = layers.UpConv(width(level), factors[s], dtype=self.dtype, name=f"skip{level}_up{s}")(y)
                y = layers.ConvNormAct(width(level), self.kernel, **kw, name=f"skip{level}_conv{s}")(y, train)
            skips.append(y)
        y = states[-1]
        for level in reversed(range(levels)):
            y = layers.UpConv(width(level), factors[level], dtype=self.dtype, name=f"up{level}")(y)
            y = jnp.concatenate([skips[level], y], axis=-1)
            y = block(width(level), self.kernel, 2, True, **kw, name=f"dec{level}")(y, train)
        return SegmentationHead(self.out_channels, name="head")(y), {}


def default_config(ndim: int) -> ml_collections.ConfigDict:
    """Every field of UNETR: the ViT's fields plus the decoder's."""
    cfg = vit.default_config(ndim)
    cfg.name = "unetr"
    cfg.out_channels = 1
    cfg.update(dict(feature_size=16, kernel_size=3, norm="instance", groups=8, activation="relu"))
    return cfg


def from_config(cfg: ml_collections.ConfigDict, conv_form: str = "xla") -> UNETR:
    encoder = vit.encoder_from_config(cfg, conv_form)
    for p in encoder.patch_size:
        if p < 2 or p & (p - 1):
            raise UserError(f"UNETR needs a power-of-two patch size per axis (>= 2), got {encoder.patch_size} "
                            f"(`jaxem convert-weights --patch 16` resamples a foundation model's patch-14 embedding).")
    if cfg.norm not in layers.NORMS:
        raise UserError(f"model.norm must be one of {', '.join(layers.NORMS)}, got {cfg.norm!r}.")
    layers.activation(cfg.activation)
    if cfg.out_channels < 1:
        raise UserError(f"model.out_channels must be >= 1 for UNETR, got {cfg.out_channels}.")
    return UNETR(encoder, cfg.out_channels, cfg.feature_size, layers.per_axis(cfg.kernel_size, cfg.ndim, "kernel_size"),
                 cfg.norm, cfg.groups, cfg.activation, layers.compute_dtype(cfg.dtype), cfg.remat, conv_form)


input_divisor = vit.input_divisor
divisor_reason = vit.divisor_reason
