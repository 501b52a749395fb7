"""Property tests of the clustering and pixel metrics, and agreement with scikit-image."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from skimage.metrics import adapted_rand_error, variation_of_information

from jaxem.metrics.clustering import clustering_scores
from jaxem.metrics.pixel import binary_scores

SETTINGS = settings(max_examples=25, deadline=None)
labels = arrays(np.int64, st.integers(2, 40), elements=st.integers(0, 4))
nonzero_labels = arrays(np.int64, st.integers(2, 40), elements=st.integers(1, 4))


def _pair(a, b):
    """Truncates two drawn label arrays to a common length."""
    n = min(a.size, b.size)
    return a[:n], b[:n]


@SETTINGS
@given(labels, labels)
def test_matches_skimage(a, b):
    seg, gt = _pair(a, b)
    if not gt.any() or np.count_nonzero(gt) < 2:
        return
    s = clustering_scores(seg, gt)
    are, _, _ = adapted_rand_error(gt, seg)
    if np.isfinite(are):  # skimage divides by zero when every segment is a single voxel
        assert s["adapted_rand_error"] == pytest.approx(are, abs=1e-12)
    split, merge = variation_of_information(gt, seg, ignore_labels=[0])
    assert (s["voi_split"], s["voi_merge"]) == pytest.approx((split, merge), abs=1e-9)


@SETTINGS
@given(labels, labels)
def test_bounds(a, b):
    seg, gt = _pair(a, b)
    s = clustering_scores(seg, gt)
    assert 0 <= s["rand_index"] <= 1 + 1e-12
    if gt.any():
        for k in ("adapted_rand_error", "vrand", "vinfo", "vrand_split", "vrand_merge", "vinfo_split", "vinfo_merge"):
            assert -1e-12 <= s[k] <= 1 + 1e-12, k
        assert s["voi_split"] >= 0 and s["voi_merge"] >= 0


@SETTINGS
@given(nonzero_labels)
def test_identical_is_perfect(gt):
    s = clustering_scores(gt, gt)
    assert s["rand_index"] == 1 and s["adapted_rand_error"] == pytest.approx(0)
    assert s["vrand"] == pytest.approx(1) and s["vinfo"] == pytest.approx(1)
    assert s["voi"] == pytest.approx(0, abs=1e-12)
    assert binary_scores(gt > 2, gt > 2)["dice"] == 1


@SETTINGS
@given(labels, labels, st.permutations([1, 2, 3, 4]))
def test_invariant_to_relabelling(a, b, perm):
    seg, gt = _pair(a, b)
    relabel = np.array([0] + list(perm))
    before = clustering_scores(seg, gt)
    after = clustering_scores(relabel[seg] * 1000, relabel[gt])
    assert after == pytest.approx(before, nan_ok=True)


@SETTINGS
@given(nonzero_labels, nonzero_labels)
def test_symmetry(a, b):
    seg, gt = _pair(a, b)
    s, t = clustering_scores(seg, gt), clustering_scores(gt, seg)
    assert s["rand_index"] == pytest.approx(t["rand_index"])
    assert s["adapted_rand_error"] == pytest.approx(t["adapted_rand_error"])
    assert (s["voi_split"], s["voi_merge"]) == pytest.approx((t["voi_merge"], t["voi_split"]))
    p, q = binary_scores(seg > 2, gt > 2), binary_scores(gt > 2, seg > 2)
    assert (p["dice"], p["iou"]) == pytest.approx((q["dice"], q["iou"]))


@SETTINGS
@given(nonzero_labels)
def test_split_raises_split_and_merge_raises_merge(gt):
    gt = np.concatenate([gt, [1, 1, 2]])
    split = gt.copy()
    split[np.flatnonzero(gt == 1)[0]] = 9  # one voxel of object 1 becomes its own object
    s = clustering_scores(split, gt)
    assert s["voi_split"] > 0 and s["voi_merge"] == pytest.approx(0, abs=1e-12)
    merged = np.where(gt == 2, 1, gt)
    m = clustering_scores(merged, gt)
    assert m["voi_merge"] > 0 and m["voi_split"] == pytest.approx(0, abs=1e-12)
    assert s["vrand_split"] < 1 and s["vrand_merge"] == 1
    assert m["vrand_merge"] < 1 and m["vrand_split"] == 1


def test_structured_3d_against_skimage():
    """Blocks of 8^3 as gt; prediction shifted by 3 voxels with a merged pair and 0 boundaries."""
    z, y, x = np.indices((24, 32, 32))
    gt = (z // 8) * 16 + (y // 8) * 4 + x // 8 + 1
    seg = ((z + 3) // 8) * 16 + ((y + 3) // 8) * 4 + (x + 3) // 8 + 1
    seg[seg == 2] = 3
    seg[:, ::8, :] = 0
    gt[:, :, ::11] = 0
    s = clustering_scores(seg.astype(np.uint64), gt)
    are, _, _ = adapted_rand_error(gt, seg)
    split, merge = variation_of_information(gt, seg, ignore_labels=[0])
    assert s["adapted_rand_error"] == pytest.approx(are)
    assert (s["voi_split"], s["voi_merge"]) == pytest.approx((split, merge))


def test_bad_labels_raise():
    from jaxem.errors import UserError

    with pytest.raises(UserError, match="negative"):
        clustering_scores(np.array([1, -1]), np.array([1, 1]))
    with pytest.raises(UserError, match="dtype float"):
        clustering_scores(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(UserError, match="shape"):
        clustering_scores(np.array([1, 2]), np.array([1, 1, 1]))
