"""Prediction outputs: an OME-Zarr (NGFF v0.4) group written through `jaxem.data.volume`.

The group at the output path holds the probabilities as its level `0` array, (c, z, y, x) or
(c, y, x), with `multiscales` metadata (scale = voxel size in nm, translation = the input's own
translation + the ROI offset, in nm), so `open_volume(path)`, napari and neuroglancer open it
directly. The group attributes also record the ROI `offset` (voxels) and the job that wrote it
(`jaxem_job`): a rerun of the same job resumes, a different one is refused unless `overwrite`
(or unless the earlier run finished no chunk).
The per-chunk done markers (`jaxem_done/...`, `DoneLog`) live inside the group.
"""

from __future__ import annotations

import os

import tensorstore as ts

from jaxem.data.volume import (
    Volume, create_volume, is_local, kvstore_spec, local_path, open_volume, ome_translation, read_attributes,
    set_ome_translation, stored, write_attributes,
)
from jaxem.errors import UserError

DONE_PREFIX = "jaxem_done/"


def create_output(path, shape, dtype, voxel_size, chunks, axes, offset, job: dict, overwrite: bool) -> tuple[Volume, bool]:
    """Creates (or reopens, for the same job) the output group; returns (level-0 volume, resumed).

    shape/chunks: (channels, *spatial) voxels; voxel_size: spatial nm; offset: the ROI start in
    voxels of the input volume; job: a JSON-ready description compared on resume. The translation
    (nm) is the input's own (job["input"], when an OME-Zarr group records one) + offset * voxel_size.
    """
    path = str(path)
    refuse_other_job(path, job, overwrite)
    if stored(path):
        if not overwrite and read_attributes(path).get("jaxem_job") == job:
            return open_volume(path, "r+", format="ome-zarr"), True
        clear_done(path)  # a remote store keeps keys create_volume does not know about
    volume = create_volume(path, shape, dtype, voxel_size, chunks=chunks, axes=axes, overwrite=True, format="ome-zarr")
    origin = (ome_translation(job["input"]) if job.get("input") else ()) or (0.0,) * len(voxel_size)
    set_ome_translation(path, [t + float(o) * float(v) for t, o, v in zip(origin, offset, voxel_size)])
    write_attributes(path, {"offset": [int(o) for o in offset], "jaxem_job": job})
    return volume, False


def refuse_other_job(path, job: dict, overwrite: bool) -> None:
    """UserError when `path` holds the output of a different job and `overwrite` is off (read only).
    A prediction output without one finished chunk (its run stopped first) holds nothing to keep
    and is not refused: the next job replaces it."""
    if stored(path) and not overwrite and read_attributes(path).get("jaxem_job") != job and not unstarted(path):
        raise UserError(f"output {path} already exists and was written by a different job; pass --overwrite to replace it.")


def unstarted(path) -> bool:
    """True when `path` is a prediction output (it records its job) with no finished chunk."""
    if "jaxem_job" not in read_attributes(path):
        return False
    kv = ts.KvStore.open(kvstore_spec(str(path))).result()
    return not kv.list(ts.KvStore.KeyRange(DONE_PREFIX, DONE_PREFIX[:-1] + "0")).result()


def clear_done(path: str) -> None:
    """Deletes the done markers of a previous job under `path` (any kvstore)."""
    if is_local(path) and not os.path.isdir(os.path.join(local_path(path), DONE_PREFIX)):
        return
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    kv.delete_range(ts.KvStore.KeyRange(DONE_PREFIX, DONE_PREFIX[:-1] + "0")).result()


class DoneLog:
    """Which output chunks are finished: one empty key per chunk inside the output group, written
    only after the chunk's own write has landed (so a killed run resumes from what is on disk)."""

    def __init__(self, output_path: str):
        self.kv = ts.KvStore.open(kvstore_spec(output_path)).result()

    @staticmethod
    def key(index) -> str:
        return DONE_PREFIX + "_".join(map(str, index))

    def done(self) -> set[tuple[int, ...]]:
        keys = self.kv.list(ts.KvStore.KeyRange(DONE_PREFIX, DONE_PREFIX[:-1] + "0")).result()
        return {tuple(int(v) for v in k.decode()[len(DONE_PREFIX):].split("_")) for k in keys}

    def mark(self, index) -> None:
        self.kv.write(self.key(index), b"").result()
