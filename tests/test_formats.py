"""Import of TIFF/HDF5 into OME-Zarr, pyramids and info."""

import json

import h5py
import numpy as np
import pytest
import tifffile

from jaxem.data import formats
from jaxem.data.volume import open_volume
from jaxem.errors import UserError


@pytest.fixture
def stack():
    return np.random.default_rng(0).integers(0, 255, size=(7, 40, 48)).astype(np.uint8)


def test_tiff_import_streams_pages(tmp_path, stack):
    tifffile.imwrite(tmp_path / "a.tif", stack)
    source = formats.open_source(tmp_path / "a.tif")
    assert [s.shape[0] for _, s in source.slabs(3)] == [3, 3, 1]  # never the whole stack at once
    vol = formats.import_volume(tmp_path / "a.tif", tmp_path / "a.zarr", voxel_size=(40, 4, 4), chunks=(2, 16, 16))
    again = open_volume(tmp_path / "a.zarr")
    assert again.format == "ome-zarr" and again.voxel_size == (40.0, 4.0, 4.0) and vol.chunks == (2, 16, 16)
    np.testing.assert_array_equal(again.read(), stack)


def test_tiff_voxel_size_from_imagej_metadata(tmp_path, stack):
    tifffile.imwrite(tmp_path / "a.tif", stack, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.05, "unit": "micron"})
    vol = formats.import_volume(tmp_path / "a.tif", tmp_path / "a.zarr")
    np.testing.assert_allclose(vol.voxel_size, (50, 4, 4))


def test_hdf5_import(tmp_path, stack):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["volumes/raw"] = stack
        f["volumes/raw"].attrs["resolution"] = (40.0, 4.0, 4.0)
        f["volumes/labels/neuron_ids"] = stack.astype(np.uint64)
    with pytest.raises(UserError, match="--dataset"):
        formats.import_volume(tmp_path / "a.h5", tmp_path / "x.zarr")
    vol = formats.import_volume(tmp_path / "a.h5", tmp_path / "raw.zarr", dataset="volumes/raw")
    assert vol.voxel_size == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(open_volume(tmp_path / "raw.zarr").read(), stack)
    with pytest.raises(UserError, match="voxel size"):  # the label dataset records none
        formats.import_volume(tmp_path / "a.h5", tmp_path / "l.zarr", dataset="volumes/labels/neuron_ids")
    formats.import_volume(tmp_path / "a.h5", tmp_path / "l.zarr", dataset="volumes/labels/neuron_ids", voxel_size=(40, 4, 4))
    attrs = json.loads((tmp_path / "l.zarr" / ".zattrs").read_text())
    assert attrs["jaxem_kind"] == "labels" and "image-label" in attrs
    with pytest.raises(UserError, match="no dataset 'nope'"):
        formats.import_volume(tmp_path / "a.h5", tmp_path / "n.zarr", dataset="nope", voxel_size=(1, 1, 1))


def test_import_bad_input(tmp_path, stack):
    tifffile.imwrite(tmp_path / "a.tif", stack)
    with pytest.raises(UserError, match="--voxel-size"):
        formats.import_volume(tmp_path / "a.tif", tmp_path / "a.zarr")
    with pytest.raises(UserError, match="3 axes"):
        formats.import_volume(tmp_path / "a.tif", tmp_path / "a.zarr", voxel_size=(4, 4))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(UserError, match="grey-value"):
        formats.import_volume(tmp_path / "rgb.tif", tmp_path / "b.zarr", voxel_size=(4, 4))
    tifffile.imwrite(tmp_path / "three.tif", np.zeros((3, 8, 8), np.uint8))  # tifffile stores it as planar RGB
    with pytest.raises(UserError, match="If these are 3 z-slices.*minisblack"):
        formats.import_volume(tmp_path / "three.tif", tmp_path / "b.zarr", voxel_size=(40, 4, 4))
    with pytest.raises(UserError, match="does not exist"):
        formats.import_volume(tmp_path / "nope.tif", tmp_path / "c.zarr", voxel_size=(4, 4))
    formats.import_volume(tmp_path / "a.tif", tmp_path / "a.zarr", voxel_size=(40, 4, 4))
    with pytest.raises(UserError, match="--overwrite"):
        formats.import_volume(tmp_path / "a.tif", tmp_path / "a.zarr", voxel_size=(40, 4, 4))


def test_downsample_mean_and_mode():
    block = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    out = formats.downsample(block, (2, 2), labels=False)
    assert out.shape == (3, 3)
    assert out[0, 0] == block[:2, :2].mean() and out[2, 1] == block[4, 2:4].mean()
    labels = np.array([[1, 1, 2, 2], [1, 3, 2, 0], [0, 0, 5, 5], [0, 7, 5, 6]], np.uint64)
    np.testing.assert_array_equal(formats.downsample(labels, (2, 2), labels=True), [[1, 2], [0, 5]])


def test_pyramid_factors_respect_anisotropy():
    assert formats.pyramid_factors((40, 4, 4), (100, 1000, 1000)) == (1, 2, 2)
    assert formats.pyramid_factors((40, 32, 32), (100, 1000, 1000)) == (2, 2, 2)
    assert formats.pyramid_factors((5, 5, 5), (40, 1000, 1000)) == (1, 2, 2)  # z too small to halve


def test_pyramid_levels(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, size=(4, 130, 96)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack")
    formats.import_volume(tmp_path / "a.tif", tmp_path / "a.zarr", voxel_size=(40, 4, 4), chunks=(2, 16, 16))
    infos = formats.pyramid(tmp_path / "a.zarr", min_size=16)
    # an axis stops halving once it is under 2 * min_size voxels
    assert [i["shape"] for i in infos] == [[4, 130, 96], [4, 65, 48], [4, 33, 24], [4, 17, 24]]
    assert [i["voxel_size"] for i in infos] == [[40, 4, 4], [40, 8, 8], [40, 16, 16], [40, 32, 16]]
    level1 = open_volume(tmp_path / "a.zarr", level=1).read()
    np.testing.assert_array_equal(level1, formats.downsample(data, (1, 2, 2), labels=False))
    with pytest.raises(UserError, match="--overwrite"):
        formats.pyramid(tmp_path / "a.zarr")
    assert len(formats.pyramid(tmp_path / "a.zarr", levels=1, overwrite=True)) == 2
    info = formats.describe(tmp_path / "a.zarr")
    assert info["format"] == "ome-zarr" and info["chunks"] == [2, 16, 16] and len(info["levels"]) == 2


def test_pyramid_needs_a_group(tmp_path):
    from jaxem.data.volume import create_volume

    create_volume(tmp_path / "plain", (2, 8, 8), np.uint8, (1, 1, 1))
    with pytest.raises(UserError, match="not an OME-Zarr group"):
        formats.pyramid(tmp_path / "plain")
