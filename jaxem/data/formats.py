"""Getting data into jaxem's on-disk layout: TIFF/HDF5/any-volume import, pyramids, info.

The layout jaxem writes is an OME-Zarr (NGFF v0.4) group: a zarr v2 group whose `.zattrs` hold
`multiscales` (axes z, y, x in nanometres, one scale per level, a translation where it is not
zero) plus jaxem's own `voxel_size`/`axes`/`unit`; level `0` is the full-resolution array, `1`, `2`,
... are downsampled levels added by `pyramid`, each translated to the centre of the level-0 voxels it
summarises. `write_labels_of` adds a segmentation to an image as its OME-Zarr label image
IMAGE/labels/NAME. napari (napari-ome-zarr) and neuroglancer open the group directly.

Import never holds the whole volume in memory: TIFF stacks are read a few pages at a time, HDF5
datasets and tensorstore volumes one slab of chunk depth at a time.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxem.data.guard import staged
from jaxem.data.volume import (
    Volume, copy_ome_translation, create_volume, detect_format, is_local, join, local_path, ome_metadata,
    ome_multiscales, ome_translation, ome_voxel_sizes, open_volume, read_attributes, read_json,
    set_ome_translation, write_attributes, write_json,
)
from jaxem.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".n5.h5")
_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "micron": 1e3, "micrometer": 1e3, "\u00b5m": 1e3, "mm": 1e6}


# ---------------------------------------------------------------- sources


class Source:
    """A readable array of any supported kind: shape, dtype, voxel size (or None) and slabs along axis 0."""

    def __init__(self, path: str, shape, dtype, voxel_size, read_slab, kind: str):
        self.path, self.shape, self.dtype, self.voxel_size = path, tuple(shape), np.dtype(dtype), voxel_size
        self.read_slab, self.kind = read_slab, kind

    def slabs(self, depth: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (start index along axis 0, array of up to `depth` planes); one slab in memory at a time."""
        if len(self.shape) == 2:
            yield 0, self.read_slab(0, 1)
            return
        for start in range(0, self.shape[0], depth):
            yield start, self.read_slab(start, min(start + depth, self.shape[0]))


def open_source(path: str | os.PathLike, dataset: str | None = None) -> Source:
    """Opens a TIFF stack, an HDF5 dataset or any volume `open_volume` reads, for streaming import."""
    path = str(path)
    if is_local(path) and not os.path.exists(local_path(path)):
        raise UserError(f"{path} does not exist.")
    suffix = Path(local_path(path)).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _tiff_source(local_path(path))
    if suffix in HDF5_SUFFIXES:
        return _hdf5_source(local_path(path), dataset)
    volume = open_volume(path)
    return Source(path, volume.shape, volume.dtype, volume.voxel_size,
                  lambda a, b: volume.read((slice(a, b),)), volume.format)


def _tiff_source(path: str) -> Source:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable TIFF file ({e}).") from None
    series = tif.series[0]
    shape = tuple(int(s) for s in series.shape)
    squeezed = tuple(s for s in shape[:-2] if s != 1) + shape[-2:]
    if len(squeezed) not in (2, 3) or "S" in series.axes:
        hint = ""
        if series.axes == "SYX":  # what tifffile.imwrite makes of a (3|4, y, x) stack unless told otherwise
            hint = (f" If these are {shape[0]} z-slices, re-save them as grey-value pages: "
                    "tifffile.imwrite(path, stack, photometric='minisblack').")
        raise UserError(f"{path} has axes {series.axes} of shape {shape}; expected a 2D (y, x) or 3D (z, y, x) grey-value stack (colour or multi-sample images are not EM volumes).{hint}")

    def read(a, b):
        if len(squeezed) == 2:
            return tif.asarray(key=0).reshape(squeezed)
        return tif.asarray(key=range(a, b)).reshape((b - a, *squeezed[1:]))

    return Source(path, squeezed, series.dtype, _tiff_voxel_size(tif, len(squeezed)), read, "tiff")


def _tiff_voxel_size(tif, ndim: int) -> tuple[float, ...] | None:
    """Voxel size in nm from ImageJ metadata (unit, spacing) and the resolution tags, if present."""
    meta = tif.imagej_metadata or {}
    unit = str(meta.get("unit", "")).replace("\\u00B5", "\u00b5").lower()
    if unit not in _UNIT_NM:
        return None
    page = tif.pages[0]
    try:
        yx = [page.tags[t].value for t in ("YResolution", "XResolution")]
        yx = [_UNIT_NM[unit] * den / num for num, den in yx]
    except (KeyError, ZeroDivisionError):
        return None
    if ndim == 2:
        return tuple(yx)
    if "spacing" not in meta:
        return None
    return (float(meta["spacing"]) * _UNIT_NM[unit], *yx)


def _hdf5_source(path: str, dataset: str | None) -> Source:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e}).") from None
    names = []
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    if dataset is None:
        if len(names) != 1:
            raise UserError(f"{path} holds {len(names)} datasets; choose one with --dataset ({', '.join(names) or 'none'}).")
        dataset = names[0]
    if dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
        raise UserError(f"{path} has no dataset {dataset!r} (datasets: {', '.join(names) or 'none'}).")
    ds = handle[dataset]
    if ds.ndim not in (2, 3):
        raise UserError(f"{path}:{dataset} has shape {ds.shape}; expected a 2D (y, x) or 3D (z, y, x) dataset.")
    return Source(f"{path}:{dataset}", ds.shape, ds.dtype, _hdf5_voxel_size(ds), lambda a, b: ds[a:b], "hdf5")


def _hdf5_voxel_size(ds) -> tuple[float, ...] | None:
    """Voxel size in nm from `resolution`/`voxel_size` (nm, CREMI) or `element_size_um` (ilastik)."""
    for key, scale in (("resolution", 1.0), ("voxel_size", 1.0), ("element_size_um", 1e3)):
        if key in ds.attrs:
            values = tuple(float(v) * scale for v in np.ravel(ds.attrs[key]))
            if len(values) == ds.ndim:
                return values
    return None


# ---------------------------------------------------------------- import


def import_volume(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    voxel_size: Sequence[float] | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    labels: bool | None = None,
    chunks: Sequence[int] | None = None,
    format: str = "ome-zarr",
) -> Volume:
    """Copies a TIFF stack, HDF5 dataset or volume into `dst` (an OME-Zarr group by default), slab by slab.

    voxel_size: nm (z, y, x) or (y, x); required unless the source records it. labels: mark the
    output as a label image (None: integer types wider than 16 bit are labels). An OME-Zarr source's
    translation (nm) is kept when the output is OME-Zarr (other formats have no place for it).
    Returns level 0.
    """
    source = open_source(src, dataset)
    voxel_size = tuple(float(v) for v in voxel_size) if voxel_size is not None else source.voxel_size
    if voxel_size is None:
        raise UserError(f"{src} does not record its voxel size; pass --voxel-size Z,Y,X in nm.")
    if len(voxel_size) != len(source.shape):
        raise UserError(f"voxel size {voxel_size} has {len(voxel_size)} values but {src} has {len(source.shape)} axes {source.shape}.")
    if labels is None:
        labels = source.dtype.kind in "iu" and source.dtype.itemsize > 2
    chunks = tuple(chunks) if chunks else default_import_chunks(source.shape, voxel_size, source.dtype)
    out = create_volume(dst, source.shape, source.dtype, voxel_size, chunks=chunks, overwrite=overwrite,
                        format=format, labels=labels)
    for start, slab in source.slabs(chunks[0]):
        out.write(slab, (start,) + (0,) * (len(source.shape) - 1))
    if format == "ome-zarr" and source.kind == "ome-zarr":
        copy_ome_translation(src, dst)
    return out


def default_import_chunks(shape, voxel_size, dtype) -> tuple[int, ...]:
    """Chunks of roughly equal physical extent: 128 px in-plane (64 for >16-bit types), z scaled by anisotropy."""
    side = 128 if np.dtype(dtype).itemsize <= 2 else 64
    if len(shape) == 2:
        return (min(side, shape[0]), min(side, shape[1]))
    z = side * voxel_size[1] / voxel_size[0]
    z = 2 ** max(0, round(math.log2(max(z, 1))))
    return (min(z, shape[0]), min(side, shape[1]), min(side, shape[2]))


# ---------------------------------------------------------------- pyramid


def pyramid_factors(voxel_size: Sequence[float], shape: Sequence[int], min_size: int = 32) -> tuple[int, ...]:
    """Per-axis downsampling factor (1 or 2) for the next level.

    Anisotropy-aware: an axis is halved only while its voxel is less than twice the finest one
    (so 40x4x4 nm halves y and x until they reach ~32 nm, then all three), and never below
    `min_size` voxels.
    """
    finest = min(voxel_size)
    return tuple(2 if v < 2 * finest and s >= 2 * min_size else 1 for v, s in zip(voxel_size, shape))


def downsample(block: np.ndarray, factors: Sequence[int], labels: bool) -> np.ndarray:
    """Downsamples `block` by integer `factors` per axis: mean for images, mode for labels.

    Partial windows at the far edges are padded by repeating the edge voxel; output shape is
    ceil(shape / factors).
    """
    factors = tuple(int(f) for f in factors)
    pad = [(0, -s % f) for s, f in zip(block.shape, factors)]
    block = np.pad(block, pad, mode="edge") if any(p for _, p in pad) else block
    split = [d for s, f in zip(block.shape, factors) for d in (s // f, f)]
    windows = block.reshape(split)
    window_axes = tuple(range(1, 2 * block.ndim, 2))
    if not labels:
        mean = windows.mean(axis=window_axes, dtype=np.float64)
        return (np.rint(mean) if block.dtype.kind in "iu" else mean).astype(block.dtype)
    windows = np.moveaxis(windows, window_axes, range(block.ndim, 2 * block.ndim))
    windows = windows.reshape(*windows.shape[: block.ndim], -1)
    votes = (windows[..., :, None] == windows[..., None, :]).sum(-1)
    return np.take_along_axis(windows, votes.argmax(-1)[..., None], -1)[..., 0]


def check_pyramid_sizes(levels: int | None, min_size: int) -> None:
    """UserError for a non-positive --levels (adds nothing) or --min-size (halves down to 1 voxel,
    about a thousand levels of one-voxel axes)."""
    if levels is not None and levels < 1:
        raise UserError(f"--levels {levels} must be at least 1 (leave it out to add levels until no axis can be halved).")
    if min_size < 1:
        raise UserError(f"--min-size {min_size} must be at least 1 voxel (the size below which an axis is not halved).")


def pyramid(path: str | os.PathLike, levels: int | None = None, labels: bool | None = None,
            min_size: int = 32, overwrite: bool = False, factors: Sequence[Sequence[int]] | None = None,
            region: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """Adds downsampled levels 1, 2, ... to the OME-Zarr group at `path`; returns each level's info.

    levels: how many levels to add at most (None: until no axis can be halved). labels: mode
    instead of mean (None: read from the group's metadata). Existing levels above 0 are replaced
    only with `overwrite`. factors: each new level's integer factors per spatial axis (default
    `pyramid_factors`). region: (start, stop) voxels per spatial axis of level 0 outside which it
    holds only zeros (only that part is downsampled). Level 0's translation is kept; level k's
    is that plus (voxel_size_k - voxel_size_0) / 2 nm (`ome_metadata`).
    """
    path = str(path)
    check_pyramid_sizes(levels, min_size)
    if detect_format(path) != "ome-zarr" or ome_multiscales(path) is None:
        raise UserError(f"{path} is not an OME-Zarr group; pyramids are written into groups made by `jaxem data import`.")
    attrs = read_attributes(path)
    if len(attrs["multiscales"][0]["datasets"]) > 1 and not overwrite:
        raise UserError(f"{path} already has {len(attrs['multiscales'][0]['datasets'])} levels; pass --overwrite to rebuild them.")
    if labels is None:
        labels = attrs.get("jaxem_kind") == "labels" or "image-label" in attrs
    translation = ome_translation(path)
    current = open_volume(path, level=0)
    spatial = [i for i, a in enumerate(current.axes) if a in "zyx"]
    box = [(0, s) for s in current.shape]
    for i, r in zip(spatial, region or ()):
        box[i] = tuple(r)
    voxel_sizes = [current.voxel_size]
    while levels is None or len(voxel_sizes) <= levels:
        step = _level_factors(current, spatial, min_size, factors, len(voxel_sizes) - 1)
        if max(step) == 1:
            break
        box = [(a // f, -(-b // f)) for (a, b), f in zip(box, step)]
        current = _write_level(path, current, step, len(voxel_sizes), labels, box)
        voxel_sizes.append(current.voxel_size)
    multiscales = ome_metadata(current.axes, voxel_sizes, name=attrs["multiscales"][0].get("name", ""),
                               translation=translation or None)
    write_attributes(path, {"multiscales": [multiscales]})
    return [open_volume(path, level=i).info() for i in range(len(voxel_sizes))]


def _level_factors(current: Volume, spatial, min_size, factors, index) -> list[int]:
    """Factors per axis (1 on channel axes) from level `index` to the next: factors[index], else pyramid_factors."""
    step = [1] * current.ndim
    if factors is not None:
        chosen = factors[index] if index < len(factors) else [1] * len(spatial)
    else:
        chosen = pyramid_factors(current.voxel_size, [current.shape[i] for i in spatial], min_size)
    for i, f in zip(spatial, chosen):
        step[i] = int(f)
    return step


def _write_level(path: str, source: Volume, factors, level: int, labels: bool, box) -> Volume:
    shape = tuple(-(-s // f) for s, f in zip(source.shape, factors))
    spatial_f = [f for f, a in zip(factors, source.axes) if a in "zyx"]
    voxel_size = tuple(v * f for v, f in zip(source.voxel_size, spatial_f))
    out = create_volume(join(path, str(level)), shape, source.dtype, voxel_size, chunks=source.chunks,
                        axes=source.axes, overwrite=True, labels=labels)

    def level_block(part):  # output block -> its input block, downsampled
        inside = tuple(slice(a * f, min(b * f, s)) for (a, b), f, s in zip(part, factors, source.shape))
        return downsample(source.read(inside), factors, labels), [a for a, _ in part]

    write_blocks(out, map(level_block, blocks(box, [2 * c for c in out.chunks])))
    return Volume(store=out.store, path=path, voxel_size=voxel_size, axes=source.axes, format="ome-zarr", level=level)


def blocks(box: Sequence[tuple[int, int]], block: Sequence[int]) -> Iterator[tuple[tuple[int, int], ...]]:
    """The parts of `box` ((start, stop) voxels per axis) on the grid of `block`-sized cells, so two
    parts never share a chunk when `block` is a multiple of the chunks."""
    axes = [[(max(c, a), min(c + s, b)) for c in range(a - a % s, b, s)] for (a, b), s in zip(box, block)]
    return itertools.product(*axes)


def write_blocks(out: Volume, parts: Iterator[tuple[np.ndarray, Sequence[int]]], in_flight: int = 8) -> None:
    """Writes each (array, corner) of `parts` into `out`, with at most `in_flight` writes pending."""
    futures = []
    for array, corner in parts:
        futures.append(out.write_async(array, corner))
        if len(futures) > in_flight:
            futures.pop(0).result()
    for future in futures:
        future.result()


# ---------------------------------------------------------------- labels of an image

LABEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_labels_of(image: str, name: str, shape: Sequence[int], voxel_size: Sequence[float],
                    translation: Sequence[float], axes: Sequence[str], overwrite: bool = False) -> tuple[int, ...]:
    """Where a label volume lands in the OME-Zarr image `image`: its offset in voxels of image level 0.

    shape/axes: the labels' spatial shape and axis names; voxel_size, translation: nm per axis
    (translation: the first voxel's centre). UserError (one sentence naming the path) when `image`
    is no OME-Zarr v0.4 image, the labels lie off its voxel grid or outside it, `name` is not a plain
    name, or IMAGE/labels/`name` exists and `overwrite` is off. Reads only metadata.
    """
    attrs = read_attributes(image) if read_json(image, ".zgroup") is not None else {}
    if "multiscales" not in attrs or "image-label" in attrs:
        raise UserError(f"--labels-of {image} is not an OME-Zarr (v0.4, zarr v2) image group; "
                        "import the raw volume with `jaxem data import` first.")
    if not LABEL_NAME.fullmatch(name):
        raise UserError(f"--labels-name {name!r} for {image} must be a plain name (letters, digits, '_', '.', '-').")
    base = open_volume(image)
    spatial = [i for i, a in enumerate(base.axes) if a in "zyx"]
    image_axes, image_shape = [base.axes[i] for i in spatial], [base.shape[i] for i in spatial]
    if list(axes) != image_axes or not np.allclose(voxel_size, base.voxel_size, rtol=1e-6):
        raise UserError(f"the labels ({', '.join(axes)} at {tuple(voxel_size)} nm) are not on the voxel grid of "
                        f"{image} ({', '.join(image_axes)} at {base.voxel_size} nm).")
    origin = ome_translation(image)
    offset = (np.asarray(translation, float) - origin) / np.asarray(voxel_size, float)
    corner = np.rint(offset).astype(int)
    if np.abs(offset - corner).max() > 1e-3 or (corner < 0).any() or (corner + shape > image_shape).any():
        raise UserError(f"the labels (shape {tuple(shape)} at {tuple(offset.round(3))} voxels) do not fit on the voxel "
                        f"grid of {image} (shape {tuple(image_shape)}).")
    group = join(image, "labels", name)
    if not overwrite and (name in read_attributes(join(image, "labels")).get("labels", []) or _exists(group)):
        raise UserError(f"{group} already exists; pass --overwrite to replace it.")
    return tuple(int(c) for c in corner)


def write_labels_of(labels: str | os.PathLike, image: str | os.PathLike, name: str = "segmentation",
                    overwrite: bool = False, min_size: int = 32) -> list[dict]:
    """Writes the label volume `labels` as the OME-Zarr label image IMAGE/labels/`name`, multiscale.

    Level 0 has the image's spatial shape and voxel grid, the labels placed at their translation
    (zeros elsewhere, not stored); levels 1, 2, ... take the mode over the same windows as the
    image's own levels (or, for a single-level image, those `jaxem data pyramid` would add). The
    image's arrays and metadata are untouched but for the `labels` group listing; a local label
    image is written beside its place and renamed into it when complete. Returns its levels' info.
    """
    image, source = str(image), open_volume(labels)
    offset = check_labels_of(image, name, source.shape, source.voxel_size, ome_translation(labels) or
                             (0.0,) * source.ndim, source.axes, overwrite)
    base = open_volume(image)
    shape = [s for s, a in zip(base.shape, base.axes) if a in "zyx"]
    region = [(o, o + s) for o, s in zip(offset, source.shape)]
    group = join(image, "labels", name)
    with staged(group, overwrite, "--labels-name") as target:
        out = create_volume(target, shape, source.dtype, source.voxel_size, axes=source.axes, overwrite=overwrite,
                            format="ome-zarr", labels=True,
                            chunks=default_import_chunks(shape, source.voxel_size, source.dtype))
        set_ome_translation(target, ome_translation(image))
        write_attributes(target, {"image-label": {"version": "0.4", "source": {"image": "../../"}}})
        write_blocks(out, ((source.read(tuple(slice(a - o, b - o) for (a, b), o in zip(part, offset))),
                            [a for a, _ in part]) for part in blocks(region, [2 * c for c in out.chunks])))
        levels = pyramid(target, labels=True, min_size=min_size, overwrite=True, factors=_image_factors(image),
                         region=region)
    _list_label(image, name)
    return [open_volume(group, level=i).info() for i in range(len(levels))]


def _list_label(image: str, name: str) -> None:
    """Adds `name` to the `labels` listing of IMAGE/labels (a zarr v2 group made when missing)."""
    listing = join(image, "labels")
    if read_json(listing, ".zgroup") is None:
        write_json(listing, ".zgroup", {"zarr_format": 2})
    names = read_attributes(listing).get("labels", [])
    write_attributes(listing, {"labels": names + [name] if name not in names else names})


def _image_factors(image: str) -> list[list[int]] | None:
    """Integer factors between successive levels of `image` (spatial axes), up to the first level
    that is no integer multiple of the one before; None when there are none (single level)."""
    sizes = ome_voxel_sizes(image)
    if len(sizes) == 1:
        return None
    factors = []
    for finer, coarser in zip(sizes, sizes[1:]):
        ratio = np.asarray(coarser) / np.asarray(finer)
        if np.abs(ratio - np.rint(ratio)).max() > 1e-6 or (np.rint(ratio) < 1).any():
            break
        factors.append([int(r) for r in np.rint(ratio)])
    return factors or None


def _exists(path: str) -> bool:
    try:
        detect_format(path)
    except UserError:
        return is_local(path) and os.path.exists(local_path(path))
    return True


# ---------------------------------------------------------------- info


def describe(path: str | os.PathLike, dataset: str | None = None) -> dict:
    """Shape, dtype, chunks, voxel size (nm) and format of a volume, TIFF or HDF5 file, JSON-ready.

    For an OME-Zarr group, also every level's shape and voxel size, level 0's translation (nm) and
    the names of its label images (IMAGE/labels).
    """
    path = str(path)
    suffix = Path(local_path(path)).suffix.lower()
    if suffix in TIFF_SUFFIXES + HDF5_SUFFIXES:
        source = open_source(path, dataset)
        return {"path": path, "format": source.kind, "shape": list(source.shape), "dtype": source.dtype.name,
                "chunks": None, "voxel_size": list(source.voxel_size) if source.voxel_size else None}
    volume = open_volume(path)
    info = volume.info()
    if volume.format == "ome-zarr":
        datasets = ome_multiscales(path)["datasets"]
        info["levels"] = [{"shape": list(v.shape), "voxel_size": list(v.voxel_size)}
                          for v in (open_volume(path, level=i) for i in range(len(datasets)))]
        info["translation"] = list(ome_translation(path))
        info["labels"] = read_attributes(join(path, "labels")).get("labels", [])
    return info
