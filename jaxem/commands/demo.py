"""`jaxem demo [--workdir DIR]`: synthetic EM -> train a 2D U-Net -> predict -> instances -> scores.

Writes to the workdir: data/*.zarr (the synthetic volumes), config.json, metrics.jsonl,
tensorboard/, checkpoints/, training_curves.png, predictions.zarr, overlay.png, results.json.
Running the same command again resumes training from the latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxem.config import apply_overrides, load_config


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--config", default="demo", help="config file, default configs/demo.py (FILE[:ARG])")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def write_synthetic_data(config, data_dir: Path) -> dict[str, tuple[str, str]]:
    """Generates the train/val/test synthetic volumes as zarr (once); returns split -> (raw, labels)."""
    from jaxem.data.synthetic import generate
    from jaxem.data.volume import create_volume

    paths = {}
    for seed_offset, split in enumerate(("train", "val", "test")):
        raw_path, labels_path = data_dir / f"{split}_raw.zarr", data_dir / f"{split}_instances.zarr"
        paths[split] = (str(raw_path), str(labels_path))
        if (labels_path / ".zattrs").exists():
            continue
        em = generate(shape=tuple(config.demo[f"{split}_shape"]), voxel_size=tuple(config.demo.voxel_size),
                      seed=config.seed * 1000 + seed_offset)
        for path, array in ((raw_path, em.raw), (labels_path, em.instances)):
            create_volume(path, array.shape, array.dtype, voxel_size=config.demo.voxel_size, overwrite=True).write(array)
    return paths


def with_data_paths(config, paths):
    """The config with data.{train,val}_{images,labels} pointing at the written volumes."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    config.data.train_images, config.data.train_labels = (paths["train"][0],), (paths["train"][1],)
    config.data.val_images, config.data.val_labels = (paths["val"][0],), (paths["val"][1],)
    config.lock()
    return config


def evaluate_slices(instances: np.ndarray, boundary: np.ndarray, gt: np.ndarray) -> dict:
    """ISBI-style scores averaged over z-slices: clustering scores of the instances, and Dice/IoU of
    the predicted cell interior (boundary probability < 0.5) against the ground-truth interior."""
    from jaxem.metrics.clustering import clustering_scores
    from jaxem.metrics.pixel import binary_scores

    rows = []
    for seg_slice, boundary_slice, gt_slice in zip(instances, boundary, gt):
        scores = clustering_scores(seg_slice, gt_slice)
        pixel = binary_scores(boundary_slice < 0.5, gt_slice > 0)
        rows.append({**scores, "dice": pixel["dice"], "iou": pixel["iou"]})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def threshold_baseline(raw: np.ndarray) -> np.ndarray:
    """Membrane 'probability' from the raw image alone: dark = membrane, Otsu-scaled to [0, 1]."""
    from skimage.filters import threshold_otsu

    inverted = 1.0 - raw.astype(np.float32) / 255.0
    t = threshold_otsu(inverted)
    return np.clip(0.5 + (inverted - t), 0.0, 1.0)  # crosses 0.5 exactly at the Otsu threshold


def run(args, overrides) -> int:
    from jaxem.infer.blockwise import predict_run
    from jaxem.segment.instances import instances_from_boundaries
    from jaxem.train.loop import train
    from jaxem.data.volume import open_volume

    workdir = Path(args.workdir)
    config = apply_overrides(load_config(args.config), overrides)
    paths = write_synthetic_data(config, workdir / "data")
    config = with_data_paths(config, paths)

    summary = train(config, workdir, progress=not args.no_progress)
    predictions_path = workdir / "predictions.zarr"
    predict_run(workdir, paths["test"][0], str(predictions_path), overwrite=True, progress=not args.no_progress)

    raw = open_volume(paths["test"][0]).read()
    gt = open_volume(paths["test"][1]).read()
    boundary = _boundary_channel(predictions_path)
    ours = instances_from_boundaries(boundary, method="watershed", per_slice=True)
    baseline_boundary = threshold_baseline(raw)
    baseline = instances_from_boundaries(baseline_boundary, method="watershed", per_slice=True)
    results = {
        "unet": evaluate_slices(ours, boundary, gt),
        "threshold_baseline": evaluate_slices(baseline, baseline_boundary, gt),
        "training": summary,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_overlay(raw, boundary, ours, baseline, gt, workdir / "overlay.png")
    print_table(results)
    print(f"\nwrote {workdir}/results.json, overlay.png, training_curves.png, metrics.jsonl, checkpoints/")
    return 0


def _boundary_channel(path: Path) -> np.ndarray:
    from jaxem.data.volume import open_volume

    volume = open_volume(str(path))
    array = volume.read()
    return array[..., 0] if volume.axes[-1] == "c" else (array[0] if volume.axes[0] == "c" else array)


def print_table(results: dict) -> None:
    keys = ["vrand", "vinfo", "adapted_rand_error", "voi_split", "voi_merge", "dice", "iou"]
    better = {"vrand": "higher", "vinfo": "higher", "adapted_rand_error": "lower", "voi_split": "lower",
              "voi_merge": "lower", "dice": "higher", "iou": "higher"}
    print(f"\n{'metric':<20}{'U-Net':>10}{'threshold':>12}   better")
    for k in keys:
        print(f"{k:<20}{results['unet'][k]:>10.4f}{results['threshold_baseline'][k]:>12.4f}   {better[k]}")


def write_overlay(raw, boundary, ours, baseline, gt, out_path: Path, z: int | None = None) -> None:
    """PNG: EM | predicted membranes over EM | U-Net instances | threshold instances | ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb

    z = raw.shape[0] // 2 if z is None else z
    panels = [
        ("EM (held-out)", raw[z], "gray"),
        ("predicted membranes", None, None),
        ("U-Net instances", label2rgb(ours[z], raw[z], alpha=0.35, bg_label=0), None),
        ("threshold baseline", label2rgb(baseline[z], raw[z], alpha=0.35, bg_label=0), None),
        ("ground truth", label2rgb(gt[z].astype(np.int64), raw[z], alpha=0.35, bg_label=0), None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for ax, (title, image, cmap) in zip(axes, panels):
        if image is None:
            ax.imshow(raw[z], cmap="gray")
            ax.imshow(np.ma.masked_less(boundary[z], 0.5), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
        else:
            ax.imshow(image, cmap=cmap)
        ax.set_title(title), ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
