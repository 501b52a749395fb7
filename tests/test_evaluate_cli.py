"""`jaxem evaluate` end to end on zarr and TIFF volumes, blockwise agreement, and bad input."""

import csv
import json

import numpy as np
import pytest
import tifffile

from jaxem.cli import main
from jaxem.data.volume import create_volume, write_attributes
from jaxem.metrics.clustering import clustering_scores
from jaxem.metrics.detection import detection_scores


def _zarr(path, array, voxel_size=(40.0, 8.0, 8.0)):
    vol = create_volume(path, array.shape, array.dtype, voxel_size, chunks=(4, 32, 32))
    vol.write(array)
    return str(path)


def _instances():
    z, y, x = np.indices((12, 48, 48))
    gt = ((z // 6) * 36 + (y // 8) * 6 + x // 8 + 1).astype(np.uint32)
    gt[:, ::8, :] = 0
    pred = gt.astype(np.uint64) * 3
    pred[pred == 6] = 9  # merge two objects
    pred[:5, 20:30, 20:30] = 500  # a spurious object
    return pred, gt


def test_instance_report_blockwise_equals_in_memory(tmp_path, capsys):
    pred, gt = _instances()
    p, g = _zarr(tmp_path / "p.zarr", pred), _zarr(tmp_path / "g.zarr", gt)
    out = tmp_path / "out"
    rc = main(["evaluate", "--pred", p, "--gt", g, "--task", "instance", "--out", str(out), "--block-voxels", "5000"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    expected = {**clustering_scores(pred, gt), **detection_scores(pred, gt)}
    for key in ("rand_index", "adapted_rand_error", "vrand", "vinfo", "voi_split", "voi_merge", "ap50", "ap75", "map", "aji", "pq"):
        assert report[key] == pytest.approx(expected[key]), key
    assert report["dice"] == pytest.approx(2 * np.sum((pred > 0) & (gt > 0)) / (np.sum(pred > 0) + np.sum(gt > 0)))
    assert (out / "report.md").read_text().startswith("# Evaluation: instance")
    rows = (out / "morphology_gt.csv").read_text().splitlines()
    assert len(rows) == 1 + len(np.unique(gt[gt > 0]))
    assert rows[0].startswith("label,volume_nm3")
    assert (out / "morphology_pred.png").exists()


def test_semantic_with_mask_and_float_prediction(tmp_path):
    rng = np.random.default_rng(0)
    gt = (rng.random((6, 20, 20)) > 0.5).astype(np.uint8)
    prob = np.clip(gt + rng.normal(0, 0.4, gt.shape), 0, 1).astype(np.float32)
    mask = (rng.random(gt.shape) > 0.3).astype(np.uint8)
    paths = [_zarr(tmp_path / n, a) for n, a in (("p.zarr", prob), ("g.zarr", gt), ("m.zarr", mask))]
    out = tmp_path / "out"
    assert main(["evaluate", "--pred", paths[0], "--gt", paths[1], "--mask", paths[2], "--task", "semantic", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    m = mask.astype(bool)
    assert report["accuracy"] == pytest.approx(np.mean((prob > 0.5)[m] == gt.astype(bool)[m]))


def test_semantic_objects_get_morphology_across_blocks(tmp_path):
    """Three mitochondria-like objects, one spanning every evaluation slab: one CSV row each."""
    gt = np.zeros((12, 32, 32), np.uint8)
    gt[0:12, 4:8, 4:8] = 1     # spans all slabs
    gt[2:5, 20:26, 20:30] = 1
    gt[8:10, 24:28, 2:6] = 1
    prob = np.where(gt > 0, 0.9, 0.1).astype(np.float32)
    prob[0:12, 6, 4:8] = 0.2  # the prediction splits the long object lengthwise
    paths = [_zarr(tmp_path / n, a) for n, a in (("p.zarr", prob), ("g.zarr", gt))]
    out = tmp_path / "out"
    assert main(["evaluate", "--pred", paths[0], "--gt", paths[1], "--task", "semantic", "--out", str(out),
                 "--block-voxels", str(2 * 32 * 32)]) == 0
    rows = list(csv.DictReader((out / "morphology_gt.csv").read_text().splitlines()))
    assert len(rows) == 3 and {r["class"] for r in rows} == {"1"}
    volumes = sorted(float(r["volume_nm3"]) for r in rows)
    assert volumes == pytest.approx(sorted(v * 40 * 8 * 8 for v in (12 * 16, 3 * 6 * 10, 2 * 4 * 4)))
    assert len((out / "morphology_pred.csv").read_text().splitlines()) == 1 + 4


def test_semantic_morphology_per_class(tmp_path):
    """Touching objects of different classes are separate objects with their class; an object
    of one class crossing a slab face stays one."""
    gt = np.zeros((8, 16, 16), np.uint8)
    gt[:, 2:6, 2:6] = 1
    gt[:, 2:6, 6:10] = 2   # touches the class-1 object
    gt[1:3, 10:14, 10:14] = 3
    paths = [_zarr(tmp_path / n, a) for n, a in (("p.zarr", gt), ("g.zarr", gt))]
    out = tmp_path / "out"
    assert main(["evaluate", "--pred", paths[0], "--gt", paths[1], "--task", "semantic", "--out", str(out),
                 "--block-voxels", str(2 * 16 * 16)]) == 0
    rows = list(csv.DictReader((out / "morphology_gt.csv").read_text().splitlines()))
    by_class = {r["class"]: float(r["volume_nm3"]) for r in rows}
    assert len(rows) == 3 and by_class == pytest.approx({"1": 8 * 16 * 40 * 64, "2": 8 * 16 * 40 * 64, "3": 2 * 16 * 40 * 64})
    report_md = (out / "report.md").read_text()
    assert "Morphology of gt objects" in report_md
    for c, volume in ((1, 8 * 16 * 40 * 64), (3, 2 * 16 * 40 * 64)):  # one summary row per class
        assert f"| class {c} | 1 | {volume:.4g} |" in report_md


def _prediction_map(path, array, kind):
    """A (c, *spatial) map with the target description `jaxem predict` writes beside its output."""
    vol = create_volume(path, array.shape, array.dtype, (40.0, 8.0, 8.0), chunks=(1, 4, 32, 32), axes=("c", "z", "y", "x"))
    vol.write(array)
    write_attributes(path, {"jaxem_target": {"kind": kind, "channels": int(array.shape[0])}})
    return str(path)


def _report(pred, gt, tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["evaluate", "--pred", pred, "--gt", gt, "--task", "semantic", "--out", str(out), "--block-voxels", "800",
                 *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_predict_maps_score_as_their_squeezed_probabilities(tmp_path, capsys):
    """A `jaxem predict` map (c, z, y, x): one channel of uint8 (rint(255 p)) scores as p > 0.5,
    not as value != 0; a multiclass map as its argmax class; two channels need --channel."""
    rng = np.random.default_rng(1)
    gt = np.zeros((6, 20, 20), np.uint8)
    gt[:, 4:12, 3:15] = 1
    gt[2:5, 14:18, 2:18] = 2
    p = np.clip((gt > 0) * 0.8 + rng.normal(0.1, 0.3, gt.shape), 0, 1).astype(np.float32)
    stored = np.rint(255 * p).astype(np.uint8)
    g = _zarr(tmp_path / "g.zarr", gt)
    as_probabilities = _report(_zarr(tmp_path / "p.zarr", stored.astype(np.float32) / 255), g, tmp_path, "float")
    uint8_map = _report(_prediction_map(tmp_path / "u.zarr", stored[None], "foreground"), g, tmp_path, "uint8")
    nonzero = _report(_zarr(tmp_path / "mask.zarr", (stored != 0).astype(np.uint8)), g, tmp_path, "nonzero")
    for key in ("dice", "iou", "precision", "recall", "accuracy"):
        assert uint8_map[key] == pytest.approx(as_probabilities[key]), key
    assert uint8_map["precision"] > nonzero["precision"] + 0.05  # what reading it as a class map would give

    logits = np.stack([-2 * (gt == c) + rng.normal(0, 0.8, gt.shape) for c in range(3)])
    softmax = (np.exp(-logits) / np.exp(-logits).sum(0)).astype(np.float32)
    multiclass = _report(_prediction_map(tmp_path / "mc.zarr", softmax, "multiclass"), g, tmp_path, "mc")
    argmax = _report(_zarr(tmp_path / "argmax.zarr", np.argmax(softmax, 0).astype(np.uint8)), g, tmp_path, "argmax")
    assert 0.3 < multiclass["macro_dice"] < 1
    for key in ("dice", "macro_dice", "micro_iou", "accuracy"):
        assert multiclass[key] == pytest.approx(argmax[key]), key
    assert _report(str(tmp_path / "mc.zarr"), g, tmp_path, "class1", "--channel", "1")["dice"] < multiclass["dice"]

    two = _prediction_map(tmp_path / "two.zarr", np.stack([stored, 255 - stored]), "boundary")
    out = tmp_path / "refused"
    assert main(["evaluate", "--pred", two, "--gt", g, "--task", "semantic", "--out", str(out)]) == 2
    assert "has 2 channels" in capsys.readouterr().err and not out.exists()
    assert _report(two, g, tmp_path, "second", "--channel", "1")["recall"] < uint8_map["recall"]
    for pred, channel in ((two, "2"), (g, "0")):
        assert main(["evaluate", "--pred", pred, "--gt", g, "--task", "semantic", "--out", str(out), "--channel", channel]) == 2
        assert "--channel" in capsys.readouterr().err and not out.exists()


def test_boundary_on_isbi_tiff(tmp_path, shared_data):
    labels = tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[:2, :128, :128]
    pred = labels.copy()
    pred[:, 60, :] = 0  # an extra membrane splits cells
    tifffile.imwrite(tmp_path / "gt.tif", labels)
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    out = tmp_path / "out"
    rc = main(["evaluate", "--pred", str(tmp_path / "pred.tif"), "--gt", str(tmp_path / "gt.tif"),
               "--task", "boundary", "--boundary-is-zero", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["warping_error"] < 128 / (2 * 128 * 128)  # at most the new line's pixels
    assert report["vrand_split"] < 1 and report["vrand_merge"] == pytest.approx(1)
    same = tmp_path / "same"
    main(["evaluate", "--pred", str(tmp_path / "gt.tif"), "--gt", str(tmp_path / "gt.tif"),
          "--task", "boundary", "--boundary-is-zero", "--out", str(same)])
    perfect = json.loads((same / "report.json").read_text())
    assert perfect["warping_error"] == 0 and perfect["vrand"] == 1 and perfect["vinfo"] == 1
    mask = np.ones(labels.shape, np.uint8)
    mask[:, 56:64, :] = 0  # hides the extra membrane
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    masked = tmp_path / "masked"
    main(["evaluate", "--pred", str(tmp_path / "pred.tif"), "--gt", str(tmp_path / "gt.tif"), "--mask", str(tmp_path / "mask.tif"),
          "--task", "boundary", "--boundary-is-zero", "--out", str(masked)])
    assert json.loads((masked / "report.json").read_text())["warping_error"] == 0
    mask[:, 56:64, :] = 1
    mask[:, :, :4] = 0  # the membrane still shows: same mismatches over fewer voxels
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    main(["evaluate", "--pred", str(tmp_path / "pred.tif"), "--gt", str(tmp_path / "gt.tif"), "--mask", str(tmp_path / "mask.tif"),
          "--task", "boundary", "--boundary-is-zero", "--out", str(tmp_path / "masked2")])
    assert json.loads((tmp_path / "masked2" / "report.json").read_text())["warping_error"] > report["warping_error"]


@pytest.mark.parametrize("case, message", [
    ("shape", "has shape"), ("float", "expected integer"), ("negative", "negative"),
    ("empty", "empty"), ("missing", "does not exist"),
])
def test_bad_input_exits_2(tmp_path, capsys, case, message):
    pred, gt = _instances()
    if case == "shape":
        pred = pred[:, :40]
    if case == "float":
        pred = pred.astype(np.float32)
    if case == "negative":
        pred = pred.astype(np.int32) - 5
    if case == "empty":
        gt = np.zeros_like(gt)
    p, g = _zarr(tmp_path / "p.zarr", pred), _zarr(tmp_path / "g.zarr", gt)
    if case == "missing":
        g = str(tmp_path / "nope.zarr")
    rc = main(["evaluate", "--pred", p, "--gt", g, "--task", "instance", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1]
