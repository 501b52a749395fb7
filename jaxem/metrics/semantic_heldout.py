"""Score a trained run on a held-out labelled volume of a semantic (foreground) target: mitochondria.

The field's Lucchi protocol: predict the whole test volume blockwise, threshold the probability at
0.5, and compute over all voxels at once (not per slice) the foreground Jaccard index (IoU) and
Dice with precision and recall; then, as 3D objects, the mitochondria of the prediction and of the
ground truth as 26-connected components, scored by detection metrics (AP at IoU 0.5 / 0.75, mAP,
PQ = SQ x RQ, AJI; jaxem.metrics.detection). The same scores for a baseline that thresholds the raw
image at Otsu's level (mitochondria are dark), and an overlay PNG of predictions on the EM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxem.errors import UserError

PIXEL_KEYS = ("jaccard", "dice", "precision", "recall", "accuracy")
OBJECT_KEYS = ("ap50", "ap75", "map", "pq", "sq", "rq", "aji", "n_pred", "n_gt")
SCORE_KEYS = PIXEL_KEYS + OBJECT_KEYS
COUNT_KEYS = ("n_pred", "n_gt")  # object counts, not scores: no "better" direction


def foreground_scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Voxel scores of a boolean prediction against a boolean ground truth, same shape (z, y, x).

    Counted over the whole volume at once. Returns floats keyed jaccard (= IoU, TP/(TP+FP+FN)),
    dice, precision, recall, accuracy (jaxem.metrics.pixel conventions for empty denominators).
    """
    from jaxem.metrics.pixel import binary_scores

    scores = binary_scores(_bool(pred, "prediction"), _bool(gt, "ground truth"))
    return {"jaccard": scores["iou"], **{k: scores[k] for k in PIXEL_KEYS[1:]}}


def components(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """3D connected components of a boolean (z, y, x) mask: uint32 ids 1..N, 0 = background.

    connectivity: 6, 18 or 26 (3D); 4 or 8 for a (y, x) mask.
    """
    import cc3d

    mask = _bool(mask, "mask")
    allowed = (6, 18, 26) if mask.ndim == 3 else (4, 8)
    if connectivity not in allowed:
        raise UserError(f"connectivity must be one of {allowed} for a {mask.ndim}D mask, got {connectivity}.")
    return cc3d.connected_components(mask, connectivity=connectivity).astype(np.uint32)


def object_scores(pred: np.ndarray, gt: np.ndarray, connectivity: int = 26) -> dict:
    """Detection scores of the connected components of two boolean masks (same shape).

    Objects match when their IoU > t (unique for t >= 0.5); ap50/ap75 = TP/(TP+FP+FN) at t = 0.5/0.75,
    map over t = 0.5:0.05:0.95, pq/sq/rq at 0.5, aji; n_pred/n_gt are the object counts.
    """
    from jaxem.metrics.detection import detection_scores

    scores = detection_scores(components(pred, connectivity), components(gt, connectivity))
    return {k: scores[k] for k in OBJECT_KEYS}


def score_masks(pred: np.ndarray, gt: np.ndarray, connectivity: int = 26) -> dict:
    """foreground_scores and object_scores of boolean masks in one dict (keys SCORE_KEYS)."""
    if np.shape(pred) != np.shape(gt):
        raise UserError(f"prediction shape {np.shape(pred)} differs from ground truth shape {np.shape(gt)}.")
    return {**foreground_scores(pred, gt), **object_scores(pred, gt, connectivity)}


def otsu_dark(raw: np.ndarray) -> np.ndarray:
    """Foreground 'probability' from the raw image alone: dark = foreground, shifted so that 0.5 is
    Otsu's threshold. raw: uint8 (or any real) array; returns float32 in [0, 1], same shape."""
    from skimage.filters import threshold_otsu

    raw = np.asarray(raw, dtype=np.float32)
    span = float(raw.max() - raw.min()) or 1.0
    inverted = 1.0 - (raw - raw.min()) / span
    return np.clip(0.5 + (inverted - threshold_otsu(inverted)), 0.0, 1.0).astype(np.float32)


def remove_small(mask: np.ndarray, min_size: int, connectivity: int = 26) -> np.ndarray:
    """The boolean `mask` without its connected components smaller than `min_size` voxels."""
    import cc3d

    mask = _bool(mask, "mask")
    if min_size <= 0:
        return mask
    return cc3d.dust(mask, threshold=min_size, connectivity=connectivity if mask.ndim == 3 else 8) > 0


def score_run(run_dir: str | Path, image_path: str, labels_path: str, out_dir: str | Path | None = None,
              threshold: float = 0.5, min_size: int = 0, progress: bool = True) -> dict:
    """Predicts `image_path` with the run's checkpoint and scores it against the 0/1 `labels_path`.

    `min_size` > 0 (voxels) removes smaller predicted objects, of the model and of the baseline,
    before scoring (post-processing; the published protocol scores the plain threshold, 0).
    Writes predictions.zarr, results.json and overlay.png to `out_dir` (default the run dir).
    Returns {"model": scores, "threshold_baseline": scores, "threshold", "min_size", "foreground_fraction"}.
    """
    from jaxem.data.volume import open_volume
    from jaxem.metrics.heldout import predict_heldout, prediction_channel

    if not 0.0 < threshold < 1.0:
        raise UserError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
    out_dir, predictions = predict_heldout(run_dir, image_path, out_dir, progress)
    raw, gt = open_volume(image_path).read(), open_volume(labels_path).read() > 0
    probability = prediction_channel(predictions)
    ours, baseline = remove_small(probability > threshold, min_size), remove_small(otsu_dark(raw) > 0.5, min_size)
    results = {"model": score_masks(ours, gt), "threshold_baseline": score_masks(baseline, gt),
               "threshold": threshold, "min_size": min_size, "foreground_fraction": float(gt.mean())}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_overlay(raw, probability, ours, baseline, gt, out_dir / "overlay.png")
    return results


def format_table(results: dict) -> str:
    """The model's scores beside the threshold baseline's, one metric per line."""
    lines = [f"{'metric':<12}{'model':>10}{'threshold':>12}   better"]
    for k in SCORE_KEYS:
        model, base = results["model"][k], results["threshold_baseline"][k]
        if k in COUNT_KEYS:
            lines.append(f"{k:<12}{model:>10d}{base:>12d}   (objects; gt {results['model']['n_gt']})")
        else:
            lines.append(f"{k:<12}{model:>10.4f}{base:>12.4f}   higher")
    return "\n".join(lines)


def busiest_slice(gt: np.ndarray) -> int:
    """The z index with the most ground-truth foreground voxels (the middle one when there is none)."""
    counts = np.asarray(gt).reshape(gt.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.any() else gt.shape[0] // 2


def write_overlay(raw, probability, ours, baseline, gt, out_path: Path, z: int | None = None) -> None:
    """PNG of one z-slice (default the busiest_slice): EM | probability over EM | model objects |
    threshold-baseline objects | ground-truth objects (the slice's components, coloured, over the EM)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb

    z = busiest_slice(gt) if z is None else z
    tint = lambda mask: label2rgb(components(mask[z], 8).astype(np.int64), raw[z], alpha=0.35, bg_label=0)  # noqa: E731
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.3))
    axes[0].imshow(raw[z], cmap="gray")
    axes[1].imshow(raw[z], cmap="gray")
    axes[1].imshow(np.ma.masked_less(probability[z], 0.5), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
    for ax, mask in zip(axes[2:], (ours, baseline, gt)):
        ax.imshow(tint(mask))
    titles = (f"EM (held-out, z={z})", "mitochondria probability", "model objects", "threshold baseline", "ground truth")
    for ax, title in zip(axes, titles):
        ax.set_title(title), ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def _bool(array, name: str) -> np.ndarray:
    """`array` as a bool array; UserError for anything but bool or 0/1 integers."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.integer) or (array.size and (array.min() < 0 or array.max() > 1)):
        raise UserError(f"{name} must be a boolean or 0/1 integer mask, got dtype {array.dtype}.")
    return array.astype(bool)
