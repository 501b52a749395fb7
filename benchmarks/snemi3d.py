"""3D neuron segmentation recipe: train an affinity model (unless the run exists) and score it in 3D.

    python benchmarks/snemi3d.py --run runs/snemi3d_cpu --config snemi3d_affinities:cpu,synthetic
    python benchmarks/snemi3d.py --run runs/snemi3d --config snemi3d_affinities      # SNEMI3D, a GPU
    python benchmarks/snemi3d.py --run R --config snemi3d_affinities:cpu,synthetic --seeds 0 1 2

Scores the config's dataset's `val` split (SNEMI3D: slices 80-99 of the labelled volume; the
synthetic neuropil: its own held-out volume) the SNEMI3D / CREMI way over the whole 3D volume:
adapted Rand error, VOI split/merge, VRand/VInfo, interior Dice, for mutex watershed and the
affinity watershed on the model's affinities and for the raw-threshold baseline
(jaxem/metrics/heldout_affinities.py). Prints JSON with training time and the machine. With
--seeds, one run per seed in <run>/seed<N> and the mean and std of every score.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path



def train_and_score(config, run: Path, progress: bool, min_size: int, h: float) -> dict:
    """Trains `config` into `run` (resuming or skipping a finished run) and scores the val split."""
    from jaxem.data import datasets
    from jaxem.metrics.heldout import train_to_completion
    from jaxem.metrics.heldout_affinities import score_affinity_run

    summary, train_seconds = train_to_completion(config, run, progress)
    images, labels = datasets.split_paths(config.data.dataset, "val")
    scores = score_affinity_run(run, images[0], labels[0], out_dir=run / "heldout", min_size=min_size, h=h,
                                progress=progress)
    return {"scores": scores, "training": summary, "wall_seconds_this_invocation": train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (trained here when it holds no finished run)")
    parser.add_argument("--config", default="snemi3d_affinities:cpu,synthetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--min-size", type=int, default=100, help="voxels: smaller fragments are flooded")
    parser.add_argument("--h", type=float, default=16.0, help="nm: h-maxima depth of the watershed seeds")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args()

    import jax

    from jaxem.config import apply_overrides, load_config
    from jaxem.metrics.heldout import over_seeds
    from jaxem.metrics.heldout_affinities import ROWS, SCORE_KEYS, format_table

    config = apply_overrides(load_config(args.config), overrides)
    report = {"benchmark": f"{config.data.dataset}_val_3d", "config": args.config, "overrides": overrides}
    if args.seeds is None:
        result = train_and_score(config, Path(args.run), not args.no_progress, args.min_size, args.h)
        print(format_table(result["scores"]))
        report.update(result)
    else:
        per_seed = {}
        for seed in args.seeds:
            config.seed = seed
            per_seed[seed] = train_and_score(config, Path(args.run) / f"seed{seed}", not args.no_progress,
                                             args.min_size, args.h)
        summary = over_seeds({s: r["scores"] for s, r in per_seed.items()}, rows=ROWS)
        print(f"mean ± std over seeds {', '.join(map(str, args.seeds))}")
        print(f"{'metric':<20}" + "".join(f"{r:>19}" for r in ROWS))
        for k in SCORE_KEYS:
            print(f"{k:<20}" + "".join(f"{summary[r][k]['mean']:>10.4f} ± {summary[r][k]['std']:.4f}" for r in ROWS))
        report.update(seeds=args.seeds, over_seeds=summary,
                      per_seed={str(s): r for s, r in per_seed.items()})
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "devices": [str(d) for d in jax.devices()]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
