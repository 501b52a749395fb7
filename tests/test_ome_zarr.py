"""Viewer-ready OME-Zarr: translations kept through predict --roi / segment / pyramid / import, and
`jaxem segment --labels-of IMAGE` writing a multiscale label image inside the image (issue #23).

Convention checked here (jaxem.data.volume.ome_metadata): a translation is where a level's first
voxel centre lies, in nm; level k, made with windows of f_k level-0 voxels starting at voxel 0,
has scale voxel_size * f_k and translation t0 + (f_k - 1) / 2 * voxel_size.
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import train_tiny_demo

from jaxem.cli import main
from jaxem.data.formats import check_labels_of, pyramid, write_labels_of
from jaxem.data.volume import (
    create_volume, ome_multiscales, ome_translation, open_volume, read_attributes, set_ome_translation,
)
from jaxem.errors import UserError

VOXEL = (40.0, 4.0, 4.0)


def transforms(path, level: int) -> tuple[list, list]:
    """(scale, translation) of one level of an OME-Zarr group, translation zeros when absent."""
    found = {t["type"]: t for t in ome_multiscales(path)["datasets"][level]["coordinateTransformations"]}
    scale = found["scale"]["scale"]
    return scale, found.get("translation", {"translation": [0.0] * len(scale)})["translation"]


def assert_levels(path, voxel, translation, factors):
    """Every level k of `path` has scale voxel * f_k and translation t0 + (f_k - 1) / 2 * voxel."""
    assert len(ome_multiscales(path)["datasets"]) == len(factors)
    for level, f in enumerate(factors):
        scale, shift = transforms(path, level)
        np.testing.assert_allclose(scale[-3:], np.multiply(voxel, f))
        np.testing.assert_allclose(shift[-3:], np.add(translation, (np.asarray(f) - 1) / 2 * np.asarray(voxel)))


def tree_digest(path: Path, skip: str = "labels") -> str:
    """sha256 over every file under `path` except the `skip` folder: the image's own arrays and metadata."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] != skip):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def fake_prediction(path, shape, offset):
    """A (1, *shape) boundary map on the 40x4x4 nm grid, as `jaxem predict --roi` writes it at `offset` voxels."""
    rng = np.random.default_rng(0)
    prob = (rng.random((1, *shape)) < 0.2).astype(np.float32)
    create_volume(path, prob.shape, np.float32, VOXEL, axes=("c", "z", "y", "x"), format="ome-zarr").write(prob)
    set_ome_translation(path, np.multiply(offset, VOXEL))
    return prob


def ome_image(path, shape, levels_min_size=None):
    """A uint8 OME-Zarr image (the raw EM), optionally with its mean pyramid."""
    raw = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    create_volume(path, shape, np.uint8, VOXEL, format="ome-zarr").write(raw)
    if levels_min_size:
        pyramid(path, min_size=levels_min_size)
    return raw


def test_pyramid_keeps_translation_at_every_level(tmp_path):
    """Scale and translation of every pyramid level, mean (image) and mode (labels) alike, and the
    translation survives `jaxem data import` of an OME-Zarr group."""
    offset = np.array([2, 8, 16])
    for labels in (False, True):
        path = tmp_path / f"vol{labels}"
        create_volume(path, (4, 64, 64), np.uint64 if labels else np.uint8, VOXEL, format="ome-zarr", labels=labels)
        set_ome_translation(path, offset * VOXEL)
        pyramid(path, min_size=8)
        assert_levels(path, VOXEL, offset * VOXEL, [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)])
    assert main(["data", "import", str(tmp_path / "volFalse"), str(tmp_path / "copy")]) == 0
    assert ome_translation(tmp_path / "copy") == tuple(offset * VOXEL)


def test_segment_and_labels_of_a_roi(tmp_path, capsys):
    """A prediction of an ROI segmented with --labels-of: the segment output keeps the ROI's
    translation; IMAGE/labels/segmentation has the image's shape and levels, the segmentation at
    the ROI (zeros elsewhere), mode-downsampled; the image's own files are unchanged; refusals."""
    image = tmp_path / "raw.zarr"
    ome_image(image, (4, 64, 64), levels_min_size=8)  # levels 64, 32, 16, 8 in-plane
    before = tree_digest(image)
    offset = (1, 8, 16)
    fake_prediction(tmp_path / "pred", (2, 48, 40), offset)
    seg = tmp_path / "seg"
    rc = main(["segment", "--input", str(tmp_path / "pred"), "--output", str(seg), "--method", "cc",
               "--labels-of", str(image), "--no-progress"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["labels_of"]["levels"] == 4
    assert ome_translation(seg) == tuple(np.multiply(offset, VOXEL))
    label = image / "labels" / "segmentation"
    assert read_attributes(image / "labels") == {"labels": ["segmentation"]}
    assert sorted(p.name for p in (image / "labels").iterdir()) == [".zattrs", ".zgroup", "segmentation"]
    assert read_attributes(label)["image-label"] == {"version": "0.4", "source": {"image": "../../"}}
    levels = [open_volume(label, level=k) for k in range(4)]
    assert [v.shape for v in levels] == [open_volume(image, level=k).shape for k in range(4)]
    assert [v.voxel_size for v in levels] == [open_volume(image, level=k).voxel_size for k in range(4)]
    for k in range(4):
        assert transforms(label, k) == transforms(image, k)
    full = levels[0].read()
    roi = tuple(slice(o, o + s) for o, s in zip(offset, (2, 48, 40)))
    np.testing.assert_array_equal(full[roi], open_volume(seg).read())
    full[roi] = 0
    assert not full.any()
    np.testing.assert_array_equal(levels[1].read(), mode_2x(levels[0].read()))
    assert tree_digest(image) == before
    assert main(["data", "info", str(seg)]) == 0
    assert json.loads(capsys.readouterr().out)["translation"] == list(np.multiply(offset, VOXEL))
    assert main(["data", "info", str(image)]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["segmentation"]

    # refusals: one sentence naming the path, exit 2, nothing written
    base = ["segment", "--input", str(tmp_path / "pred"), "--method", "cc", "--no-progress"]
    create_volume(tmp_path / "plain", (4, 64, 64), np.uint8, VOXEL)  # a zarr array, not an OME-Zarr image
    create_volume(tmp_path / "coarse", (4, 64, 64), np.uint8, (40.0, 8.0, 8.0), format="ome-zarr")
    create_volume(tmp_path / "small", (4, 32, 32), np.uint8, VOXEL, format="ome-zarr")
    for target, name, message in [(tmp_path / "plain", "segmentation", "is not an OME-Zarr"),
                                  (label, "segmentation", "is not an OME-Zarr"),  # a label image is no image
                                  (tmp_path / "coarse", "segmentation", "voxel grid"),
                                  (tmp_path / "small", "segmentation", "do not fit"),
                                  (image, "segmentation", "already exists"),
                                  (image, "../x", "plain name")]:
        rc = main(base + ["--output", str(tmp_path / "bad"), "--labels-of", str(target), "--labels-name", name])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and str(target) in err, (target, err)
        assert not (tmp_path / "bad").exists()
    # never over an input: --output inside IMAGE, a label image that is the prediction
    assert main(base + ["--output", str(image / "seg"), "--labels-of", str(image), "--labels-name", "fresh"]) == 2
    shutil.copytree(tmp_path / "pred", image / "labels" / "pred")
    assert main(base[:2] + [str(image / "labels" / "pred")] + base[3:] + ["--output", str(tmp_path / "bad"),
                "--labels-of", str(image), "--labels-name", "pred", "--overwrite"]) == 2
    assert capsys.readouterr().err.count("never writes over its inputs") == 2
    assert (image / "labels" / "pred" / "0" / ".zarray").is_file() and not (image / "seg").exists()
    shutil.rmtree(image / "labels" / "pred")
    assert tree_digest(image) == before
    # --overwrite replaces the label image (and only it); a second name is listed beside the first
    assert main(base + ["--output", str(seg), "--labels-of", str(image), "--overwrite"]) == 0
    write_labels_of(seg, image, "again")
    assert read_attributes(image / "labels") == {"labels": ["segmentation", "again"]}
    assert tree_digest(image) == before


def mode_2x(labels: np.ndarray) -> np.ndarray:
    """The most frequent value of each 1x2x2 window (first in window order on ties), by brute force."""
    z, y, x = labels.shape
    out = np.zeros((z, -(-y // 2), -(-x // 2)), labels.dtype)
    for i, j, k in np.ndindex(out.shape):
        window = list(labels[i, 2 * j:2 * j + 2, 2 * k:2 * k + 2].ravel())
        out[i, j, k] = max(window, key=window.count)
    return out


def test_labels_of_a_single_level_image_and_off_grid(tmp_path):
    """A single-level image: the label pyramid is what `jaxem data pyramid` would give the image;
    a translation that is not a whole number of voxels away is refused."""
    image = tmp_path / "raw.zarr"
    ome_image(image, (4, 128, 128))
    seg = tmp_path / "seg"
    create_volume(seg, (4, 128, 128), np.uint64, VOXEL, format="ome-zarr", labels=True).write(
        np.arange(4 * 128 * 128, dtype=np.uint64).reshape(4, 128, 128) // 1000)
    levels = write_labels_of(seg, image, "cells", min_size=32)
    assert [tuple(v["voxel_size"]) for v in levels] == [VOXEL, (40.0, 8.0, 8.0), (40.0, 16.0, 16.0)]
    assert_levels(image / "labels" / "cells", VOXEL, (0, 0, 0), [(1, 1, 1), (1, 2, 2), (1, 4, 4)])
    with pytest.raises(UserError, match="do not fit"):
        check_labels_of(str(image), "x", (4, 16, 16), VOXEL, (0.0, 2.0, 0.0), ("z", "y", "x"))


def test_written_metadata_validates_against_ome_zarr(tmp_path):
    """The OME-Zarr 0.4 models (ome-zarr-models, pydantic) accept the image, its `labels` group and
    the label image; ome-zarr's reader finds the image and its labels, without napari."""
    models = pytest.importorskip("ome_zarr_models.v04", exc_type=ImportError)
    zarr = pytest.importorskip("zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    image = tmp_path / "raw.zarr"
    ome_image(image, (4, 64, 64), levels_min_size=8)
    fake_prediction(tmp_path / "pred", (2, 48, 40), (1, 8, 16))
    assert main(["segment", "--input", str(tmp_path / "pred"), "--output", str(tmp_path / "seg"), "--method", "cc",
                 "--labels-of", str(image), "--no-progress"]) == 0
    assert main(["data", "pyramid", str(tmp_path / "seg"), "--min-size", "8"]) == 0
    models.Image.from_zarr(zarr.open_group(str(image), mode="r"))
    models.Image.from_zarr(zarr.open_group(str(tmp_path / "seg"), mode="r"))
    models.Labels.from_zarr(zarr.open_group(str(image / "labels"), mode="r"))
    models.ImageLabel.from_zarr(zarr.open_group(str(image / "labels" / "segmentation"), mode="r"))

    nodes = list(Reader(parse_url(str(image)))())
    label_nodes = [n for n in nodes if n.load(Label)]
    assert nodes[0].load(Multiscales) and len(nodes[0].data) == 4
    assert len(label_nodes) == 1 and len(label_nodes[0].data) == 4
    assert label_nodes[0].data[0].shape == (4, 64, 64)
    assert "napari" not in sys.modules


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A demo:tiny run (6 steps) and its synthetic test volume (2, 64, 64) at 40x4x4 nm."""
    return train_tiny_demo(tmp_path_factory.mktemp("run"))


@pytest.mark.slow
def test_predict_roi_segment_pyramid_labels_of_from_a_run(tiny_run, tmp_path, capsys):
    """The raw EM imported as an OME-Zarr image placed at `origin` nm, an ROI predicted by a real
    run, segmented with --labels-of the raw, the segmentation's pyramid built: every output sits at
    origin + ROI offset x voxel size, every level at the pixel-centre translation of its factor."""
    raw = tmp_path / "raw.zarr"
    assert main(["data", "import", str(tiny_run / "data" / "test_raw.zarr"), str(raw)]) == 0
    origin = np.array([400.0, 80.0, 160.0])  # the raw's own translation: 10, 20, 40 voxels
    set_ome_translation(raw, origin)
    assert main(["data", "pyramid", str(raw), "--min-size", "8"]) == 0  # in-plane 64, 32, 16, 8
    assert_levels(raw, VOXEL, origin, [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)])
    offset = np.array([1, 8, 16])
    pred, seg = tmp_path / "pred.zarr", tmp_path / "seg.zarr"
    assert main(["predict", "--run", str(tiny_run), "--input", str(raw), "--output", str(pred),
                 "--roi", "1:2,8:56,16:64", "--no-progress"]) == 0
    expected = tuple(origin + offset * VOXEL)
    assert ome_translation(pred) == expected
    assert main(["segment", "--input", str(pred), "--output", str(seg), "--method", "watershed", "--per-slice",
                 "--labels-of", str(raw), "--labels-name", "cells", "--no-progress"]) == 0
    assert ome_translation(seg) == expected
    assert main(["data", "pyramid", str(seg), "--min-size", "8"]) == 0  # 48 in-plane: 24, 12
    assert_levels(seg, VOXEL, expected, [(1, 1, 1), (1, 2, 2), (1, 4, 4)])
    label = raw / "labels" / "cells"
    assert_levels(label, VOXEL, origin, [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)])
    np.testing.assert_array_equal(open_volume(label).read()[1:2, 8:56, 16:64], open_volume(seg).read())
    assert open_volume(seg).read().max() > 1
