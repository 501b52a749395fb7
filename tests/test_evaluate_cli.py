"""`jaxem evaluate` end to end on zarr and TIFF volumes, blockwise agreement, and bad input."""

import csv
import json

import numpy as np
import pytest
import tifffile

from jaxem.cli import main
from jaxem.data.volume import create_volume
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
