"""Vision Transformer encoder with 2D or 3D patch embedding (as behind SAM and UNETR).

Position embeddings are fixed sin-cos per axis (MAE-style), computed for whatever patch grid the
input gives, so one ViT takes any input whose sizes are multiples of the patch size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxem.errors import UserError
from jaxem.models.heads import PooledEncoder
from jaxem.models import layers

SIZES = {  # name -> (hidden, depth, heads); MLP is 4 x hidden
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


def sincos_position_embedding(grid: tuple[int, ...], dim: int) -> np.ndarray:
    """Fixed (prod(grid), dim) embedding: each axis gets dim // ndim channels of sin/cos of its
    coordinate at geometric frequencies; leftover channels are zero."""
    per_axis = (dim // len(grid)) // 2 * 2
    freqs = 1.0 / 10000 ** (np.arange(per_axis // 2) / max(per_axis // 2, 1))
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, len(grid))
    parts = []
    for axis in range(len(grid)):
        angles = coords[:, axis:axis + 1] * freqs[None]
        parts += [np.sin(angles), np.cos(angles)]
    emb = np.concatenate(parts, axis=-1)
    return np.pad(emb, ((0, 0), (0, dim - emb.shape[1]))).astype(np.float32)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x)). (B, N, D) -> (B, N, D)."""

    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype)(y, y)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
        return x + nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))


class ViT(nn.Module):
    """Patch embedding + sin-cos positions + `depth` transformer blocks.

    (B, *S, C) with S a multiple of patch_size -> list of `depth` hidden states as token grids
    (B, *S / patch_size, hidden), one per block; the last one passes a final LayerNorm.
    """

    patch_size: tuple[int, ...]
    hidden: int
    depth: int
    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        x = layers.Conv(self.hidden, self.patch_size, strides=self.patch_size, padding="VALID",
                        dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
        batch, grid = x.shape[0], x.shape[1:-1]
        tokens = x.reshape(batch, -1, self.hidden) + sincos_position_embedding(grid, self.hidden).astype(self.dtype)
        block = layers.maybe_remat(TransformerBlock, self.remat)
        states = []
        for i in range(self.depth):
            tokens = block(self.heads, self.mlp_dim, self.dtype, name=f"block{i}")(tokens, train)
            states.append(tokens)
        states[-1] = nn.LayerNorm(dtype=self.dtype, name="final_norm")(tokens)
        return [s.reshape(batch, *grid, self.hidden) for s in states]


def default_config(ndim: int) -> ml_collections.ConfigDict:
    """Every field of the 'vit' model. hidden/depth/heads/mlp_dim = 0 take the `size` preset."""
    return ml_collections.ConfigDict(dict(
        name="vit",
        ndim=ndim,
        out_channels=0,      # 0: pooled features (B, hidden); > 0: linear head
        size="small",        # 'tiny' (192/12/3) | 'small' (384/12/6) | 'base' (768/12/12)
        patch_size=(16,) * ndim,
        hidden=0,
        depth=0,
        heads=0,
        mlp_dim=0,           # 0 = 4 x hidden
        dtype="float32",
        remat=False,
    ))


def encoder_from_config(cfg: ml_collections.ConfigDict) -> ViT:
    """The ViT that `cfg` describes (also used by UNETR)."""
    if cfg.ndim not in (2, 3):
        raise UserError(f"model.ndim must be 2 or 3, got {cfg.ndim!r}.")
    if cfg.size not in SIZES:
        raise UserError(f"model.size must be one of {', '.join(SIZES)}, got {cfg.size!r}.")
    hidden, depth, heads = SIZES[cfg.size]
    hidden, depth, heads = cfg.hidden or hidden, cfg.depth or depth, cfg.heads or heads
    if hidden % heads:
        raise UserError(f"model.hidden ({hidden}) must be a multiple of model.heads ({heads}).")
    patch = layers.per_axis(cfg.patch_size, cfg.ndim, "patch_size")
    return ViT(patch, hidden, depth, heads, cfg.mlp_dim or 4 * hidden,
               dtype=layers.compute_dtype(cfg.dtype), remat=cfg.remat)


def from_config(cfg: ml_collections.ConfigDict) -> PooledEncoder:
    return PooledEncoder(encoder_from_config(cfg), cfg.out_channels)


def input_divisor(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Sizes must be multiples of the patch size."""
    return layers.per_axis(cfg.patch_size, cfg.ndim, "patch_size")


def divisor_reason(cfg: ml_collections.ConfigDict) -> str:
    return f"is not a multiple of the patch size {input_divisor(cfg)}"
