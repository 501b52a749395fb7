"""Linear probe of a pretraining run's encoder: do its frozen features tell membranes from cells?

    probe = make_probe(config)          # None without ssl.probe_images or with train.eval_every = 0
    baseline = probe.start(state, workdir)   # the randomly initialised encoder, logged at step 0
    metrics = probe(state)              # {"probe_f1": ..., "probe_balanced_accuracy": ..., "probe_r2": ...}

`jaxem.ssl.pretrain.pretrain` passes the probe to the training loop as its `validate` hook, so it
runs every `train.eval_every` steps (and at the last step) and its metrics are logged like
validation metrics: 'val' rows of metrics.jsonl, TensorBoard and a panel each in
training_curves.png.

What is measured. `ssl.probe_crops` fixed crops of `data.crop_shape` are read from
`ssl.probe_images` (tiles of the volumes, evenly spaced in reading order, normalised exactly as
the training pipeline normalises) with their labels `ssl.probe_labels`, which become the config's
`target` (jaxem.data.targets; for the default target, the boundary map of the instances) - what
a fine-tuned model would predict. The encoder runs in eval mode (batch norm: running statistics);
each of its feature maps (every level, fine to coarse) is resized bilinearly to the crop and they
are concatenated per pixel. At `ssl.probe_pixels` fixed pixels per crop, a ridge regression
(`ssl.probe_ridge`, on standardised features, closed form in float64) from the features to the
target is fitted on the first half of the crops; its threshold is the one of best F1 on that half.
The second half is scored:

- `probe_f1`: F1 of the thresholded score against the target binarised at 0.5 (for the boundary
  target: membrane F1). Predicting "membrane" everywhere scores 2p / (1 + p) at a membrane
  fraction p, so compare with the random-init baseline, not with 0.
- `probe_balanced_accuracy`: (true positive rate + true negative rate) / 2 at that threshold;
  chance is 0.5.
- `probe_r2`: 1 - squared error / variance of the target on the scored pixels (no threshold).

Targets of several channels (affinities) are fitted per channel and pooled. Everything is
deterministic (fixed crops, fixed pixels, no randomness in the fit): the same parameters give the
same numbers. Each process of a multi-process run computes the probe on its own first device from
its replica of the parameters (no collectives); only process 0 writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxem import models
from jaxem.data import sampling, targets
from jaxem.data.volume import open_volume
from jaxem.errors import UserError
from jaxem.train.logs import MetricWriter, read_metrics
from jaxem.train.loop import has_checkpoints

METRICS = ("probe_f1", "probe_balanced_accuracy", "probe_r2")
# The probe's settings: a workdir's checkpoints do not depend on them (jaxem.ssl.pretrain.run_shape leaves them out).
PROBE_FIELDS = tuple(f"ssl.probe_{name}" for name in ("images", "labels", "crops", "pixels", "ridge"))
PIXEL_SEED = 0  # the probe's pixels are the same whatever config.seed, so runs compare on one set


def check_probe_config(config: ml_collections.ConfigDict) -> list[tuple[int, ...]]:
    """UserError naming the field when the probe settings cannot work; returns the volumes' shapes."""
    ssl, crop_shape = config.ssl, tuple(int(c) for c in config.data.crop_shape)
    images, labels = tuple(ssl.probe_images), tuple(ssl.probe_labels)
    if len(images) != len(labels):
        raise UserError(f"ssl.probe_images names {len(images)} volumes but ssl.probe_labels names {len(labels)}; "
                        f"give one instance-label volume per probe image.")
    if int(ssl.probe_crops) < 2:
        raise UserError(f"ssl.probe_crops must be at least 2 (half are fitted, half scored), got {ssl.probe_crops}.")
    if int(ssl.probe_pixels) < 1:
        raise UserError(f"ssl.probe_pixels must be at least 1 (pixels per probe crop), got {ssl.probe_pixels}.")
    if not float(ssl.probe_ridge) > 0:
        raise UserError(f"ssl.probe_ridge must be > 0 (the ridge regression's lambda), got {ssl.probe_ridge}.")
    best = config.train.get("best_metric", "")
    if best and best not in {f"val_{m}" for m in METRICS}:
        raise UserError(f"train.best_metric={best!r}: with a linear probe the validation metrics of a pretraining "
                        f"run are {', '.join('val_' + m for m in METRICS)}; use one of them (with train.best_mode="
                        f"'max') or '' to keep the latest checkpoints.")
    if best and config.train.get("best_mode", "min") != "max":
        raise UserError(f"train.best_mode must be 'max' with train.best_metric={best!r} (higher is better).")
    shapes = []
    for i, (image, label) in enumerate(zip(images, labels)):
        shape = _open(image, f"ssl.probe_images[{i}]").shape
        label_shape = _open(label, f"ssl.probe_labels[{i}]").shape
        if label_shape != shape:
            raise UserError(f"ssl.probe_labels[{i}] {label} has shape {label_shape} but its image "
                            f"ssl.probe_images[{i}] {image} has {shape}.")
        if len(shape) < len(crop_shape) or any(c > s for c, s in zip(crop_shape[::-1], shape[::-1])):
            raise UserError(f"data.crop_shape {crop_shape} does not fit in ssl.probe_images[{i}] {image} of shape "
                            f"{shape}.")
        shapes.append(shape)
    return shapes


def _open(path: str, field: str):
    try:
        return open_volume(path)
    except UserError as e:
        raise UserError(f"{field}: {e}") from None


def make_probe(config: ml_collections.ConfigDict, encoder: nn.Module | None = None) -> "LinearProbe | None":
    """The LinearProbe `config` asks for, or None (no probe volumes, or train.eval_every = 0).
    The probe settings are checked whenever probe volumes are named."""
    if not (config.ssl.get("probe_images") or config.ssl.get("probe_labels")):
        return None
    shapes = check_probe_config(config)
    if config.train.eval_every <= 0:
        return None
    return LinearProbe(config, shapes, encoder)


def probe_crops(config: ml_collections.ConfigDict, shapes: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The fixed probe crops: {"image": (N, *crop, 1) float32 normalised as in training, "labels":
    (N, *crop) int32, "mask": (N, *crop) float32}. Tiles of every volume (`sampling.grid_boxes`, in
    order), of which `ssl.probe_crops` evenly spaced ones are kept."""
    data, ssl = config.data, config.ssl
    images, labels = tuple(ssl.probe_images), tuple(ssl.probe_labels)
    stats = [sampling.normalize_stats(open_volume(p), data.normalize, tuple(data.percentiles)) for p in images]
    source = sampling.CropSource(images=images, labels=labels, masks=(), crop_shape=tuple(data.crop_shape),
                                 stats=stats, shapes=shapes, renumber=bool(data.renumber))
    boxes = [(i, box) for i, shape in enumerate(shapes) for box in sampling.grid_boxes(shape, tuple(data.crop_shape))]
    if len(boxes) < 2:
        raise UserError(f"ssl.probe_images hold only {len(boxes)} crop of data.crop_shape {tuple(data.crop_shape)}; "
                        f"the probe needs at least 2 (half fitted, half scored).")
    picks = sorted({int(round(k)) for k in np.linspace(0, len(boxes) - 1, min(int(ssl.probe_crops), len(boxes)))})
    crops = [source.finish(source.read(*boxes[k])) for k in picks]
    batch = {key: np.stack([c[key] for c in crops]) for key in crops[0]}
    batch["image"] = batch["image"][..., None]
    return batch


def encoder_variables(state) -> dict:
    """The encoder's variables {"params", ["batch_stats"]} of a pretraining state: the 'encoder'
    subtree for the contrastive methods (ContrastiveState) and for mim (a TrainState of the whole
    network) alike."""
    variables = {"params": state.params["encoder"]}
    if state.batch_stats and "encoder" in state.batch_stats:
        variables["batch_stats"] = state.batch_stats["encoder"]
    return variables


def _on_local_device(tree):
    """`tree` with each array on this process's first device: a replicated array's local copy (no
    transfer, no collective), anything else fetched to the host."""
    def local(x):
        if not isinstance(x, jax.Array):
            return jnp.asarray(x)
        return x.addressable_data(0) if x.is_fully_replicated else jnp.asarray(jax.device_get(x))
    return jax.tree.map(local, tree)


def make_feature_fn(encoder: nn.Module) -> Callable:
    """jitted `fn(variables, image (B, *S, 1), pixels (B, P) int32) -> (B, P, C) float32`: every
    feature map of `encoder` (eval mode) resized bilinearly to S and concatenated, at the given flat
    pixel indices."""
    def features(variables, image, pixels):
        maps = encoder.apply(variables, image, train=False)
        batch, spatial = image.shape[0], image.shape[1:-1]
        flat = []
        for f in maps:
            f = jax.image.resize(f.astype(jnp.float32), (batch, *spatial, f.shape[-1]), "linear")
            flat.append(f.reshape(batch, -1, f.shape[-1]))
        return jnp.take_along_axis(jnp.concatenate(flat, axis=-1), pixels[..., None], axis=1)
    return jax.jit(features)


class LinearProbe:
    """The probe of one config: fixed crops, targets and pixels, read and computed once. Call it
    with a pretraining state (or `score_variables` with encoder variables) for the metrics."""

    def __init__(self, config: ml_collections.ConfigDict, shapes: list[tuple[int, ...]],
                 encoder: nn.Module | None = None):
        ndim = config.model.ndim
        self.ridge = float(config.ssl.probe_ridge)
        crops = probe_crops(config, shapes)
        target, target_mask = jax.jit(targets.make_target_fn(config.target, ndim))(
            jnp.asarray(crops["labels"], jnp.int32), jnp.asarray(crops["mask"]))
        n, spatial = crops["image"].shape[0], crops["image"].shape[1:-1]
        voxels = math.prod(spatial)
        per_crop = min(int(config.ssl.probe_pixels), voxels)
        rng = np.random.default_rng(PIXEL_SEED)
        self.pixels = np.stack([np.sort(rng.choice(voxels, per_crop, replace=False)) for _ in range(n)]).astype(np.int32)
        k = target.shape[-1]
        take = lambda a: np.take_along_axis(np.asarray(a).reshape(n, voxels, k), self.pixels[..., None], 1)  # noqa: E731
        self.target, self.target_mask = take(target).astype(np.float64), take(target_mask) > 0
        self.images = crops["image"]
        self.fit_crops = n // 2
        encoder = encoder if encoder is not None else models.build(config.model).encoder
        self.features_fn = make_feature_fn(encoder.clone(parent=None, name=None))

    def features(self, variables: dict) -> np.ndarray:
        """(N crops, P pixels, C) float32 features of the probe pixels, one crop at a time."""
        variables = _on_local_device(variables)
        device = jax.tree.leaves(variables)[0].devices().pop() if jax.tree.leaves(variables) else None
        out = []
        for image, pixels in zip(self.images, self.pixels):
            x, p = (jax.device_put(a[None], device) for a in (image, pixels))
            out.append(np.asarray(self.features_fn(variables, x, p))[0])
        return np.stack(out)

    def score_variables(self, variables: dict) -> dict:
        """The probe's metrics for encoder `variables` ({"params", ["batch_stats"]})."""
        x = self.features(variables)
        f = self.fit_crops
        return fit_and_score(x[:f], self.target[:f], self.target_mask[:f], x[f:], self.target[f:],
                             self.target_mask[f:], self.ridge)

    def __call__(self, state) -> dict:
        """The probe's metrics for a pretraining state's encoder (the training loop's `validate`)."""
        return self.score_variables(encoder_variables(state))

    def start(self, state, workdir: str | Path) -> dict:
        """Probes the initial (randomly initialised) encoder of `state`: logged as the 'val' row of
        step 0 in metrics.jsonl and TensorBoard of a fresh run (process 0), so each probe curve
        starts at its baseline. Returns {"probe_f1_random_init": ..., ...} for the run's summary."""
        metrics = self(state)
        workdir = Path(workdir)
        if jax.process_index() == 0 and not has_checkpoints(workdir):
            path = workdir / "metrics.jsonl"
            if not (path.exists() and any(r["step"] == 0 and r["split"] == "val" for r in read_metrics(path))):
                workdir.mkdir(parents=True, exist_ok=True)
                writer = MetricWriter(workdir)
                writer.write(0, "val", metrics)
                writer.close()
        return {f"{k}_random_init": v for k, v in metrics.items()}


def fit_and_score(fit_x: np.ndarray, fit_y: np.ndarray, fit_mask: np.ndarray, score_x: np.ndarray,
                  score_y: np.ndarray, score_mask: np.ndarray, ridge: float) -> dict:
    """Ridge regression from features (..., C) to targets (..., K) on the fit pixels (where
    fit_mask, (..., K) bool, holds), threshold of best F1 on them, metrics on the score pixels.

    Features are standardised with the fit pixels' mean and std; lambda = `ridge` on that scale;
    float64 throughout. Returns probe_f1, probe_balanced_accuracy, probe_r2 (pooled over K)."""
    c, k = fit_x.shape[-1], fit_y.shape[-1]
    fit_x, score_x = (np.asarray(a, np.float64).reshape(-1, c) for a in (fit_x, score_x))
    fit_y, score_y = (np.asarray(a, np.float64).reshape(-1, k) for a in (fit_y, score_y))
    fit_mask, score_mask = (np.asarray(a, bool).reshape(-1, k) for a in (fit_mask, score_mask))
    mean, std = fit_x.mean(0), fit_x.std(0)
    std = np.where(std > 1e-8, std, np.inf)  # constant features contribute nothing
    fit_x, score_x = (fit_x - mean) / std, (score_x - mean) / std
    counts = np.zeros(4)  # tp, fp, fn, tn pooled over channels
    sse = sst = 0.0
    fit_scores, fit_truth = [], []
    weights = []
    for j in range(k):
        x, y = fit_x[fit_mask[:, j]], fit_y[fit_mask[:, j], j]
        if len(y) == 0:
            weights.append(None)
            continue
        offset = y.mean()
        xc = x - x.mean(0)
        gram = xc.T @ xc / len(y) + ridge * np.eye(c)
        w = np.linalg.solve(gram, xc.T @ (y - offset) / len(y))
        b = offset - x.mean(0) @ w
        weights.append((w, b))
        fit_scores.append(x @ w + b)
        fit_truth.append(y > 0.5)
    if not fit_scores:
        return {name: float("nan") for name in METRICS}
    threshold = _best_f1_threshold(np.concatenate(fit_scores), np.concatenate(fit_truth))
    for j, wb in enumerate(weights):
        keep = score_mask[:, j]
        if wb is None or not keep.any():
            continue
        w, b = wb
        s, y = score_x[keep] @ w + b, score_y[keep, j]
        counts += _confusion(s > threshold, y > 0.5)
        sse += float(np.sum((s - y) ** 2))
        sst += float(np.sum((y - y.mean()) ** 2))
    tp, fp, fn, tn = counts
    rates = [r for r in (tp / (tp + fn) if tp + fn else None, tn / (tn + fp) if tn + fp else None) if r is not None]
    return {"probe_f1": float(2 * tp / max(2 * tp + fp + fn, 1.0)),
            "probe_balanced_accuracy": float(np.mean(rates)) if rates else float("nan"),
            "probe_r2": float(1.0 - sse / sst) if sst > 0 else float("nan")}


def _confusion(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([np.sum(prediction & truth), np.sum(prediction & ~truth), np.sum(~prediction & truth),
                     np.sum(~prediction & ~truth)], np.float64)


def _best_f1_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold among 0.5 and the 1st..99th percentiles of `scores` with the best F1 on them
    (the lowest such threshold on ties)."""
    candidates = np.unique(np.concatenate([[0.5], np.percentile(scores, np.arange(1, 100))]))
    best, best_f1 = 0.5, -1.0
    for t in candidates:
        tp, fp, fn, _ = _confusion(scores > t, truth)
        f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best

