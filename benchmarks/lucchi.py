"""Lucchi mitochondria accuracy recipe: train (unless the run exists) and score the test volume.

    python benchmarks/lucchi.py --run runs/lucchi --config lucchi_mito [--local-copy DIR] [--config.x=y ...]
    python benchmarks/lucchi.py --run /tmp/lucchi_cpu --config lucchi_mito:cpu,synthetic --no-progress

--dataset lucchi (default for the lucchi_mito config) prepares the EPFL data from --local-copy DIR
(a folder holding training.tif, training_groundtruth.tif, testing.tif, testing_groundtruth.tif) or
else from the official download, when it is not yet in $JAXEM_DATA; --dataset synthetic_mito (the
default with the config's `synthetic` argument) is generated on first use. The config trains on
the dataset's train split; the test split is predicted blockwise, thresholded at 0.5 and scored
over the whole volume (jaxem.protocols.lucchi): foreground Jaccard/Dice, and the
mitochondria as 3D connected components (AP@0.5/0.75, PQ, AJI), beside an Otsu threshold of the
raw image. Writes <run>/heldout/{predictions.zarr,results.json,overlay.png}; prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

DATASETS = ("lucchi", "synthetic_mito")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(known arguments, --config.* overrides)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (trained here when it holds no finished run)")
    parser.add_argument("--config", default="lucchi_mito:cpu")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="dataset to train on and score (default: the config's data.dataset)")
    parser.add_argument("--local-copy", default=None, help="folder with the four Lucchi TIFFs (instead of the download)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold of the model")
    parser.add_argument("--min-size", type=int, default=0,
                        help="voxels: smaller predicted objects are removed before scoring (0 = the published protocol)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_known_args(argv)


def prepare_dataset(name: str, local_copy: str | None, progress: bool) -> None:
    """Makes sure `name` is prepared in $JAXEM_DATA (from `local_copy` via file:// when given)."""
    from jaxem.data import datasets
    from jaxem.errors import UserError

    if datasets.is_prepared(name) or name in datasets.GENERATED:
        return
    url_base = None
    if local_copy:
        folder = Path(local_copy).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"--local-copy {local_copy} is not a folder (expected one holding the Lucchi TIFFs).")
        url_base = folder.as_uri() + "/"
    datasets.download(name, url_base=url_base, progress=progress)


def train_and_score(config, run: Path, threshold: float, progress: bool, min_size: int = 0) -> dict:
    """Trains `config` into `run` (resuming or skipping a finished run) and scores the test split."""
    from jaxem.data import datasets
    from jaxem.protocols.common import train_to_completion
    from jaxem.protocols.lucchi import score_run

    summary, train_seconds = train_to_completion(config, run, progress)
    images, labels = datasets.split_paths(config.data.dataset, "test")
    start = time.time()
    scores = score_run(run, images[0], labels[0], out_dir=run / "heldout", threshold=threshold, min_size=min_size,
                       progress=progress)
    return {"scores": scores, "training": summary, "wall_seconds_this_invocation": train_seconds,
            "predict_and_score_seconds": time.time() - start, "test_image": images[0]}


def main(argv=None) -> dict:
    """Runs the benchmark; prints the table and the JSON report, and returns the report."""
    args, overrides = parse_args(argv)
    import jax

    from jaxem.config import apply_overrides, load_config
    from jaxem.protocols.lucchi import format_table

    config = apply_overrides(load_config(args.config), overrides)
    if args.dataset:
        config.data.dataset = args.dataset
    prepare_dataset(config.data.dataset, args.local_copy, not args.no_progress)
    report = {"benchmark": f"{config.data.dataset}_test_mitochondria", "config": args.config,
              "dataset": config.data.dataset, "overrides": overrides}
    report.update(train_and_score(config, Path(args.run), args.threshold, not args.no_progress, args.min_size))
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "devices": [str(d) for d in jax.devices()]}
    print(format_table(report["scores"]))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(main)
