"""Score a trained run on a held-out labelled volume, the way the demo and recipes report results.

predict blockwise -> membrane probabilities -> seeded watershed per z-slice -> ISBI-2012-style
scores averaged over slices (VRand, VInfo, adapted Rand error, VOI split/merge; Dice/IoU of the
predicted cell interior), beside a baseline that thresholds the raw image (Otsu) and runs the same
watershed, plus an overlay PNG of predictions on the EM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCORE_KEYS = ("vrand", "vinfo", "adapted_rand_error", "voi_split", "voi_merge", "dice", "iou")
BETTER = {"vrand": "higher", "vinfo": "higher", "adapted_rand_error": "lower", "voi_split": "lower",
          "voi_merge": "lower", "dice": "higher", "iou": "higher"}


def score_slices(instances: np.ndarray, boundary: np.ndarray, gt: np.ndarray) -> dict:
    """Scores averaged over z-slices (z, y, x): clustering scores of `instances` against `gt`
    (gt 0 = membrane, ignored where the definitions say so), and Dice/IoU of the predicted interior
    (boundary probability < 0.5) against the ground-truth interior (gt > 0)."""
    from jaxem.metrics.clustering import clustering_scores
    from jaxem.metrics.pixel import binary_scores

    rows = []
    for seg_slice, boundary_slice, gt_slice in zip(instances, boundary, gt):
        pixel = binary_scores(boundary_slice < 0.5, gt_slice > 0)
        rows.append({**clustering_scores(seg_slice, gt_slice), "dice": pixel["dice"], "iou": pixel["iou"]})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


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
                    progress: bool = True, adapt_batch_norm: int = 0) -> tuple[Path, Path]:
    """Predicts `image_path` blockwise with the run's checkpoint into `out_dir`/predictions.zarr
    (replacing an earlier one); returns (out_dir, that path). `out_dir` defaults to the run dir;
    `adapt_batch_norm` > 0 first adapts batch-norm statistics to that many crops (jaxem.infer.adapt)."""
    from jaxem.infer.blockwise import predict_run

    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = out_dir / "predictions.zarr"
    predict_run(run_dir, image_path, str(predictions), overwrite=True, progress=progress,
                adapt_batch_norm=adapt_batch_norm)
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
              progress: bool = True, adapt_batch_norm: int = 0) -> dict:
    """Predicts `image_path` with the run's best checkpoint and scores it against `labels_path`.

    Writes predictions.zarr, results.json and overlay.png to `out_dir` (default the run dir) and
    returns {"model": scores, "threshold_baseline": scores}. `adapt_batch_norm`: as `predict_heldout`.
    """
    from jaxem.data.volume import open_volume
    from jaxem.segment.instances import instances_from_boundaries

    out_dir, predictions = predict_heldout(run_dir, image_path, out_dir, progress, adapt_batch_norm)
    raw, gt = open_volume(image_path).read(), open_volume(labels_path).read()
    boundary = prediction_channel(predictions)
    ours = instances_from_boundaries(boundary, method="watershed", per_slice=True)
    baseline_boundary = threshold_baseline(raw)
    baseline = instances_from_boundaries(baseline_boundary, method="watershed", per_slice=True)
    results = {"model": score_slices(ours, boundary, gt),
               "threshold_baseline": score_slices(baseline, baseline_boundary, gt)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_overlay(raw, boundary, ours, baseline, gt, out_dir / "overlay.png")
    return results


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


def format_table(results: dict) -> str:
    """The model's scores beside the threshold baseline's, one metric per line."""
    lines = [f"{'metric':<20}{'model':>10}{'threshold':>12}   better"]
    for k in SCORE_KEYS:
        lines.append(f"{k:<20}{results['model'][k]:>10.4f}{results['threshold_baseline'][k]:>12.4f}   {BETTER[k]}")
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
