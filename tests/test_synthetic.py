"""Synthetic EM: determinism, types, realistic statistics and valid ground truth."""

import cc3d
import numpy as np
import pytest

from jaxem.data import synthetic

SHAPE = (8, 128, 128)


@pytest.fixture(scope="module")
def em():
    return synthetic.generate(SHAPE, seed=3)


def test_dtypes_and_shapes(em):
    assert em.raw.shape == em.instances.shape == em.semantic.shape == SHAPE
    assert em.raw.dtype == np.uint8 and em.instances.dtype == np.uint64 and em.semantic.dtype == np.uint8
    assert em.voxel_size == (40.0, 4.0, 4.0)
    assert set(np.unique(em.semantic)) <= {0, 1, 2}


def test_deterministic_for_a_seed(em):
    again = synthetic.generate(SHAPE, seed=3)
    np.testing.assert_array_equal(em.raw, again.raw)
    np.testing.assert_array_equal(em.instances, again.instances)
    other = synthetic.generate(SHAPE, seed=4)
    assert (em.raw != other.raw).mean() > 0.5
    assert not np.array_equal(em.instances > 0, other.instances > 0)


def test_membranes_are_background_and_darker(em):
    membrane = em.instances == 0
    np.testing.assert_array_equal(membrane, em.semantic == synthetic.MEMBRANE)
    assert 0.05 < membrane.mean() < 0.3
    raw = em.raw.astype(float)
    assert raw[membrane].mean() < raw[em.semantic == synthetic.CYTOPLASM].mean() - 25


def test_every_instance_is_one_connected_component(em):
    components = cc3d.connected_components(em.instances, connectivity=6)
    assert len(np.unique(components)) == len(np.unique(em.instances))


def test_membranes_are_thin_in_plane(em):
    # median in-plane distance from a membrane voxel to cytoplasm is a couple of pixels, not tens
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(em.instances == 0, sampling=(1e6, 1, 1))
    assert np.median(inside[em.instances == 0]) <= 2.5


def test_cell_count_grows_with_volume():
    small = synthetic.generate((4, 96, 96), seed=1)
    large = synthetic.generate((8, 192, 192), seed=1)
    n_small = len(np.unique(small.instances)) - 1
    n_large = len(np.unique(large.instances)) - 1
    assert n_small >= 5 and n_large > 2 * n_small


def test_mitochondria_switch():
    with_mito = synthetic.generate(SHAPE, seed=0, mitochondria=True)
    without = synthetic.generate(SHAPE, seed=0, mitochondria=False)
    assert (with_mito.semantic == synthetic.MITOCHONDRION).sum() > 200
    assert (without.semantic == synthetic.MITOCHONDRION).sum() == 0
    # mitochondria lie inside cells and are darker than the cytoplasm around them
    mito = with_mito.semantic == synthetic.MITOCHONDRION
    assert (with_mito.instances[mito] > 0).all()
    raw = with_mito.raw.astype(float)
    assert raw[mito].mean() < raw[with_mito.semantic == synthetic.CYTOPLASM].mean()


def test_threshold_does_not_recover_membranes(em):
    # a plain global threshold at the best level still mislabels many voxels
    membrane = em.instances == 0
    raw = em.raw.astype(float)
    best = max(_f1(raw < t, membrane) for t in range(20, 200, 5))
    assert best < 0.8


def test_two_dimensional_section():
    em2 = synthetic.generate((96, 128), seed=2)
    assert em2.raw.shape == (96, 128) and em2.voxel_size == (4.0, 4.0)
    assert len(np.unique(em2.instances)) > 5
    components = cc3d.connected_components(em2.instances, connectivity=4)
    assert len(np.unique(components)) == len(np.unique(em2.instances))


def test_bad_shape():
    with pytest.raises(ValueError):
        synthetic.generate((0, 10, 10))


def _f1(pred, truth):
    tp = (pred & truth).sum()
    return 2 * tp / (pred.sum() + truth.sum())
