"""Test-time augmentation and model ensembles, as wrappers around a tile predictor.

A predictor maps a batch x (B, *spatial, C) float32 to probabilities (B, *spatial, K). TTA runs
it on flipped / rotated copies, inverts each transform on the output and averages. Ensembles
combine several predictors (e.g. several checkpoints) by mean, median or majority vote.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

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


def submitter(predict_fn: Callable) -> Callable:
    """`predict_fn.submit` (start a forward, return a function that waits for it), or the same
    interface around a synchronous predictor."""
    return getattr(predict_fn, "submit", None) or (lambda x: (lambda y: lambda: y)(predict_fn(x)))


def predictor(submit: Callable, batch: int) -> Callable:
    """A predictor `fn(x) -> probabilities` with `fn.submit = submit` and `fn.batch = batch`."""

    def fn(x: np.ndarray) -> np.ndarray:
        return submit(x)()

    fn.batch, fn.submit = batch, submit
    return fn


def with_tta(predict_fn: Callable, rotations: bool = True) -> Callable:
    """A predictor that averages `predict_fn` over `tta_transforms` (inverse-transformed).
    All transformed batches are dispatched before the first result is awaited."""
    start = submitter(predict_fn)

    def submit(x: np.ndarray) -> Callable[[], np.ndarray]:
        transforms = tta_transforms(x.shape[1:-1], rotations)
        waits = [start(np.ascontiguousarray(transform(np, x, t))) for t in transforms]

        def wait() -> np.ndarray:
            total = None
            for t, result in zip(transforms, waits):
                y = transform(np, result(), t, inverse=True)
                total = y if total is None else total + y
            return total / len(transforms)
        return wait

    return predictor(submit, getattr(predict_fn, "batch", 1))


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
    jax.numpy: see `ensemble`."""
    if reduce == "mean":
        return ys.mean(0)
    if reduce == "median":
        return xp.median(ys, axis=0)
    if multiclass:
        votes = xp.eye(ys.shape[-1], dtype=np.float32)[ys.argmax(-1)].sum(0)
        return xp.eye(ys.shape[-1], dtype=np.float32)[votes.argmax(-1)]
    frac = (ys > 0.5).mean(0)
    return xp.where(frac > 0.5, 1.0, xp.where(frac == 0.5, 0.5, 0.0)).astype(np.float32)


def ensemble(predict_fns: Sequence[Callable], reduce: str = "mean", multiclass: bool = False) -> Callable:
    """Combines predictors: 'mean', 'median', or 'majority' vote.

    Majority on sigmoid outputs gives 1.0 where more than half of the models predict > 0.5 (0.5
    on a tie); on softmax outputs the one-hot of the class most models choose (ties: lowest class).
    """
    check_reduction(reduce, len(predict_fns))

    starts = [submitter(f) for f in predict_fns]

    def submit(x: np.ndarray) -> Callable[[], np.ndarray]:
        waits = [start(x) for start in starts]  # every model's forward is dispatched first
        return lambda: combine(np, np.stack([w() for w in waits]), reduce, multiclass)

    return predictor(submit, min(getattr(f, "batch", 1) for f in predict_fns))
