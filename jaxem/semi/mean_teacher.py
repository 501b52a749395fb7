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
is what validation and inference use (EMA weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxem.errors import UserError


def default_semi_config() -> ml_collections.ConfigDict:
    """Every `config.semi` field: off (weight 0) unless unlabelled volumes and a weight are set."""
    return ml_collections.ConfigDict(dict(
        unlabelled_images=(),  # volumes without labels (any format jaxem reads)
        weight=0.0,            # consistency weight at the end of the ramp; 0 = supervised only
        batch_size=8,          # unlabelled crops per step (global, like data.batch_size)
        rampup_steps=200,
        noise_std=0.1,         # input noise of student and teacher, in normalized-image units
    ))


def enabled(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether a `semi` config section turns the mean teacher on."""
    return cfg is not None and float(cfg.get("weight", 0.0)) > 0


def check_semi_config(config: ml_collections.ConfigDict) -> None:
    """UserError naming the field that stops a mean teacher from running."""
    semi = config.semi
    if not semi.unlabelled_images:
        raise UserError("semi.weight > 0 needs semi.unlabelled_images (volumes without labels).")
    if config.train.ema_decay <= 0:
        raise UserError("the mean teacher is the EMA of the trained weights: set train.ema_decay > 0 (e.g. 0.99).")
    if config.train.accumulate_steps != 1:
        raise UserError("semi-supervised training runs with train.accumulate_steps=1.")
    if semi.rampup_steps < 0 or semi.noise_std < 0:
        raise UserError("semi.rampup_steps and semi.noise_std must be >= 0.")


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


class PairedLoader:
    """Labelled batches with `semi.batch_size` unlabelled crops added under "unlabelled"
    ((B_u, *crop, 1) float32); resumes both at their exact positions."""

    def __init__(self, labelled, unlabelled):
        self.labelled, self.unlabelled = labelled, unlabelled

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return dict(next(self.labelled), unlabelled=next(self.unlabelled)["image"])

    def get_state(self) -> dict:
        return {"labelled": self.labelled.get_state(), "unlabelled": self.unlabelled.get_state()}

    def set_state(self, state: dict) -> None:
        if "labelled" not in state:
            raise UserError(f"the checkpoint's data position {sorted(state)} does not fit this run's loader (was "
                            f"semi-supervised training turned on or off?); use a new --workdir.")
        self.labelled.set_state(state["labelled"])
        self.unlabelled.set_state(state["unlabelled"])

    def close(self) -> None:
        self.labelled.close()
        self.unlabelled.close()


def make_unlabelled_loader(config: ml_collections.ConfigDict, mesh):
    """The loader of `semi.unlabelled_images` crops (crop shape and normalisation of `config.data`)."""
    from jaxem.data import pipeline

    data = ml_collections.ConfigDict(config.data.to_dict())
    data.train_images, data.train_masks = tuple(config.semi.unlabelled_images), ()
    data.batch_size = int(config.semi.batch_size)
    # Another seed than the labelled loader's, so unlabelled crops are not drawn in lockstep with them.
    return pipeline.make_loader(data, mesh=mesh, ndim=config.model.ndim, seed=config.seed + 7919, split="train",
                                labelled=False)

