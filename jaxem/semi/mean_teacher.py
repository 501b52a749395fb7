"""Semi-supervised training with a mean teacher (Tarvainen & Valpola 2017) on unlabelled EM.

Any supervised config becomes semi-supervised by naming unlabelled volumes and a weight:

    jaxem train --config demo.py --workdir runs/mt --config.train.ema_decay=0.99 \
        --config.semi.unlabelled_images="('raw.zarr',)" --config.semi.weight=1.0

Each step then also draws `semi.batch_size` unlabelled crops, augments them (the same on-device
augmentations as the labelled ones), and adds `weight * ramp(step) * consistency` to the loss: the
mean squared difference between the student's probabilities (the trained network, train mode) and
the teacher's (its exponential moving average `ema_params`, eval mode, no gradient), each fed the
augmented crop with its own Gaussian noise of std `semi.noise_std`. ramp(t) = exp(-5 (1 - t)^2)
over the first `semi.rampup_steps` steps, so the teacher's early guesses weigh little. The teacher
is what validation and inference use (EMA weights). The `semi` section and the unlabelled loader
are in jaxem.semi.unlabelled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rampup(step: jax.Array, steps: int) -> jax.Array:
    """exp(-5 (1 - t)^2) with t = min(step / steps, 1): 0.0067 at the start, 1 from `steps` on."""
    if steps <= 0:
        return jnp.ones((), jnp.float32)
    t = jnp.clip(step.astype(jnp.float32) / steps, 0.0, 1.0)
    return jnp.exp(-5.0 * (1.0 - t) ** 2)


def consistency(student_probs: jax.Array, teacher_probs: jax.Array) -> jax.Array:
    """Mean squared difference of probabilities; no gradient reaches the teacher."""
    return jnp.mean((student_probs - jax.lax.stop_gradient(teacher_probs)) ** 2)


def noisy_pair(rng: jax.Array, image: jax.Array, std: float) -> tuple[jax.Array, jax.Array]:
    """(student input, teacher input): `image` with two independent Gaussian noises of `std`."""
    k1, k2 = jax.random.split(rng)
    return (image + std * jax.random.normal(k1, image.shape, image.dtype),
            image + std * jax.random.normal(k2, image.shape, image.dtype))
