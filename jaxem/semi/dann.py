"""Feature-level domain adaptation (DANN, Ganin & Lempitsky 2015): a domain classifier on the
encoder's deepest features, behind a gradient-reversal layer.

    jaxem train --config demo.py --workdir runs/dann --config.semi.dann_weight=0.1 \
        --config.semi.unlabelled_images="('target_raw.zarr',)"

The classifier (global average pooling, then an MLP of `semi.dann_widths`, then one logit) learns
to tell labelled source crops (domain 0) from unlabelled target crops (domain 1) by their encoder
features. Between the encoder and the classifier sits the gradient-reversal layer: the identity
forward, -lambda x the gradient backward. So one backward pass of `loss + dann_weight * BCE` gives
the classifier the gradient that lowers the BCE and the encoder the one that raises it: the encoder
learns features the classifier cannot tell apart, i.e. features that do not depend on the domain.
lambda ramps from 0 to 1 as 2 / (1 + exp(-GAMMA p)) - 1, p = step / train.steps, so the untrained
classifier's noise does not disturb the early steps. The classifier's parameters and Adam state
(`semi.dann_lr`) live beside the discriminator of jaxem.semi.adversarial in the train state.
The features are the return value of the model's `encoder` submodule, captured during the forward
passes the step already makes (flax `capture_intermediates`): every jaxem model has one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxem.errors import UserError

GAMMA = 10.0  # steepness of Ganin & Lempitsky's lambda schedule
ENCODER = "encoder"  # the submodule every jaxem model holds its encoder under (jaxem.models)
SOURCE, TARGET = 0.0, 1.0  # domain labels


class DomainClassifier(nn.Module):
    """Features (B, *S, C) (or ViT tokens (B, N, C)) -> domain logits (B,), target = positive:
    the mean over every axis between the first and the last, then Dense + ReLU per width, then
    Dense(1)."""

    widths: Sequence[int] = (64, 64)

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        x = jnp.mean(features.astype(jnp.float32), axis=tuple(range(1, features.ndim - 1)))
        for width in self.widths:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(1)(x)[:, 0]


def classifier(semi_cfg: ml_collections.ConfigDict) -> DomainClassifier:
    """The domain classifier `semi.dann_widths` describes."""
    return DomainClassifier(tuple(int(w) for w in semi_cfg.dann_widths))


def optimizer(semi_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam at `semi.dann_lr`."""
    return optax.adam(semi_cfg.dann_lr)


def init_domain_classifier(semi_cfg: ml_collections.ConfigDict, rng: jax.Array, features_shape) -> dict:
    """{"params", "opt_state"}: a fresh domain classifier for encoder features of `features_shape`
    (B, *S, C) and its Adam state (the trainer keeps it in its train state)."""
    params = classifier(semi_cfg).init(rng, jnp.zeros(features_shape, jnp.float32))["params"]
    return {"params": params, "opt_state": optimizer(semi_cfg).init(params)}


def grl_lambda(step: jax.Array, total_steps: int) -> jax.Array:
    """Ganin & Lempitsky's reversal scale at `step` of `total_steps`: 2 / (1 + exp(-GAMMA p)) - 1,
    p = step / total_steps clipped to [0, 1] (0 at the start, 0.987 at p = 0.5, 0.99991 at 1)."""
    p = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return 2.0 / (1.0 + jnp.exp(-GAMMA * p)) - 1.0


@jax.custom_vjp
def reverse_gradient(x: jax.Array, lam: jax.Array) -> jax.Array:
    """The gradient-reversal layer: `x` forward; backward the cotangent times -`lam` (and none for
    `lam`)."""
    return x


def _reverse_fwd(x, lam):
    return x, lam


def _reverse_bwd(lam, g):
    return jax.tree.map(lambda t: (-lam * t).astype(t.dtype), g), jnp.zeros_like(lam)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


def captures_encoder(module: nn.Module, method: str) -> bool:
    """The `capture_intermediates` filter that keeps the model's encoder output only."""
    return method == "__call__" and module.scope.path == (ENCODER,)


def deepest_features(state: dict) -> jax.Array:
    """The deepest features (the last of the encoder's list, fine to coarse) from the mutable state
    `model.apply(..., capture_intermediates=captures_encoder, mutable=[..., "intermediates"])`
    returned; UserError when the model has no `encoder` submodule."""
    captured = state.get("intermediates", {}).get(ENCODER, {}).get("__call__")
    if not captured:
        raise UserError(f"semi.dann_weight > 0 needs a model with an '{ENCODER}' submodule (its features are what "
                        f"the domain classifier sees); this model has none.")
    features = captured[0]
    return features[-1] if isinstance(features, (list, tuple)) else features


def bce(logits: jax.Array, label: float) -> jax.Array:
    """Mean binary cross-entropy of `logits` against a constant domain label."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, label)))


def domain_loss(params, clf: DomainClassifier, source: jax.Array, target: jax.Array, lam: jax.Array):
    """(BCE, accuracy) of the classifier on source (label 0) and target (label 1) features seen
    through the gradient-reversal layer of scale `lam`: the mean of both domains' BCE, and the mean
    of both domains' fraction classified right. Its gradient lowers the BCE in `params` and (times
    -lam) raises it in whatever made the features."""
    logits = [clf.apply({"params": params}, reverse_gradient(f, lam)) for f in (source, target)]
    loss = 0.5 * (bce(logits[0], SOURCE) + bce(logits[1], TARGET))
    accuracy = 0.5 * (jnp.mean(logits[0] < 0) + jnp.mean(logits[1] > 0))
    return loss, accuracy


def update_classifier(domain: dict, semi_cfg: ml_collections.ConfigDict, grads) -> dict:
    """One Adam step of the classifier {"params", "opt_state"} on `grads`, the gradient of the train
    step's loss in its params (that is dann_weight x the BCE's: divided back out, so its step does
    not depend on the weight)."""
    grads = jax.tree.map(lambda g: g / semi_cfg.dann_weight, grads)
    updates, opt_state = optimizer(semi_cfg).update(grads, domain["opt_state"], domain["params"])
    return {"params": optax.apply_updates(domain["params"], updates), "opt_state": opt_state}
