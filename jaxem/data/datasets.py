"""Registry of named EM datasets: where to get them, checksums, voxel size, labels, splits.

A dataset is downloaded once into `$JAXEM_DATA/<name>/downloads/` (default root
`~/.cache/jaxem`), checked against its sha256, and prepared into one OME-Zarr group per split
part: `$JAXEM_DATA/<name>/<split>/<part>/image.zarr` and `labels.zarr` (labels converted to
instance ids, 0 = background/membrane, or to a 0/1 mask where the dataset is semantic). `READY.json`
marks a prepared dataset. `load_dataset(name, split)` returns the volumes; `split_paths` returns
their paths for `config.data.train_images` and friends.

`synthetic` and `synthetic_mito` need no download: they are generated (deterministically) on first
use. `synthetic_mito` is the Lucchi stand-in: isotropic 5 nm synthetic EM whose labels are the
mitochondria mask (synthetic class 2), shapes per split in `SYNTHETIC_MITO_SHAPES`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxem.data import synthetic
from jaxem.data.formats import default_import_chunks, open_source
from jaxem.data.volume import Volume, create_volume, open_volume
from jaxem.errors import UserError

SPECIAL_ID_MIN = np.uint64(2**64 - 10)  # CREMI: ids above this (uint64(-9) .. uint64(-1)) mean "no label"

@dataclass(frozen=True)
class File:
    """A file to download: its name on disk, official URL and sha256 (None: not yet recorded)."""

    name: str
    url: str
    sha256: str | None = None
    member: str | None = None  # for a .zip: the file inside to extract as `name`


@dataclass(frozen=True)
class Ref:
    """One array: a downloaded file (+ HDF5 dataset), a z range, and how to convert its values."""

    file: str
    dataset: str | None = None
    z: tuple[int, int] | None = None
    convert: str = "none"  # none | interior_to_instances_2d | mask | cremi_neuron_ids


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    voxel_size: tuple[float, float, float]
    labels: str  # what the prepared labels mean
    homepage: str
    citation: str
    files: tuple[File, ...] = ()
    splits: dict = field(default_factory=dict)  # split -> {part: (image Ref, labels Ref | None)}


_ISBI = "http://brainiac2.mit.edu/isbi_challenge/sites/default/files/"
_LUCCHI = "https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/"
_SNEMI = "http://brainiac2.mit.edu/SNEMI3D/sites/default/files/"
_CREMI = "https://cremi.org/static/data/"

# (z, y, x) voxels per split of `synthetic_mito`: at 5 nm, 96x256x256 holds ~10-20 mitochondria
# (the generator places ~30 per cubic micrometre) and takes ~8 s to generate on a 2-core CPU.
SYNTHETIC_MITO_SHAPES = {"train": (96, 256, 256), "val": (48, 192, 192), "test": (128, 256, 256)}
GENERATED = ("synthetic", "synthetic_mito")  # prepared on first use, no download

REGISTRY: dict[str, Dataset] = {
    "synthetic": Dataset(
        name="synthetic",
        description="generated ssTEM-like neuropil (jaxem.data.synthetic), 16x256x256 per part",
        voxel_size=(40.0, 4.0, 4.0),
        labels="instance ids, 0 = membrane",
        homepage="embedded",
        citation="jaxem",
        splits={s: {"0": (Ref(f"seed{i}"), Ref(f"seed{i}"))} for i, s in enumerate(("train", "val", "test"))},
    ),
    "synthetic_mito": Dataset(
        name="synthetic_mito",
        description="generated isotropic 5 nm EM (jaxem.data.synthetic), mitochondria mask; a stand-in for lucchi",
        voxel_size=(5.0, 5.0, 5.0),
        labels="mitochondria mask, 1 = mitochondrion, 0 = background",
        homepage="embedded",
        citation="jaxem",
        splits={s: {"0": (Ref(f"seed{i}"), Ref(f"seed{i}", convert="mask"))} for i, s in enumerate(("train", "val", "test"))},
    ),
    "isbi2012": Dataset(
        name="isbi2012",
        description="ISBI 2012 neuron membranes, ssTEM of Drosophila larva VNC, 20 labelled + 30 test slices",
        voxel_size=(50.0, 4.0, 4.0),
        labels="instance ids by 2D connected components of the interior (255) per slice, 0 = membrane",
        homepage="https://imagej.net/events/isbi-2012-segmentation-challenge",
        citation="Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; Cardona et al. 2010",
        # sha256 of the PNG-derived copies (zhixuhao/unet, stacked to zlib TIFFs); the challenge's
        # own TIFFs have other bytes: fetch those with --no-verify.
        files=(
            File("train-volume.tif", _ISBI + "train-volume.tif", "5d1797691a36529bb1ac15c1ccb873d2511ca536fd788626ba1c3be376189c92"),
            File("train-labels.tif", _ISBI + "train-labels.tif", "9a60ad87e71559ff3f1d3630a6e0155f153fb0380cd07bc11f457946bc5b17b1"),
            File("test-volume.tif", _ISBI + "test-volume.tif", "44ca05e57cc211c225f88c3d40d6805986b78b0062aea3fd59fcc6bb7fa985dd"),
        ),
        splits={
            "train": {"0": (Ref("train-volume.tif", z=(0, 16)), Ref("train-labels.tif", z=(0, 16), convert="interior_to_instances_2d"))},
            "val": {"0": (Ref("train-volume.tif", z=(16, 20)), Ref("train-labels.tif", z=(16, 20), convert="interior_to_instances_2d"))},
            "test": {"0": (Ref("test-volume.tif"), None)},
        },
    ),
    "lucchi": Dataset(
        name="lucchi",
        description="EPFL hippocampus CA1 FIB-SEM, mitochondria, 165x768x1024 train + test",
        voxel_size=(5.0, 5.0, 5.0),
        labels="mitochondria mask, 1 = mitochondrion, 0 = background",
        homepage="https://www.epfl.ch/labs/cvlab/data/data-em/",
        citation="Lucchi et al. 2012, IEEE TMI 31(2)",
        files=(
            File("training.tif", _LUCCHI + "training.tif"),
            File("training_groundtruth.tif", _LUCCHI + "training_groundtruth.tif"),
            File("testing.tif", _LUCCHI + "testing.tif"),
            File("testing_groundtruth.tif", _LUCCHI + "testing_groundtruth.tif"),
        ),
        splits={
            # val: the last 32 slices, so that 3D crops 32 voxels deep fit (configs/lucchi_mito.py)
            "train": {"0": (Ref("training.tif", z=(0, 133)), Ref("training_groundtruth.tif", z=(0, 133), convert="mask"))},
            "val": {"0": (Ref("training.tif", z=(133, 165)), Ref("training_groundtruth.tif", z=(133, 165), convert="mask"))},
            "test": {"0": (Ref("testing.tif"), Ref("testing_groundtruth.tif", convert="mask"))},
        },
    ),
    "snemi3d": Dataset(
        name="snemi3d",
        description="SNEMI3D mouse cortex ATUM-SEM, 100x1024x1024 labelled + 100 test slices",
        voxel_size=(30.0, 6.0, 6.0),
        labels="dense 3D neuron instance ids as distributed",
        homepage="https://snemi3d.grand-challenge.org/",
        citation="Kasthuri et al. 2015, Cell 162(3)",
        files=(
            File("train-input.tif", _SNEMI + "train-input.zip", member="train-input.tif"),
            File("train-labels.tif", _SNEMI + "train-labels.zip", member="train-labels.tif"),
            File("test-input.tif", _SNEMI + "test-input.zip", member="test-input.tif"),
        ),
        splits={
            "train": {"0": (Ref("train-input.tif", z=(0, 80)), Ref("train-labels.tif", z=(0, 80)))},
            "val": {"0": (Ref("train-input.tif", z=(80, 100)), Ref("train-labels.tif", z=(80, 100)))},
            "test": {"0": (Ref("test-input.tif"), None)},
        },
    ),
    "cremi": Dataset(
        name="cremi",
        description="CREMI adult Drosophila brain ssTEM, samples A, B, C (125x1250x1250 each, HDF5)",
        voxel_size=(40.0, 4.0, 4.0),
        labels="neuron_ids (uint64) as distributed, CREMI's no-label ids (> uint64(-10)) -> 0",
        homepage="https://cremi.org/data/",
        citation="CREMI challenge, Funke et al. 2016",
        files=tuple(File(f"sample_{s}_20160501.hdf", f"{_CREMI}sample_{s}_20160501.hdf") for s in "ABC"),
        splits={
            split: {
                s: (Ref(f"sample_{s}_20160501.hdf", "volumes/raw", z),
                    Ref(f"sample_{s}_20160501.hdf", "volumes/labels/neuron_ids", z, convert="cremi_neuron_ids"))
                for s in "ABC"
            }
            for split, z in (("train", (0, 100)), ("val", (100, 125)))
        },
    ),
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets live: `root`, else $JAXEM_DATA, else ~/.cache/jaxem."""
    return Path(root or os.environ.get("JAXEM_DATA") or Path.home() / ".cache" / "jaxem").expanduser()


def get(name: str) -> Dataset:
    """The registry entry for `name`; UserError with close names when there is none."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown dataset {name!r}: {hint}known datasets are {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def is_prepared(name: str, root=None) -> bool:
    return (data_root(root) / name / "READY.json").is_file()


def list_datasets(root=None) -> list[dict]:
    """One row per registered dataset: name, whether it is prepared, its folder, voxel size, description."""
    return [
        {"name": d.name, "present": is_prepared(d.name, root), "path": str(data_root(root) / d.name),
         "voxel_size": list(d.voxel_size), "splits": list(d.splits), "description": d.description}
        for d in REGISTRY.values()
    ]


# ---------------------------------------------------------------- download


def download(name: str, root=None, url_base: str | None = None, verify: bool = True,
             overwrite: bool = False, progress: bool = True) -> Path:
    """Downloads, verifies and prepares dataset `name`; returns its folder.

    url_base: fetch every file from `url_base/<url file name>` instead of the official location (a
    mirror, or file:// for local copies). Files already present with the right checksum are kept.
    """
    spec = get(name)
    folder = data_root(root) / name
    if is_prepared(name, root) and not overwrite:
        return folder
    downloads = folder / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for item in spec.files:
        url = item.url if url_base is None else url_base.rstrip("/") + "/" + item.url.rsplit("/", 1)[-1]
        checksums[item.name] = _fetch_file(item, url, downloads, verify, progress)
    prepare(name, root, overwrite=True, checksums=checksums)
    return folder


def _fetch_file(item: File, url: str, downloads: Path, verify: bool, progress: bool) -> str:
    """Downloads `url` (extracting `item.member` from a zip) to downloads/item.name; returns its sha256."""
    target = downloads / item.name
    if target.is_file() and (not verify or item.sha256 in (None, sha256sum(target))):
        return sha256sum(target)
    expected = item.sha256 if verify else None
    if not item.member:
        return fetch(url, target, expected, progress)
    fetched = downloads / url.rsplit("/", 1)[-1]
    fetch(url, fetched, None, progress)
    part = target.with_name(target.name + ".part")
    try:
        with zipfile.ZipFile(fetched) as archive, archive.open(item.member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        part.unlink(missing_ok=True)
        raise UserError(f"{fetched} from {url} is not a zip holding {item.member} ({e}).") from None
    finally:
        fetched.unlink(missing_ok=True)
    digest = sha256sum(part)
    if expected and digest != expected:
        part.unlink()
        raise UserError(f"checksum mismatch for {item.name} from {url}: expected sha256 {expected}, got {digest}.")
    os.replace(part, target)
    return digest


def fetch(url: str, dest: Path, expected: str | None = None, progress: bool = True) -> str:
    """Streams `url` to `dest` with a progress bar; verifies sha256 `expected`; renames atomically.

    Returns the sha256. On a checksum mismatch or a failed download nothing is left at `dest`.
    """
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}).") from None
    if expected and digest.hexdigest() != expected:
        part.unlink()
        raise UserError(f"checksum mismatch for {dest.name} from {url}: expected sha256 {expected}, got {digest.hexdigest()}.")
    os.replace(part, dest)
    return digest.hexdigest()


def sha256sum(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- prepare and load


def prepare(name: str, root=None, overwrite: bool = False, checksums: dict | None = None) -> Path:
    """Converts downloaded files (or, for GENERATED datasets, generated volumes) into per-split OME-Zarr groups."""
    spec = get(name)
    folder = data_root(root) / name
    if is_prepared(name, root) and not overwrite:
        return folder
    for split, parts in spec.splits.items():
        for part, (image_ref, labels_ref) in parts.items():
            out = folder / split / part
            if name in GENERATED:
                _write_generated(name, split, out, int(image_ref.file[len("seed"):]), spec.voxel_size)
                continue
            _write_ref(folder / "downloads", image_ref, out / "image.zarr", spec.voxel_size, labels=False)
            if labels_ref is not None:
                _write_ref(folder / "downloads", labels_ref, out / "labels.zarr", spec.voxel_size, labels=True)
    (folder / "READY.json").write_text(json.dumps({"name": name, "sha256": checksums or {}}, indent=2) + "\n")
    return folder


def _write_generated(name: str, split: str, out: Path, seed: int, voxel_size) -> None:
    """Generates one part of a GENERATED dataset into out/{image,labels}.zarr."""
    if name == "synthetic":
        em = synthetic.generate((16, 256, 256), voxel_size=voxel_size, seed=seed)
        labels = em.instances
    else:
        em = synthetic.generate(SYNTHETIC_MITO_SHAPES[split], voxel_size=voxel_size, seed=seed)
        labels = (em.semantic == synthetic.MITOCHONDRION).astype(np.uint8)
    for key, array, is_labels in (("image", em.raw, False), ("labels", labels, True)):
        create_volume(out / f"{key}.zarr", array.shape, array.dtype, voxel_size, format="ome-zarr",
                      labels=is_labels, overwrite=True).write(array)


def _write_ref(downloads: Path, ref: Ref, dest: Path, voxel_size, labels: bool) -> None:
    path = downloads / ref.file
    if not path.is_file():
        raise UserError(f"{path} is missing; run `jaxem data download` for this dataset.")
    source = open_source(path, ref.dataset)
    if ref.convert == "cremi_neuron_ids":
        _check_unpadded(path, ref.dataset)
    z0, z1 = ref.z or (0, source.shape[0])
    if len(source.shape) != 3 or z1 > source.shape[0]:
        raise UserError(f"{path} has shape {source.shape}; expected a (z, y, x) stack with at least {z1} slices.")
    shape = (z1 - z0, *source.shape[1:])
    dtype = {"interior_to_instances_2d": np.uint32, "mask": np.uint8}.get(ref.convert, source.dtype)
    chunks = default_import_chunks(shape, voxel_size, dtype)
    out = create_volume(dest, shape, dtype, voxel_size, chunks=chunks, format="ome-zarr", labels=labels, overwrite=True)
    next_id = 0
    for start in range(z0, z1, chunks[0]):
        slab = source.read_slab(start, min(start + chunks[0], z1))
        slab, next_id = _convert(slab, ref.convert, next_id)
        out.write(slab.astype(dtype), (start - z0, 0, 0))


def _check_unpadded(path: Path, dataset: str) -> None:
    """UserError when the HDF5 `dataset` has a non-zero `offset` attribute: CREMI's padded files
    place their labels at that offset (nm) inside a larger raw volume, so raw and labels do not align."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = np.ravel(f[dataset].attrs.get("offset", 0.0))
    if np.any(offset != 0):
        raise UserError(f"{path} is a padded CREMI file ({dataset} has offset {offset.tolist()} nm in the raw "
                        "volume); use the unpadded sample_<X>_20160501.hdf, whose raw and labels align.")


def clear_special_ids(labels: np.ndarray) -> np.ndarray:
    """`labels` with CREMI's "no label" ids (uint64 above SPECIAL_ID_MIN, e.g. uint64(-1)) set to
    0, in place for a uint64 array (other dtypes cannot hold them and are returned as they are)."""
    if labels.dtype == np.uint64:
        labels[labels > SPECIAL_ID_MIN] = 0
    return labels


def _convert(slab: np.ndarray, how: str, next_id: int) -> tuple[np.ndarray, int]:
    """Applies a label conversion to a (k, y, x) slab; ids stay unique across slabs via `next_id`."""
    if how == "cremi_neuron_ids":
        return clear_special_ids(np.array(slab)), next_id
    if how == "mask":
        return (slab > 0).astype(np.uint8), next_id
    if how == "interior_to_instances_2d":
        import cc3d

        out = np.zeros(slab.shape, np.uint32)
        for i, plane in enumerate(slab):  # one 2D labelling per section, as the challenge defines cells
            ids = cc3d.connected_components(plane > 0, connectivity=4).astype(np.uint32)
            out[i] = np.where(ids > 0, ids + next_id, 0)
            next_id += int(ids.max())
        return out, next_id
    return slab, next_id


def load_dataset(name: str, split: str, root=None) -> list[tuple[Volume, Volume | None]]:
    """The (image, labels or None) volumes of one split; GENERATED datasets are generated on first use."""
    images, labels = split_paths(name, split, root)
    pairs = [(open_volume(i), open_volume(l) if l else None) for i, l in zip(images, labels)]
    for image, label in pairs:
        check_pair(image, label)
    return pairs


def check_pair(image: Volume, labels: Volume | None) -> None:
    """UserError unless `labels` (if any) has the shape of `image`."""
    if labels is not None and labels.shape != image.shape:
        raise UserError(f"labels {labels.path} have shape {labels.shape} but their image {image.path} has {image.shape}.")


def split_paths(name: str, split: str, root=None) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """(image paths, label paths or None) of one split, e.g. for config.data.train_images/train_labels."""
    spec = get(name)
    if split not in spec.splits:
        raise UserError(f"dataset {name} has no split {split!r} (splits: {', '.join(spec.splits)}).")
    if not is_prepared(name, root):
        if name not in GENERATED:
            raise UserError(f"dataset {name} is not in {data_root(root)}; run `jaxem data download {name}` first.")
        prepare(name, root)
    folder = data_root(root) / name / split
    images, labels = [], []
    for part, (_, labels_ref) in spec.splits[split].items():
        images.append(str(folder / part / "image.zarr"))
        labels.append(str(folder / part / "labels.zarr") if labels_ref is not None else None)
    return tuple(images), tuple(labels)
