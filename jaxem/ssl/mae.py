"""Masked autoencoder pretraining of a ViT encoder (ssl.method = "mae"; He et al. 2022).

    model = build_mae_model(config.model, config.ssl)   # MAE(encoder=the model's ViT, light decoder)
    state = create_train_state(model, tx, rng, input_shape)
    step = make_mae_step(model, ssl_cfg, augment_fn)     # (state, batch) -> (state, metrics)

For models whose encoder is the jaxem ViT ('vit', 'unetr'; variants 'jaxem' and 'timm'):

1. each crop is augmented once (`config.augment`);
2. per example a random `mask_ratio` of the patch grid is dropped (argsort of uniform noise, as in
   the paper); the encoder embeds every patch (patch + position embedding) and then runs its
   blocks on the visible tokens only (`ViT(..., keep=...)`; a 'timm' class token stays);
3. a light transformer decoder (`decoder_dim`, `decoder_depth`, `decoder_heads`; fixed sin-cos
   positions; a learned mask token in every dropped position) maps the encoder's final tokens to
   the pixels of every patch;
4. loss = mean squared error over the dropped patches only, against per-patch normalised pixels
   (`norm_pix_loss`, the paper's default: each patch's target has zero mean and unit variance).

The parameters are {"encoder": the ViT, "decoder_embed", "mask_token", "decoder_block{i}",
"decoder_norm", "decoder_pred"}; the export is the `encoder` subtree alone, exactly the one the
'vit' and 'unetr' models hold, so `--config.train.init_encoder=WORKDIR` fine-tunes a UNETR from it.

Logged per step: `loss`, `masked_r2` (1 - MSE / variance of the dropped patches' targets, as
jaxem.ssl.masked) and `grad_norm`.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxem import models
from jaxem.errors import UserError
from jaxem.models import layers, vit
from jaxem.ssl.masked import hidden_count, reconstruction_loss
from jaxem.train.state import TrainState

VIT_MODELS = ("vit", "unetr")  # model names whose `encoder` is the jaxem ViT


def check_mae_config(config: ml_collections.ConfigDict) -> None:
    """UserError naming the field of `config` (model, ssl, data.crop_shape) that MAE cannot use."""
    model, ssl = config.model, config.ssl
    if model.name not in VIT_MODELS:
        raise UserError(f"ssl.method='mae' needs a model whose encoder is the jaxem ViT (model.name 'vit' or 'unetr'), "
                        f"got model.name={model.name!r}.")
    vit.check_token_dropping(model.get("variant", "jaxem"), tuple(model.get("window_size", ())),
                             bool(model.get("rel_pos", False)))
    if not 0 < ssl.mask_ratio < 1:
        raise UserError(f"ssl.mask_ratio must be in (0, 1) (the fraction of patch tokens dropped), "
                        f"got {ssl.mask_ratio}.")
    crop = tuple(int(c) for c in config.data.crop_shape)
    patch = layers.per_axis(model.patch_size, model.ndim, "patch_size")
    if len(crop) != len(patch) or any(c % p for c, p in zip(crop, patch)):
        raise UserError(f"data.crop_shape={crop} must be a multiple of model.patch_size={patch} on every axis "
                        f"(MAE reconstructs whole patches).")
    for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
        if int(ssl[name]) < 1:
            raise UserError(f"ssl.{name} must be >= 1, got {ssl[name]}.")
    if ssl.decoder_dim % ssl.decoder_heads:
        raise UserError(f"ssl.decoder_dim ({ssl.decoder_dim}) must be a multiple of ssl.decoder_heads "
                        f"({ssl.decoder_heads}).")


def patchify(image: jax.Array, patch: tuple[int, ...]) -> jax.Array:
    """(B, *S, C) -> (B, N, prod(patch) * C): the pixels of each patch, patches in the order of the
    ViT's tokens (row-major over the patch grid)."""
    batch, spatial, channels = image.shape[0], image.shape[1:-1], image.shape[-1]
    grid = tuple(s // p for s, p in zip(spatial, patch))
    n = len(grid)
    x = image.reshape(batch, *[v for g, p in zip(grid, patch) for v in (g, p)], channels)
    x = x.transpose([0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n])
    return x.reshape(batch, math.prod(grid), math.prod(patch) * channels)


def normalise_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Each patch (last axis) to zero mean and unit variance (MAE's norm_pix_loss targets)."""
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True)
    return (patches - mean) / jnp.sqrt(var + eps)


def random_keep(rng: jax.Array, batch: int, n: int, ratio: float) -> tuple[jax.Array, jax.Array]:
    """(keep (batch, n - round(ratio * n)) int32 sorted token indices, mask (batch, n) float32, 1
    where dropped): per example the tokens of the lowest uniform noise are kept (MAE's shuffle)."""
    hidden = hidden_count(n, ratio)
    order = jnp.argsort(jax.random.uniform(rng, (batch, n)), axis=1)
    keep = jnp.sort(order[:, :n - hidden], axis=1).astype(jnp.int32)
    mask = jnp.ones((batch, n), jnp.float32).at[jnp.arange(batch)[:, None], keep].set(0.0)
    return keep, mask


class MAE(nn.Module):
    """encoder (a ViT) on the kept tokens -> light transformer decoder -> pixels of every patch.

    __call__(x (B, *S, C), keep (B, N_visible) int or None = all, train) -> (B, N, prod(patch) * C)
    float32, N = prod(S / patch).
    """

    encoder: vit.ViT
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array | None = None, train: bool = False) -> jax.Array:
        batch, channels = x.shape[0], x.shape[-1]
        patch = tuple(self.encoder.patch_size)
        grid = tuple(s // p for s, p in zip(x.shape[1:-1], patch))
        n = math.prod(grid)
        if keep is None:
            keep = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
        visible = self.encoder(x, train, keep=keep)[-1].astype(jnp.float32)
        visible = nn.Dense(self.decoder_dim, name="decoder_embed")(visible)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (self.decoder_dim,))
        tokens = jnp.broadcast_to(mask_token, (batch, n, self.decoder_dim))
        tokens = tokens.at[jnp.arange(batch)[:, None], keep].set(visible)
        tokens = tokens + vit.sincos_position_embedding(grid, self.decoder_dim)
        for i in range(self.decoder_depth):
            tokens = vit.TransformerBlock(self.decoder_heads, 4 * self.decoder_dim, name=f"decoder_block{i}")(
                tokens, train)
        tokens = nn.LayerNorm(name="decoder_norm")(tokens)
        return nn.Dense(math.prod(patch) * channels, name="decoder_pred")(tokens).astype(jnp.float32)


def build_mae_model(model_cfg: ml_collections.ConfigDict, ssl_cfg: ml_collections.ConfigDict) -> MAE:
    """The MAE network around the ViT encoder of `model_cfg` ('vit' or 'unetr')."""
    encoder = models.build(model_cfg).encoder
    return MAE(encoder.clone(parent=None, name=None), int(ssl_cfg.decoder_dim), int(ssl_cfg.decoder_depth),
               int(ssl_cfg.decoder_heads))


def mae_loss(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """(loss, {"masked_r2"}) for prediction/target (B, N, P) and mask (B, N), 1 where dropped: the
    MSE over the dropped patches' pixels only."""
    loss, metrics = reconstruction_loss(prediction, target, jnp.broadcast_to(mask[..., None], prediction.shape))
    return loss, {"masked_r2": metrics["masked_r2"]}


def make_mae_step(model: MAE, cfg: ml_collections.ConfigDict, augment_fn: Callable) -> Callable:
    """Builds `train_step(state, batch) -> (state, metrics)` for MAE.

    batch: {"image": (B, *spatial, 1) float32, normalised}; `augment_fn(rng, {"image": ...})` makes
    the one view. metrics: loss, masked_r2, grad_norm.
    """
    patch = tuple(model.encoder.patch_size)

    def loss_fn(params, image, keep, mask):
        prediction = model.apply({"params": params}, image, keep, train=True)
        target = patchify(image, patch)
        if cfg.norm_pix_loss:
            target = normalise_patches(target)
        return mae_loss(prediction, target, mask)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        augment_rng, mask_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
        image = augment_fn(augment_rng, {"image": batch["image"]})["image"].astype(jnp.float32)
        n = math.prod(s // p for s, p in zip(image.shape[1:-1], patch))
        keep, mask = random_keep(mask_rng, image.shape[0], n, cfg.mask_ratio)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, image, keep, mask)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        state = state.replace(step=state.step + 1, params=params, ema_params=params, opt_state=opt_state)
        return state, {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads)}

    return train_step
