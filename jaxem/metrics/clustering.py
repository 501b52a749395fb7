"""Clustering metrics for instance labels, all computed from one sparse contingency table.

The table counts, for every pair (pred id i, gt id j), the voxels labelled i in the prediction
and j in the ground truth. It is built blockwise (`ContingencyAccumulator`), so volumes larger
than memory can be scored, and every metric below is a cheap function of it:

- `rand_index`, `rand_error`: Rand (1971) over all voxel pairs; label 0 is an ordinary label.
- `adapted_rand_error` (+ `_precision`, `_recall`): SNEMI3D/CREMI, equal to
  `skimage.metrics.adapted_rand_error(gt, pred)[0]`: 1 - F-score of Rand precision (pairs of
  distinct voxels together in both / together in pred) and recall (/ together in gt), voxels
  with gt 0 ignored, pred 0 an ordinary label. (skimage 0.26 returns these two in the opposite
  order to its docstring: its second value is our recall.)
- `vrand`, `vinfo` (+ `_split`, `_merge`): ISBI 2012 challenge (Arganda-Carreras et al. 2015,
  Front. Neuroanat. 9:142), foreground-restricted: voxels with gt 0 are excluded and, as in the
  challenge's Fiji script, pred-0 (boundary) voxels count as singleton segments.
  V_split = sum p_ij^2 / sum t_j^2, V_merge = sum p_ij^2 / sum s_i^2 (s: pred, t: gt marginals);
  VInfo_split = I(S;T) / H(S), VInfo_merge = I(S;T) / H(T); V = their harmonic mean. 1 is best.
- `voi`, `voi_split`, `voi_merge`: variation of information (Meila 2007) in bits with gt 0
  ignored (CREMI). voi_split = H(pred|gt), voi_merge = H(gt|pred).
  `skimage.metrics.variation_of_information(gt, pred, ignore_labels=[0])` returns
  [H(pred|gt), H(gt|pred)] = [voi_split, voi_merge].
"""

from __future__ import annotations

from dataclasses import dataclass

import fastremap
import numpy as np

from jaxem.errors import UserError

CHUNK_VOXELS = 1 << 24


@dataclass
class Contingency:
    """Sparse contingency table: one entry per (pred id, gt id) pair that co-occurs."""

    pred_ids: np.ndarray  # (k,) original pred label of each entry
    gt_ids: np.ndarray  # (k,) original gt label of each entry
    counts: np.ndarray  # (k,) int64 voxels with that pair

    def restrict(self, keep: np.ndarray) -> "Contingency":
        """The table with only the entries where `keep` (k,) bool is True."""
        return Contingency(self.pred_ids[keep], self.gt_ids[keep], self.counts[keep])


def check_labels(array: np.ndarray, name: str) -> None:
    """Raises UserError unless `array` holds non-negative integer ids."""
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise UserError(f"{name} has dtype {array.dtype}; expected integer instance ids (0 = background).")
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise UserError(f"{name} contains negative labels; expected non-negative instance ids (0 = background).")


def _block_pairs(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred id, gt id, count) for each co-occurring pair in two flat blocks of equal size."""
    # EM labels are spatially coherent: compress runs of equal (pred, gt) along the block first
    change = np.empty(pred.size, bool)
    change[:1] = True
    np.not_equal(pred[1:], pred[:-1], out=change[1:])
    change[1:] |= gt[1:] != gt[:-1]
    starts = np.flatnonzero(change)
    return _run_pairs(pred[starts], gt[starts], np.diff(starts, append=pred.size))


def _run_pairs(pred: np.ndarray, gt: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred id, gt id, count) of each distinct pair among runs with ids `pred`, `gt` (k,) and
    `lengths` (k,) voxels."""
    p, pmap = fastremap.renumber(pred, preserve_zero=False, in_place=False)  # ids 1..n_p
    g, gmap = fastremap.renumber(gt, preserve_zero=False, in_place=False)
    n_g = len(gmap) + 1
    # hash-renumber the packed pairs (linear time, no sort), then count run lengths per pair
    pair, pair_map = fastremap.renumber(p.astype(np.int64) * n_g + g, preserve_zero=False, in_place=True)
    key = np.zeros(len(pair_map) + 1, np.int64)
    key[np.fromiter(pair_map.values(), np.int64, len(pair_map))] = np.fromiter(pair_map.keys(), np.int64, len(pair_map))
    counts = np.bincount(pair, weights=lengths, minlength=key.size)
    key, counts = key[1:], counts[1:]
    p_orig = np.zeros(len(pmap) + 1, dtype=np.uint64)
    p_orig[np.fromiter(pmap.values(), np.int64, len(pmap))] = np.fromiter(pmap.keys(), np.uint64, len(pmap))
    g_orig = np.zeros(n_g, dtype=np.uint64)
    g_orig[np.fromiter(gmap.values(), np.int64, len(gmap))] = np.fromiter(gmap.keys(), np.uint64, len(gmap))
    return p_orig[key // n_g], g_orig[key % n_g], counts.astype(np.int64)


def _merge(pred_ids, gt_ids, counts) -> Contingency:
    """Sums the counts of duplicate (pred, gt) entries."""
    pu, pi = np.unique(pred_ids, return_inverse=True)
    gu, gi = np.unique(gt_ids, return_inverse=True)
    key = pi.astype(np.int64) * len(gu) + gi
    key, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=counts, minlength=len(key)).astype(np.int64)
    return Contingency(pu[key // len(gu)], gu[key % len(gu)], summed)


class ContingencyAccumulator:
    """Builds a contingency table block by block: `add(pred_block, gt_block)`, then `table()`."""

    def __init__(self):
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Adds the voxels of two label blocks of the same shape (any ndim, non-negative ints)."""
        if pred.shape != gt.shape:
            raise UserError(f"prediction block shape {pred.shape} differs from ground truth {gt.shape}.")
        check_labels(pred, "prediction")
        check_labels(gt, "ground truth")
        pred, gt = pred.reshape(-1), gt.reshape(-1)
        for start in range(0, pred.size, CHUNK_VOXELS):
            self._append(_block_pairs(pred[start:start + CHUNK_VOXELS], gt[start:start + CHUNK_VOXELS]))

    def add_runs(self, pred: np.ndarray, gt: np.ndarray, lengths: np.ndarray) -> None:
        """Adds runs of voxels: run r has pred id `pred[r]`, gt id `gt[r]` and `lengths[r]` voxels
        (all (k,); ids non-negative integers, as `runs.run_starts` finds them)."""
        if len(pred):
            self._append(_run_pairs(pred, gt, lengths))

    def _append(self, part) -> None:
        self._parts.append(part)
        self._pending += part[2].size
        if self._pending > 4 * CHUNK_VOXELS:  # bound memory on huge volumes
            self._parts = [self._consolidate()]
            self._pending = self._parts[0][2].size

    def _consolidate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._parts:
            empty = np.zeros(0, np.uint64)
            return empty, empty, np.zeros(0, np.int64)
        t = _merge(*(np.concatenate(a) for a in zip(*self._parts)))
        return t.pred_ids, t.gt_ids, t.counts

    def table(self) -> Contingency:
        """The accumulated table, duplicates summed."""
        return Contingency(*self._consolidate())


def contingency_table(pred: np.ndarray, gt: np.ndarray) -> Contingency:
    """Contingency table of two label arrays of the same shape (non-negative integer ids)."""
    acc = ContingencyAccumulator()
    acc.add(np.asarray(pred), np.asarray(gt))
    return acc.table()


def _sum_sq(values: np.ndarray) -> float:
    values = values.astype(np.float64)
    return float(values @ values)


def _marginal(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Voxel count per distinct id."""
    _, inverse = np.unique(ids, return_inverse=True)
    return np.bincount(inverse.ravel(), weights=counts).astype(np.int64)


def _entropy(counts: np.ndarray, n: float) -> float:
    """Shannon entropy in bits of the distribution counts / n."""
    p = counts[counts > 0].astype(np.float64) / n
    return float(-(p * np.log2(p)).sum())


def _ratio(num: float, den: float) -> float:
    """num / den, with 0 / 0 = 1 (nothing to get wrong)."""
    return 1.0 if den == 0 else num / den


def _f_score(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def rand_scores(table: Contingency) -> dict:
    """Rand index and error over all voxel pairs (Rand 1971); all labels including 0 count."""
    n = float(table.counts.sum())
    sum_ij = _sum_sq(table.counts)
    sum_p = _sum_sq(_marginal(table.pred_ids, table.counts))
    sum_g = _sum_sq(_marginal(table.gt_ids, table.counts))
    disagree = (sum_p + sum_g - 2 * sum_ij) / 2  # pairs together in one labelling only
    index = 1.0 if n < 2 else 1.0 - disagree / (n * (n - 1) / 2)
    return {"rand_index": index, "rand_error": 1.0 - index}


def adapted_rand_scores(table: Contingency) -> dict:
    """SNEMI3D adapted Rand error, precision and recall, gt 0 ignored (as skimage)."""
    fg = table.restrict(table.gt_ids != 0)
    n = float(fg.counts.sum())
    sum_ij = _sum_sq(fg.counts) - n
    precision = _ratio(sum_ij, _sum_sq(_marginal(fg.pred_ids, fg.counts)) - n)
    recall = _ratio(sum_ij, _sum_sq(_marginal(fg.gt_ids, fg.counts)) - n)
    return {
        "adapted_rand_error": 1.0 - _f_score(precision, recall),
        "adapted_rand_precision": precision,
        "adapted_rand_recall": recall,
    }


def isbi_scores(table: Contingency) -> dict:
    """ISBI 2012 foreground-restricted VRand and VInfo with split/merge parts (1 is best)."""
    fg = table.restrict(table.gt_ids != 0)
    n = float(fg.counts.sum())
    bg = fg.pred_ids == 0  # pred boundary voxels: each its own segment
    objects = fg.restrict(~bg)
    singles = float(fg.counts[bg].sum())
    s = _marginal(objects.pred_ids, objects.counts)
    t = _marginal(fg.gt_ids, fg.counts)
    sum_p, sum_s, sum_t = _sum_sq(objects.counts) + singles, _sum_sq(s) + singles, _sum_sq(t)
    single_h = 0.0 if n == 0 else float(singles / n * np.log2(n))
    h_s = _entropy(s, n) + single_h
    h_t = _entropy(t, n)
    mutual = h_s + h_t - (_entropy(objects.counts, n) + single_h)
    rand_split, rand_merge = _ratio(sum_p, sum_t), _ratio(sum_p, sum_s)
    info_split, info_merge = _ratio(mutual, h_s), _ratio(mutual, h_t)
    return {
        "vrand": _ratio(2 * sum_p, sum_s + sum_t),
        "vrand_split": rand_split,
        "vrand_merge": rand_merge,
        "vinfo": _ratio(2 * mutual, h_s + h_t),
        "vinfo_split": info_split,
        "vinfo_merge": info_merge,
    }


def voi_scores(table: Contingency) -> dict:
    """Variation of information in bits, gt 0 ignored: split = H(pred|gt), merge = H(gt|pred)."""
    fg = table.restrict(table.gt_ids != 0)
    n = float(fg.counts.sum())
    h_joint = _entropy(fg.counts, n)
    split = max(h_joint - _entropy(_marginal(fg.gt_ids, fg.counts), n), 0.0)
    merge = max(h_joint - _entropy(_marginal(fg.pred_ids, fg.counts), n), 0.0)
    return {"voi": split + merge, "voi_split": split, "voi_merge": merge}


def scores_from_table(table: Contingency) -> dict:
    """All clustering metrics of this module from one contingency table (see module docstring)."""
    scores = {}
    for part in (rand_scores, adapted_rand_scores, isbi_scores, voi_scores):
        scores.update(part(table))
    return scores


def clustering_scores(seg: np.ndarray, gt: np.ndarray) -> dict:
    """Clustering metrics of instance labels `seg` (prediction) against `gt`, same shape (z,y,x) or (y,x).

    Returns a dict of floats: rand_index, rand_error, adapted_rand_error (+ _precision, _recall),
    vrand, vinfo (+ _split, _merge), voi, voi_split, voi_merge; definitions in the module
    docstring. Foreground-restricted metrics are NaN when gt has no foreground.
    """
    seg, gt = np.asarray(seg), np.asarray(gt)
    if seg.shape != gt.shape:
        raise UserError(f"prediction shape {seg.shape} differs from ground truth shape {gt.shape}.")
    table = contingency_table(seg, gt)
    if not (table.gt_ids != 0).any():
        scores = rand_scores(table)
        nan = float("nan")
        scores.update({k: nan for k in ("adapted_rand_error", "vrand", "vinfo", "voi", "voi_split", "voi_merge")})
        return scores
    return scores_from_table(table)
