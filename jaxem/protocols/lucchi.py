"""Lucchi mitochondria: score a trained run on a held-out labelled volume of a semantic (foreground) target.

The field's Lucchi protocol: predict the whole test volume blockwise, threshold the probability at
0.5, and compute over all voxels at once (not per slice) the foreground Jaccard index (IoU) and
Dice with precision and recall; then, as 3D objects, the mitochondria of the prediction and of the
ground truth as 26-connected components, scored by detection metrics (AP at IoU 0.5 / 0.75, mAP,
PQ = SQ x RQ, AJI; jaxem.metrics.detection). The same scores for a baseline that thresholds the raw
image at Otsu's level (mitochondria are dark, `common.otsu_dark`), and an overlay PNG of predictions on the EM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxem.errors import UserError
from jaxem.metrics.detection import detection_scores
from jaxem.metrics.pixel import binary_scores
from jaxem.protocols import common
from jaxem.segment.labels import connected_components

PIXEL_KEYS = ("jaccard", "dice", "precision", "recall", "accuracy")
OBJECT_KEYS = ("ap50", "ap75", "map", "pq", "sq", "rq", "aji", "n_pred", "n_gt")
SCORE_KEYS = PIXEL_KEYS + OBJECT_KEYS
COUNT_KEYS = ("n_pred", "n_gt")  # object counts, not scores: no "better" direction


def foreground_scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Voxel scores of a boolean prediction against a boolean ground truth, same shape (z, y, x).

    Counted over the whole volume at once. Returns floats keyed jaccard (= IoU, TP/(TP+FP+FN)),
    dice, precision, recall, accuracy (jaxem.metrics.pixel conventions for empty denominators).
    """
    scores = binary_scores(_bool(pred, "prediction"), _bool(gt, "ground truth"))
    return {"jaccard": scores["iou"], **{k: scores[k] for k in PIXEL_KEYS[1:]}}


def components(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """3D connected components of a boolean (z, y, x) mask: uint32 ids 1..N, 0 = background.

    connectivity: 6, 18 or 26 (3D); 4 or 8 for a (y, x) mask.
    """
    mask = _bool(mask, "mask")
    allowed = (6, 18, 26) if mask.ndim == 3 else (4, 8)
    if connectivity not in allowed:
        raise UserError(f"connectivity must be one of {allowed} for a {mask.ndim}D mask, got {connectivity}.")
    return connected_components(mask, connectivity).astype(np.uint32)


def object_scores(pred: np.ndarray, gt: np.ndarray, connectivity: int = 26) -> dict:
    """Detection scores of the connected components of two boolean masks (same shape).

    Objects match when their IoU > t (unique for t >= 0.5); ap50/ap75 = TP/(TP+FP+FN) at t = 0.5/0.75,
    map over t = 0.5:0.05:0.95, pq/sq/rq at 0.5, aji; n_pred/n_gt are the object counts.
    """
    scores = detection_scores(components(pred, connectivity), components(gt, connectivity))
    return {k: scores[k] for k in OBJECT_KEYS}


def score_masks(pred: np.ndarray, gt: np.ndarray, connectivity: int = 26) -> dict:
    """foreground_scores and object_scores of boolean masks in one dict (keys SCORE_KEYS)."""
    if np.shape(pred) != np.shape(gt):
        raise UserError(f"prediction shape {np.shape(pred)} differs from ground truth shape {np.shape(gt)}.")
    return {**foreground_scores(pred, gt), **object_scores(pred, gt, connectivity)}


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
    if not 0.0 < threshold < 1.0:
        raise UserError(f"threshold must lie strictly between 0 and 1, got {threshold}.")
    heldout = common.read_heldout(run_dir, image_path, labels_path, out_dir, progress)
    raw, gt = heldout.raw, heldout.gt > 0
    probability = common.prediction_channel(heldout.predictions)
    ours = remove_small(probability > threshold, min_size)
    baseline = remove_small(common.otsu_dark(raw) > 0.5, min_size)
    results = {"model": score_masks(ours, gt), "threshold_baseline": score_masks(baseline, gt),
               "threshold": threshold, "min_size": min_size, "foreground_fraction": float(gt.mean())}
    common.write_results(heldout.out_dir, results)
    write_overlay(raw, probability, ours, baseline, gt, heldout.out_dir / "overlay.png")
    return results


def format_table(results: dict) -> str:
    """The model's scores beside the threshold baseline's, one metric per line (object counts
    noted as such, with the ground truth's)."""
    better = {k: f"(objects; gt {results['model']['n_gt']})" if k in COUNT_KEYS else "higher" for k in SCORE_KEYS}
    return common.format_table(results, ("model", "threshold_baseline"), SCORE_KEYS, better,
                               {"threshold_baseline": "threshold"}, key_width=12)


def busiest_slice(gt: np.ndarray) -> int:
    """The z index with the most ground-truth foreground voxels (the middle one when there is none)."""
    counts = np.asarray(gt).reshape(gt.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.any() else gt.shape[0] // 2


def write_overlay(raw, probability, ours, baseline, gt, out_path: Path, z: int | None = None) -> None:
    """PNG of one z-slice (default the busiest_slice) of (z, y, x) volumes: EM | probability over EM
    | model objects | threshold-baseline objects | ground-truth objects (the slice's components of
    each boolean mask, coloured, over the EM)."""
    z = busiest_slice(gt) if z is None else z
    common.write_overlay(raw[z], probability[z], [components(mask[z], 8) for mask in (ours, baseline, gt)],
                         [f"EM (held-out, z={z})", "mitochondria probability", "model objects", "threshold baseline",
                          "ground truth"], out_path)


def _bool(array, name: str) -> np.ndarray:
    """`array` as a bool array; UserError for anything but bool or 0/1 integers."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.integer) or (array.size and (array.min() < 0 or array.max() > 1)):
        raise UserError(f"{name} must be a boolean or 0/1 integer mask, got dtype {array.dtype}.")
    return array.astype(bool)
