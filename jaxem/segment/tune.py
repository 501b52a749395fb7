"""Choose how predictions become instances, on labelled data: a grid search of segmentation settings.

The network's probabilities are half of an instance segmentation; the other half is the threshold,
the watershed seeds, the merging and the size filter that turn them into objects. On ISBI 2012 the
same boundary maps score held-out VRand 0.856 with the fixed defaults and 0.924 with settings
chosen on the training slices (0.948 with test-time augmentation; docs/training.md). `tune` tries
every setting of a grid on a prediction whose ground truth is known, scores each with the chosen
metric and returns the best; `jaxem tune` writes it to a JSON file that `jaxem segment --params`
applies. Tune on labelled data that is not the data you report (the training volume, or a
validation volume), as nnU-Net chooses its post-processing.

A grid holds settings in their JSON form (`jaxem.segment.setting.SegmentSetting.from_dict`):
method ('cc', 'watershed', 'agglomerate', 'mws'), threshold, seeds ('distance' or 'threshold'), h
(nm when a voxel size is given, else voxels), merge (the mean boundary value below which
'agglomerate' joins two fragments) and min_size (voxels); each is applied by
`jaxem.segment.setting.segment_volume`.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxem.errors import UserError
from jaxem.metrics.clustering import clustering_scores
from jaxem.segment.calibration import LEVELS, map_quantiles
from jaxem.segment.instances import finish
from jaxem.segment.setting import SegmentSetting, check_kind, fragment_key, setting_fragments

METRICS = {"vrand": "higher", "vinfo": "higher", "adapted_rand_error": "lower", "voi": "lower",
           "rand_error": "lower"}
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
H_STEPS = (1, 2, 3, 5, 8)  # h-maxima depths in multiples of the finest voxel size
FRAGMENT_THRESHOLDS = (0.3, 0.5)  # of the over-seeded (h = 1 voxel) watershed that agglomeration merges
MERGES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SIZES = (0, 25, 100, 400, 1600)  # voxels


def default_grid(kind: str, voxel_size: Sequence[float] | None = None) -> list[dict]:
    """The settings `tune` tries by default for a prediction `kind`; h in nm when `voxel_size`
    (nm, z-y-x) is given (multiples of its finest axis), else in voxels.

    boundary / foreground: seeded watershed with distance seeds (threshold x h), with threshold
    seeds (threshold), connected components (threshold), and agglomeration of the watershed with
    h = 1 voxel (fragment threshold x merge). affinities: mutex watershed (min_size), the affinity
    watershed (threshold x h) and its agglomeration (fragment threshold x merge), small fragments
    of the last two flooded at min_size 100.
    """
    check_kind(kind)
    unit = float(min(voxel_size)) if voxel_size is not None else 1.0
    distance = [{"method": "watershed", "seeds": "distance", "threshold": t, "h": k * unit}
                for t, k in itertools.product(THRESHOLDS, H_STEPS)]
    merged = [{"method": "agglomerate", "seeds": "distance", "threshold": t, "h": unit, "merge": m}
              for t, m in itertools.product(FRAGMENT_THRESHOLDS, MERGES)]
    if kind == "affinities":
        return ([{"method": "mws", "min_size": m} for m in MIN_SIZES]
                + [dict(s, min_size=100) for s in distance + merged])
    return (distance + [{"method": "watershed", "seeds": "threshold", "threshold": t} for t in THRESHOLDS]
            + [{"method": "cc", "threshold": t} for t in THRESHOLDS] + merged)


def score(labels: np.ndarray, gt: np.ndarray, per_slice: bool = False) -> dict:
    """Clustering scores (jaxem.metrics.clustering) of `labels` against `gt`: over the whole volume,
    or averaged over z-slices with `per_slice` (the ISBI 2012 way)."""
    if not per_slice or labels.ndim == 2:
        return clustering_scores(labels, gt)
    rows = [clustering_scores(s, g) for s, g in zip(labels, gt)]
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def tune(prediction: np.ndarray, gt: np.ndarray, kind: str = "boundary", grid: list[dict] | None = None,
         metric: str = "vrand", per_slice: bool = False, voxel_size: Sequence[float] | None = None,
         offsets=None, progress: bool = True, workers: int | None = None) -> dict:
    """Segments `prediction` with every setting of `grid` (default `default_grid`), scores each
    against `gt` (instance ids, 0 = boundary/unlabelled) and picks the best by `metric`. Settings
    that differ only in merge and min_size share one computation of their fragments (and of the
    agglomeration's region graph); those groups run on `workers` threads (default: one per CPU
    core; the segmentation libraries release the GIL).

    Returns {"best": setting, "best_score", "metric", "better", "kind", "per_slice", "voxel_size",
    "offsets", "table": [{"setting", "scores"}], "quantiles"}; ties go to the earlier setting of the
    grid. "quantiles" (C rows of `calibration.LEVELS`; one per affinity channel, else one) are the
    prediction's, for `jaxem segment --match-quantiles`.
    """
    from tqdm import tqdm

    if metric not in METRICS:
        raise UserError(f"tuning metric {metric!r} is not one of {', '.join(METRICS)}.")
    spatial = prediction.shape[1:] if kind == "affinities" else prediction.shape
    if tuple(spatial) != tuple(gt.shape):
        raise UserError(f"the prediction's spatial shape {tuple(spatial)} differs from the labels' shape {tuple(gt.shape)}.")
    grid = default_grid(kind, voxel_size) if grid is None else grid
    if not grid:
        raise UserError("the tuning grid has no settings.")
    check_kind(kind)
    settings = [SegmentSetting.from_dict(setting) for setting in grid]  # every bad setting fails before the sweep

    groups: dict = {}  # settings that share their fragments, segmented from one computation of them
    for i, setting in enumerate(settings):
        groups.setdefault(fragment_key(setting), []).append(i)

    def try_group(members: list[int]) -> list[tuple[int, dict]]:
        first = settings[members[0]]
        flood = any(settings[i].min_size > 0 for i in members)
        fragments = setting_fragments(prediction, first, kind, per_slice, voxel_size, offsets, flood=flood)
        rows = []
        for i in members:
            labels = finish(fragments, settings[i].method, settings[i].merge, settings[i].min_size)
            scores = score(labels, gt, per_slice)
            rows.append((i, {"setting": dict(grid[i]), "scores": {k: float(scores[k]) for k in METRICS}}))
        return rows

    workers = workers or min(8, os.cpu_count() or 1)
    table = [None] * len(grid)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(grid), desc="tune", unit="setting",
                                                   disable=not progress) as bar:
        for done in as_completed([pool.submit(try_group, members) for members in groups.values()]):
            for i, row in done.result():
                table[i] = row
            bar.update(len(done.result()))
    sign = 1.0 if METRICS[metric] == "higher" else -1.0
    values = [sign * row["scores"][metric] for row in table]
    best = int(np.nanargmax(values))
    return {"best": table[best]["setting"], "best_score": table[best]["scores"][metric], "metric": metric,
            "better": METRICS[metric], "kind": kind, "per_slice": bool(per_slice),
            "voxel_size": None if voxel_size is None else [float(v) for v in voxel_size],
            "offsets": offsets, "table": table,
            "quantiles": map_quantiles(prediction, channel_axis=kind == "affinities").tolist()}


def read_setting(path: str | Path) -> dict:
    """The best setting of a `jaxem tune` JSON file in its JSON form (`SegmentSetting.from_dict`
    reads it), with its kind and per_slice: {"method", ... , "kind", "per_slice"}; UserError naming
    the file when it is not one."""

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--params {path} does not exist; write one with `jaxem tune`.")
    try:
        tuned = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--params {path} is not JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(tuned, dict) or "best" not in tuned:
        raise UserError(f"--params {path} has no 'best' setting; expected the JSON that `jaxem tune` writes.")
    SegmentSetting.from_dict(tuned["best"], f"'best' in {path}")  # UserError when it is not a setting
    return dict(tuned["best"], kind=tuned.get("kind", "boundary"), per_slice=bool(tuned.get("per_slice", False)))


def read_quantiles(path: str | Path) -> np.ndarray:
    """The quantiles (C, calibration.LEVELS) of the map a `jaxem tune` JSON file was tuned on;
    UserError naming the file when it has none (written before tune stored them) or they are malformed."""
    read_setting(path)  # the file's own errors first
    quantiles = json.loads(Path(path).read_text()).get("quantiles")
    if quantiles is None:
        raise UserError(f"--params {path} holds no 'quantiles' (tuned before `jaxem tune` stored them); "
                        "run `jaxem tune` again to match quantiles.")
    try:
        array = np.asarray(quantiles, np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.ndim != 2 or array.shape[1] != LEVELS or not np.all(np.diff(array, axis=1) >= 0):
        raise UserError(f"--params {path}: 'quantiles' must be rows of {LEVELS} non-decreasing numbers, one per channel.")
    return array


def plot_tuning(result: dict, out_path: str | Path) -> None:
    """PNG of the metric against each setting's swept value, one panel per swept key (merge for
    agglomeration, min_size for mws, else threshold) and one line per remaining setting; the best
    marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list]] = {}  # x key -> series name -> [(x, metric)]
    for row in result["table"]:
        s = row["setting"]
        x_key = _swept_key(s)
        name = ", ".join(f"{k}={_short(v)}" for k, v in s.items() if k != x_key)
        panels.setdefault(x_key, {}).setdefault(name, []).append((float(s.get(x_key, 0)), row["scores"][result["metric"]]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6.5), squeeze=False)
    best = result["best"]
    for ax, (x_key, series) in zip(axes[0], panels.items()):
        for name, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name)
        if x_key == _swept_key(best):
            ax.plot([best.get(x_key, 0)], [result["best_score"]], "k*", ms=14, label="best")
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{result['metric']} ({result['better']} is better)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: panels stay apart
    fig.suptitle("segmentation settings on the tuning data")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90, bbox_inches="tight")  # keeps the legends outside the axes
    plt.close(fig)


def _swept_key(setting: dict) -> str:
    """The key a setting's panel of `plot_tuning` has on its x axis."""
    return "merge" if "merge" in setting else "threshold" if "threshold" in setting else "min_size"


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
