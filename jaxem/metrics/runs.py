"""One pass over a pair of label blocks: runs of equal ids along the last axis.

EM labels are spatially coherent, so a block of N voxels holds far fewer runs (maximal stretches
of one id along a row of the last axis). Everything the instance protocol needs comes from the
runs, never from per-voxel arrays:

- the contingency table (`clustering.ContingencyAccumulator.add_runs`): runs of equal
  (pred, gt) pairs are the union of the run starts of both volumes;
- per-object morphology (`RunMorphology`): voxel count, first and second moments of the voxel
  coordinates and bounding boxes in closed form per run (a run is an arithmetic sequence along
  the last axis), summed per id.
"""

from __future__ import annotations

import fastremap
import numpy as np

from jaxem.segment import morphology


def run_starts(flat: np.ndarray, row: int) -> np.ndarray:
    """(n,) bool for a C-order block flattened to `flat` (n,) whose last axis has `row` voxels:
    True where a run starts (the first voxel of each row, and wherever the id changes)."""
    change = np.empty(flat.size, bool)
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::max(row, 1)] = True
    return change


def run_lengths(starts: np.ndarray, n: int) -> np.ndarray:
    """(k,) int64 length of each run from its (k,) start indices in a block of `n` voxels."""
    return np.diff(starts, append=n).astype(np.int64)


def _run_moments(starts: np.ndarray, lengths: np.ndarray, shape, offset) -> dict:
    """Per run (k,): count, first (k, ndim), second (k, ndim*ndim) moments and lo/hi (k, ndim) of
    its voxel coordinates (volume voxel indices: block coordinates + `offset`), all exact int64."""
    coords = [c.astype(np.int64) + o for c, o in zip(np.unravel_index(starts, shape), offset)]
    ndim, n = len(shape), lengths
    x0 = coords[-1]
    sum_x = n * x0 + n * (n - 1) // 2
    sum_xx = n * x0 * x0 + x0 * n * (n - 1) + (n - 1) * n * (2 * n - 1) // 6
    first = [c * n for c in coords[:-1]] + [sum_x]
    second = np.empty((len(n), ndim, ndim), np.int64)
    for a in range(ndim):
        for b in range(a, ndim):
            value = sum_xx if a == b == ndim - 1 else coords[a] * first[b]  # first[b] = c_b n or sum_x
            second[:, a, b] = second[:, b, a] = value
    lo = np.stack(coords, 1)
    hi = lo.copy()
    hi[:, -1] += n - 1
    return dict(count=n, first=np.stack(first, 1), second=second.reshape(len(n), -1), lo=lo, hi=hi)


class RunMorphology(morphology.MorphologyAccumulator):
    """`morphology.MorphologyAccumulator` fed with runs (`add_runs`) instead of voxels: the same
    table (`table(voxel_size)`), with moments summed exactly in integers."""

    def add_runs(self, values: np.ndarray, starts: np.ndarray, shape, offset=None) -> None:
        """Adds the runs of a block of `shape` (voxels) at `offset` (voxel indices): `starts` (k,)
        flat start index of each run in the block, `values` (k,) the id of each run (0 is skipped)."""
        offset = (0,) * len(shape) if offset is None else tuple(int(o) for o in offset)
        runs = _run_moments(starts, run_lengths(starts, int(np.prod(shape))), shape, offset)
        local, mapping = fastremap.renumber(values, preserve_zero=True, in_place=False)
        k = int(local.max(initial=0)) + 1
        ids = np.zeros(k, np.uint64)
        ids[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(mapping.keys(), np.uint64, len(mapping))
        local = local.astype(np.intp)

        def total(x):
            return np.stack([np.bincount(local, x[:, j].astype(np.float64), k) for j in range(x.shape[1])], 1)

        lo = np.full((k, len(shape)), np.iinfo(np.int64).max)
        hi = np.full((k, len(shape)), -1, np.int64)
        for a in range(len(shape)):
            np.minimum.at(lo[:, a], local, runs["lo"][:, a])
            np.maximum.at(hi[:, a], local, runs["hi"][:, a])
        count = np.bincount(local, runs["count"].astype(np.float64), k).astype(np.int64)
        keep = (ids != 0) & (count > 0)
        self._parts.append(dict(ids=ids[keep], count=count[keep], first=total(runs["first"])[keep],
                                second=total(runs["second"])[keep], lo=lo[keep], hi=hi[keep] + 1))
