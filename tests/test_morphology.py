"""Morphology: a hand-computed rectangle and agreement with skimage regionprops, blockwise too."""

import math

import numpy as np
import pytest
from skimage.measure import regionprops

import cc3d

from jaxem.segment.morphology import MorphologyAccumulator, SlabComponents, morphology, plot_histograms, write_csv


def test_rectangle_by_hand(tmp_path):
    labels = np.zeros((5, 7), np.uint8)
    labels[1:4, 2:7] = 3  # 3 rows x 5 columns, voxel size 2 nm (y) x 1 nm (x)
    t = morphology(labels, (2.0, 1.0))
    assert t["label"].tolist() == [3]
    assert t["area_nm2"][0] == pytest.approx(30.0)
    # y coordinates 2,4,6 nm: variance 8/3; x 2..6 nm: variance 2; length = 2 sqrt(4 var)
    assert t["major_axis_nm"][0] == pytest.approx(2 * math.sqrt(4 * 8 / 3))
    assert t["minor_axis_nm"][0] == pytest.approx(2 * math.sqrt(8))
    assert t["axis_ratio"][0] == pytest.approx(math.sqrt(4 / 3))
    assert t["equivalent_diameter_nm"][0] == pytest.approx(math.sqrt(4 * 30 / math.pi))
    assert (t["centroid_y_nm"][0], t["centroid_x_nm"][0]) == pytest.approx((4.0, 4.0))
    assert [t[k][0] for k in ("bbox_y_min", "bbox_y_max", "bbox_x_min", "bbox_x_max")] == [1, 4, 2, 7]
    write_csv(t, tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text().splitlines()[0].startswith("label,area_nm2")
    plot_histograms(t, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_matches_regionprops_3d_anisotropic_and_blockwise():
    rng = np.random.default_rng(3)
    labels = np.zeros((16, 24, 24), np.uint64)
    for i in range(1, 7):
        z, y, x = rng.integers(0, 12), rng.integers(0, 18), rng.integers(0, 18)
        labels[z:z + rng.integers(2, 5), y:y + rng.integers(2, 7), x:x + rng.integers(2, 7)] = i * 11
    labels[rng.random(labels.shape) < 0.1] = 0  # ragged shapes
    vs = (30.0, 4.0, 5.0)
    acc = MorphologyAccumulator(3)
    for z0 in range(0, 16, 5):
        acc.add(labels[z0:z0 + 5], (z0, 0, 0))
    blockwise = acc.table(vs)
    whole = morphology(labels, vs)
    for k in whole:
        np.testing.assert_allclose(blockwise[k], whole[k], rtol=1e-9)
    props = regionprops(labels.astype(np.int64), spacing=vs)
    assert whole["label"].tolist() == [p.label for p in props]
    np.testing.assert_allclose(whole["volume_nm3"], [p.area for p in props])
    np.testing.assert_allclose(whole["major_axis_nm"], [p.axis_major_length for p in props], rtol=1e-6)
    np.testing.assert_allclose(whole["minor_axis_nm"], [p.axis_minor_length for p in props], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole["centroid_z_nm"], [p.centroid[0] for p in props])
    assert [whole["bbox_x_max"][i] for i in range(len(props))] == [p.bbox[5] for p in props]


@pytest.mark.parametrize("ndim", [2, 3])
def test_slab_components_equal_whole_volume_components(ndim):
    """Slabs of 2 planes along the first axis: a U whose arms join only in the last slab, a
    bar crossing every slab, random blobs; objects and their morphology equal whole-volume cc."""
    rng = np.random.default_rng(3)
    shape = (12, 20, 16)[-ndim:]
    mask = rng.random(shape) > 0.8
    u = np.zeros(shape, bool)
    u[1:11, 2:4] = True    # left arm, all the way down
    u[1:11, 8:10] = True   # right arm
    u[10:12, 2:10] = True  # the base joins them in the last slab
    mask |= u
    mask[:, 14, ...] = True  # a bar through every slab
    components, acc = SlabComponents(), MorphologyAccumulator(ndim)
    for z in range(0, shape[0], 2):
        acc.add(components.add(mask[z:z + 2]), [z] + [0] * (ndim - 1))
    acc.relabel(components.roots())
    voxel = (40.0, 4.0, 4.0)[-ndim:]
    ours = acc.table(voxel)
    whole = morphology(cc3d.connected_components(mask, connectivity=4 if ndim == 2 else 6), voxel)
    assert len(ours["label"]) == len(whole["label"]) == len(np.unique(cc3d.connected_components(mask, connectivity=4 if ndim == 2 else 6))) - 1
    assert np.array_equal(ours["label"], np.arange(1, len(ours["label"]) + 1))  # consecutive ids
    for key in whole:
        if key != "label":
            np.testing.assert_allclose(np.sort(ours[key]), np.sort(whole[key]), rtol=1e-9, err_msg=key)
