"""Losses for dense prediction. All take logits and targets of shape (B, *spatial, K) and an
optional mask of the same shape (1 = voxel counts), and return a scalar float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def binary_cross_entropy(logits, targets, mask=None, pos_weight: float = 1.0) -> jax.Array:
    """Sigmoid cross-entropy, optionally up-weighting positives (e.g. thin membranes)."""
    losses = optax.sigmoid_binary_cross_entropy(logits, targets)
    if pos_weight != 1.0:
        losses = losses * (1.0 + (pos_weight - 1.0) * targets)
    return _masked_mean(losses, mask)


def soft_dice(logits, targets, mask=None, eps: float = 1.0) -> jax.Array:
    """1 - soft Dice of sigmoid(logits) against targets, averaged over channels."""
    probs = jax.nn.sigmoid(logits)
    mask = jnp.ones_like(probs) if mask is None else mask
    axes = tuple(range(probs.ndim - 1))
    inter = jnp.sum(probs * targets * mask, axis=axes)
    total = jnp.sum((probs + targets) * mask, axis=axes)
    return 1.0 - jnp.mean((2.0 * inter + eps) / (total + eps))


def focal(logits, targets, mask=None, gamma: float = 2.0) -> jax.Array:
    """Sigmoid focal loss (Lin et al. 2017) for heavily imbalanced targets."""
    return _masked_mean(optax.sigmoid_focal_loss(logits, targets, gamma=gamma), mask)


def softmax_cross_entropy(logits, targets, mask=None) -> jax.Array:
    """Cross-entropy for one-hot multiclass targets; mask is (B, *spatial, K) or (B, *spatial, 1)."""
    losses = optax.softmax_cross_entropy(logits, targets)[..., None]
    return _masked_mean(losses, None if mask is None else mask[..., :1])


LOSSES = {"bce": binary_cross_entropy, "dice": soft_dice, "focal": focal, "softmax_ce": softmax_cross_entropy}


def segmentation_loss(loss_cfg, logits, targets, mask=None) -> tuple[jax.Array, dict]:
    """Weighted sum of the losses named in `loss_cfg.terms` ({'bce': 1.0, 'dice': 0.5}).

    Returns the total and each term (for logging).
    """
    parts = {}
    for name, weight in loss_cfg.terms.items():
        kwargs = {"pos_weight": loss_cfg.pos_weight} if name == "bce" else {}
        parts[f"loss_{name}"] = LOSSES[name](logits, targets, mask, **kwargs) * weight
    return sum(parts.values()), parts


def info_nce(queries: jax.Array, keys: jax.Array, temperature: float = 0.1) -> jax.Array:
    """InfoNCE / NT-Xent: row i of `queries` (N, D) matches row i of `keys` (N, D), all else negative."""
    q = queries / jnp.linalg.norm(queries, axis=-1, keepdims=True)
    k = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    logits = q @ k.T / temperature
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(q.shape[0])))
