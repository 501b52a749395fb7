"""Output-space adversarial domain adaptation (AdaptSegNet, Tsai et al. 2018) for EM from another
microscope, lab or staining: labelled crops of the source domain, unlabelled crops of the target.

    jaxem train --config demo.py --workdir runs/da --config.semi.adversarial_weight=0.01 \
        --config.semi.unlabelled_images="('target_raw.zarr',)"

A small fully convolutional discriminator looks at predicted probability maps, patch by patch, and
learns to tell source predictions (label 1) from target ones (label 0). The segmenter gets, beside
its supervised loss on the source, `adversarial_weight * ramp(step) * BCE(D(p_target), 1)`: it is
pushed to make its target-domain predictions look like source-domain ones (thin, continuous
membranes rather than the blotchy maps a shifted domain gives). Each step updates the segmenter with
the current discriminator, then the discriminator (Adam, `semi.discriminator_lr`) on that step's
source and target predictions, without gradient into the segmenter. Works with any model and target
kind (it only sees outputs) and combines with the mean teacher (both read the same unlabelled crops).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax


class Discriminator(nn.Module):
    """Patch classifier on probability maps: (B, *S, K) -> logits (B, *S', 1), source = positive.

    One 3-wide convolution per width with leaky ReLU (0.2); each halves every spatial axis still
    >= 8 voxels long (so thin anisotropic z extents stop shrinking), then a 3-wide convolution to one
    logit per patch. 2D or 3D from the input's rank; no normalisation (as in AdaptSegNet).
    """

    widths: Sequence[int] = (32, 64, 128)

    @nn.compact
    def __call__(self, probs: jax.Array) -> jax.Array:
        x = probs.astype(jnp.float32)
        kernel = (3,) * (x.ndim - 2)
        for width in self.widths:
            strides = tuple(2 if s >= 8 else 1 for s in x.shape[1:-1])
            x = nn.leaky_relu(nn.Conv(width, kernel, strides=strides, padding="SAME")(x), 0.2)
        return nn.Conv(1, kernel, padding="SAME")(x)


def discriminator(semi_cfg: ml_collections.ConfigDict) -> Discriminator:
    """The discriminator `semi.discriminator_widths` describes."""
    return Discriminator(tuple(int(w) for w in semi_cfg.discriminator_widths))


def optimizer(semi_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with AdaptSegNet's betas (0.9, 0.99) at `semi.discriminator_lr`."""
    return optax.adam(semi_cfg.discriminator_lr, b1=0.9, b2=0.99)


def init_adversary(semi_cfg: ml_collections.ConfigDict, rng: jax.Array, probs_shape: tuple[int, ...]) -> dict:
    """{"params", "opt_state"}: a freshly initialised discriminator for probability maps of
    `probs_shape` (B, *S, K) and its optimizer state (the trainer keeps it in its train state)."""
    params = discriminator(semi_cfg).init(rng, jnp.zeros(probs_shape, jnp.float32))["params"]
    return {"params": params, "opt_state": optimizer(semi_cfg).init(params)}


def bce(logits: jax.Array, label: float) -> jax.Array:
    """Mean binary cross-entropy of `logits` against a constant label (1 = source, 0 = target)."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, label)))


def segmenter_loss(disc: Discriminator, params, target_probs: jax.Array) -> jax.Array:
    """What the segmenter minimises: BCE of the discriminator calling target predictions source
    (the non-saturating GAN loss); `params` are the discriminator's and get no gradient here."""
    return bce(disc.apply({"params": jax.lax.stop_gradient(params)}, target_probs), 1.0)


def discriminator_loss(params, disc: Discriminator, source_probs: jax.Array, target_probs: jax.Array):
    """(loss, accuracy) of the discriminator on source (label 1) and target (label 0) predictions;
    accuracy = mean over both domains of the fraction of patches it classifies right."""
    source_logits = disc.apply({"params": params}, source_probs)
    target_logits = disc.apply({"params": params}, target_probs)
    loss = 0.5 * (bce(source_logits, 1.0) + bce(target_logits, 0.0))
    accuracy = 0.5 * (jnp.mean(source_logits > 0) + jnp.mean(target_logits < 0))
    return loss, accuracy


def update_discriminator(adversary: dict, semi_cfg: ml_collections.ConfigDict, source_probs: jax.Array,
                         target_probs: jax.Array) -> tuple[dict, dict]:
    """One Adam step of the discriminator on detached predictions -> (adversary, metrics)."""
    source_probs, target_probs = jax.lax.stop_gradient((source_probs, target_probs))
    grad_fn = jax.value_and_grad(discriminator_loss, has_aux=True)
    (loss, accuracy), grads = grad_fn(adversary["params"], discriminator(semi_cfg), source_probs, target_probs)
    updates, opt_state = optimizer(semi_cfg).update(grads, adversary["opt_state"], adversary["params"])
    adversary = {"params": optax.apply_updates(adversary["params"], updates), "opt_state": opt_state}
    return adversary, {"discriminator_loss": loss, "discriminator_accuracy": accuracy}
