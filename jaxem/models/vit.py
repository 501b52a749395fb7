"""Vision Transformer encoder with 2D or 3D patch embedding (as behind SAM and UNETR).

One module, three block layouts chosen by the `variant` field:

- 'jaxem' (default): fixed sin-cos position embeddings per axis (MAE-style), computed for whatever
  patch grid the input gives; pre-norm blocks of flax's multi-head attention and a tanh-GELU MLP;
  a final LayerNorm.
- 'timm': the blocks of timm's VisionTransformer (DINOv2, MAE, ...): fused qkv projection, exact
  (erf) GELU, optional LayerScale, optional class and register tokens, a learned position table
  resampled bicubically (as timm does, antialiased) to the input's patch grid, a final LayerNorm.
- 'sam': the blocks of Segment Anything's image encoder (ViTDet): windowed attention in all but the
  `global_blocks`, decomposed relative positions, an absolute learned position table, and SAM's
  neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) instead of the final norm.

`jaxem.models.convert` writes the weights of those checkpoints into this module's parameters.
Every variant returns the hidden state of each block as a token grid (B, *S / patch, hidden)
with class/register tokens dropped, so UNETR and the pooled encoder take any of them.
"""

from __future__ import annotations

import math
from functools import lru_cache
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
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
VARIANTS = ("jaxem", "timm", "sam")
POS_EMBEDS = ("sincos", "learned", "none")
REL_POS_NAMES = ("rel_pos_d", "rel_pos_h", "rel_pos_w")  # per axis (z, y, x), SAM's names in 2D


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


# ---- resampling as PyTorch does it (tables are resized with fixed matrices, so the gradient flows) ----

def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of torch's `F.interpolate(mode='bicubic', antialias=True,
    align_corners=False)` along one axis (the PIL-style separable filter, cubic a = -0.5, support
    widened by the scale when shrinking, weights renormalised at the borders), which is how timm
    resamples a position table (`resample_abs_pos_embed`) and a patch kernel."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    out = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _cubic((np.arange(lo, hi) - center + 0.5) * invscale)
        out[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return out


@lru_cache(maxsize=None)
def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of torch's `F.interpolate(mode='linear', align_corners=False)`,
    which is how SAM resizes a relative-position table (`get_rel_pos`)."""
    scale = in_size / out_size
    out = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        frac = src - i0
        out[i, i0] += 1 - frac
        out[i, i1] += frac
    return out


def resample_grid(table: jax.Array, grid: tuple[int, ...]) -> jax.Array:
    """A (*old_grid, C) table resized to (*grid, C) per axis like timm's bicubic (antialiased)
    position-table interpolation; the table itself when the grids agree (timm does the same)."""
    for axis, (old, new) in enumerate(zip(table.shape[:-1], grid)):
        if old != new:
            m = jnp.asarray(bicubic_matrix(old, new), jnp.float32)
            table = jnp.moveaxis(jnp.tensordot(m, table.astype(jnp.float32), axes=([1], [axis])), 0, axis)
    return table


# ---- the blocks ----

class LayerScale(nn.Module):
    """x * gamma, one learned scale per channel (CaiT / DINOv2), initialised to `init_value`."""

    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, as timm's Mlp and SAM's MLPBlock."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's / SAM's layout) and, when
    `rel_pos_sizes` is set, SAM's decomposed relative positions: per axis a table of
    2 * size - 1 offsets x head_dim, linearly resized when the token grid is another size.

    (B, N, D) -> (B, N, D); with relative positions N = prod(grid) and tokens in grid order."""

    heads: int
    qkv_bias: bool = True
    rel_pos_sizes: tuple[int, ...] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, ...] = ()) -> jax.Array:
        batch, n, dim = x.shape
        head_dim = dim // self.heads
        qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, n, 3, self.heads, head_dim).transpose(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = jnp.einsum("bhqc,bhkc->bhqk", q * head_dim ** -0.5, k).astype(jnp.float32)
        if self.rel_pos_sizes:
            attn = attn + self._relative_positions(q, grid)
        attn = jax.nn.softmax(attn, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkc->bhqc", attn, v).transpose(0, 2, 1, 3).reshape(batch, n, dim)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out)

    def _relative_positions(self, q: jax.Array, grid: tuple[int, ...]) -> jax.Array:
        """(B, H, N, N) float32: sum over axes of q . R_axis[q_pos - k_pos] (SAM's
        `add_decomposed_rel_pos`, unscaled q), broadcast over the other axes of the key."""
        batch, heads, n, head_dim = q.shape
        ndim = len(grid)
        names = REL_POS_NAMES[-ndim:]
        rq = q.astype(jnp.float32).reshape(batch, heads, *grid, head_dim)
        letters = "zyx"[-ndim:]  # the query's grid axes
        total = jnp.zeros((batch, heads, *grid, *grid), jnp.float32)
        for axis, (name, size, g) in enumerate(zip(names, self.rel_pos_sizes, grid)):
            table = self.param(name, nn.initializers.zeros, (2 * size - 1, head_dim)).astype(jnp.float32)
            if table.shape[0] != 2 * g - 1:
                table = jnp.asarray(linear_matrix(table.shape[0], 2 * g - 1), jnp.float32) @ table
            offsets = np.arange(g)[:, None] - np.arange(g)[None, :] + g - 1
            rel = jnp.einsum(f"bh{letters}c,{letters[axis]}kc->bh{letters}k", rq, table[offsets])
            # (B, H, *q_grid, k_axis) -> broadcast over the key's other axes
            shape = (batch, heads, *grid) + tuple(g if a == axis else 1 for a in range(ndim))
            total = total + rel.reshape(shape)
        return total.reshape(batch, heads, n, n)


def window_partition(x: jax.Array, window: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """(B, *G, C) -> (B * windows, prod(window), C): zero-padded at the end of each axis to a
    multiple of the window (as SAM does, after the block's first norm), and the padded grid."""
    batch, grid, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
    pads = [(-g) % w for g, w in zip(grid, window)]
    if any(pads):
        x = jnp.pad(x, [(0, 0)] + [(0, p) for p in pads] + [(0, 0)])
    padded = tuple(g + p for g, p in zip(grid, pads))
    n = len(grid)
    x = x.reshape(batch, *[d for g, w in zip(padded, window) for d in (g // w, w)], channels)
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
    return x.transpose(order).reshape(-1, math.prod(window), channels), padded


def window_unpartition(x: jax.Array, window: tuple[int, ...], padded: tuple[int, ...], grid: tuple[int, ...],
                       batch: int) -> jax.Array:
    """The inverse of window_partition: (B * windows, prod(window), C) -> (B, *grid, C)."""
    n = len(grid)
    x = x.reshape(batch, *[g // w for g, w in zip(padded, window)], *window, x.shape[-1])
    order = [0] + [a for i in range(n) for a in (1 + i, 1 + n + i)] + [1 + 2 * n]
    x = x.transpose(order).reshape(batch, *padded, x.shape[-1])
    return x[(slice(None),) + tuple(slice(0, g) for g in grid)]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x)). (B, N, D) -> (B, N, D).

    variant 'jaxem': flax's MultiHeadDotProductAttention and a tanh-GELU MLP (parameter names
    LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, Dense_0, Dense_1). Otherwise timm's
    / SAM's layout: norm1, attn (qkv, proj, rel_pos_*), ls1, norm2, mlp (fc1, fc2), ls2, with
    attention inside windows of `window` tokens when set (tokens then form the grid `grid`,
    without class tokens) and relative positions over tables of `rel_pos_sizes`.
    """

    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    variant: str = "jaxem"
    grid: tuple[int, ...] = ()
    window: tuple[int, ...] = ()
    rel_pos_sizes: tuple[int, ...] = ()
    layer_scale: float = 0.0
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.variant == "jaxem":
            y = nn.LayerNorm(dtype=self.dtype)(x)
            x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype)(y, y)
            y = nn.LayerNorm(dtype=self.dtype)(x)
            y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
            return x + nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))
        norm = dict(epsilon=1e-6, dtype=self.dtype, use_fast_variance=False)
        attention = Attention(self.heads, self.qkv_bias, self.rel_pos_sizes, self.dtype, name="attn")
        y = nn.LayerNorm(**norm, name="norm1")(x)
        if self.window:
            batch, dim = x.shape[0], x.shape[-1]
            windows, padded = window_partition(y.reshape(batch, *self.grid, dim), self.window)
            y = attention(windows, self.window)
            y = window_unpartition(y, self.window, padded, self.grid, batch).reshape(batch, -1, dim)
        else:
            y = attention(y, self.grid)
        if self.layer_scale:
            y = LayerScale(self.layer_scale, name="ls1")(y)
        x = x + y
        y = Mlp(self.mlp_dim, self.dtype, name="mlp")(nn.LayerNorm(**norm, name="norm2")(x))
        if self.layer_scale:
            y = LayerScale(self.layer_scale, name="ls2")(y)
        return x + y


class Neck(nn.Module):
    """SAM's neck on the token grid: 1x1 conv, LayerNorm2d, 3x3 conv (in-plane: 1x3x3 in 3D),
    LayerNorm2d; convs without bias. (B, *G, D) -> (B, *G, features)."""

    features: int
    dtype: Any = jnp.float32
    conv_form: str = "xla"  # how 3D convs run (layers.CONV_FORMS); models.build picks it

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = x.ndim - 2
        norm = dict(epsilon=1e-6, dtype=self.dtype, use_fast_variance=False)
        x = layers.Conv(self.features, (1,) * n, use_bias=False, dtype=self.dtype, conv_form=self.conv_form,
                        name="conv1")(x)
        x = nn.LayerNorm(**norm, name="norm1")(x)
        x = layers.Conv(self.features, (1,) * (n - 2) + (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        conv_form=self.conv_form, name="conv2")(x)
        return nn.LayerNorm(**norm, name="norm2")(x)


class ViT(nn.Module):
    """Patch embedding + position embedding + `depth` transformer blocks.

    (B, *S, C) with S a multiple of patch_size -> list of `depth` hidden states as token grids
    (B, *S / patch_size, hidden), one per block, class/register tokens dropped; the last one
    passes a final LayerNorm ('jaxem', 'timm') or SAM's neck ('sam' with neck_dim > 0:
    (B, *S / patch_size, neck_dim)).

    Parameters (under this module): patch_embed (conv kernel = stride = patch), pos_embed
    ((*pos_grid, hidden), 'learned'), pos_embed_prefix ((tokens, hidden), 'learned' with
    prefix_pos), cls_token (1, hidden), reg_token (reg_tokens, hidden), block{i}, final_norm or neck.
    """

    patch_size: tuple[int, ...]
    hidden: int
    depth: int
    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    remat: bool = False
    variant: str = "jaxem"
    pos_embed: str = "sincos"
    pos_grid: tuple[int, ...] = ()
    class_token: bool = False
    reg_tokens: int = 0
    prefix_pos: bool = False
    layer_scale: float = 0.0
    qkv_bias: bool = True
    window_size: tuple[int, ...] = ()
    global_blocks: tuple[int, ...] = ()
    rel_pos: bool = False
    neck_dim: int = 0
    conv_form: str = "xla"  # how 3D convs run (layers.CONV_FORMS); models.build picks it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, keep: jax.Array | None = None) -> list[jax.Array]:
        """`keep` (B, N_visible) int: the blocks see only these patch tokens (flat indices into the
        patch grid, after patch and position embedding; class/register tokens stay), as MAE's
        encoder does, and the states are (B, N_visible, hidden) token lists instead of grids."""
        x = layers.Conv(self.hidden, self.patch_size, strides=self.patch_size, padding="VALID",
                        dtype=self.dtype, conv_form=self.conv_form, name="patch_embed")(x.astype(self.dtype))
        batch, grid = x.shape[0], x.shape[1:-1]
        tokens = x.reshape(batch, -1, self.hidden)
        if self.pos_embed == "sincos":
            tokens = tokens + sincos_position_embedding(grid, self.hidden).astype(self.dtype)
        elif self.pos_embed == "learned":
            table = self.param("pos_embed", nn.initializers.normal(0.02), (*self.pos_grid, self.hidden))
            tokens = tokens + resample_grid(table, grid).reshape(-1, self.hidden).astype(self.dtype)
        if keep is not None:
            check_token_dropping(self.variant, self.window_size, self.rel_pos)
            tokens = jnp.take_along_axis(tokens, keep[..., None].astype(jnp.int32), axis=1)
        prefix = []
        if self.class_token:
            prefix.append(self.param("cls_token", nn.initializers.normal(1e-6), (1, self.hidden)))
        if self.reg_tokens:
            prefix.append(self.param("reg_token", nn.initializers.normal(1e-6), (self.reg_tokens, self.hidden)))
        n_prefix = sum(p.shape[0] for p in prefix)
        if prefix:
            prefix = jnp.concatenate(prefix)
            if self.pos_embed == "learned" and self.prefix_pos:
                prefix = prefix + self.param("pos_embed_prefix", nn.initializers.normal(0.02), prefix.shape)
            prefix = jnp.broadcast_to(prefix.astype(self.dtype), (batch, *prefix.shape))
            tokens = jnp.concatenate([prefix, tokens], axis=1)
        block = layers.maybe_remat(TransformerBlock, self.remat)
        states = []
        for i in range(self.depth):
            window = self.window_size if self.window_size and i not in self.global_blocks else ()
            rel = (window or self.pos_grid) if self.rel_pos else ()
            tokens = block(self.heads, self.mlp_dim, self.dtype, self.variant, tuple(grid), tuple(window), tuple(rel),
                           self.layer_scale, self.qkv_bias, name=f"block{i}")(tokens, train)
            states.append(tokens)
        if self.variant != "sam":
            states[-1] = nn.LayerNorm(dtype=self.dtype, name="final_norm",
                                      **({} if self.variant == "jaxem" else dict(use_fast_variance=False)))(tokens)
        if keep is not None:
            return [s[:, n_prefix:] for s in states]
        states = [s[:, n_prefix:].reshape(batch, *grid, self.hidden) for s in states]
        if self.variant == "sam" and self.neck_dim:
            states[-1] = Neck(self.neck_dim, self.dtype, self.conv_form, name="neck")(states[-1])
        return states


def check_token_dropping(variant: str, window_size: tuple[int, ...] = (), rel_pos: bool = False) -> None:
    """UserError unless the ViT's blocks can run on a subset of the patch tokens (MAE): windowed
    attention and relative positions need the whole token grid."""
    if variant == "sam":
        raise UserError("model.variant='sam' (windowed attention on the whole token grid) cannot run on a subset of "
                        "the patch tokens (MAE); use model.variant='jaxem' or 'timm'.")
    if window_size or rel_pos:
        field = "window_size" if window_size else "rel_pos"
        raise UserError(f"model.{field} needs the whole token grid and cannot run on a subset of the patch tokens "
                        f"(MAE); set model.window_size=() and model.rel_pos=False.")


FOUNDATION_DEFAULTS = dict(
    variant="jaxem",     # block layout: 'jaxem' | 'timm' (DINOv2, MAE, ...) | 'sam' (SAM image encoder)
    pos_embed="sincos",  # 'sincos' (fixed, any grid) | 'learned' (a pos_grid table, resampled bicubically) | 'none'
    pos_grid=(),         # per axis, the token grid of the learned table (and of SAM's global rel-pos tables)
    class_token=False,   # a learned class token before the patch tokens (dropped from the outputs)
    reg_tokens=0,        # learned register tokens after the class token (DINOv2 with registers)
    prefix_pos=False,    # the learned table also has entries for the class/register tokens (timm's default)
    layer_scale=0.0,     # > 0: LayerScale after attention and MLP, initialised to this (DINOv2: 1e-5)
    qkv_bias=True,       # bias on the fused qkv projection (timm/sam variants)
    window_size=(),      # () = global attention; (w,) or one per axis: windowed attention (SAM: 14)
    global_blocks=(),    # blocks with global attention when window_size is set (SAM ViT-B: (2, 5, 8, 11))
    rel_pos=False,       # SAM's decomposed relative positions in every block
    neck_dim=0,          # 'sam': > 0 = SAM's neck to this many channels on the last state (SAM: 256)
)


def default_config(ndim: int) -> ml_collections.ConfigDict:
    """Every field of the 'vit' model. hidden/depth/heads/mlp_dim = 0 take the `size` preset.

    The fields after `remat` (FOUNDATION_DEFAULTS) describe foundation-model encoders
    (docs/foundation.md); their defaults are the 'jaxem' ViT. `jaxem convert-weights` writes the
    values that fit a checkpoint into its model.json.
    """
    return ml_collections.ConfigDict(dict(
        name="vit",
        ndim=ndim,
        out_channels=0,      # 0: pooled features (B, hidden); > 0: linear head
        size="small",        # 'tiny' (192/12/3) | 'small' (384/12/6) | 'base' (768/12/12) | 'large' | 'huge'
        patch_size=(16,) * ndim,
        hidden=0,
        depth=0,
        heads=0,
        mlp_dim=0,           # 0 = 4 x hidden
        dtype="float32",
        remat=False,
        **FOUNDATION_DEFAULTS,
    ))


def encoder_from_config(cfg: ml_collections.ConfigDict, conv_form: str = "xla") -> ViT:
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
    # .get: configs saved before these fields existed describe the 'jaxem' ViT
    f = {name: cfg.get(name, default) for name, default in FOUNDATION_DEFAULTS.items()}
    _check_foundation_fields(f, cfg.ndim, depth)
    window = tuple(f["window_size"])
    if window:
        window = window * cfg.ndim if len(window) == 1 else layers.per_axis(window, cfg.ndim, "window_size")
    return ViT(patch, hidden, depth, heads, cfg.mlp_dim or 4 * hidden,
               dtype=layers.compute_dtype(cfg.dtype), remat=cfg.remat, variant=f["variant"],
               pos_embed=f["pos_embed"], pos_grid=tuple(int(g) for g in f["pos_grid"]),
               class_token=bool(f["class_token"]), reg_tokens=int(f["reg_tokens"]), prefix_pos=bool(f["prefix_pos"]),
               layer_scale=float(f["layer_scale"]), qkv_bias=bool(f["qkv_bias"]), window_size=window,
               global_blocks=tuple(int(b) for b in f["global_blocks"]), rel_pos=bool(f["rel_pos"]),
               neck_dim=int(f["neck_dim"]), conv_form=conv_form)


def _check_foundation_fields(f: dict, ndim: int, depth: int) -> None:
    """UserError naming the first foundation field that does not fit the others."""
    if f["variant"] not in VARIANTS:
        raise UserError(f"model.variant must be one of {', '.join(VARIANTS)}, got {f['variant']!r}.")
    if f["pos_embed"] not in POS_EMBEDS:
        raise UserError(f"model.pos_embed must be one of {', '.join(POS_EMBEDS)}, got {f['pos_embed']!r}.")
    grid = tuple(f["pos_grid"])
    if grid and (len(grid) != ndim or min(grid) < 1):
        raise UserError(f"model.pos_grid must be {ndim} positive ints (the learned table's token grid), got {grid}.")
    if f["pos_embed"] == "learned" and not grid:
        raise UserError("model.pos_embed='learned' needs model.pos_grid, the token grid of the table (e.g. crop / patch).")
    if f["variant"] == "jaxem":
        for name, used in (("layer_scale", f["layer_scale"]), ("qkv_bias", not f["qkv_bias"]),
                           ("window_size", f["window_size"]), ("rel_pos", f["rel_pos"])):
            if used:
                raise UserError(f"model.{name}={f[name]!r} needs model.variant='timm' or 'sam' (the 'jaxem' blocks "
                                f"have no such option).")
    if f["neck_dim"] and f["variant"] != "sam":
        raise UserError(f"model.neck_dim={f['neck_dim']} needs model.variant='sam' (SAM's neck).")
    prefix = bool(f["class_token"]) or f["reg_tokens"] > 0
    if (f["window_size"] or f["rel_pos"]) and prefix:
        raise UserError("model.window_size and model.rel_pos work on the token grid alone: set model.class_token=False "
                        "and model.reg_tokens=0.")
    if f["prefix_pos"] and not (prefix and f["pos_embed"] == "learned"):
        raise UserError("model.prefix_pos needs a class or register token and model.pos_embed='learned'.")
    if f["rel_pos"] and (not f["window_size"] or f["global_blocks"]) and not grid:
        raise UserError("model.rel_pos with global attention blocks needs model.pos_grid (their tables' token grid).")
    if f["window_size"] and min(f["window_size"]) < 1:
        raise UserError(f"model.window_size must be positive, got {tuple(f['window_size'])}.")
    bad = [b for b in f["global_blocks"] if not 0 <= b < depth]
    if bad:
        raise UserError(f"model.global_blocks {tuple(f['global_blocks'])} must index blocks 0..{depth - 1}.")


def from_config(cfg: ml_collections.ConfigDict, conv_form: str = "xla") -> PooledEncoder:
    return PooledEncoder(encoder_from_config(cfg, conv_form), cfg.out_channels)


def input_divisor(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Sizes must be multiples of the patch size."""
    return layers.per_axis(cfg.patch_size, cfg.ndim, "patch_size")


def divisor_reason(cfg: ml_collections.ConfigDict) -> str:
    return f"is not a multiple of the patch size {input_divisor(cfg)}"
