"""The choices nnU-Net makes from a dataset's fingerprint, each with the reason it was made.

    choose_dimensionality(fp)      2D, anisotropic 3D or isotropic 3D (voxel size, depth, objects)
    choose_normalisation(stats)    per-volume z-score, or percentile scaling for heavy tails
    choose_augmentation(kind, ..)  3D rotations and transposes for isotropic voxels only
    choose_segmentation(target,..) the method and settings turning predictions into instances

Each returns a decision {"fields": {dotted config key: value}, "why": one sentence with the
numbers}; `planner.write_config` writes the fields under their reason as a comment.
"""

from __future__ import annotations

import math
from typing import Sequence

import fastremap
import numpy as np
from scipy import ndimage

from jaxem.data.volume import open_volume
from jaxem.errors import UserError
from jaxem.segment.setting import SegmentSetting

# nnU-Net (Isensee et al. 2021; ExperimentPlanner.anisotropy_threshold = 3): a dataset whose
# coarsest spacing is more than 3x its finest is anisotropic (separate z resampling, in-plane-only
# "dummy 2D" augmentation). Serial-section EM (40 x 4 x 4 nm: 10) is; FIB-SEM (8 x 8 x 8 nm) is not.
ANISOTROPY_THRESHOLD = 3.0
# Fewer sections than this leave a 3D U-Net nothing to pool along z (the topology pools an axis
# only while it keeps >= 2 x 4 voxels): plan 2D.
MIN_SECTIONS_3D = 8
# Labelled objects spanning fewer sections than this (median) give a 3-section kernel no context
# beyond them (e.g. labels drawn section by section): plan 2D.
MIN_OBJECT_SECTIONS = 3
# std / (IQR / 1.349): 1 for a Gaussian, 1.38 for a Laplace. Above this the tails, not the bulk,
# set a z-score's scale and squeeze the bulk's contrast: scale by percentiles instead.
HEAVY_TAIL_RATIO = 1.5
# nnU-Net's CT rule clips to the foreground's 0.5 / 99.5 percentiles.
PERCENTILES = (0.5, 99.5)
OBJECT_VOXELS = 1 << 22  # voxels of each label volume read to measure object extents

# target kind -> (prediction kind of `jaxem segment`/`tune`, method, channel)
SEGMENTATION = {
    "boundary": ("boundary", "watershed", 0),  # seeds from the membrane map's distance transform
    "affinities": ("affinities", "mws", 0),  # mutex watershed: no threshold to choose
    "foreground": ("foreground", "cc", 0),  # semantic: connected components
    "multiclass": ("foreground", "cc", 1),  # class 1's probability, connected components
    "distance": ("foreground", "watershed", 0),  # the distance map's peaks seed the objects
}


def object_extents(paths: Sequence[str], voxels: int = OBJECT_VOXELS) -> dict:
    """Median extent of the labelled instances (ids > 0) in a central box of about `voxels`
    voxels of each label volume (every section up to 64): {"count", "z_sections", "yx_voxels"};
    z_sections is 1 for (y, x) volumes, 0 when nothing is labelled."""
    z, yx = [], []
    for path in paths:
        volume = open_volume(path)
        ids = volume.read(_central_box(volume.shape, voxels))
        if ids.dtype.kind not in "ui":  # whole-number float or boolean labels, as the loader takes them
            ids = ids.astype(np.int64)
        ids = fastremap.renumber(np.ascontiguousarray(ids))[0]
        ids = ids.reshape((1,) * (3 - ids.ndim) + ids.shape)
        for box in ndimage.find_objects(ids):
            if box is not None:
                z.append(box[0].stop - box[0].start)
                yx.append(max(box[1].stop - box[1].start, box[2].stop - box[2].start))
    median = lambda xs: float(np.median(xs)) if xs else 0.0  # noqa: E731
    return {"count": len(z), "z_sections": median(z), "yx_voxels": median(yx)}


def _central_box(shape: Sequence[int], voxels: int) -> tuple[slice, ...]:
    depth = min(shape[0], 64) if len(shape) == 3 else 1
    side = max(1, int(math.sqrt(voxels / depth)))
    sizes = ((depth,) if len(shape) == 3 else ()) + tuple(min(s, side) for s in shape[-2:])
    return tuple(slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(shape, sizes))


def choose_dimensionality(shape: Sequence[int], spacing: Sequence[float], objects: dict | None = None,
                          min_sections: int = MIN_SECTIONS_3D) -> dict:
    """2D, anisotropic or isotropic 3D for volumes of median `shape` ((z, y, x) or (y, x) voxels)
    at `spacing` (nm), with `objects` from `object_extents` when labels were given.
    Returns {"ndim", "kind": "2d" | "anisotropic_3d" | "isotropic_3d", "anisotropy", "why",
    "per_slice": segment section by section (objects labelled per section)}."""
    anisotropy = float(max(spacing) / min(spacing))
    if len(shape) == 2 or shape[0] == 1:
        return _dims("2d", anisotropy, "a single section: 2D U-Net")
    if shape[0] < min_sections:
        return _dims("2d", anisotropy, f"{shape[0]} sections, fewer than the {min_sections} a 3D U-Net needs: 2D U-Net "
                                       "over sections")
    if objects and objects["count"] and objects["z_sections"] < MIN_OBJECT_SECTIONS:
        return _dims("2d", anisotropy, f"labelled objects span a median {objects['z_sections']:g} sections "
                                       f"(< {MIN_OBJECT_SECTIONS}): no 3D context, 2D U-Net and segmentation "
                                       "section by section", per_slice=True)
    ratio = f"anisotropy {anisotropy:.1f} (spacing {' x '.join(f'{s:g}' for s in spacing)} nm)"
    if objects and objects["count"]:
        ratio = f"objects span a median {objects['z_sections']:g} sections (>= {MIN_OBJECT_SECTIONS}); {ratio}"
    if anisotropy >= ANISOTROPY_THRESHOLD:
        return _dims("anisotropic_3d", anisotropy, f"{ratio} >= {ANISOTROPY_THRESHOLD:g} (nnU-Net's threshold): "
                                                   "anisotropic 3D U-Net")
    return _dims("isotropic_3d", anisotropy, f"{ratio} < {ANISOTROPY_THRESHOLD:g}: isotropic 3D U-Net")


def _dims(kind: str, anisotropy: float, why: str, per_slice: bool = False) -> dict:
    return {"ndim": 2 if kind == "2d" else 3, "kind": kind, "anisotropy": anisotropy, "why": why, "per_slice": per_slice}


def choose_normalisation(intensity: dict) -> dict:
    """The data.normalize fields for the fingerprint's intensity statistics (mean, std, p00_5, p25,
    p75, p99_5, in the volumes' units): per-volume z-score ("meanstd"), or for heavy tails
    (std > HEAVY_TAIL_RATIO x the bulk's std, IQR / 1.349) per-volume "percentile" scaling that
    maps the 0.5 / 99.5 percentiles to -1 / +1."""
    bulk = (intensity["p75"] - intensity["p25"]) / 1.349
    ratio = intensity["std"] / bulk if bulk > 0 else (math.inf if intensity["std"] > 0 else 1.0)
    numbers = (f"mean {intensity['mean']:.4g}, std {intensity['std']:.4g}, bulk std (IQR / 1.349) {bulk:.4g}, "
               f"p0.5 {intensity['p00_5']:.4g}, p99.5 {intensity['p99_5']:.4g}")
    if ratio > HEAVY_TAIL_RATIO:
        return {"fields": {"data.normalize": "percentile", "data.percentiles": PERCENTILES},
                "why": f"heavy tails: std / bulk std {ratio:.2f} > {HEAVY_TAIL_RATIO:g} ({numbers}): each volume's "
                       f"{PERCENTILES[0]:g} / {PERCENTILES[1]:g} percentiles (nnU-Net's) map to -1 / +1, so rare "
                       "extreme values do not set the scale"}
    return {"fields": {"data.normalize": "meanstd"},
            "why": f"well-behaved intensities: std / bulk std {ratio:.2f} <= {HEAVY_TAIL_RATIO:g} ({numbers}): "
                   "z-score per volume"}


def choose_augmentation(kind: str, crop_shape: Sequence[int]) -> dict:
    """Isotropic 3D: rotations, elastic displacement and (on cubic crops) axis transposes in 3D,
    as nnU-Net augments isotropic data; otherwise in-plane only (the default)."""
    if kind != "isotropic_3d":
        return {"fields": {"augment.isotropic": False},
                "why": "voxels not isotropic: rotations and elastic displacement in-plane only, no axis transposes"}
    if len(set(crop_shape)) == 1:
        return {"fields": {"augment.isotropic": True},
                "why": "isotropic voxels and a cubic crop: 3D rotations, elastic displacement and axis transposes"}
    return {"fields": {"augment.isotropic": True, "augment.transpose.p": 0.0},
            "why": f"isotropic voxels: 3D elastic displacement; no axis transposes (crop {tuple(crop_shape)} is not cubic)"}


def choose_segmentation(target: str, spacing: Sequence[float], per_slice: bool, tune: bool) -> dict:
    """The `segment` config section for predictions of `target` kind: the prediction kind, channel,
    per_slice and the SegmentSetting fields `jaxem segment` takes, plus `tune` (choose them with
    `jaxem tune` on the validation split after training)."""
    if target not in SEGMENTATION:
        raise UserError(f"--target {target!r} is not one of {', '.join(SEGMENTATION)}.")
    kind, method, channel = SEGMENTATION[target]
    # h in nm as `jaxem segment`'s default: 2 finest voxels (1 nm over-seeds EM)
    setting = SegmentSetting(method=method, h=2.0 * float(min(spacing))).to_dict()
    section = {"kind": kind, "channel": channel, "per_slice": per_slice, **setting, "tune": tune}
    how = {"watershed": f"seeded watershed (distance seeds, h {setting['h']:g} nm, threshold {setting['threshold']:g})",
           "mws": "mutex watershed (no threshold to choose)", "cc": f"connected components at {setting['threshold']:g}"}
    why = (f"{target} predictions -> {how[method]}" + (", section by section" if per_slice else "")
           + ("; segment.tune: choose the settings with `jaxem tune` on the validation split after training" if tune
              else "; pass --tune-after-training to `jaxem plan` to choose them on the validation split"))
    return {"fields": {"segment": section}, "why": why}


def follow_up(config_path: str, segment: dict, val_images: Sequence[str], val_labels: Sequence[str],
              workdir: str = "runs/planned") -> list[str]:
    """The commands after `jaxem plan`: train; with segment["tune"] predict the first validation
    volume, tune on it and segment with the tuned params (`planner.check_validation` makes sure
    there is one); else segment with the planned settings."""
    train = f"jaxem train --config {config_path} --workdir {workdir}"
    predict = f"jaxem predict --run {workdir} --input IMAGE.zarr --output {workdir}/prediction.zarr"
    # what the prediction holds, as `jaxem tune` and `jaxem segment` take it
    what = (f" --kind {segment['kind']}" + (" --per-slice" if segment["per_slice"] else "")
            + (f" --channel {segment['channel']}" if segment["channel"] else ""))
    segment_cmd = f"jaxem segment --input {workdir}/prediction.zarr --output {workdir}/segmentation.zarr{what}"
    if not segment["tune"]:
        flags = {"method": "--method", "threshold": "--threshold", "seeds": "--seeds", "h": "--h", "merge": "--merge",
                 "min_size": "--min-size"}
        return [train, predict, segment_cmd + "".join(f" {flag} {segment[k]}" for k, flag in flags.items())]
    tuned, val = f"{workdir}/segment_params.json", f"{workdir}/val_prediction.zarr"
    return [train, f"jaxem predict --run {workdir} --input {val_images[0]} --output {val}",
            f"jaxem tune --input {val} --labels {val_labels[0]} --output {tuned}{what}",
            predict, f"{segment_cmd} --params {tuned}"]
