"""3D neuron segmentation recipe: train an affinity model (unless the run exists) and score it in 3D.

    python benchmarks/snemi3d.py --run runs/snemi3d_cpu --config snemi3d_affinities:cpu,synthetic
    python benchmarks/snemi3d.py --run runs/snemi3d --config snemi3d_affinities      # SNEMI3D, a GPU
    python benchmarks/snemi3d.py --run R --config snemi3d_affinities:cpu,synthetic --seeds 0 1 2

Scores the config's dataset's `val` split (SNEMI3D: slices 80-99 of the labelled volume; the
synthetic neuropil: its own held-out volume) the SNEMI3D / CREMI way over the whole 3D volume:
adapted Rand error, VOI split/merge, VRand/VInfo, interior Dice, for mutex watershed and the
affinity watershed on the model's affinities and for the raw-threshold baseline
(jaxem/protocols/neurons.py); a split of several parts (CREMI's samples) is scored part
by part and averaged (`score_split`). Prints JSON with training time and the machine. With
--seeds, one run per seed in <run>/seed<N> and the mean and std of every score.
benchmarks/cremi.py runs `main` with CREMI's config and protocol.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def score_split(run: Path, dataset: str, progress: bool, min_size: int, h: float, protocol: str,
                tune: bool = False) -> dict:
    """Scores every part of `dataset`'s val split with the run's model (`score_affinity_run`);
    with `tune`, also with settings tuned on the first part of the train split.

    One part (SNEMI3D, the synthetic neuropil): its results, written to <run>/heldout. Several
    (CREMI's samples A, B, C): the mean of every score over the parts, and "parts": {name:
    results}, each written to <run>/heldout/<name>.
    """
    from jaxem.data import datasets
    from jaxem.protocols.common import over_seeds
    from jaxem.protocols.neurons import rows_of, score_affinity_run

    images, labels = datasets.split_paths(dataset, "val")
    tune_on = tuple(paths[0] for paths in datasets.split_paths(dataset, "train")) if tune else None
    parts = {}
    for image, label in zip(images, labels):
        name = Path(image).parent.name
        out_dir = run / "heldout" if len(images) == 1 else run / "heldout" / name
        parts[name] = score_affinity_run(run, image, label, out_dir=out_dir, min_size=min_size, h=h,
                                         progress=progress, protocol=protocol, tune_on=tune_on)
    if len(parts) == 1:
        return next(iter(parts.values()))
    rows = rows_of(next(iter(parts.values())))
    mean = {row: {k: v["mean"] for k, v in metrics.items()} for row, metrics in over_seeds(parts, rows).items()}
    return {**mean, "parts": parts}


def train_and_score(config, run: Path, progress: bool, min_size: int, h: float, protocol: str = "snemi3d",
                    tune: bool = False) -> dict:
    """Trains `config` into `run` (resuming or skipping a finished run) and scores the val split."""
    from jaxem.protocols.common import train_to_completion

    summary, train_seconds = train_to_completion(config, run, progress)
    scores = score_split(run, config.data.dataset, progress, min_size, h, protocol, tune)
    return {"scores": scores, "training": summary, "wall_seconds_this_invocation": train_seconds}


def main(default_config: str = "snemi3d_affinities:cpu,synthetic", protocol: str = "snemi3d",
         description: str = __doc__) -> None:
    """The benchmark's command line; benchmarks/cremi.py runs it with CREMI's config and protocol."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (trained here when it holds no finished run)")
    parser.add_argument("--config", default=default_config)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--min-size", type=int, default=100, help="voxels: smaller fragments are flooded")
    parser.add_argument("--h", type=float, default=16.0, help="nm: h-maxima depth of the watershed seeds")
    parser.add_argument("--tune", action="store_true",
                        help="also score with each method's settings tuned on the train split (jaxem.segment.tune)")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args()

    import jax

    from jaxem.config import apply_overrides, load_config
    from jaxem.protocols.common import over_seeds
    from jaxem.protocols.neurons import format_table, protocol_keys, rows_of

    keys = protocol_keys(protocol)
    config = apply_overrides(load_config(args.config), overrides)
    report = {"benchmark": f"{config.data.dataset}_val_3d", "config": args.config, "overrides": overrides,
              "protocol": protocol}
    if args.seeds is None:
        result = train_and_score(config, Path(args.run), not args.no_progress, args.min_size, args.h, protocol, args.tune)
        print(format_table(result["scores"], keys))
        report.update(result)
    else:
        per_seed = {}
        for seed in args.seeds:
            config.seed = seed
            per_seed[seed] = train_and_score(config, Path(args.run) / f"seed{seed}", not args.no_progress,
                                             args.min_size, args.h, protocol, args.tune)
        rows = rows_of(per_seed[args.seeds[0]]["scores"])
        summary = over_seeds({s: r["scores"] for s, r in per_seed.items()}, rows=rows)
        print(f"mean ± std over seeds {', '.join(map(str, args.seeds))}")
        print(f"{'metric':<26}" + "".join(f"{r:>19}" for r in rows))
        for k in keys:
            print(f"{k:<26}" + "".join(f"{summary[r][k]['mean']:>10.4f} ± {summary[r][k]['std']:.4f}" for r in rows))
        report.update(seeds=args.seeds, over_seeds=summary,
                      per_seed={str(s): r for s, r in per_seed.items()})
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "devices": [str(d) for d in jax.devices()]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(main)
