"""Object detection metrics for instance labels (0 = background), from the contingency table.

- `ap@t` (t in 0.50:0.05:0.95): with no confidence scores, average precision at IoU threshold t
  is TP / (TP + FP + FN) (Data Science Bowl 2018; StarDist, Cellpose), pairs matched when
  IoU > t. For t >= 0.5 such matches are unique. `map` is the mean over the ten thresholds.
- `pq = sq * rq` (Kirillov et al. 2019, "Panoptic segmentation"): matches IoU > 0.5,
  SQ = mean IoU of matches, RQ = TP / (TP + FP/2 + FN/2).
- `aji` (Kumar et al. 2017, IEEE TMI 36:1550): each gt object G takes the prediction S of largest
  IoU; AJI = sum |G & S| / (sum |G | S| + sizes of the predictions never taken).
IoU uses full object sizes (prediction voxels over gt background count against it).
"""

from __future__ import annotations

import numpy as np

from jaxem.metrics.clustering import Contingency, contingency_table

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _sizes(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct nonzero ids, voxel count of each)."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    sizes = np.bincount(inverse.ravel(), weights=counts).astype(np.int64)
    keep = uniq != 0
    return uniq[keep], sizes[keep]


def overlaps(table: Contingency) -> dict:
    """Object sizes and the IoU of every overlapping (pred, gt) object pair, both ids nonzero.

    Returns pred_ids (P,), pred_sizes (P,), gt_ids (G,), gt_sizes (G,), and per overlapping pair
    pred_index, gt_index (into those arrays), intersection, iou.
    """
    pred_ids, pred_sizes = _sizes(table.pred_ids, table.counts)
    gt_ids, gt_sizes = _sizes(table.gt_ids, table.counts)
    both = table.restrict((table.pred_ids != 0) & (table.gt_ids != 0))
    pi = np.searchsorted(pred_ids, both.pred_ids)
    gi = np.searchsorted(gt_ids, both.gt_ids)
    inter = both.counts
    iou = inter / (pred_sizes[pi] + gt_sizes[gi] - inter)
    return dict(pred_ids=pred_ids, pred_sizes=pred_sizes, gt_ids=gt_ids, gt_sizes=gt_sizes,
                pred_index=pi, gt_index=gi, intersection=inter, iou=iou)


def _matched_ious(ov: dict, threshold: float) -> np.ndarray:
    """IoUs of the unique matches with IoU > threshold (threshold >= 0.5)."""
    return ov["iou"][ov["iou"] > threshold]


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def average_precision(ov: dict, threshold: float) -> float:
    """TP / (TP + FP + FN) with unique matching at IoU > threshold (>= 0.5)."""
    tp = len(_matched_ious(ov, threshold))
    fp, fn = len(ov["pred_ids"]) - tp, len(ov["gt_ids"]) - tp
    return _ratio(tp, tp + fp + fn)


def panoptic_quality(ov: dict) -> dict:
    """PQ, SQ, RQ (Kirillov et al. 2019) with matches at IoU > 0.5."""
    ious = _matched_ious(ov, 0.5)
    tp = len(ious)
    fp, fn = len(ov["pred_ids"]) - tp, len(ov["gt_ids"]) - tp
    sq = float(ious.mean()) if tp else (1.0 if fp + fn == 0 else 0.0)
    rq = _ratio(tp, tp + 0.5 * (fp + fn))
    return {"pq": sq * rq, "sq": sq, "rq": rq}


def aggregated_jaccard(ov: dict) -> float:
    """AJI (Kumar et al. 2017); 1.0 when both labelings are empty."""
    n_gt = len(ov["gt_ids"])
    if n_gt == 0:
        return 1.0 if len(ov["pred_ids"]) == 0 else 0.0
    # best prediction per gt object: sort pairs by (gt, iou) and take each gt's last
    order = np.lexsort((ov["iou"], ov["gt_index"]))
    gi = ov["gt_index"][order]
    last = np.r_[gi[1:] != gi[:-1], True] if gi.size else np.zeros(0, bool)
    best = order[last]
    inter = ov["intersection"][best]
    union = ov["pred_sizes"][ov["pred_index"][best]] + ov["gt_sizes"][ov["gt_index"][best]] - inter
    unmatched_gt = np.ones(n_gt, bool)
    unmatched_gt[ov["gt_index"][best]] = False
    used = np.zeros(len(ov["pred_ids"]), bool)
    used[ov["pred_index"][best]] = True
    total_union = union.sum() + ov["gt_sizes"][unmatched_gt].sum() + ov["pred_sizes"][~used].sum()
    return float(inter.sum() / total_union)


def scores_from_table(table: Contingency) -> dict:
    """ap50 ... ap95, map, aji, pq, sq, rq, n_pred, n_gt from one contingency table."""
    ov = overlaps(table)
    scores = {f"ap{round(t * 100)}": average_precision(ov, t) for t in THRESHOLDS}
    scores["map"] = float(np.mean([scores[f"ap{round(t * 100)}"] for t in THRESHOLDS]))
    scores["aji"] = aggregated_jaccard(ov)
    scores.update(panoptic_quality(ov))
    scores.update(n_pred=len(ov["pred_ids"]), n_gt=len(ov["gt_ids"]))
    return scores


def detection_scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Detection metrics of instance labels `pred` against `gt` (same shape, 0 = background)."""
    return scores_from_table(contingency_table(np.asarray(pred), np.asarray(gt)))
