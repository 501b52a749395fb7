"""Targets from labels: compared with independent numpy/scipy references."""

import jax
import numpy as np
import pytest
import scipy.ndimage

from jaxem.data.targets import (
    default_target_config, distance_target, make_target_fn, num_target_channels)
from jaxem.errors import UserError


def _cells(shape, seed=0, count=6):
    """Random Voronoi-like instance labels with 0-valued membranes between cells."""
    rng = np.random.default_rng(seed)
    seeds = np.stack([rng.integers(0, s, count) for s in shape], 1)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    dist = ((grid[..., None, :] - seeds) ** 2).sum(-1)
    order = np.sort(dist, -1)
    labels = dist.argmin(-1) + 1
    labels[order[..., 1] - order[..., 0] < 3] = 0
    return labels.astype(np.int32)


def _cfg(ndim, **kw):
    cfg = default_target_config(ndim)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("shape,width", [((2, 24, 20), (1,)), ((2, 24, 20), (2,)), ((1, 6, 16, 12), (0, 1, 1))])
def test_boundary_matches_scipy_filters(shape, width):
    labels = np.stack([_cells(shape[1:], seed=i) for i in range(shape[0])])
    mask = np.ones(labels.shape, np.float32)
    ndim = labels.ndim - 1
    target, target_mask = jax.jit(make_target_fn(_cfg(ndim, kind="boundary", width=width), ndim))(labels, mask)
    w = width * ndim if len(width) == 1 else width
    size = (1,) + tuple(2 * v + 1 for v in w)
    hi = scipy.ndimage.maximum_filter(labels, size=size, mode="nearest")
    lo = scipy.ndimage.minimum_filter(labels, size=size, mode="nearest")
    expected = (labels == 0) | (hi != lo)
    np.testing.assert_array_equal(np.asarray(target[..., 0]), expected)
    assert np.all(np.asarray(target_mask) == 1)
    assert target.shape == labels.shape + (1,)


def test_boundary_width_grows_and_mask_shrinks_near_unlabelled():
    labels = _cells((32, 32))[None]
    mask = np.ones(labels.shape, np.float32)
    mask[:, :, 20:] = 0
    thin, _ = make_target_fn(_cfg(2, width=(1,)), 2)(labels, mask)
    thick, tmask = make_target_fn(_cfg(2, width=(3,)), 2)(labels, mask)
    assert np.asarray(thick).sum() > np.asarray(thin).sum()
    assert np.all(np.asarray(thick) >= np.asarray(thin))
    # Width 3 needs a fully labelled 7x7 neighbourhood: columns 17.. are undefined.
    assert np.all(np.asarray(tmask)[0, :, :17, 0] == 1) and np.all(np.asarray(tmask)[0, :, 17:, 0] == 0)


def test_affinities_long_range_against_loops():
    labels = np.stack([_cells((5, 20, 18), seed=s) for s in (1, 2)])
    mask = np.ones(labels.shape, np.float32)
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -9, 0], [0, 0, -9]]
    cfg = _cfg(3, kind="affinities", offsets=offsets)
    assert num_target_channels(cfg, 3) == 5
    target, tmask = jax.jit(make_target_fn(cfg, 3))(labels, mask)
    target, tmask = np.asarray(target), np.asarray(tmask)
    for k, off in enumerate(offsets):
        for index in np.ndindex(labels.shape):
            other = tuple(i + o for i, o in zip(index[1:], off))
            inside = all(0 <= p < n for p, n in zip(other, labels.shape[1:]))
            assert tmask[index + (k,)] == inside
            if inside:
                a, b = labels[index], labels[(index[0],) + other]
                assert target[index + (k,)] == (a == b and a > 0)


def test_affinity_mask_counts_and_unlabelled():
    labels = _cells((16, 16))[None]
    mask = np.ones(labels.shape, np.float32)
    mask[0, 0, 0] = 0
    cfg = _cfg(2, kind="affinities", offsets=[[0, -9], [-1, 0]])
    _, tmask = make_target_fn(cfg, 2)(labels, mask)
    tmask = np.asarray(tmask)[0]
    # 9 columns (1 row) leave the crop; (0,0) is among them and is the partner of one more voxel.
    assert tmask[..., 0].sum() == 16 * 16 - 16 * 9 - 1
    assert tmask[..., 1].sum() == 16 * 16 - 16 - 1


def test_nearest_neighbour_default_offsets():
    cfg = _cfg(3, kind="affinities")
    assert num_target_channels(cfg, 3) == 3
    with pytest.raises(UserError, match="offsets"):
        make_target_fn(_cfg(2, kind="affinities", offsets=[[0, -1, 0]]), 2)


def test_foreground_and_multiclass():
    labels = np.array([[[0, 1, 2], [3, -1, 1]]], np.int32)
    mask = np.ones(labels.shape, np.float32)
    fg, fgm = make_target_fn(_cfg(2, kind="foreground"), 2)(labels, mask)
    np.testing.assert_array_equal(np.asarray(fg[..., 0]), labels > 0)
    cfg = _cfg(2, kind="multiclass", num_classes=3, ignore_label=-1)
    onehot, omask = make_target_fn(cfg, 2)(labels, mask)
    onehot, omask = np.asarray(onehot), np.asarray(omask)
    assert onehot.shape == (1, 2, 3, 3)
    assert onehot[0, 0, 2, 2] == 1 and onehot[0, 0, 1, 1] == 1 and onehot.sum(-1)[0, 0, 0] == 1
    assert np.all(omask[0, 1, 0] == 0) and np.all(omask[0, 1, 1] == 0)  # class 3 out of range, -1 ignored
    assert omask.sum() == 4 * 3


def test_distance_per_instance_normalized():
    labels = _cells((24, 24), seed=3)
    dist = distance_target(labels)
    assert np.all(dist[labels == 0] == 0)
    for i in np.unique(labels[labels > 0]):
        assert dist[labels == i].max() == pytest.approx(1.0)
    reference = scipy.ndimage.distance_transform_edt(labels == 1)
    inner = (labels == 1) & (reference > 1)
    np.testing.assert_allclose(dist[inner] * reference[labels == 1].max(), reference[inner], rtol=1e-4)


def test_distance_kind_runs_under_jit():
    labels = np.stack([_cells((12, 12), seed=s) for s in range(2)])
    target, tmask = jax.jit(make_target_fn(_cfg(2, kind="distance"), 2))(labels, np.ones(labels.shape, np.float32))
    np.testing.assert_allclose(np.asarray(target[1, ..., 0]), distance_target(labels[1]), rtol=1e-6)


def test_unknown_kind_is_user_error():
    with pytest.raises(UserError, match="target.kind"):
        make_target_fn(_cfg(2, kind="nope"), 2)
