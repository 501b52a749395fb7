"""Host-side sampling: boxes, normalisation, foreground-aware crops, errors."""

import numpy as np
import pytest

from jaxem.data import sampling
from jaxem.data.volume import create_volume
from jaxem.errors import UserError


def _volume(path, array, voxel_size=(40.0, 4.0, 4.0)):
    vol = create_volume(path, array.shape, array.dtype, voxel_size[-array.ndim:], chunks=(4, 32, 32)[-array.ndim:])
    vol.write(array)
    return vol


@pytest.fixture
def pair(tmp_path):
    """A 3D image (uint8) and instance labels (uint64, big ids, 0 = background in the left third)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (6, 48, 40)).astype(np.uint8)
    labels = (rng.integers(1, 4, (6, 48, 40)) * 10**12).astype(np.uint64)
    labels[:, :, :13] = 0
    _volume(tmp_path / "img", image)
    _volume(tmp_path / "lab", labels)
    return str(tmp_path / "img"), str(tmp_path / "lab"), image, labels


def _source(pair, crop, **kw):
    img, lab, image, _ = pair
    stats = [sampling.normalize_stats(sampling.open_volume(img))]
    shapes = sampling.volume_shapes([img], [lab], [], crop, "train")
    return sampling.CropSource(images=[img], labels=[lab], masks=[], crop_shape=crop, stats=stats, shapes=shapes, **kw)


def test_normalize_stats_meanstd_and_percentile(pair):
    img, _, image, _ = pair
    vol = sampling.open_volume(img)
    a, b = sampling.normalize_stats(vol, "meanstd")
    assert a == pytest.approx(image.mean()) and b == pytest.approx(image.std())
    out = sampling.normalize(image, (a, b))
    assert out.dtype == np.float32 and abs(out.mean()) < 1e-4 and out.std() == pytest.approx(1, abs=1e-4)
    stats = sampling.normalize_stats(vol, "percentile", (1.0, 99.0))
    lo, hi = np.percentile(image, (1.0, 99.0))
    np.testing.assert_allclose(sampling.normalize(np.array([lo, hi]), stats), [-1.0, 1.0], atol=1e-5)
    with pytest.raises(UserError, match="data.normalize"):
        sampling.normalize_stats(vol, "zscore")


def test_normalize_stats_subsamples_large_volumes(tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "STATS_VOXELS", 4096)
    image = np.random.default_rng(1).normal(100, 10, (8, 64, 64)).astype(np.float32)
    vol = _volume(tmp_path / "big", image)
    a, b = sampling.normalize_stats(vol)
    assert a == pytest.approx(100, abs=1.5) and b == pytest.approx(10, rel=0.1)
    assert a != pytest.approx(float(image.mean()), abs=1e-6)  # it really was a subsample


def test_random_boxes_weighted_by_size_and_inside():
    source = sampling.CropSource(images=["a", "b"], labels=["a", "b"], masks=[], crop_shape=(8, 8),
                                 stats=[(0, 1)] * 2, shapes=[(2, 20, 20), (6, 20, 20)])
    rng = np.random.default_rng(0)
    picks = [source.random_box(rng) for _ in range(2000)]
    share = np.mean([i == 1 for i, _ in picks])
    assert share == pytest.approx(0.75, abs=0.04)
    for i, box in picks[:200]:
        assert box[0].stop - box[0].start == 1  # a 2D crop is one z-section
        assert all(0 <= s.start and s.stop <= n for s, n in zip(box, source.shapes[i]))


def test_grid_boxes_cover_the_volume():
    shape = (3, 20, 17)
    seen = np.zeros(shape, int)
    boxes = sampling.grid_boxes(shape, (8, 8))
    for box in boxes:
        seen[box] += 1
        assert seen[box].shape == (1, 8, 8)
    assert seen.min() >= 1
    assert sampling.grid_boxes(shape, (8, 8)) == boxes


def test_crops_normalized_renumbered_2d_and_3d(pair):
    img, lab, image, labels = pair
    source = _source(pair, (4, 16, 16))
    crop = source.sample(sampling.row_rng(0, 0, 0))
    assert crop["image"].shape == (4, 16, 16) and crop["image"].dtype == np.float32
    assert crop["labels"].dtype == np.int32 and crop["mask"].dtype == np.float32
    ids = np.unique(crop["labels"])
    np.testing.assert_array_equal(ids[ids > 0], np.arange(1, len(ids[ids > 0]) + 1))
    again = source.sample(sampling.row_rng(0, 0, 0))
    np.testing.assert_array_equal(crop["image"], again["image"])
    flat = _source(pair, (16, 16)).sample(sampling.row_rng(0, 1, 0))
    assert flat["image"].shape == (16, 16) and flat["labels"].shape == (16, 16)


def test_foreground_min_fraction(pair):
    source = _source(pair, (16, 16), foreground_min_fraction=0.9)
    for row in range(20):
        crop = source.sample(sampling.row_rng(3, 0, row))
        assert np.mean(crop["labels"] > 0) >= 0.9
    impossible = _source(pair, (48, 40), foreground_min_fraction=0.9, max_retries=3)
    with pytest.raises(UserError, match="foreground_min_fraction"):
        impossible.sample(sampling.row_rng(0, 0, 0))


def test_masks_read_per_crop(pair, tmp_path):
    img, lab, _, _ = pair
    mask = np.ones((6, 48, 40), np.uint8)
    mask[:, 24:] = 0
    _volume(tmp_path / "mask", mask)
    source = sampling.CropSource(images=[img], labels=[lab], masks=[str(tmp_path / "mask")], crop_shape=(48, 40),
                                 stats=[(0, 1)], shapes=[(6, 48, 40)])
    crop = source.sample(np.random.default_rng(0))
    np.testing.assert_array_equal(crop["mask"], mask[0].astype(np.float32))


def test_volume_errors(pair, tmp_path):
    img, lab, _, _ = pair
    with pytest.raises(UserError, match=r"crop_shape \(64, 64\) does not fit in volume .*img of shape \(6, 48, 40\)"):
        sampling.volume_shapes([img], [lab], [], (64, 64), "train")
    _volume(tmp_path / "other", np.zeros((6, 48, 41), np.uint8))
    with pytest.raises(UserError, match="other has shape"):
        sampling.volume_shapes([img], [str(tmp_path / "other")], [], (16, 16), "train")
    with pytest.raises(UserError, match="train_labels has 0"):
        sampling.volume_shapes([img], [], [], (16, 16), "train")
    with pytest.raises(UserError, match="does not exist"):
        sampling.volume_shapes([str(tmp_path / "missing")], [lab], [], (16, 16), "val")
