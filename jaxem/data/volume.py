"""Volume: a chunked array on disk (or any tensorstore kvstore) with its voxel size.

Volumes are (z, y, x) [2D: (y, x)], optionally with a leading channel axis ("c"). The voxel size
travels with the volume in nanometres, (z, y, x). Everything large is read and written through
tensorstore, one box at a time, so volumes may be far larger than memory.

Metadata lives in the array's attributes (`.zattrs` for zarr v2) as
`{"voxel_size": [z, y, x], "axes": ["z", "y", "x"], "unit": "nanometer"}`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorstore as ts

from jaxem.errors import UserError

ATTRS_KEY = ".zattrs"
DEFAULT_AXES = {2: ("y", "x"), 3: ("z", "y", "x"), 4: ("c", "z", "y", "x")}


def kvstore_spec(path: str | os.PathLike) -> dict | str:
    """Turns a local path or a URL (file://, gs://, s3://, memory://) into a tensorstore kvstore."""
    path = str(path)
    if "://" in path:
        return path if path.endswith("/") else path + "/"
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def is_local(path: str | os.PathLike) -> bool:
    """True for plain filesystem paths and file:// URLs."""
    return "://" not in str(path) or str(path).startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """The filesystem path of a local path or file:// URL."""
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


@dataclass
class Volume:
    """A tensorstore array plus its voxel size (nm, z-y-x) and axis names."""

    store: ts.TensorStore
    path: str
    voxel_size: tuple[float, ...]
    axes: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.store.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.store.dtype.numpy_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.store.chunk_layout.read_chunk.shape)

    def read(self, box: Sequence[slice] | None = None) -> np.ndarray:
        """Reads `box` (a tuple of slices, default everything) into a numpy array."""
        box = tuple(box) if box is not None else ()
        return self.store[box].read().result()

    def __getitem__(self, box) -> np.ndarray:
        return self.store[box].read().result()

    def write(self, array: np.ndarray, offset: Sequence[int] | None = None) -> None:
        """Writes `array` with its first voxel at `offset` (default the origin)."""
        offset = tuple(offset) if offset is not None else (0,) * self.ndim
        box = tuple(slice(o, o + s) for o, s in zip(offset, array.shape))
        self.store[box].write(np.asarray(array, dtype=self.dtype)).result()

    def write_async(self, array: np.ndarray, offset: Sequence[int]) -> ts.Future:
        """Starts writing `array` at `offset`; returns the tensorstore future to wait on."""
        box = tuple(slice(o, o + s) for o, s in zip(offset, array.shape))
        return self.store[box].write(np.asarray(array, dtype=self.dtype))


def read_attributes(path: str | os.PathLike) -> dict:
    """The JSON attributes stored beside a zarr array ({} when there are none)."""
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    value = kv.read(ATTRS_KEY).result().value
    return json.loads(bytes(value)) if value else {}


def write_attributes(path: str | os.PathLike, attrs: dict) -> None:
    """Merges `attrs` into the JSON attributes stored beside a zarr array."""
    merged = read_attributes(path)
    merged.update(attrs)
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    kv.write(ATTRS_KEY, json.dumps(merged, indent=2).encode()).result()


def open_volume(path: str | os.PathLike, mode: str = "r") -> Volume:
    """Opens an existing zarr volume for reading ("r") or reading and writing ("r+")."""
    if is_local(path) and not os.path.exists(local_path(path)):
        raise UserError(f"volume {path} does not exist.")
    spec = {"driver": "zarr", "kvstore": kvstore_spec(path)}
    try:
        store = ts.open(spec, read=True, write=(mode != "r")).result()
    except ValueError as e:
        raise UserError(f"{path} is not a readable zarr volume ({str(e).splitlines()[0]}).") from None
    attrs = read_attributes(path)
    ndim = len(store.shape)
    axes = tuple(attrs.get("axes") or DEFAULT_AXES.get(ndim, tuple(f"d{i}" for i in range(ndim))))
    spatial = sum(a in "zyx" for a in axes)
    voxel_size = tuple(float(v) for v in attrs.get("voxel_size", (1.0,) * spatial))
    return Volume(store=store, path=str(path), voxel_size=voxel_size, axes=axes)


def create_volume(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype,
    voxel_size: Sequence[float],
    chunks: Sequence[int] | None = None,
    axes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Volume:
    """Creates a chunked, blosc-compressed zarr v2 volume; refuses to replace one unless `overwrite`."""
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes or DEFAULT_AXES[len(shape)])
    spatial = sum(a in "zyx" for a in axes)
    if len(voxel_size) != spatial:
        raise UserError(f"voxel size {tuple(voxel_size)} for {path} must have {spatial} values, one per axis {axes}.")
    if is_local(path) and os.path.exists(local_path(path)) and os.listdir(local_path(path)) and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it.")
    chunks = tuple(chunks) if chunks is not None else default_chunks(shape)
    spec = {
        "driver": "zarr",
        "kvstore": kvstore_spec(path),
        "metadata": {
            "shape": list(shape),
            "chunks": [min(c, s) for c, s in zip(chunks, shape)],
            "dtype": np.dtype(dtype).str,
            "compressor": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2},
            "fill_value": 0,
        },
    }
    store = ts.open(spec, create=True, delete_existing=overwrite).result()
    write_attributes(path, {"voxel_size": [float(v) for v in voxel_size], "axes": list(axes), "unit": "nanometer"})
    return Volume(store=store, path=str(path), voxel_size=tuple(float(v) for v in voxel_size), axes=axes)


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """64^3 chunks for 3D, 256^2 for 2D slices; never larger than the volume."""
    size = {2: 256, 3: 64}.get(len(shape), 64)
    return tuple(min(size, s) for s in shape)
