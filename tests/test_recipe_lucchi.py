"""The Lucchi mitochondria recipe: the synthetic_mito dataset, configs/lucchi_mito.py, the scoring of
jaxem.protocols.lucchi and benchmarks/lucchi.py end to end at the `tiny` size."""

import json

import numpy as np
import pytest

from jaxem import models
from jaxem.config import load_config
from jaxem.data import datasets, synthetic
from jaxem.data.volume import open_volume
from jaxem.errors import UserError
from jaxem.protocols import lucchi as sh
from jaxem.protocols.common import otsu_dark, prediction_channel

SMALL = {"train": (24, 96, 96), "val": (16, 64, 64), "test": (24, 96, 96)}


@pytest.fixture
def small_mito(monkeypatch):
    """synthetic_mito generated at small shapes (the registry's take ~30 s)."""
    monkeypatch.setattr(datasets, "SYNTHETIC_MITO_SHAPES", dict(SMALL))


# ---------------------------------------------------------------- dataset


def test_synthetic_mito_labels_are_the_generators_mitochondria(small_mito, tmp_path):
    image_paths, label_paths = datasets.split_paths("synthetic_mito", "test", root=tmp_path)
    image, labels = open_volume(image_paths[0]), open_volume(label_paths[0])
    assert datasets.is_prepared("synthetic_mito", tmp_path)
    assert image.voxel_size == labels.voxel_size == (5.0, 5.0, 5.0)
    em = synthetic.generate(SMALL["test"], voxel_size=(5.0, 5.0, 5.0), seed=2)  # test = third seed
    label_array = labels.read()
    assert label_array.dtype == np.uint8 and set(np.unique(label_array)) <= {0, 1}
    np.testing.assert_array_equal(label_array, em.semantic == synthetic.MITOCHONDRION)
    np.testing.assert_array_equal(image.read(), em.raw)
    assert label_array.any(), "no mitochondrion in the small test volume"
    train_image = open_volume(datasets.split_paths("synthetic_mito", "train", root=tmp_path)[0][0]).read()
    assert not np.array_equal(train_image, image.read())  # splits come from different seeds


def test_synthetic_mito_is_deterministic(small_mito, tmp_path):
    first = [open_volume(p).read() for p in datasets.split_paths("synthetic_mito", "val", root=tmp_path / "a")[1]]
    second = [open_volume(p).read() for p in datasets.split_paths("synthetic_mito", "val", root=tmp_path / "b")[1]]
    np.testing.assert_array_equal(first[0], second[0])
    assert first[0].shape == SMALL["val"]


@pytest.mark.slow
def test_synthetic_mito_test_split_has_enough_mitochondria(tmp_path):
    """At the registry's shapes the scored volume holds enough objects for AP/PQ to mean something."""
    (_, labels), = datasets.load_dataset("synthetic_mito", "test", root=tmp_path)
    mask = labels.read()
    assert sh.components(mask).max() >= 10
    assert 0.01 < mask.mean() < 0.15  # Lucchi: a few per cent of the voxels are mitochondria


def test_benchmark_prepares_lucchi_from_a_local_copy(tmp_path, monkeypatch):
    """--local-copy DIR: the four EPFL TIFFs are fetched over file://, the 255-labels become 0/1 and
    the training volume splits into slices 0-132 (train) and 133-164 (val)."""
    import tifffile

    from benchmarks import lucchi

    monkeypatch.setenv("JAXEM_DATA", str(tmp_path / "data"))
    copy = tmp_path / "copy"
    copy.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (165, 8, 8), dtype=np.uint8)
    train_gt = np.where(rng.random((165, 8, 8)) < 0.1, 255, 0).astype(np.uint8)
    for name, array in (("training.tif", train), ("training_groundtruth.tif", train_gt),
                        ("testing.tif", train[:5]), ("testing_groundtruth.tif", train_gt[:5])):
        tifffile.imwrite(copy / name, array, photometric="minisblack")
    with pytest.raises(UserError, match="--local-copy .* is not a folder"):
        lucchi.prepare_dataset("lucchi", str(tmp_path / "nowhere"), progress=False)
    lucchi.prepare_dataset("lucchi", str(copy), progress=False)
    (train_image, train_labels), = datasets.load_dataset("lucchi", "train")
    (val_image, val_labels), = datasets.load_dataset("lucchi", "val")
    np.testing.assert_array_equal(train_image.read(), train[:133])
    np.testing.assert_array_equal(val_image.read(), train[133:])
    np.testing.assert_array_equal(val_labels.read(), train_gt[133:] // 255)
    assert train_labels.read().dtype == np.uint8 and val_image.voxel_size == (5.0, 5.0, 5.0)
    assert load_config("lucchi_mito").data.crop_shape[0] <= val_image.shape[0]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("arg", ["", "cpu", "tiny", "synthetic", "cpu,synthetic", "synthetic,tiny"])
def test_config_arguments(arg):
    config = load_config(f"lucchi_mito:{arg}" if arg else "lucchi_mito")
    options = set(arg.split(",")) - {""}
    assert config.data.dataset == ("synthetic_mito" if "synthetic" in options else "lucchi")
    assert config.model.ndim == 3 and config.target.kind == "foreground" and config.model.out_channels == 1
    assert dict(config.loss.terms) == {"bce": 1.0, "dice": 1.0}
    assert config.augment.isotropic and tuple(config.model.kernel_sizes) == () and tuple(config.model.pool_factors) == ()
    models.check_input_shape(config.model, tuple(config.data.crop_shape))  # the crop passes the U-Net
    val_depth = 32 if config.data.dataset == "lucchi" else datasets.SYNTHETIC_MITO_SHAPES["val"][0]
    assert config.data.crop_shape[0] <= val_depth  # validation crops fit the val split
    assert config.predict.block_shape[0] > 2 * config.predict.halo[0]


def test_config_sizes_shrink_with_cpu_and_tiny():
    full, cpu, tiny = (load_config(f"lucchi_mito:{a}") for a in ("synthetic", "cpu,synthetic", "tiny,synthetic"))
    assert full.train.steps > cpu.train.steps > tiny.train.steps
    assert np.prod(full.data.crop_shape) > np.prod(cpu.data.crop_shape) > np.prod(tiny.data.crop_shape)
    assert load_config("lucchi_mito:synthetic,cpu").to_dict() == cpu.to_dict()


@pytest.mark.parametrize("arg", ["gpu", "cpu,big"])
def test_config_refuses_unknown_arguments(arg):
    bad = arg.split(",")[-1]
    with pytest.raises(UserError, match=f"does not know argument.*{bad}.*cpu, synthetic, tiny"):
        load_config(f"lucchi_mito:{arg}")


# ---------------------------------------------------------------- scoring


def test_foreground_scores_by_hand():
    gt = np.zeros((1, 1, 10), bool)
    gt[..., :4] = True
    pred = np.zeros((1, 1, 10), bool)
    pred[..., 1:6] = True  # TP = 3 (1-3), FP = 2 (4, 5), FN = 1 (0), TN = 4
    s = sh.foreground_scores(pred, gt)
    assert s["jaccard"] == pytest.approx(3 / 6) and s["dice"] == pytest.approx(6 / 9)
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == pytest.approx(3 / 4)
    assert s["accuracy"] == pytest.approx(7 / 10)


def two_cubes():
    """gt: cubes A (4^3) and B (4x4x5); pred: A exactly, 3 of B's 5 x-planes, and a false blob."""
    gt = np.zeros((6, 12, 24), bool)
    gt[1:5, 1:5, 1:5] = True    # A, 64 voxels
    gt[1:5, 6:10, 8:13] = True  # B, 80 voxels
    pred = np.zeros_like(gt)
    pred[1:5, 1:5, 1:5] = True    # IoU 1
    pred[1:5, 6:10, 8:11] = True  # 48 of B's 80: IoU 0.6
    pred[2:4, 2:4, 18:20] = True  # nothing there
    return pred, gt


def test_object_scores_by_hand():
    pred, gt = two_cubes()
    s = sh.object_scores(pred, gt)
    assert (s["n_pred"], s["n_gt"]) == (3, 2)
    assert s["ap50"] == pytest.approx(2 / 3)  # A and B match: TP 2, FP 1, FN 0
    assert s["ap75"] == pytest.approx(1 / 4)  # only A: TP 1, FP 2, FN 1
    assert s["sq"] == pytest.approx(0.8) and s["rq"] == pytest.approx(2 / 2.5) and s["pq"] == pytest.approx(0.64)
    assert s["aji"] == pytest.approx((64 + 48) / (64 + 80 + 8))  # the blob's 8 voxels join the union
    both = sh.score_masks(pred, gt)
    assert set(both) == set(sh.SCORE_KEYS) and both["jaccard"] == pytest.approx((64 + 48) / (64 + 80 + 8))


def test_components_connectivity():
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corners touch: one object with 26-, two with 6-connectivity
    assert sh.components(mask).max() == 1 and sh.components(mask, 6).max() == 2
    with pytest.raises(UserError, match="connectivity"):
        sh.components(mask, 8)


def test_remove_small_drops_only_objects_below_the_size():
    mask = np.zeros((4, 10, 10), bool)
    mask[0, 0, 0] = True                 # 1 voxel
    mask[1:3, 4:7, 4:7] = True           # 18 voxels
    mask[3, 0, 5:9] = True               # 4 voxels
    kept = sh.remove_small(mask, 5)
    assert kept.sum() == 18 and kept[1:3, 4:7, 4:7].all()
    assert sh.remove_small(mask, 4).sum() == 22
    assert (sh.remove_small(mask, 0) == mask).all()


def test_otsu_dark_marks_the_dark_mode():
    raw = np.full((2, 8, 8), 200, np.uint8)
    raw[:, :3] = 50
    prob = otsu_dark(raw)
    assert prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1
    np.testing.assert_array_equal(prob > 0.5, raw == 50)


def test_bad_masks_are_refused():
    with pytest.raises(UserError, match="prediction must be a boolean or 0/1"):
        sh.foreground_scores(np.full((2, 2), 0.7), np.zeros((2, 2), bool))
    with pytest.raises(UserError, match="ground truth shape"):
        sh.score_masks(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_busiest_slice():
    gt = np.zeros((5, 4, 4), bool)
    gt[3, :2] = True
    gt[1, 0, 0] = True
    assert sh.busiest_slice(gt) == 3 and sh.busiest_slice(np.zeros((5, 2, 2), bool)) == 2


# ---------------------------------------------------------------- benchmark


def test_benchmark_end_to_end_tiny(small_mito, tmp_path, monkeypatch):
    """benchmarks/lucchi.py trains the tiny recipe, predicts the test split and reports scores that
    follow from the files it wrote."""
    from benchmarks import lucchi

    monkeypatch.setenv("JAXEM_DATA", str(tmp_path / "data"))
    run = tmp_path / "run"
    report = lucchi.main(["--run", str(run), "--config", "lucchi_mito:tiny", "--dataset", "synthetic_mito",
                          "--no-progress"])
    assert report["dataset"] == "synthetic_mito" and report["training"]["final_step"] == 4
    assert report["machine"]["devices"]
    heldout = run / "heldout"
    assert (heldout / "overlay.png").stat().st_size > 0
    assert json.loads((heldout / "results.json").read_text()) == report["scores"]
    prob = prediction_channel(heldout / "predictions.zarr")
    gt = open_volume(datasets.split_paths("synthetic_mito", "test")[1][0]).read() > 0
    assert prob.shape == gt.shape == SMALL["test"]
    pred = prob > 0.5
    tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
    model = report["scores"]["model"]
    assert model["jaccard"] == pytest.approx(tp / (tp + fp + fn))
    assert model["n_gt"] == report["scores"]["threshold_baseline"]["n_gt"] == sh.components(gt).max()
    for who in ("model", "threshold_baseline"):
        assert set(report["scores"][who]) == set(sh.SCORE_KEYS)
