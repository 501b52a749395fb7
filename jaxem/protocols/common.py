"""The held-out path every benchmark protocol shares: predict -> read -> segment -> score -> report.

A protocol predicts a labelled volume with a trained run (`predict_heldout`, `read_heldout`),
segments the prediction and a raw-threshold baseline (`otsu_dark`) with
`jaxem.segment.setting.segment_volume`, scores them with `jaxem.metrics`, and reports:
results.json (`write_results`), a table of rows beside each other (`format_table`) and an overlay
PNG of one z-slice (`write_overlay`). `over_seeds` summarises repeated runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxem.data.volume import as_probabilities, open_volume
from jaxem.infer.job import predict_run

UINT8_RANGE = (0.0, 255.0)  # the grey values of 8-bit EM


@dataclass
class HeldOut:
    """A predicted labelled volume: out_dir (where reports go), predictions (the prediction
    volume's path), raw (z, y, x) EM, gt (z, y, x) labels, voxel_size (nm, z-y-x)."""

    out_dir: Path
    predictions: Path
    raw: np.ndarray
    gt: np.ndarray
    voxel_size: tuple


def prediction_channel(path: str | Path) -> np.ndarray:
    """Channel 0 of a prediction volume written by jaxem.infer (boundary, foreground...), as
    (z, y, x) float32 probabilities (a uint8 prediction's rint(255 p) divided by 255)."""
    volume = open_volume(str(path))
    array = as_probabilities(volume.read())
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
    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = out_dir / name
    predict_run(run_dir, image_path, str(predictions), overwrite=True, progress=progress,
                adapt_batch_norm=adapt_batch_norm, tta=tta)
    return out_dir, predictions


def read_heldout(run_dir: str | Path, image_path: str, labels_path: str, out_dir: str | Path | None = None,
                 progress: bool = True, name: str = "predictions.zarr", **predict_args) -> HeldOut:
    """`predict_heldout` of `image_path` (`predict_args`: adapt_batch_norm, tta), then the EM and
    its labels read into memory."""
    out_dir, predictions = predict_heldout(run_dir, image_path, out_dir, progress, name=name, **predict_args)
    image = open_volume(image_path)
    return HeldOut(out_dir, predictions, image.read(), open_volume(labels_path).read(), tuple(image.voxel_size))


def train_to_completion(config, run_dir: str | Path, progress: bool = True) -> tuple[dict, float]:
    """Trains `config` in `run_dir` (resuming; a finished run returns at once) -> (summary, seconds).
    A run there trained with other settings is a UserError, never reused as this one. Exits when
    SIGTERM stopped the training: a half-trained model is not scored."""
    # deferred: jaxem.train pulls in optax/orbax, which scoring an existing run never needs
    from jaxem.train.trainer import train

    start = time.time()
    summary = train(config, run_dir, progress=progress, exact=True)
    if "preempted_at" in summary:
        raise SystemExit(f"training stopped at step {summary['preempted_at']} (SIGTERM); run the same command to resume.")
    return summary, time.time() - start


def otsu_dark(raw: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """The raw-threshold baseline: a 'probability' that a voxel is dark (membrane, mitochondrion)
    from the raw image alone, shifted so that 0.5 is Otsu's threshold.

    raw: any real array (z, y, x) or (y, x); its grey values are scaled to [0, 1] by `value_range`
    (low, high), default the array's own min and max (ISBI's protocol uses UINT8_RANGE). Returns
    float32 in [0, 1], same shape.
    """
    from skimage.filters import threshold_otsu

    raw = np.asarray(raw, dtype=np.float32)
    low, span = (raw.min(), float(raw.max() - raw.min())) if value_range is None else \
        (value_range[0], float(value_range[1] - value_range[0]))
    inverted = 1.0 - (raw - low) / (span or 1.0)
    return np.clip(0.5 + (inverted - threshold_otsu(inverted)), 0.0, 1.0).astype(np.float32)


def write_results(out_dir: Path, results: dict) -> None:
    """`results` as `out_dir`/results.json."""
    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def format_table(results: dict, rows, keys, better: dict, titles: dict | None = None, key_width: int = 20) -> str:
    """`results[row][key]` for each row (columns) and key of `keys` (lines), with the key's
    `better` direction ('higher', 'lower' or any note) last; `titles` name the columns (default the
    rows). Integers print as such, other values with 4 decimals."""
    titles = titles or {}
    cell = lambda v: f"{v:>11d}" if isinstance(v, (int, np.integer)) else f"{v:>11.4f}"  # noqa: E731
    lines = [f"{'metric':<{key_width}}" + "".join(f"{titles.get(r, r):>11}" for r in rows) + "   better"]
    for k in keys:
        lines.append(f"{k:<{key_width}}" + "".join(cell(results[r][k]) for r in rows) + f"   {better[k]}")
    return "\n".join(lines)


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


def write_overlay(raw: np.ndarray, probability: np.ndarray, labels: list, titles: list[str], out_path: Path) -> None:
    """PNG of one z-slice: the EM (y, x) | `probability` (y, x) >= 0.5 over the EM | each of
    `labels` (instance ids, (y, x)) tinted over the EM; `titles` name all the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb

    fig, axes = plt.subplots(1, 2 + len(labels), figsize=(4 * (2 + len(labels)), 4.3))
    axes[0].imshow(raw, cmap="gray")
    axes[1].imshow(raw, cmap="gray")
    axes[1].imshow(np.ma.masked_less(probability, 0.5), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
    for ax, ids in zip(axes[2:], labels):
        ax.imshow(label2rgb(np.asarray(ids).astype(np.int64), raw, alpha=0.35, bg_label=0))
    for ax, title in zip(axes, titles):
        ax.set_title(title), ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def write_instances_overlay(raw, boundary, ours, baseline, gt, out_path: Path, z: int | None = None) -> None:
    """`write_overlay` of z-slice `z` (default the middle one) of (z, y, x) volumes: EM | predicted
    membranes over EM | model instances | threshold-baseline instances | ground truth."""
    z = raw.shape[0] // 2 if z is None else z
    write_overlay(raw[z], boundary[z], [ours[z], baseline[z], gt[z]],
                  ["EM (held-out)", "predicted membranes", "model instances", "threshold baseline", "ground truth"],
                  out_path)
