"""Dataset registry, download (file:// URLs), preparation, loading, and the `jaxem data` CLI."""

import json
import shutil
import zipfile

import numpy as np
import pytest
import tifffile

from jaxem.cli import main
from jaxem.data import datasets
from jaxem.data.volume import open_volume
from jaxem.errors import UserError


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UserError, match="did you mean isbi2012"):
        datasets.get("isbi2013")
    assert main(["data", "download", "snemi"]) == 2


def test_synthetic_is_generated_on_first_use(tmp_path):
    assert not datasets.is_prepared("synthetic", tmp_path)
    pairs = datasets.load_dataset("synthetic", "val", root=tmp_path)
    image, labels = pairs[0]
    assert image.shape == labels.shape == (16, 256, 256) and image.voxel_size == (40.0, 4.0, 4.0)
    assert labels.dtype == np.uint64 and labels.read().max() > 10
    assert datasets.is_prepared("synthetic", tmp_path)
    images, label_paths = datasets.split_paths("synthetic", "train", root=tmp_path)
    assert open_volume(images[0]).format == "ome-zarr" and label_paths[0].endswith("labels.zarr")
    with pytest.raises(UserError, match="no split 'dev'"):
        datasets.split_paths("synthetic", "dev", root=tmp_path)


def test_not_downloaded(tmp_path):
    with pytest.raises(UserError, match="jaxem data download lucchi"):
        datasets.load_dataset("lucchi", "train", root=tmp_path)


def test_isbi_download_from_file_urls(tmp_path, shared_data, capsys):
    root = tmp_path / "data"
    url = (shared_data / "isbi2012").as_uri()
    assert main(["data", "download", "isbi2012", "--url-base", url, "--root", str(root)]) == 0
    ready = json.loads((root / "isbi2012" / "READY.json").read_text())
    expected = {f.name: f.sha256 for f in datasets.get("isbi2012").files}
    assert ready["sha256"] == expected
    train, val, test = (datasets.load_dataset("isbi2012", s, root=root) for s in ("train", "val", "test"))
    assert train[0][0].shape == (16, 512, 512) and val[0][0].shape == (4, 512, 512)
    assert test[0][1] is None and test[0][0].shape == (30, 512, 512)
    assert train[0][0].voxel_size == (50.0, 4.0, 4.0)
    # validation is slices 16-19 of the original stack, labels are per-slice instances of the interior
    raw = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")
    truth = tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")
    np.testing.assert_array_equal(val[0][0].read(), raw[16:20])
    labels = val[0][1].read()
    np.testing.assert_array_equal(labels > 0, truth[16:20] == 255)
    assert not set(np.unique(labels[0])[1:]) & set(np.unique(labels[1])[1:])  # ids unique across slices
    capsys.readouterr()
    assert main(["data", "list", "--root", str(root)]) == 0
    assert "isbi2012   present" in capsys.readouterr().out


def test_checksum_mismatch_leaves_nothing(tmp_path, shared_data):
    mirror = tmp_path / "mirror"
    shutil.copytree(shared_data / "isbi2012", mirror)
    (mirror / "train-labels.tif").chmod(0o644)
    with open(mirror / "train-labels.tif", "ab") as f:
        f.write(b"corrupt")
    root = tmp_path / "data"
    with pytest.raises(UserError, match="checksum mismatch for train-labels.tif.*expected sha256 9a60ad87"):
        datasets.download("isbi2012", root=root, url_base=mirror.as_uri(), progress=False)
    downloads = root / "isbi2012" / "downloads"
    assert not (downloads / "train-labels.tif").exists() and not list(downloads.glob("*.part"))
    assert not datasets.is_prepared("isbi2012", root)
    assert main(["data", "download", "isbi2012", "--url-base", mirror.as_uri(), "--root", str(root)]) == 2


def test_missing_url(tmp_path):
    with pytest.raises(UserError, match="could not download"):
        datasets.fetch((tmp_path / "nope.tif").as_uri(), tmp_path / "x.tif", progress=False)
    assert not list(tmp_path.iterdir())


def test_zip_member_and_unrecorded_checksum(tmp_path, monkeypatch):
    stack = np.random.default_rng(0).integers(0, 255, size=(6, 16, 16)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "input.tif", stack)
    with zipfile.ZipFile(tmp_path / "input.zip", "w") as z:
        z.write(tmp_path / "input.tif", "input.tif")
    spec = datasets.Dataset(
        name="tiny", description="test", voxel_size=(30.0, 6.0, 6.0), labels="none", homepage="", citation="",
        files=(datasets.File("input.tif", "https://example.invalid/input.zip", member="input.tif"),),
        splits={"train": {"0": (datasets.Ref("input.tif", z=(0, 4)), None)}},
    )
    monkeypatch.setitem(datasets.REGISTRY, "tiny", spec)
    datasets.download("tiny", root=tmp_path / "d", url_base=tmp_path.as_uri(), progress=False)
    (image, labels), = datasets.load_dataset("tiny", "train", root=tmp_path / "d")
    assert labels is None and image.voxel_size == (30.0, 6.0, 6.0)
    np.testing.assert_array_equal(image.read(), stack[:4])


def test_cli_import_info_pyramid(tmp_path, capsys):
    stack = np.random.default_rng(0).integers(0, 255, size=(4, 80, 80)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", stack, photometric="minisblack")
    dst = str(tmp_path / "a.zarr")
    assert main(["data", "import", str(tmp_path / "a.tif"), dst]) == 2  # no voxel size
    assert main(["data", "import", str(tmp_path / "a.tif"), dst, "--voxel-size", "40,4"]) == 2
    assert main(["data", "import", str(tmp_path / "a.tif"), dst, "--voxel-size", "40,4,x"]) == 2
    assert main(["data", "import", str(tmp_path / "a.tif"), dst, "--voxel-size", "40,4,4"]) == 0
    assert main(["data", "import", str(tmp_path / "a.tif"), dst, "--voxel-size", "40,4,4"]) == 2  # exists
    assert main(["data", "import", str(tmp_path / "a.tif"), dst, "--voxel-size", "40,4,4", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["data", "info", dst]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [4, 80, 80] and info["voxel_size"] == [40, 4, 4] and info["format"] == "ome-zarr"
    assert main(["data", "pyramid", dst, "--min-size", "16"]) == 0
    levels = json.loads(capsys.readouterr().out)
    assert [lv["shape"] for lv in levels] == [[4, 80, 80], [4, 40, 40], [4, 20, 20]]
    assert main(["data", "info", str(tmp_path / "missing.zarr")]) == 2
    assert main(["data", "import", str(tmp_path / "a.tif"), str(tmp_path / "b"), "--voxel-size", "1,1,1",
                 "--format", "hdf6"]) == 2
    assert main(["data"]) == 2


def test_image_and_labels_must_match(tmp_path):
    from jaxem.data.volume import create_volume

    image = create_volume(tmp_path / "i", (2, 8, 8), np.uint8, (1, 1, 1))
    labels = create_volume(tmp_path / "l", (2, 8, 9), np.uint32, (1, 1, 1))
    with pytest.raises(UserError, match="shape"):
        datasets.check_pair(image, labels)
