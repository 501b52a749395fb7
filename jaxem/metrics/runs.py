"""One pass over a pair of label blocks: runs of equal ids along the last axis.

EM labels are spatially coherent, so a block of N voxels holds far fewer runs (maximal stretches
of one id along a row of the last axis). Everything the instance protocol needs comes from the
runs, never from per-voxel arrays:

- the contingency table (`clustering.ContingencyAccumulator.add_runs`): runs of equal
  (pred, gt) pairs are the union of the run starts of both volumes;
- per-object morphology (`label_moments`, fed to `jaxem.protocols.report.RunMorphology`): voxel
  count, first and second moments of the voxel coordinates and bounding boxes in closed form per
  run (a run is an arithmetic sequence along the last axis), summed per id.
Pure numpy (+ fastremap).
"""

from __future__ import annotations

import fastremap
import numpy as np


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


def _run_moments(starts: np.ndarray, lengths: np.ndarray, shape, offset) -> tuple[list, list, list, list]:
    """Per run (k,): the voxel coordinates' sums (first moments, ndim arrays), sums of products
    (second moments, ndim*ndim arrays, row-major (a, b); symmetric ones shared) and lo/hi (ndim
    arrays each; volume voxel indices: block coordinates + `offset`). float64, exact below 2^53."""
    coords = [c.astype(np.float64) + o for c, o in zip(np.unravel_index(starts, shape), offset)]
    ndim, n = len(shape), lengths.astype(np.float64)
    x0 = coords[-1]
    tri = n * (n - 1) / 2  # sum of 0..n-1
    first = [c * n for c in coords[:-1]] + [n * x0 + tri]
    sum_xx = (n * x0 + 2 * tri) * x0 + tri * (2 * n - 1) / 3  # sum of (x0 + i)^2, i < n
    second = [[None] * ndim for _ in range(ndim)]
    for a in range(ndim):
        for b in range(a, ndim):
            second[a][b] = second[b][a] = sum_xx if a == b == ndim - 1 else coords[a] * first[b]
    hi = coords[:-1] + [x0 + (n - 1)]
    return first, [v for row in second for v in row], coords, hi


def label_moments(values: np.ndarray, starts: np.ndarray, shape, offset=None) -> dict:
    """Per-id sums over the runs of a block of `shape` (voxels) at `offset` (voxel indices):
    `starts` (k,) flat start index of each run in the block, `values` (k,) the id of each run.

    Returns ids (m,) uint64 (nonzero ids present), count (m,) int64 voxels, first (m, ndim) and
    second (m, ndim*ndim) float64 coordinate moments, lo and hi (m, ndim) int64 bounding box
    (hi exclusive), in volume voxel indices: `morphology.MorphologyAccumulator`'s parts.
    """
    offset = (0,) * len(shape) if offset is None else tuple(int(o) for o in offset)
    lengths = run_lengths(starts, int(np.prod(shape)))
    first, second, lo, hi = _run_moments(starts, lengths, shape, offset)
    local, mapping = fastremap.renumber(values, preserve_zero=True, in_place=False)
    k = int(local.max(initial=0)) + 1
    ids = np.zeros(k, np.uint64)
    ids[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(mapping.keys(), np.uint64, len(mapping))
    local = local.astype(np.intp)
    sums = {}  # one bincount per distinct array (the symmetric second moments share theirs)
    for x in first + second:
        if id(x) not in sums:
            sums[id(x)] = np.bincount(local, x, k)
    total = [sums[id(x)] for x in first + second]
    box = [np.full((k, len(shape)), np.inf), np.full((k, len(shape)), -np.inf)]
    for a in range(len(shape)):
        np.minimum.at(box[0][:, a], local, lo[a])
        np.maximum.at(box[1][:, a], local, hi[a])
    count = np.bincount(local, lengths, k).astype(np.int64)
    keep = (ids != 0) & (count > 0)
    return dict(ids=ids[keep], count=count[keep], first=np.stack(total[:len(shape)], 1)[keep],
                second=np.stack(total[len(shape):], 1)[keep], lo=box[0][keep].astype(np.int64),
                hi=box[1][keep].astype(np.int64) + 1)
