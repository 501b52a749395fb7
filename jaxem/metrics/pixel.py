"""Pixel (voxel) metrics for binary and multi-class semantic segmentation.

From the confusion counts TP, FP, FN, TN over the voxels inside the optional mask:
accuracy = (TP+TN)/N, precision = TP/(TP+FP), recall = TP/(TP+FN),
dice (F1) = 2TP/(2TP+FP+FN), iou (Jaccard) = TP/(TP+FP+FN), pixel_error = (FP+FN)/N
(the ISBI 2012 pixel error, 1 - accuracy), conformity = 1 - (FP+FN)/TP (Chang et al. 2009,
"Performance measure characterization for evaluating neuroimage segmentation algorithms",
NeuroImage 47:122), which is -inf when TP = 0 and errors exist.
`average_precision` ranks voxels by a probability instead of thresholding it: the area under the
precision-recall curve, independent of any threshold (so of the map's calibration).
A ratio whose denominator is 0 (e.g. precision with no positive prediction) is 1 when pred and
gt agree perfectly and 0 otherwise.
"""

from __future__ import annotations

import numpy as np

from jaxem.errors import UserError

NAMES = ("accuracy", "precision", "recall", "dice", "iou", "pixel_error", "conformity")


def _check(pred: np.ndarray, gt: np.ndarray, mask) -> np.ndarray | None:
    if pred.shape != gt.shape:
        raise UserError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}.")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != gt.shape:
            raise UserError(f"mask shape {mask.shape} differs from ground truth shape {gt.shape}.")
    return mask


def confusion_counts(pred_bool, gt_bool, mask=None) -> dict:
    """TP, FP, FN, TN (ints) of two boolean arrays of the same shape, inside `mask` if given."""
    pred, gt = np.asarray(pred_bool, dtype=bool), np.asarray(gt_bool, dtype=bool)
    mask = _check(pred, gt, mask)
    if mask is not None:
        pred, gt = pred[mask], gt[mask]
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    return {"tp": tp, "fp": n_pred - tp, "fn": n_gt - tp, "tn": pred.size - n_pred - n_gt + tp}


def scores_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict:
    """The pixel metrics of the module docstring from confusion counts."""
    errors = fp + fn
    n = tp + fp + fn + tn

    def ratio(num, den):
        return num / den if den else (1.0 if errors == 0 else 0.0)

    if tp:
        conformity = 1.0 - errors / tp
    else:
        conformity = 1.0 if errors == 0 else float("-inf")
    return {
        "accuracy": ratio(tp + tn, n),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "dice": ratio(2 * tp, 2 * tp + errors),
        "iou": ratio(tp, tp + errors),
        "pixel_error": errors / n if n else 0.0,
        "conformity": conformity,
    }


def binary_scores(pred_bool, gt_bool, mask=None) -> dict:
    """Pixel metrics of a boolean prediction against boolean ground truth, same shape (z,y,x) or (y,x).

    `mask` (bool, same shape) restricts the evaluation to voxels where it is True. Returns floats
    keyed accuracy, precision, recall, dice, iou, pixel_error, conformity (module docstring).
    """
    return scores_from_counts(**confusion_counts(pred_bool, gt_bool, mask))


def average_precision(scores, gt_bool, mask=None) -> float:
    """Average precision of `scores` (float, any shape) ranking the True voxels of `gt_bool` (same
    shape) first: sum over the positives, in descending score order, of the precision at each one's
    rank, divided by the number of positives (step-wise area under the precision-recall curve; ties
    keep voxel order). `mask` (bool, same shape) restricts the ranking. 0.0 with no positive voxel."""
    scores, gt_bool = np.asarray(scores), np.asarray(gt_bool, bool)
    if scores.shape != gt_bool.shape:
        raise UserError(f"scores of shape {scores.shape} and ground truth of shape {gt_bool.shape} differ; expected the same shape.")
    if mask is not None:
        scores, gt_bool = scores[np.asarray(mask, bool)], gt_bool[np.asarray(mask, bool)]
    hits = gt_bool.ravel()[np.argsort(-scores.ravel(), kind="stable")]
    positives = int(hits.sum())
    if positives == 0:
        return 0.0
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hits.sum() / positives)


def confusion_matrix(pred, gt, num_classes: int, mask=None) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = gt class, columns = pred class."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    mask = _check(pred, gt, mask)
    if mask is not None:
        pred, gt = pred[mask], gt[mask]
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise UserError(f"{name} has dtype {a.dtype}; expected integer class ids.")
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise UserError(f"{name} has class ids outside 0..{num_classes - 1}.")
    key = gt.astype(np.int64).ravel() * num_classes + pred.ravel()
    return np.bincount(key, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_scores(pred, gt, num_classes: int, mask=None, ignore_background: bool = False) -> dict:
    """Per-class pixel metrics of class maps (int arrays, same shape) with macro and micro means.

    Returns {"per_class": {c: scores}, "macro": mean over classes present in gt or pred,
    "micro": scores of TP/FP/FN/TN summed over classes}. `ignore_background` leaves class 0 out
    of the means.
    """
    cm = confusion_matrix(pred, gt, num_classes, mask)
    total = int(cm.sum())
    per_class, used = {}, []
    for c in range(num_classes):
        tp = int(cm[c, c])
        fp, fn = int(cm[:, c].sum()) - tp, int(cm[c, :].sum()) - tp
        per_class[c] = scores_from_counts(tp, fp, fn, total - tp - fp - fn)
        if (tp + fp + fn) and not (ignore_background and c == 0):  # class present in gt or pred
            used.append((c, (tp, fp, fn, total - tp - fp - fn)))
    if not used:
        nan = dict.fromkeys(NAMES, float("nan"))
        return {"per_class": per_class, "macro": nan, "micro": dict(nan)}
    macro = {k: float(np.mean([per_class[c][k] for c, _ in used])) for k in NAMES}
    micro = scores_from_counts(*(int(v) for v in np.sum([n for _, n in used], axis=0)))
    return {"per_class": per_class, "macro": macro, "micro": micro}
