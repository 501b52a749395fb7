"""nnU-Net-style self-configuration: a dataset's fingerprint and a memory budget -> a training config.

    fp = fingerprint(images, labels)                 # shapes, voxel sizes, intensities, foreground, objects
    p = plan(fp, ndim=None, memory_gib=16)           # 2D/3D, patch, pooling, kernels, widths, batch size,
                                                     # normalisation, augmentation, segmentation (decisions.py)
    write_config(p, "configs/my_plan.py")            # an editable config file for `jaxem train`, each
                                                     # decision under a comment saying why

The rules follow nnU-Net (Isensee et al. 2021), adapted to EM:
- Topology from voxel spacing: an axis is pooled only while its spacing is at most twice the finest
  axis's, and convolved with kernel 3 only then (kernel 1 otherwise). Serial-section EM
  (40 x 4 x 4 nm) thus gets in-plane (1, 3, 3) kernels and (1, 2, 2) pooling until the in-plane
  spacing catches up with z, then isotropic levels: the hybrid 2D-3D U-Net of DeepEM3D. Axes are
  pooled while their feature map stays >= 2 * `min_feature` voxels, for at most `max_levels`.
- Patch: starts physically balanced (about the same extent in nm on every axis, in-plane
  `start_size` voxels) and shrinks along its physically longest axis until a batch of 2 fits.
- Widths: `base_width` doubling per level, capped at `max_width`.
- Batch size: the largest that fits `memory_gib`, measured, not guessed: the training step is
  compiled by XLA for batches of 1 and 2 and its memory analysis (arguments + temporaries +
  outputs) read off, so the figure is for the backend the planner runs on (plan on the machine
  type you will train on). Capped at `max_batch` and at 5 % of the dataset's voxels per batch.
"""

from __future__ import annotations

import datetime
import json
import math
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.data.sampling import subsample
from jaxem.data.targets import num_target_channels
from jaxem.data.volume import open_volume
from jaxem.errors import UserError
from jaxem.plan.decisions import (ANISOTROPY_THRESHOLD, MIN_SECTIONS_3D, choose_augmentation,
                                  choose_dimensionality, choose_normalisation, choose_segmentation, follow_up,
                                  object_extents)
from jaxem.train import parallel
from jaxem.train.defaults import base_config
from jaxem.train.trainer import build_training

GIB = 2 ** 30
# the order in which `write_config` writes the decisions
ORDER = ("dimensionality", "topology", "patch and batch", "augmentation", "normalisation", "target", "segmentation")
PERCENTILE_KEYS = {"p00_5": 0.5, "p25": 25.0, "p50": 50.0, "p75": 75.0, "p99_5": 99.5}


def fingerprint(images: Sequence[str], labels: Sequence[str] = (), samples_voxels: int = 2_000_000,
                seed: int = 0) -> dict:
    """What planning needs to know of a dataset: per volume shape and voxel size (nm, z-y-x),
    intensity statistics of a random subsample (mean, std, 0.5/99.5 percentiles, in the volumes'
    own units; also quartiles and median), and with `labels` the fraction of labelled (> 0) voxels
    and the median extent of the labelled objects (`decisions.object_extents`)."""
    if not images:
        raise UserError("name at least one image volume to plan for.")
    if labels and len(labels) != len(images):
        raise UserError(f"{len(images)} image volumes but {len(labels)} label volumes; give one per image or none.")
    volumes = [open_volume(p) for p in images]
    per_volume = max(1, samples_voxels // len(volumes))
    values = np.concatenate([subsample(v, seed, per_volume) for v in volumes]).astype(np.float64)
    result = {
        "images": [str(p) for p in images],
        "labels": [str(p) for p in labels],
        "shapes": [list(v.shape) for v in volumes],
        "voxel_sizes": [list(v.voxel_size) for v in volumes],
        "intensity": {"mean": float(values.mean()), "std": float(values.std()),
                      **{k: float(q) for k, q in zip(PERCENTILE_KEYS, np.percentile(values, list(PERCENTILE_KEYS.values())))}},
    }
    if labels:
        fractions = [float(np.mean(subsample(open_volume(p), seed, per_volume) > 0)) for p in labels]
        result["foreground_fraction"] = float(np.mean(fractions))
        result["objects"] = object_extents(labels)
    return result


def topology(patch: Sequence[int], spacing: Sequence[float], min_feature: int = 4,
             max_levels: int = 6) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(pool_factors, kernel_sizes) of a U-Net for `patch` voxels at `spacing` (nm per axis).

    Level by level: an axis with spacing <= 2x the finest current spacing gets kernel 3 (else 1)
    and is pooled by 2 when it also keeps >= 2 * min_feature voxels; stops when nothing can be
    pooled or at `max_levels` levels. len(kernel_sizes) = len(pool_factors) + 1.
    """
    size, spacing = [int(s) for s in patch], [float(s) for s in spacing]
    pools, kernels = [], []
    while True:
        finest = min(spacing)
        near = [s <= 2 * finest for s in spacing]
        kernels.append(tuple(3 if n else 1 for n in near))
        pool = tuple(2 if n and sz >= 2 * min_feature else 1 for n, sz in zip(near, size))
        if all(p == 1 for p in pool) or len(kernels) == max_levels:
            break
        pools.append(pool)
        size = [sz // p for sz, p in zip(size, pool)]
        spacing = [s * p for s, p in zip(spacing, pool)]
    return tuple(pools), tuple(kernels)


def _divisor(pools) -> list[int]:
    return [math.prod(p[a] for p in pools) for a in range(len(pools[0]))] if pools else []


def fit_topology(patch: Sequence[int], spacing: Sequence[float], min_feature: int, max_levels: int):
    """(patch rounded down to a multiple of its pooling, pool_factors, kernel_sizes)."""
    pools, kernels = topology(patch, spacing, min_feature, max_levels)
    divisor = _divisor(pools) or [1] * len(patch)
    return tuple(max(d, (p // d) * d) for p, d in zip(patch, divisor)), pools, kernels


def initial_patch(shape: Sequence[int], spacing: Sequence[float], start_size: int) -> list[int]:
    """About `start_size` voxels on the finest axes and the same physical extent on the others,
    never more than the volume."""
    extent = start_size * min(spacing)
    return [max(1, min(int(s), round(extent / sp))) for s, sp in zip(shape, spacing)]


def measure_step_memory(config, batch_size: int) -> int:
    """Peak bytes of one training step of `config` at `batch_size`, from XLA's memory analysis of
    the compiled step on this process's first device (arguments + temporaries + outputs - aliased).
    The step is lowered with the state's shapes alone: nothing is initialised."""
    mesh = parallel.make_mesh(1)
    _, state, train_step, _ = build_training(config, mesh, abstract=True)
    return step_memory(train_step, state, config.data.crop_shape, batch_size, mesh)


def step_memory(train_step, state, crop_shape: Sequence[int], batch_size: int, mesh) -> int:
    """Peak bytes of the jitted `train_step` on `state` (arrays or their shapes) and a batch of
    `batch_size` crops of `crop_shape`, as `measure_step_memory` counts them."""
    spatial, sharding = tuple(crop_shape), parallel.data_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, *spatial, 1), jnp.float32, sharding=sharding),
             "labels": jax.ShapeDtypeStruct((batch_size, *spatial), jnp.int32, sharding=sharding),
             "mask": jax.ShapeDtypeStruct((batch_size, *spatial), jnp.float32, sharding=sharding)}
    m = train_step.lower(state, batch).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def plan(fp: dict, ndim: int | None, memory_gib: float, *, base_width: int = 32, max_width: int = 0,
         start_size: int = 0, min_feature: int = 4, max_levels: int = 6, max_batch: int = 0,
         target: str = "boundary", val_images: Sequence[str] = (), val_labels: Sequence[str] = (),
         tune: bool = False, measure: Callable = measure_step_memory, progress: Callable = print) -> dict:
    """The plan for fingerprint `fp` (see `fingerprint`) within `memory_gib` GiB per device, at
    `ndim` 2 (sections) or 3, or None: chosen from the data (`decisions.choose_dimensionality`).
    Defaults: start_size 512 (2D) / 128 (3D), max_width 512 / 320, max_batch 32 / 8. `tune`
    records that the segmentation settings are to be tuned on `val_images`/`val_labels`.
    Returns the config fields it sets, the measured memory and "decisions": {name: {"fields",
    "why"}} in the order `write_config` writes them."""
    check_validation(val_images, val_labels, tune)
    dims = _dimensionality(fp, ndim, min_feature)
    ndim = dims["ndim"]
    start_size = start_size or (512 if ndim == 2 else 128)
    max_width = max_width or (512 if ndim == 2 else 320)
    max_batch = max_batch or (32 if ndim == 2 else 8)
    shape = [int(s) for s in np.median(np.array([s[-ndim:] for s in fp["shapes"]]), axis=0)]
    spacing = [float(s) for s in np.median(np.array([v[-ndim:] for v in fp["voxel_sizes"]]), axis=0)]
    if any(s < 2 * min_feature for s in shape):
        raise UserError(f"the volumes' median {ndim}D shape {tuple(shape)} is too small to plan a U-Net for "
                        f"(every axis needs >= {2 * min_feature} voxels); use ndim 2 for thin stacks.")
    fixed = {"dimensionality": {"fields": {}, "why": dims["why"]},
             "normalisation": choose_normalisation(fp["intensity"]),
             "segmentation": choose_segmentation(target, spacing, dims["per_slice"], tune)}
    channels = _channels(target, ndim)
    fixed["target"] = {"fields": {"target.kind": target, "model.out_channels": channels},
                       "why": f"{target} target: {channels} output channel(s)"}
    data = {"data.train_images": tuple(fp["images"]), "data.train_labels": tuple(fp["labels"]),
            "data.val_images": tuple(val_images), "data.val_labels": tuple(val_labels)}
    dataset_voxels = sum(math.prod(s) for s in fp["shapes"])
    budget = memory_gib * GIB

    def configure(patch, pools, kernels, widths, batch, why=""):
        geometry = {"topology": {"fields": {"model.widths": tuple(widths), "model.pool_factors": pools,
                                            "model.kernel_sizes": kernels},
                                 "why": describe_topology(pools, kernels, spacing)},
                    "patch and batch": {"fields": {"data.crop_shape": tuple(patch), "data.batch_size": batch},
                                        "why": why},
                    "augmentation": choose_augmentation(dims["kind"], patch)}
        decisions = {**geometry, **fixed}
        return _config(ndim, data, decisions), {k: decisions[k] for k in ORDER}

    patch = initial_patch(shape, spacing, start_size)
    while True:
        patch, pools, kernels = fit_topology(patch, spacing, min_feature, max_levels)
        widths = tuple(min(base_width * 2 ** i, max_width) for i in range(len(kernels)))
        config, _ = configure(patch, pools, kernels, widths, 2)
        one, two = measure(config, 1), measure(config, 2)
        per_example, fixed_bytes = max(two - one, 1), max(2 * one - two, 0)
        progress(f"plan: patch {patch}, {len(kernels)} levels: batch 2 needs {two / GIB:.2f} GiB")
        if two <= budget:
            break
        # Activation memory grows with the patch's voxels: aim straight at the size that fits.
        voxels = math.prod(patch) * (budget - fixed_bytes) / max(two - fixed_bytes, 1) * 0.95
        smaller = _shrink(patch, spacing, pools, min_feature, voxels)
        if smaller is None:
            raise UserError(f"even the smallest patch needs {two / GIB:.2f} GiB for a batch of 2, more than "
                            f"--memory-gib {memory_gib}; raise the budget or lower --base-width.")
        patch = smaller
    fits = int((budget - fixed_bytes) // per_example)
    batch = max(2, min(fits, max_batch, int(0.05 * dataset_voxels // math.prod(patch)) or 2))
    memory = measure(configure(patch, pools, kernels, widths, batch)[0], batch)
    why = (f"crop {tuple(patch)} at batch {batch} per device (use N x {batch} on N devices): XLA measures "
           f"{memory / GIB:.3g} GiB for the step of the {memory_gib:g} GiB budget ({per_example / GIB:.3g} GiB "
           f"per example; batch capped at {max_batch} and at 5 % of the dataset's voxels)")
    config, decisions = configure(patch, pools, kernels, widths, batch, why)
    return {
        "ndim": ndim, "dimensionality": dims["kind"], "anisotropy": dims["anisotropy"], "spacing_nm": spacing,
        "median_shape": shape, "crop_shape": list(patch), "pool_factors": [list(p) for p in pools],
        "kernel_sizes": [list(k) for k in kernels], "widths": list(widths), "batch_size": batch,
        "memory_gib": memory_gib, "measured_step_gib": memory / GIB, "per_example_gib": per_example / GIB,
        "target": target, "out_channels": channels, "normalize": config.data.normalize,
        "segment": config.segment.to_dict(), "val_images": list(val_images), "val_labels": list(val_labels),
        "decisions": decisions, "fingerprint": fp,
    }


def check_validation(val_images: Sequence[str], val_labels: Sequence[str], tune: bool) -> None:
    """UserError unless there is one validation label volume per image (or none), and both when
    the segmentation is to be tuned on them."""
    if val_labels and len(val_labels) != len(val_images):
        raise UserError(f"{len(val_images)} --val-images but {len(val_labels)} --val-labels; give one per image.")
    if tune and not val_labels:
        raise UserError("--tune-after-training needs --val-images and --val-labels: `jaxem tune` chooses the "
                        "segmentation settings on the validation split.")


def _dimensionality(fp: dict, ndim: int | None, min_feature: int) -> dict:
    """`choose_dimensionality` on the median volume, overridden by an explicit `ndim`."""
    rank = min(len(s) for s in fp["shapes"])
    shape = [int(s) for s in np.median(np.array([s[-rank:] for s in fp["shapes"]]), axis=0)]
    spacing = [float(s) for s in np.median(np.array([v[-rank:] for v in fp["voxel_sizes"]]), axis=0)]
    dims = choose_dimensionality(shape, spacing, fp.get("objects"), max(MIN_SECTIONS_3D, 2 * min_feature))
    if ndim is None or ndim == dims["ndim"]:
        return dims
    if ndim not in (2, 3):
        raise UserError(f"ndim must be 2 or 3, got {ndim!r}.")
    kind = "2d" if ndim == 2 else ("anisotropic_3d" if dims["anisotropy"] >= ANISOTROPY_THRESHOLD else "isotropic_3d")
    return dict(dims, ndim=ndim, kind=kind, per_slice=False,
                why=f"{ndim}D as asked (--ndim {ndim}); from the data alone: {dims['why']}")


def describe_topology(pools, kernels, spacing: Sequence[float]) -> str:
    """One sentence on the U-Net's levels: which are in-plane only and why."""
    flat = [i for i, k in enumerate(kernels) if 1 in k]
    levels = f"{len(kernels)} levels, pooling {' '.join(str(tuple(p)) for p in pools) or 'none'}"
    if not flat:
        return f"{levels}; kernels {tuple(kernels[0])} at every level (spacing {tuple(spacing)} nm within 2x)"
    return (f"{levels}; kernels {tuple(kernels[flat[0]])} at levels {flat[0]}-{flat[-1]} and {tuple(kernels[-1])} "
            f"after: an axis is convolved and pooled only while its spacing is within 2x of the finest (nnU-Net), "
            f"spacing {tuple(spacing)} nm")


def _channels(target: str, ndim: int) -> int:
    cfg = base_config(ndim=ndim, model="unet").target
    cfg.kind = target
    return int(num_target_channels(cfg, ndim))


def _shrink(patch, spacing, pools, min_feature, target_voxels: float) -> tuple[int, ...] | None:
    """The patch cut, one pooling unit at a time along its physically longest axis that can
    shrink, until it has at most `target_voxels` voxels (at least one cut); None if none can."""
    divisor = _divisor(pools) or [1] * len(patch)
    floor = [max(d, 2 * min_feature) for d in divisor]
    patch, cut = list(patch), False
    while not cut or math.prod(patch) > target_voxels:
        axes = [a for a in range(len(patch)) if patch[a] - divisor[a] >= floor[a]]
        if not axes:
            return tuple(patch) if cut else None
        axis = max(axes, key=lambda a: patch[a] * spacing[a])
        patch[axis] -= divisor[axis]
        cut = True
    return tuple(patch)


def _config(ndim: int, data: dict, decisions: dict):
    """The training config of these `data` fields and `decisions` ({name: {"fields": ...}})."""
    config = base_config(ndim=ndim, model="unet")
    for key, value in [*data.items(), *(kv for d in decisions.values() for kv in d["fields"].items())]:
        *parents, leaf = key.split(".")
        section = config
        for name in parents:
            section = section[name]
        section[leaf] = value
    config.train.num_devices = 1
    return config


def planned_config(p: dict):
    """The training config of plan `p` (what `write_config`'s file returns)."""
    data = {f"data.{k}": tuple(v) for k, v in (("train_images", p["fingerprint"]["images"]),
            ("train_labels", p["fingerprint"]["labels"]), ("val_images", p["val_images"]), ("val_labels", p["val_labels"]))}
    return _config(p["ndim"], data, p["decisions"])


def write_config(p: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Writes plan `p` as a config file (`get_config()`) that `jaxem train --config` takes: each
    decision's fields under a comment saying why, and the commands that follow in its docstring."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; choose another --output or pass --overwrite.")
    fp = p["fingerprint"]
    summary = {k: p[k] for k in ("spacing_nm", "median_shape", "measured_step_gib", "per_example_gib", "memory_gib")}
    commands = follow_up(str(path), p["segment"], p["val_images"], p["val_labels"])
    data = [f"    config.data.{k} = {tuple(v)!r}" for k, v in (("train_images", fp["images"]), ("train_labels", fp["labels"]),
                                                             ("val_images", p["val_images"]), ("val_labels", p["val_labels"]))]
    body = []
    for name, decision in p["decisions"].items():
        body += _comment(f"{name[0].upper()}{name[1:]}: {decision['why']}.")
        body += [f"    config.{key} = {_literal(value)}" for key, value in decision["fields"].items()]
    objects = fp.get("objects")
    text = f'''"""Planned by `jaxem plan` on {datetime.date.today()} for {len(fp["images"])} volume(s).

Fingerprint: shapes {fp["shapes"]}, voxel sizes {fp["voxel_sizes"]} nm,
intensity {json.dumps(fp["intensity"])}{", foreground fraction %.3f" % fp["foreground_fraction"] if "foreground_fraction" in fp else ""}{f", objects {json.dumps(objects)}" if objects else ""}.
Plan: {json.dumps(summary)}
{"" if p["val_images"] else "Validation volumes are not set: add data.val_images / data.val_labels."}
Then:
{chr(10).join("    " + c for c in commands)}
"""

from jaxem.train.defaults import base_config


def get_config(arg: str = ""):
    config = base_config(ndim={p["ndim"]}, model="unet")
{chr(10).join(data)}
{chr(10).join(body)}
    return config
'''
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _literal(value) -> str:
    """Python source of a field's value; a dict one key per line."""
    if not isinstance(value, dict):
        return repr(value)
    return "{\n" + "".join(f"        {k!r}: {v!r},\n" for k, v in value.items()) + "    }"


def _comment(text: str, width: int = 100) -> list[str]:
    return ["    # " + line for line in textwrap.wrap(text, width - 6)]
