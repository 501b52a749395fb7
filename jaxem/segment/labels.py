"""Label-array primitives shared by the segmentation methods: connected components, consecutive ids.

Arrays are (y, x) or (z, y, x); labels are uint64 with 0 = background. This module sits below
`instances`, `agglomerate` and `morphology`, which all import it (none imports another for these).
"""

from __future__ import annotations

import cc3d
import fastremap
import numpy as np


def connected_components(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Connected components of a boolean mask, or of each nonzero value of an integer class map,
    (y, x) or (z, y, x) -> uint64 labels 1..N (0 = background). `connectivity`: 4 or 8 in 2D, 6, 18
    or 26 in 3D; default face connectivity (4 in 2D, 6 in 3D)."""
    if connectivity is None:
        connectivity = 4 if mask.ndim == 2 else 6
    return cc3d.connected_components(np.ascontiguousarray(mask), connectivity=connectivity, out_dtype=np.uint64)


def stack_unique(slices: list[np.ndarray]) -> np.ndarray:
    """Stacks per-slice labels (y, x) into (z, y, x), offsetting ids so they are unique."""
    out, offset = [], 0
    for labels in slices:
        labels = labels.astype(np.uint64)
        out.append(np.where(labels > 0, labels + np.uint64(offset), np.uint64(0)))
        offset += int(labels.max(initial=0))
    return np.stack(out)


def relabel(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Zeroes objects smaller than `min_size` voxels, then renumbers ids to 1..N (uint64)."""
    labels = np.asarray(labels, dtype=np.uint64)
    if min_size > 0:
        ids, counts = fastremap.unique(labels, return_counts=True)
        small = [int(i) for i, c in zip(ids, counts) if i != 0 and c < min_size]
        if small:
            labels = fastremap.mask(labels, small)
    labels, _ = fastremap.renumber(labels, start=1, preserve_zero=True)
    return labels.astype(np.uint64, copy=False)
