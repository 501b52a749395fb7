"""Score a trained run on a held-out labelled volume, the way the demo and recipes report results.

predict blockwise -> membrane probabilities -> seeded watershed per z-slice -> ISBI-2012-style
scores averaged over slices (VRand, VInfo, adapted Rand error, VOI split/merge; Dice/IoU of the
predicted cell interior; average precision of the membrane map, which no threshold or watershed
setting affects), beside a baseline that thresholds the raw image (Otsu) and runs the same
watershed, plus an overlay PNG of predictions on the EM.

With `tune_on` (a labelled volume the scores are not taken on, e.g. the training slices) the
segmentation settings of both rows are also chosen there (`jaxem.segment.tune`) and the held-out
volume is scored with them too: rows "model_tuned" and "threshold_baseline_tuned".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCORE_KEYS = ("vrand", "vinfo", "adapted_rand_error", "voi_split", "voi_merge", "dice", "iou", "membrane_ap")
ROWS = ("model", "model_tuned", "threshold_baseline", "threshold_baseline_tuned")
BETTER = {"vrand": "higher", "vinfo": "higher", "adapted_rand_error": "lower", "voi_split": "lower",
          "voi_merge": "lower", "dice": "higher", "iou": "higher", "membrane_ap": "higher"}


def score_slices(instances: np.ndarray, boundary: np.ndarray, gt: np.ndarray) -> dict:
    """Scores averaged over z-slices (z, y, x): clustering scores of `instances` against `gt`
    (gt 0 = membrane, ignored where the definitions say so; the same per-slice mean that tuning
    maximises, `jaxem.segment.tune.score`), and Dice/IoU of the predicted interior (boundary
    probability < 0.5) against the ground-truth interior (gt > 0), and the average precision of
    `boundary` ranking the membrane pixels (gt == 0)."""
    from jaxem.metrics.pixel import average_precision, binary_scores
    from jaxem.segment.tune import score

    pixel = [binary_scores(b < 0.5, g > 0) for b, g in zip(boundary, gt)]
    return {**score(instances, gt, per_slice=True),
            **{k: float(np.mean([p[k] for p in pixel])) for k in ("dice", "iou")},
            "membrane_ap": float(np.mean([average_precision(b, g == 0) for b, g in zip(boundary, gt)]))}


def threshold_baseline(raw: np.ndarray) -> np.ndarray:
    """Membrane 'probability' from the raw image alone: dark = membrane, shifted so 0.5 is Otsu's threshold."""
    from skimage.filters import threshold_otsu

    inverted = 1.0 - raw.astype(np.float32) / 255.0
    return np.clip(0.5 + (inverted - threshold_otsu(inverted)), 0.0, 1.0)


def prediction_channel(path: str | Path) -> np.ndarray:
    """Channel 0 of a prediction volume written by jaxem.infer (boundary, foreground...), as
    (z, y, x) float32."""
    from jaxem.data.volume import open_volume

    volume = open_volume(str(path))
    array = volume.read()
    if volume.axes[0] == "c":
        array = array[0]
    elif volume.axes[-1] == "c":
        array = array[..., 0]
    return array.astype(np.float32, copy=False)


def predict_heldout(run_dir: str | Path, image_path: str, out_dir: str | Path | None = None,
                    progress: bool = True, adapt_batch_norm: int = 0, tta: bool = False,
                    name: str = "predictions.zarr") -> tuple[Path, Path]:
    """Predicts `image_path` blockwise with the run's checkpoint into `out_dir`/`name` (replacing an
    earlier one); returns (out_dir, that path). `out_dir` defaults to the run dir; `adapt_batch_norm`
    > 0 first adapts batch-norm statistics to that many crops (jaxem.infer.adapt); `tta` averages
    the flips and rotations of test-time augmentation (jaxem.infer.ensemble)."""
    from jaxem.infer.blockwise import predict_run

    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = out_dir / name
    predict_run(run_dir, image_path, str(predictions), overwrite=True, progress=progress,
                adapt_batch_norm=adapt_batch_norm, tta=tta)
    return out_dir, predictions


def train_to_completion(config, run_dir: str | Path, progress: bool = True) -> tuple[dict, float]:
    """Trains `config` in `run_dir` (resuming; a finished run returns at once) -> (summary, seconds).
    Exits when SIGTERM stopped the training: a half-trained model is not scored."""
    import time

    from jaxem.train.loop import train

    start = time.time()
    summary = train(config, run_dir, progress=progress)
    if "preempted_at" in summary:
        raise SystemExit(f"training stopped at step {summary['preempted_at']} (SIGTERM); run the same command to resume.")
    return summary, time.time() - start


def score_run(run_dir: str | Path, image_path: str, labels_path: str, out_dir: str | Path | None = None,
              progress: bool = True, adapt_batch_norm: int = 0, tta: bool = False,
              tune_on: tuple[str, str] | None = None) -> dict:
    """Predicts `image_path` with the run's best checkpoint and scores it against `labels_path`.

    Writes predictions.zarr, results.json and overlay.png to `out_dir` (default the run dir) and
    returns {"model": scores, "threshold_baseline": scores}. `adapt_batch_norm`, `tta`: as
    `predict_heldout`. `tune_on` = (image, labels): the segmentation settings are also tuned on
    that labelled volume (predicted the same way; tuning.json and tuning.png) and applied here,
    adding rows "model_tuned" and "threshold_baseline_tuned" and the key "tuned_settings".
    """
    from jaxem.data.volume import open_volume

    out_dir, predictions = predict_heldout(run_dir, image_path, out_dir, progress, adapt_batch_norm, tta)
    raw, gt = open_volume(image_path).read(), open_volume(labels_path).read()
    maps = {"model": prediction_channel(predictions), "threshold_baseline": threshold_baseline(raw)}
    labels = {row: _segment_slices(boundary, FIXED_SETTING) for row, boundary in maps.items()}
    results = {row: score_slices(labels[row], maps[row], gt) for row in maps}
    if tune_on is not None:
        settings, voxel_size = tune_settings(run_dir, tune_on, out_dir, progress, adapt_batch_norm, tta)
        for row, setting in settings.items():
            tuned = _segment_slices(maps[row], setting, voxel_size)
            results[f"{row}_tuned"] = score_slices(tuned, maps[row], gt)
        results["tuned_settings"] = settings
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_overlay(raw, maps["model"], labels["model"], labels["threshold_baseline"], gt, out_dir / "overlay.png")
    return results


# The settings of the untuned rows: seeded watershed, distance seeds of depth 1 pixel.
FIXED_SETTING = {"method": "watershed"}


def _segment_slices(boundary: np.ndarray, setting: dict, voxel_size=None) -> np.ndarray:
    from jaxem.segment.tune import segment

    return segment(boundary, setting, "boundary", per_slice=True, voxel_size=voxel_size)


def tune_settings(run_dir, tune_on: tuple[str, str], out_dir: Path, progress: bool = True,
                  adapt_batch_norm: int = 0, tta: bool = False) -> tuple[dict, tuple]:
    """Best per-slice VRand settings of the model's prediction and of the threshold baseline on the
    labelled volume `tune_on` = (image, labels) -> ({"model": setting, "threshold_baseline":
    setting}, the volume's voxel size, which the settings' h is in). Writes
    `out_dir`/tune_predictions.zarr, tuning.json (both sweeps) and tuning.png (the model's)."""
    from jaxem.data.volume import open_volume
    from jaxem.segment.tune import plot_tuning, tune

    image_path, labels_path = tune_on
    _, predictions = predict_heldout(run_dir, image_path, out_dir, progress, adapt_batch_norm, tta,
                                     name="tune_predictions.zarr")
    image = open_volume(image_path)
    raw, gt = image.read(), open_volume(labels_path).read()
    maps = {"model": prediction_channel(predictions), "threshold_baseline": threshold_baseline(raw)}
    sweeps = {row: tune(boundary, gt, "boundary", metric="vrand", per_slice=True, voxel_size=image.voxel_size,
                        progress=progress) for row, boundary in maps.items()}
    (out_dir / "tuning.json").write_text(json.dumps({"image": image_path, "labels": labels_path, **sweeps}, indent=2) + "\n")
    plot_tuning(sweeps["model"], out_dir / "tuning.png")
    return {row: sweep["best"] for row, sweep in sweeps.items()}, tuple(image.voxel_size)


def over_seeds(per_seed: dict, rows=None) -> dict:
    """Mean, sample std and values of every score over seeds: per_seed = {seed: {row: {metric:
    value}}} (rows e.g. "model", "threshold_baseline") -> {row: {metric: {"mean", "std", "values"}}}.
    `rows` limits the rows (default all of the first seed's); non-numeric entries are skipped."""
    first = next(iter(per_seed.values()))
    out = {}
    for row in rows or [r for r, v in first.items() if isinstance(v, dict)]:
        out[row] = {}
        for metric, value in first[row].items():
            if not isinstance(value, (int, float)):
                continue
            values = [float(scores[row][metric]) for scores in per_seed.values()]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[row][metric] = {"mean": float(np.mean(values)), "std": std, "values": values}
    return out


def rows_of(results: dict) -> list[str]:
    """The rows of ROWS that `results` holds (the tuned ones only when it was tuned)."""
    return [r for r in ROWS if r in results]


def format_table(results: dict) -> str:
    """The model's scores beside the threshold baseline's (and their tuned rows, when present),
    one metric per line."""
    rows = rows_of(results)
    titles = {"model": "model", "model_tuned": "tuned", "threshold_baseline": "threshold",
              "threshold_baseline_tuned": "thr.tuned"}
    lines = [f"{'metric':<20}" + "".join(f"{titles[r]:>11}" for r in rows) + "   better"]
    for k in SCORE_KEYS:
        lines.append(f"{k:<20}" + "".join(f"{results[r][k]:>11.4f}" for r in rows) + f"   {BETTER[k]}")
    return "\n".join(lines)


def write_overlay(raw, boundary, ours, baseline, gt, out_path: Path, z: int | None = None) -> None:
    """PNG of one slice: EM | predicted membranes over EM | model instances | threshold instances | ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb

    z = raw.shape[0] // 2 if z is None else z
    tint = lambda labels: label2rgb(labels.astype(np.int64), raw[z], alpha=0.35, bg_label=0)
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.3))
    axes[0].imshow(raw[z], cmap="gray")
    axes[1].imshow(raw[z], cmap="gray")
    axes[1].imshow(np.ma.masked_less(boundary[z], 0.5), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
    for ax, labels in zip(axes[2:], (ours[z], baseline[z], gt[z])):
        ax.imshow(tint(labels))
    titles = ("EM (held-out)", "predicted membranes", "model instances", "threshold baseline", "ground truth")
    for ax, title in zip(axes, titles):
        ax.set_title(title), ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
