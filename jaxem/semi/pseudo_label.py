"""Self-training with confident pseudo-labels: pseudo-labelling (a teacher labels unlabelled crops),
FixMatch (the model's own weak-view labels train its strong view) and 4S-style slice propagation
(the teacher labels the unannotated sections next to annotated ones).

    jaxem train --config demo.py --workdir runs/pl --config.train.ema_decay=0.99 \
        --config.semi.unlabelled_images="('raw.zarr',)" --config.semi.method=pseudo_label \
        --config.semi.weight=1.0 --config.semi.confidence=0.9

A voxel is confident when the teacher's probability of its hard label is >= `semi.confidence`:
max(p, 1 - p) per channel for sigmoid targets, the largest softmax probability for multiclass. The
term is the BCE (sigmoid) or cross-entropy (multiclass) of the student's logits against the hard
labels, averaged over the confident voxels of the whole batch (0 when none is). Pseudo-labels are
made for the whole batch before it is split into micro-batches, and each voxel carries the weight
`confident / confident fraction of the batch`, so a plain mean over the voxels of each micro-batch,
averaged over micro-batches, is the mean over the batch's confident voxels: gradient accumulation
gives the update of one pass. Pure functions; the trainer (jaxem.train.supervised) calls them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

TINY = 1e-12  # below any confident fraction of a real batch; guards 0 / 0 when nothing is confident


def confident_labels(target_kind: str, probs: jax.Array, confidence: float) -> tuple[jax.Array, jax.Array]:
    """(hard labels, confident mask) of teacher probabilities `probs` (B, *S, K), both float32.

    Sigmoid targets: labels (p >= 0.5) and mask max(p, 1 - p) >= confidence, per channel, (B, *S, K).
    Multiclass: labels one-hot of the argmax (B, *S, K), mask max_k p >= confidence (B, *S, 1).
    """
    probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
    if target_kind == "multiclass":
        labels = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=jnp.float32)
        return labels, (jnp.max(probs, axis=-1, keepdims=True) >= confidence).astype(jnp.float32)
    return (probs >= 0.5).astype(jnp.float32), (jnp.maximum(probs, 1.0 - probs) >= confidence).astype(jnp.float32)


def voxel_weights(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mask / its mean, its mean): weights whose plain mean of a per-voxel loss is the loss's mean
    over the masked voxels (all 0 when none is), and the masked fraction (a metric)."""
    fraction = jnp.mean(mask)
    return mask / jnp.maximum(fraction, TINY), fraction


def pseudo_targets(target_kind: str, probs: jax.Array, confidence: float) -> tuple[dict, jax.Array]:
    """({"target", "weight"} for `loss`, fraction of confident voxels) from teacher `probs` (B, *S, K)."""
    labels, mask = confident_labels(target_kind, probs, confidence)
    weight, fraction = voxel_weights(mask)
    return {"target": labels, "weight": weight}, fraction


def loss(target_kind: str, logits: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean over voxels of `weight` x the per-voxel loss of student `logits` (B, *S, K) against hard
    labels `target` (B, *S, K): sigmoid BCE per channel, or softmax cross-entropy (weight (B, *S, 1))."""
    logits = logits.astype(jnp.float32)
    if target_kind == "multiclass":
        per_voxel = optax.softmax_cross_entropy(logits, target)[..., None]
    else:
        per_voxel = optax.sigmoid_binary_cross_entropy(logits, target)
    return jnp.mean(weight * per_voxel)


def near_annotated_sections(mask: jax.Array, k: int) -> jax.Array:
    """(B, Z, Y, X) float32: 1 on the sections of 3D crops that hold no labelled voxel but lie within
    +-k sections of one that does. `mask` (B, Z, Y, X): 1 = labelled voxel."""
    annotated = jnp.any(mask > 0, axis=(2, 3))  # (B, Z)
    near = annotated
    for shift in range(1, k + 1):
        padded = jnp.pad(annotated, ((0, 0), (shift, shift)))
        near = near | padded[:, 2 * shift:] | padded[:, :-2 * shift]
    target = near & ~annotated
    return jnp.broadcast_to(target[:, :, None, None], mask.shape).astype(jnp.float32)


def propagated_targets(target_kind: str, probs: jax.Array, mask: jax.Array, k: int,
                       confidence: float) -> tuple[dict, jax.Array]:
    """4S-style slice propagation on labelled 3D crops: ({"target", "weight"} for `loss`, fraction of
    voxels it trains). The teacher's confident labels `probs` (B, Z, Y, X, K) on the sections without
    annotation within +-k of an annotated one (`mask` (B, Z, Y, X), 1 = labelled) become targets."""
    labels, confident = confident_labels(target_kind, probs, confidence)
    weight, fraction = voxel_weights(confident * near_annotated_sections(mask, k)[..., None])
    return {"target": labels, "weight": weight}, fraction
