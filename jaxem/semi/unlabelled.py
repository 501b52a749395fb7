"""The `semi` config section, what it adds to a run's checkpoints, and the loader of unlabelled
crops that every way of learning from unlabelled EM shares: the mean teacher
(jaxem.semi.mean_teacher), self-training with pseudo-labels and FixMatch (jaxem.semi.pseudo_label),
chosen by `semi.method` and on at `semi.weight` > 0, output-space adversarial domain adaptation
(jaxem.semi.adversarial, on at `semi.adversarial_weight` > 0) and feature-level domain adaptation
(jaxem.semi.dann, on at `semi.dann_weight` > 0), alone or together. This package holds pure loss
terms and config; the trainer (jaxem.train) adds them to its loss and keeps the discriminator and
the domain classifier in its train state.
"""

from __future__ import annotations

import ml_collections

from jaxem.config import fingerprint
from jaxem.data import pipeline
from jaxem.data.augment import strong_photometric_config
from jaxem.errors import UserError

METHODS = ("mean_teacher", "pseudo_label", "fixmatch")  # what semi.weight weighs
PSEUDO_METHODS = ("pseudo_label", "fixmatch")

# How a workdir check names the add-ons with parameters of their own.
DISCRIMINATOR = "domain discriminator (semi.adversarial_weight > 0, semi.discriminator_widths)"
DOMAIN_CLASSIFIER = "DANN domain classifier (semi.dann_weight > 0, semi.dann_widths)"
ROUND_TEACHER = "frozen teacher of self-training rounds (semi.method='pseudo_label', semi.rounds > 1)"


def default_semi_config() -> ml_collections.ConfigDict:
    """Every `config.semi` field: off (every weight 0) unless unlabelled volumes and a weight are set."""
    return ml_collections.ConfigDict(dict(
        unlabelled_images=(),  # volumes without labels (any format jaxem reads): more data, or the target domain
        method="mean_teacher",  # what semi.weight weighs: mean_teacher | pseudo_label | fixmatch
        weight=0.0,            # weight of `method`'s term at the end of the ramp; 0 = off
        adversarial_weight=0.0,  # output-space adversarial weight at the end of the ramp; 0 = off (e.g. 0.01)
        batch_size=8,          # unlabelled crops per step (global, like data.batch_size)
        rampup_steps=200,      # both weights ramp up as exp(-5 (1 - t)^2) over these steps
        noise_std=0.1,         # mean teacher: input noise of student and teacher, in normalized-image units
        discriminator_widths=(32, 64, 128),  # adversarial: features per strided conv of the discriminator
        discriminator_lr=1e-4,  # adversarial: Adam learning rate of the discriminator
        dann_weight=0.0,       # DANN: weight of the domain classifier's BCE on encoder features; 0 = off (e.g. 0.1)
        dann_widths=(64, 64),  # DANN: hidden widths of the domain classifier's MLP (on pooled deepest features)
        dann_lr=1e-3,          # DANN: Adam learning rate of the domain classifier
        confidence=0.9,        # pseudo_label/fixmatch: a voxel's hard label trains when its probability >= this
        teacher="",            # pseudo_label: a finished run's WORKDIR as frozen teacher; "" = the EMA (train.ema_decay)
        rounds=1,              # pseudo_label: rounds > 1 split train.steps into rounds; each later round's teacher is
                               # the student (its EMA weights) frozen when the round begins
        propagate_slices=0,    # pseudo_label, 3D: teacher labels on unannotated sections within +-k of annotated ones
        strong_augment=strong_photometric_config(),  # fixmatch: the strong view's extra photometric ops
    ))


def method_on(cfg: ml_collections.ConfigDict | None) -> str:
    """The `semi.method` a `semi` section turns on ("" with semi.weight 0 or no section)."""
    if cfg is None or float(cfg.get("weight", 0.0)) <= 0:
        return ""
    return str(cfg.get("method", "mean_teacher"))


def mean_teacher_on(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether a `semi` config section turns the mean teacher on."""
    return method_on(cfg) == "mean_teacher"


def pseudo_on(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether a `semi` config section turns pseudo-labelling or FixMatch on."""
    return method_on(cfg) in PSEUDO_METHODS


def adversarial_on(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether a `semi` config section turns adversarial domain adaptation on."""
    return cfg is not None and float(cfg.get("adversarial_weight", 0.0)) > 0


def rounds_on(cfg: ml_collections.ConfigDict | None) -> int:
    """The number of self-training rounds a `semi` section asks for: semi.rounds with pseudo_label
    on, else 1."""
    return int(cfg.get("rounds", 1)) if method_on(cfg) == "pseudo_label" else 1


def dann_on(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether a `semi` config section turns feature-level domain adaptation (DANN) on."""
    return cfg is not None and float(cfg.get("dann_weight", 0.0)) > 0


def enabled(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether training reads unlabelled crops (a `semi.method` at weight > 0, adversarial
    adaptation, DANN, or several)."""
    return bool(method_on(cfg)) or adversarial_on(cfg) or dann_on(cfg)


def check_semi_config(config: ml_collections.ConfigDict) -> None:
    """UserError naming the field that stops semi-supervised training from running (only a
    negative weight when every add-on is off)."""
    semi = config.semi
    for field in ("weight", "adversarial_weight", "dann_weight"):
        if semi[field] < 0:
            raise UserError(f"semi.{field}={semi[field]} must be >= 0 (0 = off).")
    if not enabled(semi):
        return
    if not semi.unlabelled_images:
        raise UserError("semi.weight, semi.adversarial_weight or semi.dann_weight > 0 needs semi.unlabelled_images "
                        "(volumes without labels).")
    if semi.method not in METHODS:
        raise UserError(f"semi.method={semi.method!r} must be one of {', '.join(METHODS)}.")
    if mean_teacher_on(semi) and config.train.ema_decay <= 0:
        raise UserError("the mean teacher is the EMA of the trained weights: set train.ema_decay > 0 (e.g. 0.99).")
    if pseudo_on(semi):
        check_pseudo_config(config)
    if semi.rampup_steps < 0 or semi.noise_std < 0:
        raise UserError("semi.rampup_steps and semi.noise_std must be >= 0.")
    if adversarial_on(semi) and (not semi.discriminator_widths or min(semi.discriminator_widths) < 1
                                 or semi.discriminator_lr <= 0):
        raise UserError(f"semi.discriminator_widths={tuple(semi.discriminator_widths)} must be positive feature "
                        f"counts and semi.discriminator_lr={semi.discriminator_lr} > 0.")
    if dann_on(semi) and (not semi.dann_widths or min(semi.dann_widths) < 1 or semi.dann_lr <= 0):
        raise UserError(f"semi.dann_widths={tuple(semi.dann_widths)} must be positive feature counts (at least one) "
                        f"and semi.dann_lr={semi.dann_lr} > 0.")


def check_pseudo_config(config: ml_collections.ConfigDict) -> None:
    """UserError naming the field that stops pseudo-labelling or FixMatch from running."""
    semi, ema = config.semi, config.train.ema_decay > 0
    if not 0.5 < semi.confidence <= 1:
        raise UserError(f"semi.confidence={semi.confidence} must lie in (0.5, 1]: a voxel is confident when the "
                        f"probability of its hard label is at least this.")
    if semi.method == "pseudo_label" and not (ema or semi.teacher):
        raise UserError("semi.method='pseudo_label' needs a teacher: set train.ema_decay > 0 (the EMA teacher) or "
                        "semi.teacher=WORKDIR (a finished run).")
    if semi.rounds < 1 or (semi.rounds > 1 and (semi.method != "pseudo_label" or semi.rounds > config.train.steps)):
        raise UserError(f"semi.rounds={semi.rounds} must be >= 1; > 1 needs semi.method='pseudo_label' and at most "
                        f"train.steps={config.train.steps} rounds (each round trains train.steps / semi.rounds steps).")
    if semi.propagate_slices < 0 or (semi.propagate_slices and (semi.method != "pseudo_label"
                                                                or config.model.ndim != 3)):
        raise UserError(f"semi.propagate_slices={semi.propagate_slices} must be >= 0; > 0 needs "
                        f"semi.method='pseudo_label' and 3D crops (model.ndim=3).")


def checkpoint_shape(cfg: ml_collections.ConfigDict | None) -> dict[str, str]:
    """What the add-ons of a `semi` section add to a run's checkpoints: {what: fingerprint} of the
    discriminator with adversarial adaptation on, of the domain classifier with DANN on and of the
    rounds' frozen teacher ({} with none: the mean teacher is the EMA the train state always holds)."""
    widths = lambda field: fingerprint(ml_collections.ConfigDict({"widths": tuple(cfg[field])}))  # noqa: E731
    shape = {DISCRIMINATOR: widths("discriminator_widths")} if adversarial_on(cfg) else {}
    if dann_on(cfg):
        shape[DOMAIN_CLASSIFIER] = widths("dann_widths")
    if rounds_on(cfg) > 1:
        shape[ROUND_TEACHER] = fingerprint(ml_collections.ConfigDict({"rounds": rounds_on(cfg)}))
    return shape


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
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.train_images, data.train_masks = tuple(config.semi.unlabelled_images), ()
    data.batch_size = int(config.semi.batch_size)
    # Another seed than the labelled loader's, so unlabelled crops are not drawn in lockstep with them.
    return pipeline.make_loader(data, mesh=mesh, ndim=config.model.ndim, seed=config.seed + 7919, split="train",
                                labelled=False)
