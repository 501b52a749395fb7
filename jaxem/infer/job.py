"""One prediction job: checkpoints + input volume + ROI -> an OME-Zarr group of probabilities.

Shared by `jaxem predict`, the demo and the benchmarks. The job description (inputs, ROI, model
steps, blending, dtype) is stored with the output, so the same job resumes and a different one
is refused unless asked to overwrite.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxem.data.sampling import normalize, normalize_stats
from jaxem.data.targets import affinity_offsets
from jaxem.data.volume import Volume, open_volume, write_attributes
from jaxem.errors import UserError
from jaxem.infer.adapt import adapted_batch_stats, random_crops
from jaxem.infer.device import block_budget_bytes, ensemble_forward, forward_fn, predict_volume, tta_forward
from jaxem.infer.ensemble import check_reduction
from jaxem.infer.output import create_output, refuse_other_job
from jaxem.infer.planes import (
    check_plane_tiles, check_planes, is_orthoplane, parse_planes, plane_geometry, planes_forward, warn_if_anisotropic,
)
from jaxem.infer.tiling import make_tiling
from jaxem.models import input_divisor
from jaxem.models.heads import output_activation
from jaxem.train.checkpoint import restore_for_inference

DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


def parse_roi(text: str | None, shape: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """'z0:z1,y0:y1,x0:x1' (one range per spatial axis) -> ((z0, z1), ...); None = everything."""
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != len(shape):
        raise UserError(f"--roi {text!r} must have {len(shape)} ranges start:stop separated by commas, one per axis of {tuple(shape)}.")
    roi = []
    for axis, part in enumerate(parts):
        a, _, b = part.partition(":")
        try:
            start, stop = int(a or 0), int(b) if b else shape[axis]
        except ValueError:
            raise UserError(f"--roi range {part!r} is not start:stop with integers.") from None
        if not 0 <= start < stop <= shape[axis]:
            raise UserError(f"--roi {text!r} lies outside the input volume of shape {tuple(shape)} (axis {axis}: {start}:{stop}).")
        roi.append((start, stop))
    return tuple(roi)


def spatial_shape(source: Volume) -> tuple[int, ...]:
    """The (z, y, x) or (y, x) shape of a volume with an optional leading channel axis."""
    return tuple(s for s, a in zip(source.shape, source.axes) if a in "zyx")


def check_input(source: Volume) -> None:
    """UserError unless `source` is (z, y, x) or (y, x), optionally after one leading channel axis
    of size 1: the models are trained on one grey-value channel."""
    axes = tuple(source.axes)
    spatial = tuple(a for a in axes if a in "zyx")
    leading = axes[: len(axes) - len(spatial)]
    if len(spatial) < 2 or leading not in ((), ("c",)):
        raise UserError(f"--input {source.path} has axes ({', '.join(axes)}) of shape {source.shape}; predict takes "
                        "(z, y, x) or (y, x) grey values, optionally after a channel axis c of size 1.")
    if leading and source.shape[0] != 1:
        raise UserError(f"--input {source.path} has {source.shape[0]} channels (axes {', '.join(axes)}); the models "
                        "are trained on one grey-value channel, so pass a single-channel volume.")


def block_and_halo(predict_cfg, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Block and halo per volume axis; a 2D model on a 3D volume gets block 1 and halo 0 in z."""
    block, halo = tuple(predict_cfg.block_shape), tuple(predict_cfg.halo)
    pad = ndim - len(block)
    if pad < 0:
        raise UserError(f"predict.block_shape {block} has more axes than the input volume ({ndim}).")
    return (1,) * pad + block, (0,) * pad + halo


def job_geometry(predict_cfg, ndim: int, planes: Sequence[str]) -> tuple[tuple, tuple, tuple | None]:
    """(block, halo, chunk or None) per volume axis from `predict_cfg`: a 2D model on a stack runs
    section by section (`block_and_halo`), with orthoplane `planes` over 3D tiles (`planes.plane_geometry`)."""
    if is_orthoplane(planes):
        return plane_geometry(predict_cfg)
    block, halo = block_and_halo(predict_cfg, ndim)
    chunk = tuple(predict_cfg.get("chunk_shape", ()))
    return block, halo, (1,) * (ndim - len(chunk)) + chunk if chunk else None  # a 2D model's (y, x) chunk on a stack


def normalizer_stats(source: Volume, data_cfg) -> tuple[float, float]:
    """(a, b) of the per-volume normalisation (x - a) / b, exactly as the training loader's."""
    return normalize_stats(source, str(data_cfg.get("normalize", "meanstd")), tuple(data_cfg.get("percentiles", (1.0, 99.0))))


def make_normalizer(source: Volume, data_cfg) -> Callable:
    """Per-volume normalisation exactly as the training loader does it (jaxem.data.sampling)."""
    stats = normalizer_stats(source, data_cfg)
    return lambda x: normalize(x, stats)


def model_forward(config, model, variables, block: tuple[int, ...], tta: bool = False,
                  normalize: tuple[float, float] | None = None, planes: Sequence[str] = ("xy",),
                  planes_reduce: str = "mean") -> Callable:
    """The traceable forward of one restored model on (B, *block, 1) raw tiles -> (B, *block, K)
    float32 probabilities (sigmoid, or softmax for multiclass), normalised (x - a) / b on the
    device with `normalize` = (a, b), averaged over flips and turns with `tta`. A 2D model with
    `planes` other than ('xy',) runs over those sections of 3D tiles, combined by `planes_reduce`
    (`planes.planes_forward`). Auxiliary outputs (deep supervision) are dropped."""
    activation = output_activation(str(config.target.get("kind", "boundary")))
    forward = forward_fn(lambda x: model.apply(variables, x, train=False)[0], activation,
                         model_ndim=int(config.model.ndim), normalize=normalize)
    if is_orthoplane(planes):
        return planes_forward(forward, block, planes, planes_reduce, activation == "softmax", tta)
    return tta_forward(forward, block) if tta else forward


def with_predict_defaults(config) -> ml_collections.ConfigDict:
    """`config` with the predict fields a run saved before they existed (`block_gib`, GiB of
    one block's window on the device, see `device.block_bytes`), so `--config.predict.block_gib`
    overrides every run."""
    if "block_gib" in config.predict:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.predict.block_gib = 0.0  # auto: device.auto_block_bytes
    return config


def block_budget(predict_cfg: ml_collections.ConfigDict) -> int:
    """Bytes of one block's window: `predict.block_gib` GiB, or with 0 (the default) the device's
    share (`device.auto_block_bytes`: 1 GiB on a CPU, 1/8 of an accelerator's memory up to 16 GiB).
    UserError when it is negative."""
    gib = float(predict_cfg.get("block_gib", 0.0))
    if gib < 0:
        raise UserError(f"predict.block_gib={gib} must be >= 0 (GiB of a block's window on the device; 0 = auto).")
    return block_budget_bytes(gib)


def run_prediction(
    checkpoints: Sequence[str],
    input_path: str,
    output_path: str,
    roi: str | None = None,
    tta: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    reduce: str = "mean",
    overrides: Callable | None = None,
    progress: bool = True,
    adapt_batch_norm: int = 0,
    planes: str | Sequence[str] | None = None,
    planes_reduce: str = "mean",
) -> dict:
    """Restores `checkpoints`, predicts the ROI of `input_path` into `output_path`; returns stats.

    `adapt_batch_norm` N > 0: first re-estimates every batch-norm layer's statistics on N random
    training-sized crops of the ROI (jaxem.infer.adapt, AdaBN), for EM unlike the training data.
    `planes` ('xy,xz,yz' or names; default xy): a 2D model on a 3D volume predicts the sections
    of each orientation, combined per voxel by `planes_reduce` (jaxem.infer.planes).
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    check_reduction(reduce, len(checkpoints))
    planes = parse_planes(planes)
    source = open_volume(input_path)
    check_input(source)
    shape = spatial_shape(source)
    region = parse_roi(roi, shape)
    restored = [restore_for_inference(c) for c in checkpoints]
    config = with_predict_defaults(restored[0][0])
    config = overrides(config) if overrides else config
    kind = str(config.target.get("kind", "boundary"))
    check_planes(planes, planes_reduce, int(config.model.ndim), len(shape), kind)
    budget = block_budget(config.predict)
    norm = normalizer_stats(source, config.data)
    if adapt_batch_norm:
        restored = with_adapted_batch_norm(restored, source, make_normalizer(source, config.data), region, adapt_batch_norm)
    warn_if_anisotropic(planes, source.voxel_size)
    block, halo, chunk = job_geometry(config.predict, len(shape), planes)
    tiling = make_tiling(shape, region, block, halo, chunk, config.predict.get("blend", "gaussian"))
    if is_orthoplane(planes):
        check_plane_tiles(planes, tiling.block, input_divisor(config.model))
    # Blocks cross to the device in the source's dtype (uint8 EM: a quarter of float32's bytes).
    forwards = [model_forward(config, m, v, tiling.block, tta, normalize=norm, planes=planes, planes_reduce=planes_reduce)
                for _, m, v in restored]
    multiclass = output_activation(kind) == "softmax"
    forward = forwards[0] if len(forwards) == 1 else ensemble_forward(forwards, reduce, multiclass)
    channels = int(config.model.out_channels)
    job = {"input": os.path.abspath(input_path), "checkpoints": [os.path.abspath(c) for c in checkpoints], "roi": [list(r) for r in tiling.roi],
           "tta": tta, "dtype": dtype, "reduce": reduce, "block": list(block), "halo": list(halo), "blend": tiling.blend}
    if adapt_batch_norm:
        job["adapt_batch_norm"] = adapt_batch_norm
    if is_orthoplane(planes):
        job.update(planes=list(planes), planes_reduce=planes_reduce)
    axes = ("c",) + tuple(a for a in source.axes if a in "zyx")
    create = functools.partial(create_output, output_path, (channels, *tiling.roi_shape), DTYPES[dtype], source.voxel_size,
                               (channels, *tiling.chunk), axes, [r[0] for r in tiling.roi], job)
    target, resumed = create_shared_output(create, output_path, job, overwrite)
    if jax.process_index() == 0:
        write_attributes(output_path, {"jaxem_target": target_description(config, len(shape))})
    stats = predict_volume(forward, source, target, tiling, int(config.predict.get("batch_size", 4)), DTYPES[dtype],
                           budget, block_filter(), min_blocks=jax.process_count(),
                           progress=progress and jax.process_index() == 0)
    if jax.process_count() > 1:  # every chunk is written when any process returns
        multihost_utils.sync_global_devices("jaxem predict: all chunks written")
    return dict(stats, resumed=resumed)


def with_adapted_batch_norm(restored: list, source: Volume, normalize: Callable, region, count: int) -> list:
    """Each restored (config, model, variables) with batch-norm statistics of `count` crops of
    `source`, drawn with the model's config seed (the same crops for models sharing crop shape and seed)."""
    if count < 0:
        raise UserError(f"--adapt-batch-norm must be a number of crops >= 0, got {count}.")
    adapted = []
    for config, model, variables in restored:
        crops = random_crops(source, normalize, tuple(config.data.crop_shape), count, seed=int(config.seed), region=region)
        adapted.append((config, model, adapted_batch_stats(model, variables, crops, int(config.data.batch_size))))
    return adapted


def create_shared_output(create: Callable, path: str, job: dict, overwrite: bool):
    """`create(overwrite)` -> (volume, resumed) on process 0; with several processes the others wait,
    then open what it made (the same job, so never replaced). Every process first checks the
    refusal itself, so a refused output stops all of them, not just process 0."""
    if jax.process_count() == 1:
        return create(overwrite)  # which refuses another job's output itself
    refuse_other_job(path, job, overwrite)
    multihost_utils.sync_global_devices("jaxem predict: output checked")  # before process 0 touches it
    resumed = False
    if jax.process_index() == 0:
        target, resumed = create(overwrite)
    multihost_utils.sync_global_devices("jaxem predict: output created")
    resumed = bool(multihost_utils.broadcast_one_to_all(np.asarray(resumed)))
    if jax.process_index() != 0:
        target, _ = create(False)
    return target, resumed


def target_description(config, volume_ndim: int) -> dict:
    """What the output channels are, for the steps after prediction: {"kind", "channels"} and, for
    affinities, "offsets" in the volume's axes (a 2D model's (dy, dx) become (0, dy, dx) on a stack),
    which `jaxem segment --method mws` reads when no --offsets are given."""
    kind = str(config.target.get("kind", "boundary"))
    description = {"kind": kind, "channels": int(config.model.out_channels)}
    if kind == "affinities":
        lead = (0,) * (volume_ndim - int(config.model.ndim))
        description["offsets"] = [list(lead + o) for o in affinity_offsets(config.target, int(config.model.ndim))]
    return description


def block_filter(count: int | None = None, index: int | None = None) -> Callable | None:
    """Multi-host: process p of P takes the p-th of P contiguous runs of the block order
    (`device.block_starts`: whole columns along axis 0, columns in Morton order: compact regions,
    few carried rims recomputed at a process's edges); None for a single process."""
    count = jax.process_count() if count is None else count
    index = jax.process_index() if index is None else index
    if count == 1:
        return None
    return lambda rank, blocks: rank * count // blocks == index


def predict_run(run_dir, input_path: str, output_path: str, **kwargs) -> dict:
    """Predicts `input_path` with the model of one run workdir (`run_prediction` with one run)."""
    return run_prediction([str(run_dir)], str(input_path), str(output_path), **kwargs)
