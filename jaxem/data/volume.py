"""Volume: a chunked array on disk (or any tensorstore kvstore) with its voxel size.

Volumes are (z, y, x) [2D: (y, x)], optionally with a leading channel axis ("c"). The voxel size
travels with the volume in nanometres, (z, y, x). Everything large is read and written through
tensorstore, one box at a time, so volumes may be far larger than memory.

Formats (`FORMATS`), detected from the files at the path or named with `format=`:

- "ome-zarr": an OME-Zarr (NGFF v0.4) zarr v2 group; level `0` is the full-resolution array,
  `1`, `2`, ... are downsampled levels; voxel size and axes come from the `multiscales`
  metadata. This is what `jaxem data import` and `jaxem data pyramid` write (napari, neuroglancer).
  A zarr v3 group with OME-Zarr v0.5 metadata (`attributes.ome.multiscales`) is read too.
- "zarr" (v2 array) and "zarr3" (v3 array): jaxem metadata in the array attributes,
  `{"voxel_size": [z, y, x], "axes": ["z", "y", "x"], "unit": "nanometer"}`.
- "n5": stored x-first as N5 tools expect (BigDataViewer, Fiji) and presented as (z, y, x); voxel
  size from `resolution` (x, y, z, the n5-viewer convention).
- "precomputed": neuroglancer precomputed; stored (x, y, z, channel), presented as (z, y, x)
  (single channel) or (c, z, y, x); voxel size from the scale's `resolution`; `level` picks the scale.

Paths are local paths or tensorstore kvstore URLs (file://, gs://, s3://, memory://).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorstore as ts

from jaxem.errors import UserError

ATTRS_KEY = ".zattrs"
DEFAULT_AXES = {2: ("y", "x"), 3: ("z", "y", "x"), 4: ("c", "z", "y", "x")}
FORMATS = ("ome-zarr", "zarr", "zarr3", "n5", "precomputed")
_PRECOMPUTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")


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


def join(path: str | os.PathLike, *parts: str) -> str:
    """Joins path components with "/" for local paths and URLs alike."""
    return "/".join([str(path).rstrip("/"), *parts])


@dataclass
class Volume:
    """A tensorstore array plus its voxel size (nm, z-y-x) and axis names.

    `path` is what the volume was opened from (for an OME-Zarr group, the group); `format` one of
    FORMATS; `level` the resolution level (0 = full resolution).
    """

    store: ts.TensorStore
    path: str
    voxel_size: tuple[float, ...]
    axes: tuple[str, ...]
    format: str = "zarr"
    level: int = 0

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
        return self.wait(self.store[box].read())

    def __getitem__(self, box) -> np.ndarray:
        return self.wait(self.store[box].read())

    def wait(self, future: ts.Future) -> np.ndarray:
        """The array of a started read (`self.store[box].read()`); an unreadable chunk (corrupt,
        truncated, unreachable) becomes a UserError naming the chunk and how to recover."""
        try:
            return np.asarray(future.result())
        except ValueError as e:
            raise UserError(read_error(self.path, e)) from None

    def write(self, array: np.ndarray, offset: Sequence[int] | None = None) -> None:
        """Writes `array` with its first voxel at `offset` (default the origin)."""
        offset = tuple(offset) if offset is not None else (0,) * self.ndim
        box = tuple(slice(o, o + s) for o, s in zip(offset, array.shape))
        self.store[box].write(np.asarray(array, dtype=self.dtype)).result()

    def write_async(self, array: np.ndarray, offset: Sequence[int]) -> ts.Future:
        """Starts writing `array` at `offset`; returns the tensorstore future to wait on."""
        box = tuple(slice(o, o + s) for o, s in zip(offset, array.shape))
        return self.store[box].write(np.asarray(array, dtype=self.dtype))

    def with_read_cache(self, total_bytes: int) -> "Volume":
        """The same volume reopened with a tensorstore cache of decoded chunks (`total_bytes`).

        Without one, every read decodes each chunk it touches; overlapping reads (tiles with a
        halo, random crops) then decode the same chunk many times (10x the CPU in our test).
        """
        context = ts.Context({"cache_pool": {"total_bytes_limit": int(total_bytes)}})
        store = ts.open(self.store.spec(retain_context=False), context=context, read=True).result()
        return dataclasses.replace(self, store=store)

    def info(self) -> dict:
        """Shape, dtype, chunks, voxel size, axes and format as a JSON-ready dict."""
        return {
            "path": self.path, "format": self.format, "level": self.level, "shape": list(self.shape),
            "dtype": self.dtype.name, "chunks": list(self.chunks), "voxel_size": list(self.voxel_size),
            "axes": list(self.axes), "unit": "nanometer",
        }


def _reason(error: BaseException) -> str:
    """The first line of a tensorstore error without its JSON spec and transform."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r" \[(tensorstore_spec|transform|domain|source locations)=.*$", "", first)


def read_error(path: str, error: BaseException) -> str:
    """One sentence for a failed read of the volume at `path`: the chunk file tensorstore names
    (when it names one), what is wrong with it and how to recover."""
    text = _reason(error)
    match = re.search(r'Error reading (?:local file )?"([^"]+)": (.*)', text)
    if match is None:
        return f"{path} could not be read ({text}); check that the volume is complete and reachable."
    chunk, why = match.groups()
    return (f"chunk {chunk} of {path} cannot be read ({why}); if jaxem wrote {path}, re-run that command "
            f"with --overwrite, otherwise restore this chunk file from the original data.")


def unwritable(path: str | os.PathLike, error: BaseException) -> UserError:
    """The UserError for `error` raised while writing `path` (permission, read-only disk, a file
    where a folder is needed)."""
    reason = getattr(error, "strerror", None) or _reason(error)
    return UserError(f"cannot write {path} ({reason}); choose a writable location or fix its permissions.")


# ---------------------------------------------------------------- small key-value helpers


def read_json(path: str | os.PathLike, key: str) -> dict | None:
    """The JSON document stored under `key` beside `path`, or None when there is none."""
    try:
        kv = ts.KvStore.open(kvstore_spec(path)).result()
        result = kv.read(key).result()
    except Exception:  # unreachable bucket, bad URL: treat as absent, the caller reports it
        return None
    if result.state != "value":
        return None
    try:
        return json.loads(bytes(result.value))
    except ValueError:  # a truncated or overwritten metadata file: say so, not "no volume"
        raise UserError(f"{join(path, key)} is not valid JSON: the metadata file is corrupt or truncated; "
                        "restore it (or write the volume again).") from None


def write_json(path: str | os.PathLike, key: str, value: dict) -> None:
    """Writes `value` as JSON under `key` beside `path`."""
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    kv.write(key, json.dumps(value, indent=2).encode()).result()


def read_attributes(path: str | os.PathLike) -> dict:
    """The JSON attributes stored beside a zarr v2 array or group ({} when there are none)."""
    return read_json(path, ATTRS_KEY) or {}


def write_attributes(path: str | os.PathLike, attrs: dict) -> None:
    """Merges `attrs` into the JSON attributes stored beside a zarr v2 array or group."""
    merged = read_attributes(path)
    merged.update(attrs)
    write_json(path, ATTRS_KEY, merged)


# ---------------------------------------------------------------- format detection and open


def detect_format(path: str | os.PathLike) -> str:
    """Which of FORMATS is stored at `path`, from its metadata files; UserError when none is."""
    if read_json(path, ".zgroup") is not None:
        return "ome-zarr"
    if read_json(path, ".zarray") is not None:
        return "zarr"
    meta = read_json(path, "zarr.json")
    if meta is not None:
        return "zarr3" if meta.get("node_type") == "array" else "ome-zarr"
    if (read_json(path, "attributes.json") or {}).get("dimensions") is not None:
        return "n5"
    if read_json(path, "info") is not None:
        return "precomputed"
    raise UserError(
        f"{path} holds no volume jaxem can read (expected one of {', '.join(FORMATS)}: "
        ".zgroup/.zarray, zarr.json, N5 attributes.json or precomputed info)."
    )


def open_volume(path: str | os.PathLike, mode: str = "r", format: str | None = None, level: int = 0) -> Volume:
    """Opens an existing volume for reading ("r") or reading and writing ("r+").

    format: one of FORMATS, or None to detect it; level: the resolution level of a multiscale
    volume (OME-Zarr group, precomputed scale), 0 = full resolution.
    """
    path = str(path)
    if is_local(path) and not os.path.exists(local_path(path)):
        raise UserError(f"volume {path} does not exist.")
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown volume format {format!r} for {path} (expected one of {', '.join(FORMATS)}).")
    format = format or detect_format(path)
    opener = {"ome-zarr": _open_ome, "zarr": _open_zarr, "zarr3": _open_zarr, "n5": _open_n5,
              "precomputed": _open_precomputed}[format]
    volume = opener(path, mode, format, level)
    if 0 in volume.shape:
        raise UserError(f"{path} has shape {volume.shape} with an empty axis; jaxem needs at least one voxel along every axis.")
    return volume


def _real_valued(store: ts.TensorStore, path: str) -> ts.TensorStore:
    """`store`, or UserError when it holds complex numbers (EM, probabilities and labels are real)."""
    dtype = np.dtype(store.dtype.numpy_dtype)
    if dtype.kind == "c":
        raise UserError(f"{path} holds complex numbers ({dtype.name}); jaxem reads real-valued volumes only "
                        "(store the magnitude or the real part).")
    return store


def _ts_open(spec: dict, path: str, mode: str, what: str) -> ts.TensorStore:
    try:
        store = ts.open(spec, read=True, write=(mode != "r")).result()
    except ValueError as e:
        raise UserError(f"{path} is not a readable {what} volume ({_reason(e)}).") from None
    return _real_valued(store, path)


def _open_zarr(path, mode, format, level) -> Volume:
    driver = "zarr" if format == "zarr" else "zarr3"
    store = _ts_open({"driver": driver, "kvstore": kvstore_spec(path)}, path, mode, format)
    attrs = read_attributes(path) if format == "zarr" else (read_json(path, "zarr.json") or {}).get("attributes", {})
    axes, voxel_size = _axes_and_voxel_size(attrs, len(store.shape), path)
    return Volume(store=store, path=path, voxel_size=voxel_size, axes=axes, format=format)


def _axes_and_voxel_size(attrs: dict, ndim: int, path) -> tuple[tuple[str, ...], tuple[float, ...]]:
    axes = tuple(attrs.get("axes") or DEFAULT_AXES.get(ndim, tuple(f"d{i}" for i in range(ndim))))
    if len(axes) != ndim:
        raise UserError(f"{path} has {ndim} axes but its metadata names {len(axes)} ({', '.join(axes)}).")
    spatial = sum(a in "zyx" for a in axes)
    voxel_size = tuple(float(v) for v in attrs.get("voxel_size", (1.0,) * spatial))
    return axes, voxel_size


def _open_ome(path, mode, format, level) -> Volume:
    multiscales = ome_multiscales(path)
    if multiscales is None:
        raise UserError(f"{path} is a zarr group without OME-Zarr multiscales metadata (expected an image group).")
    datasets = multiscales["datasets"]
    if not 0 <= level < len(datasets):
        raise UserError(f"{path} has levels 0-{len(datasets) - 1}, not level {level}.")
    array_path = join(path, datasets[level]["path"])
    inner = "zarr" if read_json(array_path, ".zarray") is not None else "zarr3"
    volume = _open_zarr(array_path, mode, inner, 0)
    axes = tuple(a["name"] if isinstance(a, dict) else a for a in multiscales.get("axes", volume.axes))
    scale = next((t["scale"] for t in datasets[level].get("coordinateTransformations", []) if t["type"] == "scale"), None)
    voxel_size = volume.voxel_size
    if scale is not None:
        voxel_size = tuple(float(s) for s, a in zip(scale, axes) if a in "zyx")
    return Volume(store=volume.store, path=path, voxel_size=voxel_size, axes=axes, format="ome-zarr", level=level)


def ome_multiscales(path: str | os.PathLike) -> dict | None:
    """The first OME-Zarr multiscales entry of a group (v0.4 `.zattrs` or v0.5 `zarr.json`), or None."""
    attrs = read_attributes(path)
    if "multiscales" not in attrs:
        attrs = (read_json(path, "zarr.json") or {}).get("attributes", {})
        attrs = attrs.get("ome", attrs)
    found = attrs.get("multiscales")
    return found[0] if found else None


def _open_n5(path, mode, format, level) -> Volume:
    store = _ts_open({"driver": "n5", "kvstore": kvstore_spec(path)}, path, mode, "N5").T
    attrs = read_json(path, "attributes.json") or {}
    axes, voxel_size = _axes_and_voxel_size(attrs, len(store.shape), path)
    resolution = attrs.get("resolution") or (attrs.get("pixelResolution") or {}).get("dimensions")
    if "voxel_size" not in attrs and resolution:
        voxel_size = tuple(float(v) for v in resolution[::-1][-len(voxel_size):])
    return Volume(store=store, path=path, voxel_size=voxel_size, axes=axes, format="n5")


def _open_precomputed(path, mode, format, level) -> Volume:
    spec = {"driver": "neuroglancer_precomputed", "kvstore": kvstore_spec(path), "scale_index": level}
    store = _ts_open(spec, path, mode, "neuroglancer precomputed")
    scale = (read_json(path, "info") or {})["scales"][level]
    store = store[ts.d["channel", "z", "y", "x"].transpose[:]].translate_to[0]
    axes = ("c", "z", "y", "x")
    if store.shape[0] == 1:
        store, axes = store[0], axes[1:]
    voxel_size = tuple(float(v) for v in scale["resolution"][::-1])
    return Volume(store=store, path=path, voxel_size=voxel_size, axes=axes, format="precomputed", level=level)


# ---------------------------------------------------------------- create


def create_volume(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype,
    voxel_size: Sequence[float],
    chunks: Sequence[int] | None = None,
    axes: Sequence[str] | None = None,
    overwrite: bool = False,
    format: str = "zarr",
    labels: bool = False,
) -> Volume:
    """Creates a chunked, compressed volume; refuses to replace an existing one unless `overwrite`.

    format: "zarr" (v2 array, the default), "zarr3", "n5", "precomputed" or "ome-zarr" (an
    OME-Zarr v0.4 group whose level 0 is returned). labels: marks the volume as a label image
    (OME "image-label", precomputed "segmentation"), which also makes pyramids use the mode.
    """
    path = str(path)
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes or DEFAULT_AXES.get(len(shape), ()))
    if len(axes) != len(shape):
        raise UserError(f"{path}: a volume of shape {shape} needs {len(shape)} axis names, got {axes}.")
    spatial = sum(a in "zyx" for a in axes)
    if voxel_size is None or len(voxel_size) != spatial:
        raise UserError(f"voxel size {voxel_size} for {path} must have {spatial} values, one per axis {axes}.")
    if format not in FORMATS:
        raise UserError(f"unknown volume format {format!r} for {path} (expected one of {', '.join(FORMATS)}).")
    _refuse_existing(path, overwrite)
    voxel_size = tuple(float(v) for v in voxel_size)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks or default_chunks(shape), shape))
    jaxem_attrs = {"voxel_size": list(voxel_size), "axes": list(axes), "unit": "nanometer"}
    if labels:
        jaxem_attrs["jaxem_kind"] = "labels"
    creator = {"ome-zarr": _create_ome, "zarr": _create_zarr, "zarr3": _create_zarr3, "n5": _create_n5,
               "precomputed": _create_precomputed}[format]
    try:
        creator(path, shape, np.dtype(dtype), chunks, axes, jaxem_attrs, labels)
    except (OSError, ValueError) as e:
        raise unwritable(path, e) from None
    return open_volume(path, mode="r+", format=format)


def stored(path: str | os.PathLike) -> bool:
    """True when something is stored at `path`: a file or a non-empty folder locally, zarr array
    or group metadata under a URL."""
    if is_local(path):
        local = local_path(path)
        return os.path.exists(local) and (not os.path.isdir(local) or bool(os.listdir(local)))
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    return any(kv.read(key).result().state == "value" for key in (".zgroup", ".zarray", "zarr.json"))


def _refuse_existing(path: str, overwrite: bool) -> None:
    if is_local(path):
        local = local_path(path)
        if stored(path):
            if not overwrite:
                raise UserError(f"{path} already exists; pass --overwrite to replace it.")
            import shutil

            shutil.rmtree(local) if os.path.isdir(local) else os.remove(local)
        return
    try:
        present = detect_format(path)
    except UserError:
        return
    if not overwrite:
        raise UserError(f"{path} already exists ({present}); pass --overwrite to replace it.")


def _blosc() -> dict:
    return {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2}


def _create_zarr(path, shape, dtype, chunks, axes, attrs, labels) -> None:
    spec = {
        "driver": "zarr",
        "kvstore": kvstore_spec(path),
        "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": dtype.str,
                     "compressor": _blosc(), "fill_value": 0},
    }
    ts.open(spec, create=True, delete_existing=True).result()
    write_attributes(path, attrs)


def _create_zarr3(path, shape, dtype, chunks, axes, attrs, labels) -> None:
    spec = {
        "driver": "zarr3",
        "kvstore": kvstore_spec(path),
        "metadata": {
            "shape": list(shape), "data_type": dtype.name, "fill_value": 0, "attributes": attrs,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"}}],
            "dimension_names": list(axes),
        },
    }
    ts.open(spec, create=True, delete_existing=True).result()


def _create_n5(path, shape, dtype, chunks, axes, attrs, labels) -> None:
    spec = {
        "driver": "n5",
        "kvstore": kvstore_spec(path),
        "metadata": {"dimensions": list(shape[::-1]), "blockSize": list(chunks[::-1]), "dataType": dtype.name,
                     "compression": {"type": "zstd", "level": 3}},
    }
    ts.open(spec, create=True, delete_existing=True).result()
    meta = read_json(path, "attributes.json")
    spatial = attrs["voxel_size"]
    meta.update(attrs, resolution=spatial[::-1], units=["nm"] * len(spatial))
    write_json(path, "attributes.json", meta)


def _create_precomputed(path, shape, dtype, chunks, axes, attrs, labels) -> None:
    if tuple(axes[-3:]) != ("z", "y", "x") or len(axes) > 4:
        raise UserError(f"{path}: neuroglancer precomputed needs (z, y, x) or (c, z, y, x) axes, got {axes}.")
    if dtype.name not in _PRECOMPUTED_DTYPES:
        raise UserError(f"{path}: neuroglancer precomputed cannot store {dtype.name} (use one of {', '.join(_PRECOMPUTED_DTYPES)}).")
    channels = shape[0] if len(shape) == 4 else 1
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": kvstore_spec(path),
        "multiscale_metadata": {"type": "segmentation" if labels else "image", "data_type": dtype.name,
                                "num_channels": channels},
        "scale_metadata": {"size": list(shape[-3:][::-1]), "resolution": attrs["voxel_size"][::-1],
                           "encoding": "compressed_segmentation" if labels and dtype.name in ("uint32", "uint64") else "raw",
                           "chunk_size": list(chunks[-3:][::-1])},
    }
    ts.open(spec, create=True, delete_existing=True).result()


def _create_ome(path, shape, dtype, chunks, axes, attrs, labels) -> None:
    write_json(path, ".zgroup", {"zarr_format": 2})
    _create_zarr(join(path, "0"), shape, dtype, chunks, axes, attrs, labels)
    group = {"multiscales": [ome_metadata(axes, [attrs["voxel_size"]], name=os.path.basename(path.rstrip("/")))]}
    group.update(attrs)
    if labels:
        group["image-label"] = {"version": "0.4"}
    write_attributes(path, group)


def ome_metadata(axes: Sequence[str], voxel_sizes: Sequence[Sequence[float]], name: str = "",
                 translation: Sequence[float] | None = None) -> dict:
    """OME-Zarr v0.4 `multiscales` entry for levels "0", "1", ... with the given voxel sizes (nm).

    translation: nm per spatial axis (z, y, x) of level 0's first voxel centre (default 0). Level
    i's first voxel centre is the centre of the level-0 voxels it summarises: translation +
    (voxel_sizes[i] - voxel_sizes[0]) / 2, i.e. + (f - 1) / 2 level-0 voxels for a factor f.
    """
    kinds = [{"name": a, "type": "space", "unit": "nanometer"} if a in "zyx" else {"name": a, "type": "channel"}
             for a in axes]
    lead = [1.0] * (len(axes) - len(voxel_sizes[0]))
    origin = [float(t) for t in translation] if translation is not None else [0.0] * len(voxel_sizes[0])
    datasets = []
    for level, vs in enumerate(voxel_sizes):
        shift = [0.0] * len(lead) + [t + (float(v) - float(v0)) / 2 for t, v, v0 in zip(origin, vs, voxel_sizes[0])]
        transforms = [{"type": "scale", "scale": lead + [float(v) for v in vs]}]
        if any(shift):
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {"version": "0.4", "name": name, "axes": kinds, "datasets": datasets}


def ome_translation(path: str | os.PathLike) -> tuple[float, ...]:
    """Level 0's translation (nm, spatial axes only) of the OME-Zarr group at `path`: where its
    first voxel's centre lies; zeros when it records none, () when `path` is no OME-Zarr group."""
    multiscales = _ome_or_none(path)
    if multiscales is None:
        return ()
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscales.get("axes", ())]
    spatial = [i for i, a in enumerate(axes) if a in "zyx"]
    found = [t["translation"] for t in multiscales["datasets"][0].get("coordinateTransformations", [])
             if t["type"] == "translation"]
    return tuple(float(found[0][i]) if found else 0.0 for i in spatial)


def ome_voxel_sizes(path: str | os.PathLike) -> list[tuple[float, ...]]:
    """Every level's voxel size (nm, spatial axes) of the OME-Zarr group at `path`, from its scales."""
    multiscales = ome_multiscales(path)
    return [open_volume(path, level=i).voxel_size for i in range(len(multiscales["datasets"]))]


def set_ome_translation(path: str | os.PathLike, translation: Sequence[float]) -> None:
    """Rewrites the multiscales of the OME-Zarr group at `path` (written by jaxem) so that level 0's
    first voxel centre lies at `translation` (nm, spatial axes) and every level follows `ome_metadata`."""
    multiscales = ome_multiscales(path)
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscales["axes"]]
    entry = ome_metadata(axes, ome_voxel_sizes(path), multiscales.get("name", ""), translation)
    write_attributes(path, {"multiscales": [entry]})


def copy_ome_translation(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Gives the OME-Zarr group `target` the level-0 translation (nm) of `source` (a volume derived
    from it on the same voxel grid); nothing when `source` is not an OME-Zarr group or has none."""
    translation = ome_translation(source)
    if any(translation):
        set_ome_translation(target, translation)


def _ome_or_none(path) -> dict | None:
    try:
        return ome_multiscales(path) if detect_format(path) == "ome-zarr" else None
    except UserError:
        return None


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """64^3 chunks for 3D, 256^2 for 2D slices; never larger than the volume."""
    size = {2: 256, 3: 64}.get(len(shape), 64)
    return tuple(min(size, s) for s in shape)


# ---------------------------------------------------------------- NaN and Inf

NONFINITE_BLOCK_VOXELS = 2**24  # voxels read at a time when counting NaN / Inf (64 MiB of float32)


def slab_boxes(shape: Sequence[int], block_voxels: int = NONFINITE_BLOCK_VOXELS):
    """Boxes tiling `shape`, each whole along the trailing axes and of about `block_voxels` voxels
    (at least one voxel thick along the axis it is cut on)."""
    shape = tuple(int(s) for s in shape)
    axis = next(k for k in range(len(shape)) if int(np.prod(shape[k + 1:])) <= block_voxels)
    step = max(1, block_voxels // int(np.prod(shape[axis + 1:])))
    for lead in np.ndindex(*shape[:axis]):
        for start in range(0, shape[axis], step):
            yield tuple(slice(i, i + 1) for i in lead) + (slice(start, min(start + step, shape[axis])),)


def nonfinite_count(source, block_voxels: int = NONFINITE_BLOCK_VOXELS) -> int:
    """How many voxels of `source` (a Volume, or anything with shape, dtype and read(box)) are NaN
    or infinite, read `block_voxels` at a time; 0 without reading for integer volumes."""
    if not np.issubdtype(source.dtype, np.inexact):
        return 0
    return sum(int(np.count_nonzero(~np.isfinite(source.read(box)))) for box in slab_boxes(source.shape, block_voxels))


def refuse_nonfinite(source, path, allow: bool = False, block_voxels: int = NONFINITE_BLOCK_VOXELS) -> int:
    """UserError naming `path` and how many of its voxels are NaN or infinite, unless `allow`
    (--allow-nan: a NaN is then read as probability 0, +Inf as 1, -Inf as 0); returns the count."""
    count = nonfinite_count(source, block_voxels)
    if count and not allow:
        raise UserError(f"{path} holds {count} NaN or infinite voxels (of {int(np.prod(source.shape))}); fix the "
                        "prediction, or pass --allow-nan to read NaN as probability 0 (+Inf as 1, -Inf as 0).")
    if count:
        print(f"warning: {path} holds {count} NaN or infinite voxels; --allow-nan reads NaN as probability 0 "
              "(+Inf as 1, -Inf as 0).", file=sys.stderr)
    return count


def as_probabilities(array: np.ndarray) -> np.ndarray:
    """A block of a prediction as probabilities: uint8 (`jaxem predict --dtype uint8` writes
    rint(255 p)) as float32 p = v / 255; any other dtype unchanged."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    return array


def finite_probabilities(array: np.ndarray) -> np.ndarray:
    """`array` with NaN read as 0, +Inf as 1 and -Inf as 0 (what --allow-nan means)."""
    if not np.issubdtype(array.dtype, np.inexact):
        return array
    return np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0)
