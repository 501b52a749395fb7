"""Test-time augmentation and model ensembles: the transforms and reductions, for numpy or jax.numpy.

TTA runs a forward on flipped / rotated copies of a batch x (B, *spatial, C), inverts each
transform on the output and averages; ensembles combine several models' probabilities (e.g.
several checkpoints) by mean, median or majority vote. `jaxem.infer.device.tta_forward` and
`ensemble_forward` do both inside the jitted sliding window.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from jaxem.errors import UserError

REDUCTIONS = ("mean", "median", "majority")


def tta_transforms(spatial_shape: Sequence[int], rotations: bool = True) -> list[tuple[tuple[int, ...], int]]:
    """(flip axes, quarter turns in the y-x plane) pairs; spatial axes counted from 0.

    All flip combinations of the axes longer than 1 (flipping a 1-voxel axis, e.g. z of a 2D
    model's (1, y, x) tile, changes nothing), times 4 rotations of the last two axes when
    `rotations` and the y-x extent is square (so the rotated tile keeps its shape): 8 in 2D, 16 in 3D.
    """
    ndim = len(spatial_shape)
    flips = [tuple(a for a, f in zip(range(ndim), bits) if f) for bits in itertools.product((0, 1), repeat=ndim)]
    flips = [f for f in flips if all(spatial_shape[a] > 1 for a in f)]
    turns = (0, 1, 2, 3) if rotations and spatial_shape[-1] == spatial_shape[-2] else (0,)
    if turns != (0,):
        flips = [f for f in flips if ndim - 1 not in f]  # rot x flip(y) spans the same group: 4x2 in y-x
    return [(f, k) for f in flips for k in turns]


def transform(xp, x, flip_turns: tuple[tuple[int, ...], int], inverse: bool = False):
    """One of `tta_transforms` on a batch x (B, *spatial, C) (or its inverse), with `xp` = numpy
    or jax.numpy: flips of the spatial axes, then quarter turns in the last two spatial axes."""
    flips, turns = flip_turns
    axes, plane = tuple(1 + a for a in flips), (x.ndim - 3, x.ndim - 2)
    if inverse:
        return xp.flip(xp.rot90(x, -turns, axes=plane), axes)
    return xp.rot90(xp.flip(x, axes), turns, axes=plane)


def check_reduction(reduce: str, models: int) -> None:
    """UserError for a reduction not in REDUCTIONS, or for 'median'/'majority' of a single model
    (`--reduce` combines an ensemble's models: with one model it would be ignored)."""
    if reduce not in REDUCTIONS:
        raise UserError(f"--reduce {reduce!r} is not one of {', '.join(REDUCTIONS)}.")
    if models == 1 and reduce != "mean":
        raise UserError(f"--reduce {reduce} combines the models of an ensemble but one model was given; "
                        "pass several --run/--checkpoint, or leave --reduce out.")


def combine(xp, ys, reduce: str, multiclass: bool):
    """The models' probabilities ys (M, B, *spatial, K) reduced over M, with `xp` = numpy or
    jax.numpy. Majority on sigmoid outputs gives 1.0 where more than half of the models predict
    > 0.5 (0.5 on a tie); on softmax outputs the one-hot of the class most models choose (ties:
    lowest class)."""
    if reduce == "mean":
        return ys.mean(0)
    if reduce == "median":
        return xp.median(ys, axis=0)
    if multiclass:
        votes = xp.eye(ys.shape[-1], dtype=np.float32)[ys.argmax(-1)].sum(0)
        return xp.eye(ys.shape[-1], dtype=np.float32)[votes.argmax(-1)]
    frac = (ys > 0.5).mean(0)
    return xp.where(frac > 0.5, 1.0, xp.where(frac == 0.5, 0.5, 0.0)).astype(np.float32)
