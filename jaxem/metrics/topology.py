"""Warping error (Jain et al. 2010, "Boundary learning by optimization with topological
constraints", CVPR), the topology-aware boundary metric of the ISBI 2012 challenge.

The ground-truth boundary map L* is warped toward the prediction T by flipping, one at a time,
pixels where they disagree and whose flip keeps the topology (simple pixels); what cannot be
flipped are topological errors (splits, mergers, holes). warping error = remaining mismatches /
pixels. Boundary (True) is 8-connected and background 4-connected, so a diagonal membrane still
separates cells. Outside the image counts as background.

Simple pixels are flipped in parallel on nine interleaved sub-grids (stride 3): pixels of one
sub-grid do not see each other's 3x3 neighbourhood, so a parallel flip equals a sequential one.
"""

from __future__ import annotations

import functools

import numpy as np

# 8-neighbourhood in ring order starting top-left, clockwise: (dy, dx)
RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _components(cells: set, adjacent) -> list[set]:
    comps, seen = [], set()
    for c in cells:
        if c in seen:
            continue
        comp, stack = set(), [c]
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            comp.add(p)
            stack.extend(q for q in cells if q not in seen and adjacent(p, q))
        comps.append(comp)
    return comps


def _is_simple(code: int) -> bool:
    """Whether the centre pixel of a 3x3 neighbourhood (bit i = RING[i] is boundary) is simple."""
    fg = {RING[i] for i in range(8) if code >> i & 1}
    bg = {RING[i] for i in range(8) if not code >> i & 1}
    adj8 = lambda p, q: max(abs(p[0] - q[0]), abs(p[1] - q[1])) == 1  # noqa: E731
    adj4 = lambda p, q: abs(p[0] - q[0]) + abs(p[1] - q[1]) == 1  # noqa: E731
    t8 = len(_components(fg, adj8))
    t4 = sum(any(abs(y) + abs(x) == 1 for y, x in c) for c in _components(bg, adj4))
    return t8 == 1 and t4 == 1


@functools.lru_cache(maxsize=1)
def simple_table() -> np.ndarray:
    """(256,) bool: is the centre simple, indexed by the 8-neighbour code."""
    return np.array([_is_simple(code) for code in range(256)])


def _codes(labels: np.ndarray) -> np.ndarray:
    """(y, x) uint8 neighbour code of every pixel of a 2D bool map."""
    padded = np.pad(labels, 1)
    h, w = labels.shape
    code = np.zeros(labels.shape, np.uint8)
    for i, (dy, dx) in enumerate(RING):
        code |= padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w].astype(np.uint8) << i
    return code


def warp(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Warps boolean 2D `source` toward `target` by simple-pixel flips; returns the warped map."""
    warped = np.array(source, dtype=bool)
    target = np.asarray(target, dtype=bool)
    table = simple_table()
    changed = True
    while changed:
        changed = False
        for oy in range(3):
            for ox in range(3):
                sub = (slice(oy, None, 3), slice(ox, None, 3))
                flip = (warped[sub] != target[sub]) & table[_codes(warped)[sub]]
                if flip.any():
                    warped[sub] ^= flip
                    changed = True
    return warped


def warping_error(pred_bool: np.ndarray, gt_bool: np.ndarray) -> float:
    """Warping error of a 2D (y, x) boolean boundary map against the gt boundary map, in [0, 1].

    A (z, y, x) stack is scored slice by slice and the mismatches are pooled.
    """
    pred, gt = np.asarray(pred_bool, dtype=bool), np.asarray(gt_bool, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    return warping_mismatches(pred, gt) / max(gt.size, 1)


def warping_mismatches(pred: np.ndarray, gt: np.ndarray) -> int:
    """Number of topological mismatches left after warping gt toward pred (2D or a stack of 2D)."""
    if pred.ndim == 3:
        return sum(warping_mismatches(p, g) for p, g in zip(pred, gt))
    return int(np.count_nonzero(warp(pred, gt) != pred))
