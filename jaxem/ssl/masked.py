"""Masked image modelling of a whole segmentation network (SimMIM / SparK-style, MAE targets).

    model = build_reconstruction_model(config.model)   # the segmentation model, 1 output channel
    state = create_train_state(model, tx, rng, input_shape)
    step = make_masked_step(model, ssl_cfg, augment_fn)  # (state, batch) -> (state, metrics)

Contrastive losses (MoCo, SimCLR, DenseCL) train an encoder to tell crops apart; a membrane map
needs every pixel, and a U-Net's decoder is half of it. Here the network the user will fine-tune,
encoder *and* decoder, learns to paint in hidden parts of the EM image:

1. each crop is augmented once (`config.augment`: flips, rotations, elastic, intensity, defects);
2. a random `mask_ratio` of its `mask_patch`-sized patches is hidden: set to 0, the mean of the
   per-volume normalised image (and optionally every pixel gets Gaussian noise of `noise_std`, the
   denoising variant);
3. the network's single output channel must reproduce the augmented image, and the loss is the
   mean squared error over the hidden pixels (as MAE and SparK: the visible pixels are free to copy,
   so they would teach nothing). `mask_loss = "all"` scores every pixel instead.

Inferring a hidden 16x16 px patch of neuropil from its surround means continuing membranes,
vesicles and mitochondria across the gap: the structure a membrane detector needs. The exported
variables are the whole network but its output head (`jaxem.models.transfer.network_parts`), and fine-tuning copies them
all (`jaxem.models.transfer_encoder_params`), so the decoder starts trained too.

Logged per step: `loss` (MSE on hidden pixels), `masked_r2` = 1 - MSE / variance of the hidden
target pixels (0 = predicting the mean grey, 1 = perfect: the readable measure of progress) and
`visible_mse` (how well the network passes visible pixels through).
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
from jaxem.ssl.contrastive import train_mode_apply
from jaxem.train.state import TrainState

def check_masked_config(cfg: ml_collections.ConfigDict, crop_shape: tuple[int, ...]) -> None:
    """UserError naming the `ssl` field that cannot work for crops of `crop_shape` (spatial)."""
    if not 0 < cfg.mask_ratio < 1:
        raise UserError(f"ssl.mask_ratio must be in (0, 1) (the fraction of patches hidden), got {cfg.mask_ratio}.")
    if cfg.mask_loss not in ("masked", "all"):
        raise UserError(f"ssl.mask_loss must be 'masked' or 'all', got {cfg.mask_loss!r}.")
    if cfg.noise_std < 0:
        raise UserError(f"ssl.noise_std must be >= 0, got {cfg.noise_std}.")
    patch = mask_patch_shape(cfg, len(crop_shape))
    if any(c % p for c, p in zip(crop_shape, patch)):
        raise UserError(f"ssl.mask_patch={patch} must divide data.crop_shape={tuple(crop_shape)} on every axis.")


def mask_patch_shape(cfg: ml_collections.ConfigDict, ndim: int) -> tuple[int, ...]:
    """`ssl.mask_patch` per spatial axis: one value is in-plane (y, x), with 1 section in z for 3D."""
    patch = tuple(int(p) for p in (cfg.mask_patch if isinstance(cfg.mask_patch, (tuple, list)) else (cfg.mask_patch,)))
    if len(patch) == 1:
        patch = (1,) * (ndim - 2) + patch * 2
    if len(patch) != ndim or min(patch) < 1:
        raise UserError(f"ssl.mask_patch must be (in-plane size,) or {ndim} positive sizes, got {cfg.mask_patch!r}.")
    return patch


def build_reconstruction_model(model_cfg: ml_collections.ConfigDict) -> nn.Module:
    """The segmentation model of `model_cfg` with one output channel (the predicted image) and no
    deep supervision: the same parameter tree as the model to fine-tune, but for its head."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.out_channels = 1
    if "deep_supervision" in cfg:
        cfg.deep_supervision = False
    return models.build(cfg)


def random_patch_mask(rng: jax.Array, spatial: tuple[int, ...], batch: int, patch: tuple[int, ...],
                      ratio: float) -> jax.Array:
    """(batch, *spatial) float32, 1 where hidden: exactly round(ratio x patches) whole patches of
    `patch` voxels per example, chosen uniformly without replacement."""
    grid = tuple(s // p for s, p in zip(spatial, patch))
    n = math.prod(grid)
    hidden = hidden_count(n, ratio)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, n)), axis=1), axis=1)
    mask = (ranks < hidden).astype(jnp.float32).reshape(batch, *grid)
    for axis, p in enumerate(patch):
        mask = jnp.repeat(mask, p, axis=axis + 1)
    return mask


def hidden_count(n: int, ratio: float) -> int:
    """How many of `n` patches a mask ratio hides: round(ratio x n), at least 1 and at most n - 1."""
    return max(1, min(n - 1, round(ratio * n)))


def masked_inputs(rng: jax.Array, image: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(network input, mask (B, *S, 1)) for a normalised `image` (B, *S, 1): hidden patches are 0,
    every pixel gets N(0, noise_std^2) noise when `noise_std` > 0."""
    mask_rng, noise_rng = jax.random.split(rng)
    spatial = image.shape[1:-1]
    mask = random_patch_mask(mask_rng, spatial, image.shape[0], mask_patch_shape(cfg, len(spatial)),
                             cfg.mask_ratio)[..., None]
    inputs = image * (1.0 - mask)
    if cfg.noise_std > 0:
        inputs = inputs + cfg.noise_std * jax.random.normal(noise_rng, image.shape, image.dtype)
    return inputs, mask


def reconstruction_loss(prediction: jax.Array, target: jax.Array, mask: jax.Array,
                        mask_loss: str = "masked") -> tuple[jax.Array, dict]:
    """(loss, metrics) for float32 (B, *S, 1) arrays: MSE over the hidden pixels (or all with
    mask_loss='all'), masked_r2 and visible_mse."""
    err = jnp.square(prediction - target)
    hidden = jnp.maximum(jnp.sum(mask), 1.0)
    visible = jnp.maximum(jnp.sum(1.0 - mask), 1.0)
    masked_mse = jnp.sum(err * mask) / hidden
    target_mean = jnp.sum(target * mask) / hidden
    target_var = jnp.sum(jnp.square(target - target_mean) * mask) / hidden
    metrics = {"masked_r2": 1.0 - masked_mse / jnp.maximum(target_var, 1e-6),
               "visible_mse": jnp.sum(err * (1.0 - mask)) / visible}
    loss = masked_mse if mask_loss == "masked" else jnp.mean(err)
    return loss, metrics


def make_masked_step(model: nn.Module, cfg: ml_collections.ConfigDict, augment_fn: Callable) -> Callable:
    """Builds `train_step(state, batch) -> (state, metrics)` for masked image modelling.

    batch: {"image": (B, *spatial, 1) float32, normalised}; `augment_fn(rng, {"image": ...})` makes
    the one view. metrics: loss, masked_r2, visible_mse, grad_norm.
    """

    def loss_fn(params, state, inputs, target, mask):
        (prediction, _), batch_stats = train_mode_apply(model, params, state.batch_stats, inputs)
        loss, metrics = reconstruction_loss(prediction.astype(jnp.float32), target, mask, cfg.mask_loss)
        return loss, (metrics, batch_stats)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        augment_rng, mask_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
        target = augment_fn(augment_rng, {"image": batch["image"]})["image"].astype(jnp.float32)
        inputs, mask = masked_inputs(mask_rng, target, cfg)
        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, inputs, target, mask)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        state = state.replace(step=state.step + 1, params=params, ema_params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
        return state, {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads)}

    return train_step

