"""Prediction outputs: a chunked zarr v2 array with voxel size, axes, ROI offset and job metadata.

The array is written at the output path itself, so `jaxem.data.volume.open_volume`, neuroglancer
(zarr:// source) and napari open it directly; its attributes also carry an OME-NGFF 0.4
`multiscales` entry (scale = voxel size, translation = ROI offset in nm) for tools that read it.
Readers here also accept a real OME-Zarr group (the array at `0`). The attributes record the job
that wrote the array (`jaxem_job`): a rerun of the same job resumes, a different one is refused
unless `--overwrite`.
"""

from __future__ import annotations

import os

import tensorstore as ts

from jaxem.data.volume import Volume, create_volume, is_local, kvstore_spec, local_path, open_volume, read_attributes, write_attributes
from jaxem.errors import UserError


def array_path(path: str) -> str:
    """The array inside an OME-Zarr group (`path/0`), or `path` itself for a plain array."""
    return path.rstrip("/") + "/0" if _has_key(path, ".zgroup") else path


def open_array(path: str, mode: str = "r") -> Volume:
    """Opens a plain zarr array or the full-resolution array of an OME-Zarr group."""
    return open_volume(array_path(path), mode)


def create_output(path, shape, dtype, voxel_size, chunks, axes, offset, job: dict, overwrite: bool) -> tuple[Volume, bool]:
    """Creates (or reopens, for the same job) the output array; returns (array, resumed)."""
    path = str(path)
    if _exists(path) and not overwrite:
        if read_attributes(path).get("jaxem_job") == job:
            return open_volume(path, "r+"), True
        raise UserError(f"output {path} already exists and was written by a different job; pass --overwrite to replace it.")
    if _exists(path) and is_local(path):
        import shutil

        shutil.rmtree(local_path(path))  # also removes the done log of the previous job
    array = create_volume(path, shape, dtype, voxel_size, chunks=chunks, axes=axes, overwrite=True)
    write_attributes(path, {"offset": [int(o) for o in offset], "multiscales": [_multiscales(axes, voxel_size, offset)],
                            "jaxem_job": job})
    return array, False


def _multiscales(axes, voxel_size, offset) -> dict:
    spatial = [a for a in axes if a in "zyx"]
    kinds = [{"name": a, "type": "space", "unit": "nanometer"} if a in "zyx" else {"name": a, "type": "channel"} for a in axes]
    lead = [1.0] * (len(axes) - len(spatial))
    translation = [0.0] * len(lead) + [float(o) * float(v) for o, v in zip(offset, voxel_size)]
    return {
        "version": "0.4",
        "axes": kinds,
        "datasets": [{"path": ".", "coordinateTransformations": [
            {"type": "scale", "scale": lead + [float(v) for v in voxel_size]},
            {"type": "translation", "translation": translation},
        ]}],
    }


def _exists(path: str) -> bool:
    if is_local(path):
        p = local_path(path)
        return os.path.exists(p) and bool(os.listdir(p))
    return _has_key(path, ".zgroup") or _has_key(path, ".zarray")


def _has_key(path: str, key: str) -> bool:
    try:
        kv = ts.KvStore.open(kvstore_spec(path)).result()
        return kv.read(key).result().state == "value"
    except Exception:
        return False
