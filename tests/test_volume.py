"""Volume formats: round trips through every format, detection, metadata, bad input."""

import json

import numpy as np
import pytest

from jaxem.data.volume import FORMATS, create_volume, detect_format, open_volume
from jaxem.errors import UserError


def _data(shape=(5, 19, 23), dtype=np.uint16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, size=shape).astype(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(tmp_path, fmt):
    data = _data()
    path = tmp_path / f"v.{fmt}"
    vol = create_volume(path, data.shape, data.dtype, (40, 4, 4), chunks=(2, 8, 8), format=fmt)
    vol.write(data[:, :10], offset=(0, 0, 0))
    vol.write(data[:, 10:], offset=(0, 10, 0))
    again = open_volume(path)  # format detected from the files
    assert again.format == fmt and detect_format(path) == fmt
    assert again.shape == data.shape and again.dtype == data.dtype
    assert again.voxel_size == (40.0, 4.0, 4.0) and again.axes == ("z", "y", "x")
    assert again.chunks == (2, 8, 8)
    np.testing.assert_array_equal(again.read(), data)
    np.testing.assert_array_equal(again.read((slice(1, 3), slice(4, 9), slice(20, 23))), data[1:3, 4:9, 20:23])
    cached = again.with_read_cache(1 << 20)  # same view (N5 transposed, precomputed channel-squeezed)
    assert (cached.shape, cached.axes, cached.voxel_size) == (again.shape, again.axes, again.voxel_size)
    np.testing.assert_array_equal(cached.read((slice(1, 3), slice(4, 9), slice(20, 23))), data[1:3, 4:9, 20:23])
    np.testing.assert_array_equal(cached.read(), data)


def test_file_url_and_explicit_format(tmp_path):
    data = _data((3, 8, 8), np.uint8)
    create_volume(tmp_path / "a", data.shape, data.dtype, (30, 6, 6), format="zarr3").write(data)
    vol = open_volume(f"file://{tmp_path}/a", format="zarr3")
    assert vol.voxel_size == (30.0, 6.0, 6.0)
    np.testing.assert_array_equal(vol.read(), data)


def test_n5_is_stored_x_first(tmp_path):
    create_volume(tmp_path / "a.n5", (4, 6, 8), np.uint8, (40, 5, 3), format="n5")
    attrs = json.loads((tmp_path / "a.n5" / "attributes.json").read_text())
    assert attrs["dimensions"] == [8, 6, 4] and attrs["resolution"] == [3, 5, 40]


def test_ome_zarr_group_metadata(tmp_path):
    create_volume(tmp_path / "g", (4, 6, 8), np.uint8, (40, 4, 4), format="ome-zarr")
    attrs = json.loads((tmp_path / "g" / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["path"] == "0"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [40.0, 4.0, 4.0]
    assert (tmp_path / "g" / "0" / ".zarray").exists()
    # the level-0 array alone opens as a plain zarr array too
    assert open_volume(tmp_path / "g" / "0").shape == (4, 6, 8)


def test_two_dimensional_and_channels(tmp_path):
    vol = create_volume(tmp_path / "a", (6, 8), np.float32, (4, 4))
    assert open_volume(tmp_path / "a").axes == ("y", "x")
    pre = create_volume(tmp_path / "p", (2, 3, 6, 8), np.float32, (40, 4, 4), format="precomputed")
    assert pre.axes == ("c", "z", "y", "x") and pre.shape == (2, 3, 6, 8)
    assert vol.voxel_size == (4.0, 4.0)


def test_never_overwrites_without_flag(tmp_path):
    data = _data((2, 4, 4), np.uint8)
    create_volume(tmp_path / "a", data.shape, data.dtype, (1, 1, 1)).write(data)
    with pytest.raises(UserError, match="--overwrite"):
        create_volume(tmp_path / "a", data.shape, data.dtype, (1, 1, 1))
    np.testing.assert_array_equal(open_volume(tmp_path / "a").read(), data)
    create_volume(tmp_path / "a", (3, 3, 3), np.uint8, (1, 1, 1), overwrite=True)
    assert open_volume(tmp_path / "a").shape == (3, 3, 3)


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_volume(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hello")
    with pytest.raises(UserError, match="holds no volume"):
        open_volume(tmp_path / "junk")
    with pytest.raises(UserError, match="unknown volume format"):
        open_volume(tmp_path / "junk", format="hdf6")
    with pytest.raises(UserError, match="voxel size"):
        create_volume(tmp_path / "b", (2, 3, 4), np.uint8, (4, 4))
    with pytest.raises(UserError, match="precomputed cannot store"):
        create_volume(tmp_path / "c", (2, 3, 4), np.float64, (4, 4, 4), format="precomputed")
    create_volume(tmp_path / "g", (2, 3, 4), np.uint8, (4, 4, 4), format="ome-zarr")
    with pytest.raises(UserError, match="levels 0-0"):
        open_volume(tmp_path / "g", level=2)
