"""The CREMI recipe: the border mask and scores of CREMI's protocol (by hand and against a slow
re-implementation of cremi_python's logic), CREMI's HDF5 preparation, the config, the held-out
scorer's protocol="cremi" (the benchmark end to end: tests/test_recipe_snemi3d.py)."""

import math

import h5py
import numpy as np
import pytest

from jaxem.config import load_config
from jaxem.data import datasets
from jaxem.errors import UserError
from jaxem.metrics.cremi import border_mask, cremi_scores, mask_ground_truth

VOXEL = (40.0, 4.0, 4.0)
NO_LABEL = np.uint64(2**64 - 1)  # uint64(-1)


def halves(shape=(1, 4, 20), split=10):
    """uint64 ids: 1 left of x = `split`, 2 from it on."""
    gt = np.full(shape, 1, np.uint64)
    gt[..., split:] = 2
    return gt


# ---------------------------------------------------------------- border mask by hand


def test_border_mask_by_hand():
    """Border pixels are x = 9 and 10. 25 nm at 4 nm is 6.25 pixels: x = 3..16 are masked; 4 nm is
    1 pixel: x = 8..11; no threshold masks nothing (cremi_python masks only when it is truthy)."""
    gt = halves()
    for threshold, (lo, hi) in ((25, (3, 16)), (4, (8, 11))):
        expected = np.zeros(gt.shape, bool)
        expected[..., lo:hi + 1] = True
        np.testing.assert_array_equal(border_mask(gt, VOXEL, threshold), expected)
    assert not border_mask(gt, VOXEL, None).any() and not border_mask(gt, VOXEL, 0).any()
    np.testing.assert_array_equal(border_mask(gt[0], VOXEL[1:], 4), border_mask(gt, VOXEL, 4)[0])  # 2D


def test_border_mask_is_in_plane_per_section_and_euclidean():
    """Section 0 splits at x = 10, section 1 at x = 4: each is masked by its own border only. A corner
    of label 2 at (0, 0): pixel (2, 2) is sqrt(1 + 1) from the border pixel (1, 1), inside 1.5 pixels."""
    gt = np.stack([halves((4, 20), 10), halves((4, 20), 4)])
    mask = border_mask(gt, VOXEL, 4)
    assert mask[0, :, 8:12].all() and not mask[0, :, :8].any() and not mask[0, :, 12:].any()
    assert mask[1, :, 2:6].all() and not mask[1, :, 6:].any()
    corner = np.ones((1, 8, 8), np.uint64)
    corner[0, 0, 0] = 2  # border pixels: (0, 0), (0, 1), (1, 0)
    mask = border_mask(corner, VOXEL, 6.0)[0]  # 1.5 pixels
    assert mask[1, 1] and mask[2, 0] and not mask[2, 2] and not mask[3, 0]


def test_a_section_without_border_is_not_masked():
    """cremi_python's scipy call would mask a quarter disc at the corner there (documented)."""
    assert not border_mask(np.ones((2, 6, 6), np.uint64), VOXEL).any()


def test_voxel_size_must_match_and_be_square():
    with pytest.raises(UserError, match="y 8.0 != x 4.0"):
        border_mask(halves(), (40, 8, 4))
    with pytest.raises(UserError, match="must hold 3 positive sizes"):
        cremi_scores(halves(), halves(), (4, 4))
    with pytest.raises(UserError, match="differs from ground truth shape"):
        cremi_scores(halves()[:, :2], halves(), VOXEL)


# ---------------------------------------------------------------- scores by hand


def test_merge_of_two_equal_neurons_by_hand():
    """Two neurons of 12 unmasked voxels each, merged: VOI merge 1 bit, split 0; CREMI's Rand
    sums (self-pairs counted): A = 2 * 12^2, B = 24^2, AB = 2 * 12^2 -> precision 1/2, recall 1,
    error 1/3; CREMI score sqrt(1/3 * 1). What the prediction does inside the mask is ignored."""
    gt = halves()
    pred = np.ones_like(gt)
    pred[..., 5:15] = 7  # inside the 25 nm mask only
    scores = cremi_scores(pred, gt, VOXEL)
    assert scores["voi_merge"] == pytest.approx(1.0) and scores["voi_split"] == pytest.approx(0.0)
    assert scores["adapted_rand_error"] == pytest.approx(1 / 3)
    assert scores["cremi_score"] == pytest.approx(math.sqrt(1 / 3))
    assert scores["masked_fraction"] == pytest.approx(14 / 20)
    perfect = cremi_scores(gt, gt, VOXEL)
    assert perfect["voi_split"] == perfect["voi_merge"] == perfect["adapted_rand_error"] == perfect["cremi_score"] == 0


def test_prediction_zero_counts_only_as_c_over_n():
    """All-zero prediction, no mask, gt = two neurons of 40 voxels: c = n = 80, so sumB = sumAB = 1,
    sumA = 2 * 40^2 -> recall 1/3200, error 1 - 2/3201 (cremi_python's SNEMI3D-script quirk)."""
    scores = cremi_scores(np.zeros((1, 4, 20), np.uint64), halves(), VOXEL, threshold_nm=None)
    assert scores["adapted_rand_error"] == pytest.approx(1 - 2 / 3201)
    assert scores["voi_merge"] == pytest.approx(1.0)


def test_no_label_ids_are_ignored_and_their_borders_masked():
    """uint64(-1) (and the other ids above uint64(-10)) mean "no label": ignored like 0, and the
    neuron voxels next to them are masked as near any border."""
    gt = halves()
    gt[..., 17:] = NO_LABEL
    masked = mask_ground_truth(gt, VOXEL, 4)
    assert (masked[..., 17:] == 0).all() and (masked[..., 15:17] == 0).all() and (masked[..., 12:15] == 2).all()
    pred = np.arange(gt.size, dtype=np.uint64).reshape(gt.shape)  # every voxel its own id
    pred[..., :8], pred[..., 12:15] = 1, 2  # correct on every unmasked neuron voxel
    assert cremi_scores(pred, gt, VOXEL, 4)["cremi_score"] == 0
    gt[..., 17:] = NO_LABEL - np.uint64(2)
    assert cremi_scores(pred, gt, VOXEL, 4)["cremi_score"] == 0


def test_nothing_left_to_score_gives_nan():
    scores = cremi_scores(np.ones((1, 4, 4), np.uint64), np.zeros((1, 4, 4), np.uint64), VOXEL)
    assert math.isnan(scores["cremi_score"]) and scores["masked_fraction"] == 1


# ---------------------------------------------------------------- against a slow re-implementation


def slow_border(section: np.ndarray, max_dist: float) -> np.ndarray:
    """cremi_python's create_border_mask_2d, pixel by pixel: border = a 4-neighbour inside the
    image differs; masked = Euclidean distance (pixels) to the nearest border pixel <= max_dist."""
    h, w = section.shape
    border = [(y, x) for y in range(h) for x in range(w)
              if any(0 <= y + dy < h and 0 <= x + dx < w and section[y + dy, x + dx] != section[y, x]
                     for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))]
    assert border, "a section without border: scipy's quirk, not reproduced"
    return np.array([[min(math.hypot(y - by, x - bx) for by, bx in border) <= max_dist for x in range(w)]
                     for y in range(h)])


def slow_cremi(pred: np.ndarray, gt_file: np.ndarray, pixel_nm: float, threshold_nm: float) -> tuple:
    """cremi_python's NeuronIds on a ground truth as stored in a CREMI file (uint64(-1) = no label):
    border -> uint64(-1), every label + 1 (wrapping uint64(-1) to 0), then VOI and adapted Rand
    with gt 0 ignored, from dense tables. Returns (voi_split, voi_merge, adapted_rand_error)."""
    gt = gt_file.copy()
    for z in range(gt.shape[0]):
        gt[z][slow_border(gt_file[z], threshold_nm / pixel_nm)] = NO_LABEL
    with np.errstate(over="ignore"):
        gt = gt + np.uint64(1)
    _, g = np.unique(gt, return_inverse=True)  # dense ids, 0 stays 0 (it is the smallest)
    _, p = np.unique(pred, return_inverse=True)
    p = p + (0 if (pred == 0).any() else 1)  # keep "pred 0" as column 0 only when pred has 0
    table = np.zeros((g.max() + 1, p.max() + 1))
    np.add.at(table, (g.ravel(), p.ravel()), 1)
    n = pred.size
    fg = table[1:]  # rows: gt labels other than 0
    joint = fg / fg.sum()
    pg, pp = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    split = -(joint[nz] * np.log2((joint / np.where(pg > 0, pg, 1))[nz])).sum()  # H(pred | gt)
    merge = -(joint[nz] * np.log2((joint / np.where(pp > 0, pp, 1))[nz])).sum()  # H(gt | pred)
    c, b = fg[:, 0].sum(), fg[:, 1:]  # column 0: prediction 0 (empty when pred has none)
    sum_a = (fg.sum(1) ** 2).sum()
    sum_b = (b.sum(0) ** 2).sum() + c / n
    sum_ab = (b ** 2).sum() + c / n
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    return split, merge, 1 - 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_scores_match_a_slow_reimplementation_of_cremi_python(seed):
    """Random 3D neurons (Voronoi cells that change between sections), a no-label region, and a
    prediction with merges, splits, noise and 0 voxels; 25 nm and 10 nm thresholds at 4 nm."""
    rng = np.random.default_rng(seed)
    shape = (3, 18, 22)
    zz, yy, xx = np.indices(shape)
    centres = rng.uniform((0, 0, 0), shape, size=(7, 3))
    gt = np.argmin([(zz - cz) ** 2 * 4 + (yy - cy) ** 2 + (xx - cx) ** 2 for cz, cy, cx in centres], 0)
    gt = (gt + 1).astype(np.uint64) * np.uint64(1000)  # large, sparse ids
    gt[:, :3, :4] = 0  # jaxem's "no label"
    pred = gt // np.uint64(1000)
    pred[pred == 2] = 3  # a merge
    pred[:, :, 15:][pred[:, :, 15:] == 4] = 9  # a split
    pred[rng.uniform(size=shape) < 0.05] = 0
    noisy = rng.uniform(size=shape) < 0.05
    pred[noisy] = rng.integers(1, 12, noisy.sum())
    gt_file = np.where(gt == 0, NO_LABEL, gt)  # as CREMI stores "no label"
    for threshold in (25.0, 10.0):
        ours = cremi_scores(pred, gt, VOXEL, threshold)
        split, merge, rand = slow_cremi(pred, gt_file, VOXEL[1], threshold)
        assert ours["voi_split"] == pytest.approx(split, abs=1e-10)
        assert ours["voi_merge"] == pytest.approx(merge, abs=1e-10)
        assert ours["adapted_rand_error"] == pytest.approx(rand, abs=1e-12)
        assert ours["cremi_score"] == pytest.approx(math.sqrt(rand * (split + merge)), abs=1e-10)
        assert cremi_scores(pred, gt_file, VOXEL, threshold) == ours  # uint64(-1) in gt: the same


# ---------------------------------------------------------------- data


def write_cremi_file(path, labels, offset=None):
    """A CREMI-layout HDF5 file: volumes/raw (uint8) and volumes/labels/neuron_ids (uint64), both
    with `resolution` (40, 4, 4) nm; `offset` (nm) on the labels as the padded files have it."""
    with h5py.File(path, "w") as f:
        raw = f.create_dataset("volumes/raw", data=(labels % np.uint64(251)).astype(np.uint8))
        ids = f.create_dataset("volumes/labels/neuron_ids", data=labels)
        for ds in (raw, ids):
            ds.attrs["resolution"] = (40.0, 4.0, 4.0)
        if offset is not None:
            ids.attrs["offset"] = offset


def test_cremi_preparation_maps_no_label_ids_to_zero_and_splits_by_z(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    rng = np.random.default_rng(0)
    originals = {}
    for sample in "ABC":
        labels = rng.integers(1, 50, size=(125, 6, 5)).astype(np.uint64) * np.uint64(10**12)
        labels[:, 0, :2] = NO_LABEL
        labels[:, 1, 0] = NO_LABEL - np.uint64(3)
        originals[sample] = labels
        write_cremi_file(mirror / f"sample_{sample}_20160501.hdf", labels)
    datasets.download("cremi", root=tmp_path / "data", url_base=mirror.as_uri(), progress=False)
    for split, (z0, z1) in (("train", (0, 100)), ("val", (100, 125))):
        pairs = datasets.load_dataset("cremi", split, root=tmp_path / "data")
        assert len(pairs) == 3
        for sample, (image, labels) in zip("ABC", pairs):
            expected = originals[sample][z0:z1].copy()
            expected[expected > np.uint64(2**64 - 10)] = 0
            assert labels.dtype == np.uint64 and labels.voxel_size == VOXEL
            np.testing.assert_array_equal(labels.read(), expected)
            assert image.shape == (z1 - z0, 6, 5)
    assert datasets.split_paths("cremi", "val", root=tmp_path / "data")[0][1].endswith("val/B/image.zarr")


def test_a_padded_cremi_file_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for sample in "ABC":
        write_cremi_file(mirror / f"sample_{sample}_20160501.hdf", np.ones((125, 4, 4), np.uint64),
                         offset=(1480.0, 1480.0, 1480.0) if sample == "B" else None)
    with pytest.raises(UserError, match="sample_B_20160501.hdf is a padded CREMI file"):
        datasets.download("cremi", root=tmp_path / "data", url_base=mirror.as_uri(), progress=False)


# ---------------------------------------------------------------- config and scoring


def test_config_arguments_dataset_and_in_plane_levels():
    from jaxem import models
    from jaxem.data.targets import num_target_channels

    for arg in ("", "cpu", "tiny", "cpu,synthetic", "tiny,synthetic"):
        config = load_config(f"cremi_affinities:{arg}")
        snemi = load_config(f"snemi3d_affinities:{arg}")
        models.check_input_shape(config.model, config.data.crop_shape)
        assert config.model.out_channels == num_target_channels(config.target, 3)
        assert config.data.dataset == ("synthetic" if "synthetic" in arg else "cremi")
        assert config.target.offsets == snemi.target.offsets and config.model.widths == snemi.model.widths
        if "tiny" not in arg:  # 40x4x4 nm: three in-plane levels (SNEMI3D's 30x6x6: two)
            assert [tuple(p) for p in config.model.pool_factors[:3]] == [(1, 2, 2)] * 3
    with pytest.raises(UserError, match="does not know argument"):
        load_config("cremi_affinities:gpu")


def test_score_volume_adds_cremi_keys_only_for_the_cremi_protocol():
    from jaxem.protocols.neurons import CREMI_KEYS, SCORE_KEYS, score_volume

    gt = halves((2, 4, 20))
    boundary = np.zeros(gt.shape, np.float32)
    assert set(score_volume(gt, boundary, gt)) == set(SCORE_KEYS)
    scores = score_volume(np.ones_like(gt), boundary, gt, VOXEL, protocol="cremi")
    assert set(CREMI_KEYS) <= set(scores) and scores["cremi_score"] == pytest.approx(math.sqrt(1 / 3))
    assert scores["adapted_rand_error"] != scores["cremi_adapted_rand_error"]  # skimage's vs cremi_python's
    with pytest.raises(UserError, match="protocol 'isbi' is not one of snemi3d, cremi"):
        score_volume(gt, boundary, gt, VOXEL, protocol="isbi")


def test_benchmark_averages_the_parts_of_the_val_split(tmp_path, monkeypatch):
    """CREMI's val split has samples A, B, C: each is scored into heldout/<sample>, the rows averaged."""
    from benchmarks import snemi3d
    from jaxem.protocols import neurons

    paths = ([f"/d/val/{s}/image.zarr" for s in "ABC"], [f"/d/val/{s}/labels.zarr" for s in "ABC"])
    monkeypatch.setattr(datasets, "split_paths", lambda name, split: paths)
    calls = []

    def fake_score(run, image, labels, out_dir, **kwargs):
        calls.append((out_dir.name, kwargs["protocol"]))
        value = {"A": 0.1, "B": 0.2, "C": 0.6}[out_dir.name]
        return {row: {"cremi_score": value} for row in neurons.ROWS} | {"settings": {}}

    monkeypatch.setattr(neurons, "score_affinity_run", fake_score)
    scores = snemi3d.score_split(tmp_path, "cremi", False, 100, 16.0, "cremi")
    assert calls == [("A", "cremi"), ("B", "cremi"), ("C", "cremi")]
    assert scores["mws"]["cremi_score"] == pytest.approx(0.3)
    assert scores["parts"]["C"]["watershed"]["cremi_score"] == 0.6


# benchmarks/cremi.py end to end: tests/test_recipe_snemi3d.py::test_snemi3d_benchmark_trains_and_scores_in_3d
# (its tiny config is SNEMI3D's, so it scores the same trained run by CREMI's protocol).
