"""ISBI 2012 membranes: score a trained run on a held-out labelled volume, per z-slice, the way the
demo and recipes report results.

predict blockwise -> membrane probabilities -> seeded watershed per z-slice -> ISBI-2012-style
scores averaged over slices (VRand, VInfo, adapted Rand error, VOI split/merge; Dice/IoU of the
predicted cell interior; average precision of the membrane map, which no threshold or watershed
setting affects), beside a baseline that thresholds the raw image (Otsu) and runs the same
watershed, plus an overlay PNG of predictions on the EM.

With `tune_on` (a labelled volume the scores are not taken on, e.g. the training slices) the
segmentation settings of both rows are also chosen there (`jaxem.segment.tune`) and the held-out
volume is scored with them too: rows "model_tuned" and "threshold_baseline_tuned", and
"model_tuned_matched": the model's tuned setting on its held-out map matched to the quantiles of
its map of the tuning volume (`jaxem segment --match-quantiles`, `jaxem.segment.calibration`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np

from jaxem.metrics.pixel import average_precision, binary_scores
from jaxem.protocols import common
from jaxem.segment.calibration import map_quantiles, match_quantiles
from jaxem.segment.setting import SegmentSetting, segment_volume
from jaxem.segment.tune import plot_tuning, score, tune

SCORE_KEYS = ("vrand", "vinfo", "adapted_rand_error", "voi_split", "voi_merge", "dice", "iou", "membrane_ap")
ROWS = ("model", "model_tuned", "model_tuned_matched", "threshold_baseline", "threshold_baseline_tuned")
BETTER = {"vrand": "higher", "vinfo": "higher", "adapted_rand_error": "lower", "voi_split": "lower",
          "voi_merge": "lower", "dice": "higher", "iou": "higher", "membrane_ap": "higher"}
TITLES = {"model": "model", "model_tuned": "tuned", "model_tuned_matched": "matched", "threshold_baseline": "threshold",
          "threshold_baseline_tuned": "thr.tuned"}
# The setting of the untuned rows: seeded watershed, distance seeds of depth 1 pixel.
FIXED_SETTING = SegmentSetting("watershed")


def score_slices(instances: np.ndarray, boundary: np.ndarray, gt: np.ndarray) -> dict:
    """Scores averaged over z-slices (z, y, x): clustering scores of `instances` against `gt`
    (gt 0 = membrane, ignored where the definitions say so; the same per-slice mean that tuning
    maximises, `jaxem.segment.tune.score`), and Dice/IoU of the predicted interior (boundary
    probability < 0.5) against the ground-truth interior (gt > 0), and the average precision of
    `boundary` ranking the membrane pixels (gt == 0)."""
    pixel = [binary_scores(b < 0.5, g > 0) for b, g in zip(boundary, gt)]
    return {**score(instances, gt, per_slice=True),
            **{k: float(np.mean([p[k] for p in pixel])) for k in ("dice", "iou")},
            "membrane_ap": float(np.mean([average_precision(b, g == 0) for b, g in zip(boundary, gt)]))}


def boundary_maps(heldout: common.HeldOut) -> dict:
    """{"model": the predicted membrane probability, "threshold_baseline": the Otsu map of the raw
    8-bit EM}, each (z, y, x) float32."""
    return {"model": common.prediction_channel(heldout.predictions),
            "threshold_baseline": common.otsu_dark(heldout.raw, common.UINT8_RANGE)}


def segment_slices(boundary: np.ndarray, setting: SegmentSetting, voxel_size=None) -> np.ndarray:
    """Instances (z, y, x) uint64 of a boundary map (z, y, x), each z-slice segmented alone."""
    return segment_volume(boundary, setting, "boundary", per_slice=True, voxel_size=voxel_size)


def score_run(run_dir: str | Path, image_path: str, labels_path: str, out_dir: str | Path | None = None,
              progress: bool = True, adapt_batch_norm: int = 0, tta: bool = False,
              tune_on: tuple[str, str] | None = None) -> dict:
    """Predicts `image_path` with the run's best checkpoint and scores it against `labels_path`.

    Writes predictions.zarr, results.json and overlay.png to `out_dir` (default the run dir) and
    returns {"model": scores, "threshold_baseline": scores}. `adapt_batch_norm`, `tta`: as
    `common.predict_heldout`. `tune_on` = (image, labels): the segmentation settings are also tuned
    on that labelled volume (predicted the same way; tuning.json and tuning.png) and applied here,
    adding rows "model_tuned" and "threshold_baseline_tuned", "model_tuned_matched" (the model's
    setting on its map matched to its tuning map's quantiles) and the key "tuned_settings".
    """
    heldout = common.read_heldout(run_dir, image_path, labels_path, out_dir, progress,
                                  adapt_batch_norm=adapt_batch_norm, tta=tta)
    maps = boundary_maps(heldout)
    labels = {row: segment_slices(boundary, FIXED_SETTING) for row, boundary in maps.items()}
    results = {row: score_slices(labels[row], maps[row], heldout.gt) for row in maps}
    if tune_on is not None:
        settings, voxel_size, quantiles = tune_settings(run_dir, tune_on, heldout.out_dir, progress, adapt_batch_norm, tta)
        baseline = SegmentSetting.from_dict(settings["threshold_baseline"])
        results["threshold_baseline_tuned"] = score_slices(
            segment_slices(maps["threshold_baseline"], baseline, voxel_size), maps["threshold_baseline"], heldout.gt)
        results.update(tuned_rows(maps["model"], heldout.gt, settings["model"], quantiles, voxel_size))
        results["tuned_settings"] = settings
    common.write_results(heldout.out_dir, results)
    common.write_instances_overlay(heldout.raw, maps["model"], labels["model"], labels["threshold_baseline"],
                                   heldout.gt, heldout.out_dir / "overlay.png")
    return results


def tuned_rows(boundary: np.ndarray, gt: np.ndarray, setting: dict, quantiles: np.ndarray, voxel_size) -> dict:
    """{"model_tuned", "model_tuned_matched"}: `score_slices` of a boundary map (z, y, x) segmented
    with a setting tuned elsewhere (its JSON form; h in the units of `voxel_size`), as it is and
    after `match_quantiles` maps its values onto `quantiles` (1, LEVELS), the tuning map's."""
    setting = SegmentSetting.from_dict(setting)
    matched = match_quantiles(boundary, map_quantiles(boundary), quantiles)
    return {"model_tuned": score_slices(segment_slices(boundary, setting, voxel_size), boundary, gt),
            "model_tuned_matched": score_slices(segment_slices(matched, setting, voxel_size), matched, gt)}


def tune_settings(run_dir, tune_on: tuple[str, str], out_dir: Path, progress: bool = True,
                  adapt_batch_norm: int = 0, tta: bool = False) -> tuple[dict, tuple, np.ndarray]:
    """Best per-slice VRand settings of the model's prediction and of the threshold baseline on the
    labelled volume `tune_on` = (image, labels) -> ({"model": setting, "threshold_baseline":
    setting} in their JSON form, the volume's voxel size, which the settings' h is in, the
    quantiles (1, LEVELS) of the model's map there, for matching a map to it). Writes
    `out_dir`/tune_predictions.zarr, tuning.json (both sweeps) and tuning.png (the model's)."""
    image_path, labels_path = tune_on
    tuning = common.read_heldout(run_dir, image_path, labels_path, out_dir, progress, name="tune_predictions.zarr",
                                 adapt_batch_norm=adapt_batch_norm, tta=tta)
    maps = boundary_maps(tuning)
    sweeps = {"model": sweep_settings(maps["model"], tuning.gt, tuning.voxel_size, progress),
              "threshold_baseline": baseline_sweep(tuning.raw, tuning.gt, tuning.voxel_size, progress)}
    (out_dir / "tuning.json").write_text(json.dumps({"image": image_path, "labels": labels_path, **sweeps}, indent=2) + "\n")
    plot_tuning(sweeps["model"], out_dir / "tuning.png")
    return ({row: sweep["best"] for row, sweep in sweeps.items()}, tuning.voxel_size,
            np.asarray(sweeps["model"]["quantiles"]))


def sweep_settings(boundary: np.ndarray, gt: np.ndarray, voxel_size: tuple, progress: bool = True) -> dict:
    """`tune` of a boundary map (z, y, x), a model's or the baseline's, against `gt` by this protocol: the default grid,
    each z-slice segmented alone, best mean per-slice VRand; h in the units of `voxel_size`."""
    return tune(boundary, gt, "boundary", metric="vrand", per_slice=True, voxel_size=voxel_size, progress=progress)


def baseline_sweep(raw: np.ndarray, gt: np.ndarray, voxel_size: tuple, progress: bool = True) -> dict:
    """`tune` of the threshold baseline's boundary map (`common.otsu_dark` of the 8-bit EM `raw`)
    against `gt`, as `tune_settings` sweeps the model's. The baseline depends on the data alone, so
    a benchmark that scores many runs on the same labelled slices sweeps it once per process: the
    result is kept under a digest of (raw, gt, voxel_size)."""
    key = hashlib.sha256(b"".join([np.ascontiguousarray(raw).tobytes(), str(raw.shape).encode(),
                                   np.ascontiguousarray(gt).tobytes(), str(gt.dtype).encode(),
                                   repr(tuple(voxel_size)).encode()])).hexdigest()
    if key not in _BASELINE_SWEEPS:
        _BASELINE_SWEEPS[key] = sweep_settings(common.otsu_dark(raw, common.UINT8_RANGE), gt, voxel_size, progress)
    return copy.deepcopy(_BASELINE_SWEEPS[key])


_BASELINE_SWEEPS: dict[str, dict] = {}  # baseline_sweep's results in this process, by data digest


def rows_of(results: dict) -> list[str]:
    """The rows of ROWS that `results` holds (the tuned ones only when it was tuned)."""
    return [r for r in ROWS if r in results]


def format_table(results: dict) -> str:
    """The model's scores beside the threshold baseline's (and their tuned rows, when present),
    one metric per line."""
    return common.format_table(results, rows_of(results), SCORE_KEYS, BETTER, TITLES)

