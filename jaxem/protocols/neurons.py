"""Neurons in 3D (SNEMI3D, CREMI): score a trained affinity run on a held-out labelled volume.

predict blockwise -> affinities (K, z, y, x) -> 3D instances by mutex watershed ('mws') and by the
classic affinity watershed ('watershed': seeded watershed of the nearest-neighbour boundary map)
-> scores over the whole volume: adapted Rand error (SNEMI3D's ranking metric), VOI split and
merge in bits, VRand/VInfo, and Dice of the predicted cell interior; beside a baseline
that thresholds the raw image (Otsu) and runs the same 3D watershed. Ground-truth id 0 (membrane
or unlabelled) is ignored by the foreground-restricted scores, as in both challenges.

With `tune_on` (a labelled volume not scored, e.g. the training volume) each method's settings
(mws min_size; watershed threshold, h; agglomeration of the over-seeded watershed: fragment
threshold, merge) are also chosen there (`jaxem.segment.tune`; adapted Rand error for SNEMI3D,
VOI for CREMI) and applied here: rows "mws_tuned", "watershed_tuned" and "agglomerate_tuned".

protocol="cremi" adds CREMI's own scores (`jaxem.metrics.cremi`): VOI split/merge and
cremi_python's adapted Rand error with the ground truth's 25 nm border mask ignored, and the
CREMI score, as `cremi_*` keys of every row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from jaxem.data.volume import as_probabilities, open_volume, read_attributes
from jaxem.errors import UserError
from jaxem.metrics.clustering import clustering_scores
from jaxem.metrics.cremi import BORDER_THRESHOLD_NM, cremi_scores
from jaxem.metrics.pixel import binary_scores
from jaxem.protocols import common
from jaxem.segment.instances import boundary_from_affinities, fill_small
from jaxem.segment.setting import SegmentSetting, segment_volume
from jaxem.segment.tune import default_grid, plot_tuning, tune

SCORE_KEYS = ("adapted_rand_error", "voi_split", "voi_merge", "vrand", "vinfo", "dice")
BETTER = {"adapted_rand_error": "lower", "voi_split": "lower", "voi_merge": "lower", "vrand": "higher",
          "vinfo": "higher", "dice": "higher"}
ROWS = ("mws", "watershed", "threshold_baseline")
TUNED_METHODS = ("mws", "watershed", "agglomerate")  # each tuned on its own: one row per method
TUNED_ROWS = tuple(f"{m}_tuned" for m in TUNED_METHODS)
TUNE_METRIC = {"snemi3d": "adapted_rand_error", "cremi": "voi"}  # protocol -> what tuning minimises
CREMI_KEYS = ("cremi_voi_split", "cremi_voi_merge", "cremi_adapted_rand_error", "cremi_score")
BETTER.update({k: "lower" for k in CREMI_KEYS})
PROTOCOLS = {"snemi3d": SCORE_KEYS, "cremi": SCORE_KEYS + CREMI_KEYS}  # protocol -> its score keys
TITLES = {"mws": "mws", "watershed": "watershed", "threshold_baseline": "threshold",
          "mws_tuned": "mws tuned", "watershed_tuned": "ws tuned", "agglomerate_tuned": "agglo tuned"}


def protocol_keys(protocol: str) -> tuple[str, ...]:
    """The score keys of `protocol` ('snemi3d' or 'cremi'); UserError for any other."""
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}.")
    return PROTOCOLS[protocol]


def score_volume(instances: np.ndarray, boundary: np.ndarray, gt: np.ndarray, voxel_size=None,
                 protocol: str = "snemi3d") -> dict:
    """Scores of 3D `instances` against `gt` (z, y, x) over the whole volume (not per slice), and
    Dice of the predicted interior (boundary < 0.5) against the ground-truth interior (gt > 0).
    protocol="cremi" adds `CREMI_KEYS` (border mask from `voxel_size`, nm (z, y, x))."""
    protocol_keys(protocol)  # UserError for an unknown protocol
    scores = clustering_scores(instances, gt)
    out = {**{k: float(scores[k]) for k in SCORE_KEYS if k != "dice"},
           "dice": float(binary_scores(boundary < 0.5, gt > 0)["dice"])}
    if protocol == "cremi":
        cremi = cremi_scores(instances, gt, voxel_size)
        out.update({f"cremi_{k}": float(cremi[k]) for k in ("voi_split", "voi_merge", "adapted_rand_error")},
                   cremi_score=float(cremi["cremi_score"]), cremi_masked_fraction=float(cremi["masked_fraction"]))
    return out


def read_affinities(path: str | Path) -> tuple[np.ndarray, list[list[int]]]:
    """A `jaxem predict` affinity volume -> ((K, z, y, x) float32, the K offsets it records)."""
    volume = open_volume(str(path))
    target = read_attributes(str(path)).get("jaxem_target", {})
    if target.get("kind") != "affinities" or volume.axes[0] != "c":
        raise UserError(f"{path} holds no affinities (its jaxem_target is {target or 'missing'}); "
                        "score affinity runs only (config.target.kind = 'affinities').")
    return as_probabilities(volume.read()).astype(np.float32, copy=False), target["offsets"]


def segment_all(affinities, offsets, raw, voxel_size, min_size: int, h: float) -> tuple[dict, dict]:
    """({row: (instances, boundary map)}, {method: seconds}) for mws, the affinity watershed and the
    raw-threshold baseline; affinities (K, z, y, x), raw (z, y, x), voxel_size in nm (z, y, x).

    `h` (nm) is the watershed seeds' h-maxima depth on the distance transform in nm; `min_size`
    (voxels): smaller fragments are flooded from their neighbours.
    """
    boundary = boundary_from_affinities(affinities, offsets)
    out, seconds = {}, {}
    for method in ("mws", "watershed"):
        start = time.time()
        setting = SegmentSetting(method, min_size=min_size, h=h)
        out[method] = (segment_volume(affinities, setting, "affinities", voxel_size=voxel_size, offsets=offsets), boundary)
        seconds[method] = time.time() - start
    baseline_boundary = common.otsu_dark(raw, common.UINT8_RANGE)
    baseline = segment_volume(baseline_boundary, SegmentSetting("watershed", h=h), "boundary", voxel_size=voxel_size)
    out["threshold_baseline"] = (fill_small(baseline, baseline_boundary, min_size), baseline_boundary)
    return out, seconds


def score_affinity_run(run_dir: str | Path, image_path: str, labels_path: str, out_dir: str | Path | None = None,
                       min_size: int = 100, h: float = 16.0, progress: bool = True,
                       protocol: str = "snemi3d", tune_on: tuple[str, str] | None = None) -> dict:
    """Predicts `image_path` with the run's best checkpoint, segments it in 3D and scores it by
    `protocol` ('snemi3d', or 'cremi': adds `CREMI_KEYS`, see `score_volume`).

    Writes predictions.zarr, results.json and overlay.png to `out_dir` (default the run dir);
    returns {"mws" | "watershed" | "threshold_baseline": scores, "segment_seconds": {...},
    "settings": {...}}. `tune_on` = (image, labels) adds TUNED_ROWS and "tuned_settings" (module
    docstring; the sweeps in tuning.json).
    """
    protocol_keys(protocol)  # a bad protocol fails before the prediction
    heldout = common.read_heldout(run_dir, image_path, labels_path, out_dir, progress)
    affinities, offsets = read_affinities(heldout.predictions)
    gt, voxel_size = heldout.gt, heldout.voxel_size
    segmentations, seconds = segment_all(affinities, offsets, heldout.raw, voxel_size, min_size, h)
    results = {row: score_volume(seg, boundary, gt, voxel_size, protocol)
               for row, (seg, boundary) in segmentations.items()}
    if tune_on is not None:
        settings = tune_affinity_settings(run_dir, tune_on, heldout.out_dir, progress, TUNE_METRIC[protocol])
        boundary = segmentations["watershed"][1]  # every method's nearest-neighbour boundary map
        for method, setting in settings.items():
            labels = segment_volume(affinities, SegmentSetting.from_dict(setting), "affinities", voxel_size=voxel_size,
                                    offsets=offsets)
            results[f"{method}_tuned"] = score_volume(labels, boundary, gt, voxel_size, protocol)
        results["tuned_settings"] = settings
    results["segment_seconds"] = seconds
    results["settings"] = {"min_size_voxels": min_size, "h_nm": h, "offsets": offsets,
                           "voxel_size_nm": list(voxel_size), "protocol": protocol}
    if protocol == "cremi":
        results["settings"]["cremi_border_threshold_nm"] = BORDER_THRESHOLD_NM
    common.write_results(heldout.out_dir, results)
    mws, boundary = segmentations["mws"]
    baseline, baseline_boundary = segmentations["threshold_baseline"]
    common.write_instances_overlay(heldout.raw, boundary, mws, baseline, gt, heldout.out_dir / "overlay.png")
    return results


def tune_affinity_settings(run_dir, tune_on: tuple[str, str], out_dir: Path, progress: bool = True,
                           metric: str = "adapted_rand_error") -> dict:
    """{method: setting (JSON form)} for TUNED_METHODS: each method's best default-grid setting by
    `metric` on the labelled volume `tune_on` = (image, labels), predicted into
    `out_dir`/tune_predictions.zarr; the sweeps go to tuning.json, the plot of both to tuning.png."""
    image_path, labels_path = tune_on
    tuning = common.read_heldout(run_dir, image_path, labels_path, out_dir, progress, name="tune_predictions.zarr")
    affinities, offsets = read_affinities(tuning.predictions)
    grid = default_grid("affinities", tuning.voxel_size)
    sweeps = {method: tune(affinities, tuning.gt, "affinities", [s for s in grid if s["method"] == method], metric,
                           voxel_size=tuning.voxel_size, offsets=offsets, progress=progress)
              for method in TUNED_METHODS}
    (out_dir / "tuning.json").write_text(json.dumps({"image": image_path, "labels": labels_path, **sweeps}, indent=2) + "\n")
    best = min(sweeps.values(), key=lambda sweep: sweep["best_score"])  # lower is better for both metrics
    table = [row for sweep in sweeps.values() for row in sweep["table"]]
    plot_tuning(dict(best, table=table), out_dir / "tuning.png")
    return {method: sweep["best"] for method, sweep in sweeps.items()}


def rows_of(results: dict) -> tuple[str, ...]:
    """The rows `results` holds: ROWS, then TUNED_ROWS when it was tuned."""
    return ROWS + tuple(r for r in TUNED_ROWS if r in results)


def format_table(results: dict, keys=SCORE_KEYS) -> str:
    """One metric of `keys` per line: mutex watershed, affinity watershed, the threshold baseline,
    and the tuned rows when present."""
    return common.format_table(results, rows_of(results), keys, BETTER, TITLES, key_width=26)
