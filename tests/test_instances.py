"""Instances from boundary / foreground maps: cc, seeded watershed, size filter, per-slice ids."""

import numpy as np
import pytest

from conftest import grid_boundaries
from jaxem.errors import UserError
from jaxem.segment.instances import instances_from_boundaries, instances_from_foreground, mutex_watershed, relabel


@pytest.mark.parametrize("shape,cells", [((33, 33), 16), ((17, 17, 17), 8)])
def test_cc_finds_each_grid_cell(shape, cells):
    labels = instances_from_boundaries(grid_boundaries(shape, 8), method="cc")
    assert labels.dtype == np.uint64 and labels.shape == shape
    assert labels.max() == cells
    assert set(np.unique(labels)) == set(range(cells + 1))
    assert (labels[grid_boundaries(shape, 8) > 0] == 0).all()


@pytest.mark.parametrize("shape,cells", [((33, 33), 16), ((17, 17, 17), 8)])
def test_watershed_assigns_membranes_to_cells(shape, cells):
    labels = instances_from_boundaries(grid_boundaries(shape, 8), method="watershed")
    assert labels.max() == cells
    assert (labels > 0).all()


@pytest.mark.parametrize("method", ["cc", "watershed", "agglomerate"])
def test_per_slice_segments_each_slice_as_it_would_be_alone(method):
    """Three different noisy slices: each slice of the per-slice result is the partition that
    slice gets segmented alone, with ids unique over the volume."""
    rng = np.random.default_rng(1)
    prob = np.stack([grid_boundaries((40, 40), step) for step in (6, 9, 13)])
    prob = np.clip(prob + rng.normal(0, 0.2, prob.shape), 0, 1).astype(np.float32)
    labels = instances_from_boundaries(prob, method, merge=0.4, per_slice=True)
    ids = [set(np.unique(labels[z])) - {0} for z in range(3)]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    for z in range(3):
        alone = instances_from_boundaries(prob[z], method, merge=0.4)
        pairs = np.unique(np.stack([labels[z].ravel(), alone.ravel()]), axis=1)
        assert pairs.shape[1] == len(np.unique(alone)) == len(np.unique(labels[z]))  # one-to-one


def test_watershed_splits_cells_touching_through_a_gap():
    prob = np.zeros((40, 80), np.float32)
    prob[:, 39:41] = 1.0
    prob[18:22, 39:41] = 0.0  # a leaky membrane: cc merges, distance seeds do not
    assert instances_from_boundaries(prob, method="cc").max() == 1
    labels = instances_from_boundaries(prob, method="watershed", h=2.0)
    assert labels.max() == 2
    assert labels[20, 5] != labels[20, 75]


def test_threshold_seeds_and_min_size():
    prob = grid_boundaries((33, 33), 8)
    prob[1:8, 1:8] = 0.4  # one cell with weak interior: no strict seed, absorbed by neighbours
    labels = instances_from_boundaries(prob, method="watershed", seeds="threshold")
    assert labels.max() == 15
    small = grid_boundaries((30, 30), 10)
    small[:, 25] = 1.0  # a thin 4-voxel-wide strip of cells
    cc = instances_from_boundaries(small, method="cc")
    big = instances_from_boundaries(small, method="cc", min_size=50)
    assert cc.max() > big.max() and big.max() == 6
    assert set(np.unique(big)) == set(range(7))


def test_per_slice_ids_are_unique_over_the_volume():
    vol = np.stack([grid_boundaries((33, 33), 8)] * 3)
    labels = instances_from_boundaries(vol, method="cc", per_slice=True)
    assert labels.max() == 48
    assert not set(np.unique(labels[0])) - {0} & set(np.unique(labels[1]))


def test_watershed_of_a_slice_without_any_boundary_returns():
    """A map with no voxel on the boundary side of the threshold (a slice inside one cell; a
    weak, barely trained model) is one object; a map that is all boundary has none. (The distance
    transform is infinite there, on which skimage's h_maxima used to hang.)"""
    inside = np.stack([np.full((64, 64), 0.45, np.float32), grid_boundaries((64, 64), 16)])
    labels = instances_from_boundaries(inside, method="watershed", per_slice=True, anisotropy=(40.0, 4.0, 4.0))
    assert len(np.unique(labels[0])) == 1 and labels[0, 0, 0] > 0  # one object over the whole slice
    assert labels.max() == 1 + 16
    assert instances_from_boundaries(np.ones((16, 16), np.float32), method="watershed").max() == 0
    assert instances_from_foreground(np.ones((8, 16, 16), np.float32), method="watershed").max() == 1


def test_foreground_keeps_background_and_splits_touching_disks():
    yy, xx = np.mgrid[:40, :70]
    fg = ((yy - 20) ** 2 + (xx - 20) ** 2 < 15**2) | ((yy - 20) ** 2 + (xx - 47) ** 2 < 15**2)
    labels = instances_from_foreground(fg.astype(np.float32), method="watershed")
    assert labels.max() == 2 and (labels[~fg] == 0).all() and (labels[fg] > 0).all()
    assert instances_from_foreground(fg.astype(np.float32), method="cc").max() == 1


def test_relabel_is_consecutive_and_bad_input_is_a_user_error():
    labels = relabel(np.array([[0, 7, 7], [3, 3, 100]]))
    assert labels.tolist() == [[0, 1, 1], [2, 2, 3]] or sorted(np.unique(labels)) == [0, 1, 2, 3]
    with pytest.raises(UserError):
        instances_from_boundaries(np.zeros(5), method="cc")
    with pytest.raises(UserError):
        instances_from_boundaries(np.zeros((5, 5)), method="nope")


def _reference_mutex_watershed(affinities, offsets, strides=None):
    """Wolf et al. 2018 spelled out: all edges strongest first (attractive weight a, repulsive
    1 - a), a union-find that joins two clusters unless a mutex separates them."""
    spatial = affinities.shape[1:]
    index = np.arange(int(np.prod(spatial))).reshape(spatial)
    edges = []
    for k, off in enumerate(offsets):
        src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(off, spatial))
        dst = tuple(slice(s.start + o, s.stop + o) for s, o in zip(src, off))
        repulsive = sum(abs(o) for o in off) > 1
        if repulsive and strides:
            src, dst = (tuple(slice(s.start, s.stop, st) for s, st in zip(b, strides)) for b in (src, dst))
        a = affinities[k][src].ravel()
        edges += zip(1.0 - a if repulsive else a, [repulsive] * a.size, index[src].ravel(), index[dst].ravel())
    parent = list(range(index.size))
    mutex = {i: set() for i in range(index.size)}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for _, repulsive, u, v in sorted(edges, key=lambda e: -e[0]):
        a, b = find(u), find(v)
        if a == b:
            continue
        if repulsive:
            mutex[a].add(b), mutex[b].add(a)
        elif b not in mutex[a]:
            parent[b] = a
            for c in mutex.pop(b):
                mutex[c].discard(b), mutex[c].add(a)
                mutex[a].add(c)
    return np.array([find(i) for i in range(index.size)]).reshape(spatial)


@pytest.mark.parametrize("shape,offsets,strides", [
    ((24, 24), [(1, 0), (0, 1), (3, 0), (0, 3), (-3, -3)], None),
    ((6, 16, 16), [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 4, 0), (0, 0, 4), (0, 4, 4)], None),
    ((6, 16, 16), [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 4, 0), (0, 0, 4)], (1, 2, 2)),
])
def test_mutex_watershed_equals_the_algorithm_spelled_out(shape, offsets, strides):
    """mwatershed (Rust), as jaxem maps its weights, gives the same partition as the paper's
    algorithm on smooth random affinities (no ties)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(len(shape))
    affinities = gaussian_filter(rng.uniform(size=(len(offsets), *shape)), (0,) + (1.5,) * len(shape))
    affinities = (affinities - affinities.min()) / (affinities.max() - affinities.min())
    ours = mutex_watershed(affinities, offsets, strides=strides)
    reference = _reference_mutex_watershed(affinities, offsets, strides)
    assert ours.dtype == np.uint64 and ours.min() == 1
    pairs = np.unique(np.stack([ours.ravel(), reference.ravel()]), axis=1)
    assert 10 < len(np.unique(reference)) == ours.max() == pairs.shape[1]  # a bijection of segments


@pytest.mark.parametrize("offsets,strides,message", [
    ([(1, 0), (0, 1)], None, "one offset of 2 values per affinity channel"),
    ([(1, 0), (0, 1), (0, 1, 1)], None, "one offset of 2 values per affinity channel"),
    ([(1, 0), (0, 1), (3, 0)], (2, 2, 2), "strides need 2 values"),
])
def test_mutex_watershed_bad_offsets_or_strides_are_clear_errors(offsets, strides, message):
    with pytest.raises(UserError, match=message):
        mutex_watershed(np.ones((3, 8, 8), np.float32), offsets, strides=strides)
