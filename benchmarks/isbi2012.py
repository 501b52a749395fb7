"""ISBI 2012 accuracy recipe: train (unless the run exists) and score held-out slices 16-19.

    python benchmarks/isbi2012.py --run runs/isbi2012_cpu --config isbi2012_unet:cpu [--config.x=y ...]

Prepares the dataset from ../shared/data/isbi2012 (a local copy of the challenge data) when it is
not yet in $JAXEM_DATA. Prints JSON: held-out VRand, VInfo, adapted Rand error, VOI split/merge,
interior Dice/IoU for the model and for the raw-threshold baseline, training time, the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

LOCAL_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (trained here when it holds no finished run)")
    parser.add_argument("--config", default="isbi2012_unet:cpu")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args()

    import jax

    from jaxem.config import apply_overrides, load_config
    from jaxem.data import datasets
    from jaxem.metrics.heldout import format_table, score_run
    from jaxem.train.loop import train

    if not datasets.is_prepared("isbi2012"):
        datasets.download("isbi2012", url_base=LOCAL_COPY.as_uri() + "/")
    config = apply_overrides(load_config(args.config), overrides)
    start = time.time()
    summary = train(config, args.run, progress=not args.no_progress)
    train_seconds = time.time() - start
    images, labels = datasets.split_paths("isbi2012", "val")
    results = score_run(args.run, images[0], labels[0], out_dir=Path(args.run) / "heldout",
                        progress=not args.no_progress)
    print(format_table(results))
    print(json.dumps({
        "benchmark": "isbi2012_heldout_slices_16_19", "config": args.config, "overrides": overrides,
        "scores": results, "training": summary, "wall_seconds_this_invocation": train_seconds,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "devices": [str(d) for d in jax.devices()]},
    }, indent=2))


if __name__ == "__main__":
    main()
