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


def unit_vectors(x: jax.Array) -> jax.Array:
    """Rows of `x` (N, D) scaled to length 1 (zero rows stay zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _similarities(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
    # Full float32 precision: a temperature of 0.1-0.2 multiplies any rounding of the dot products.
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST) / temperature


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """SimCLR's NT-Xent loss over the 2N embeddings of N positive pairs (z1[i], z2[i]), each (N, D).

    Every embedding must pick its partner out of the other 2N - 1 (all other views are negatives;
    under jit on a 'data'-sharded batch these include the other devices' views). Returns
    (mean loss, top-1 accuracy of picking the partner).
    """
    n = z1.shape[0]
    z = unit_vectors(jnp.concatenate([z1, z2]).astype(jnp.float32))
    logits = _similarities(z, z, temperature)
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -1e9, logits)  # a view is not its own negative
    partner = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, partner)
    return jnp.mean(loss), jnp.mean(jnp.argmax(logits, axis=-1) == partner)


def moco_infonce(queries: jax.Array, keys: jax.Array, queue: jax.Array,
                 temperature: float = 0.2) -> tuple[jax.Array, jax.Array]:
    """MoCo's InfoNCE: query i (N, D) must pick its key i (N, D) against the K queued keys (K, D).

    `keys` and `queue` are constants (no gradient flows into them); `queue` rows are unit vectors.
    Returns (mean loss, top-1 accuracy of picking the positive key).
    """
    q = unit_vectors(queries.astype(jnp.float32))
    k = jax.lax.stop_gradient(unit_vectors(keys.astype(jnp.float32)))
    return _queue_infonce(q, k, queue, temperature)


def _queue_infonce(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """InfoNCE of unit queries q (N, D) against their unit keys k (N, D) and the queue (K, D)."""
    positive = jnp.sum(q * k, axis=-1, keepdims=True) / temperature
    logits = jnp.concatenate([positive, _similarities(q, jax.lax.stop_gradient(queue), temperature)], axis=-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(q.shape[0], jnp.int32))
    return jnp.mean(loss), jnp.mean(jnp.argmax(logits, axis=-1) == 0)


def unit_vectors_safe(x: jax.Array) -> jax.Array:
    """Rows of `x` (N, D) scaled to length 1; zero rows stay zero with a zero gradient (`unit_vectors`
    gives them a NaN one): a dense head's output is exactly 0 wherever its input and biases are
    (locations whose ReLU'd features are all 0, at initialisation)."""
    squares = jnp.sum(x * x, axis=-1, keepdims=True)
    nonzero = squares > 0
    return jnp.where(nonzero, x * jax.lax.rsqrt(jnp.where(nonzero, squares, 1.0)), 0.0)


def flatten_locations(x: jax.Array) -> jax.Array:
    """A feature map (B, *S, C) as (B, prod(S), C): one row per location, in row-major order."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def match_locations(query_features: jax.Array, key_features: jax.Array) -> jax.Array:
    """DenseCL's correspondence: for every location i of each query map, the key location j of the
    same example whose feature vector is the most similar, argmax_j cos(query[b, i], key[b, j]).

    query_features (B, *Sq, C), key_features (B, *Sk, C), any dtype (compared in float32) ->
    (B, prod(Sq)) int32 indices into the row-major flattened key locations. No gradient.
    """
    q = unit_vectors(flatten_locations(query_features).astype(jnp.float32))
    k = unit_vectors(flatten_locations(key_features).astype(jnp.float32))
    sims = jnp.einsum("bic,bjc->bij", q, k, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.stop_gradient(jnp.argmax(sims, axis=-1).astype(jnp.int32))


def dense_infonce(queries: jax.Array, keys: jax.Array, match: jax.Array, queue: jax.Array,
                  temperature: float = 0.2) -> tuple[jax.Array, jax.Array]:
    """DenseCL's dense InfoNCE: the query vector at location i of example b must pick the key vector
    at location match[b, i] of the same example against the K queued keys (MoCo's InfoNCE over all
    B * prod(Sq) locations).

    queries (B, *Sq, D), keys (B, *Sk, D) (a constant: no gradient), match (B, prod(Sq)) int from
    `match_locations`, queue (K, D) unit rows (DenseCL: globally pooled dense keys of earlier steps).
    Returns (mean loss over locations, top-1 accuracy of picking the matched key).
    """
    q, k = flatten_locations(queries), flatten_locations(keys)
    matched = jnp.take_along_axis(k, match[..., None].astype(jnp.int32), axis=1)  # (B, Sq, D)
    q = unit_vectors_safe(q.reshape(-1, q.shape[-1]).astype(jnp.float32))
    matched = jax.lax.stop_gradient(unit_vectors_safe(matched.reshape(-1, k.shape[-1]).astype(jnp.float32)))
    return _queue_infonce(q, matched, queue, temperature)
