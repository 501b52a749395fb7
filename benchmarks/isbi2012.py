"""ISBI 2012 accuracy recipe: train (unless the run exists) and score held-out slices 16-19.

    python benchmarks/isbi2012.py --run runs/isbi2012_cpu --config isbi2012_unet:cpu [--config.x=y ...]
    python benchmarks/isbi2012.py --run runs/isbi2012_cpu --config isbi2012_unet:cpu --seeds 0 1 2
    python benchmarks/isbi2012.py --run runs/isbi2012_cpu --config isbi2012_unet:cpu --tta

Prepares the dataset from ../shared/data/isbi2012 (a local copy of the challenge data) when it is
not yet in $JAXEM_DATA. Prints JSON: held-out VRand, VInfo, adapted Rand error, VOI split/merge,
interior Dice/IoU for the model and for the raw-threshold baseline, training time, the machine.
Each is scored twice: with the fixed watershed settings ("model", "threshold_baseline") and with
the settings tuned on the training slices 0-15 ("model_tuned", "threshold_baseline_tuned";
jaxem.segment.tune; --no-tune skips them). --tta predicts with test-time augmentation (8 flips
and rotations), both the tuning slices and the held-out ones.
A finished run is not trained again, and its scores are not recomputed when its checkpoints and
the scoring request are those results.json was scored from (scored_from.json beside it):
--rescore after changing the scoring code. With --seeds, one run per seed in <run>/seed<N>
(config.seed = N) and the mean and standard deviation of every score over the seeds: single runs
differ by ~0.01 VRand from rounding alone (docs/training.md), so compare recipes by these.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


LOCAL_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"


def prepare_isbi() -> None:
    """Prepares ISBI 2012 in $JAXEM_DATA from the local copy (../shared/data/isbi2012) unless it is there."""
    from jaxem.data import datasets

    if not datasets.is_prepared("isbi2012"):
        datasets.download("isbi2012", url_base=LOCAL_COPY.as_uri() + "/")


def train_and_score(config, run: Path, progress: bool, tta: bool = False, tune: bool = True,
                    tune_on: tuple[str, str] | None = None, rescore: bool = False) -> dict:
    """Trains `config` into `run` (resuming or skipping a finished run) and scores slices 16-19,
    with settings tuned on `tune_on` = (image, labels) (default slices 0-15) as well unless `tune`
    is False. Scores of the same checkpoints and request are read back from the last scoring
    (`scoring_key`) unless `rescore`."""
    from jaxem.data import datasets
    from jaxem.protocols.common import train_to_completion
    from jaxem.protocols.isbi2012 import ROWS, score_run

    summary, train_seconds = train_to_completion(config, run, progress)
    images, labels = datasets.split_paths("isbi2012", "val")
    if tune_on is None:
        tune_on = tuple(p[0] for p in datasets.split_paths("isbi2012", "train"))
    tune_on = tune_on if tune else None
    out_dir = run / scored_dir_name(tta)
    key = scoring_key(run, image=images[0], labels=labels[0], tta=tta, tune_on=tune_on, rows=list(ROWS))
    scores = None if rescore else scores_of(out_dir, key)
    if scores is None:
        (out_dir / SCORED_FROM).unlink(missing_ok=True)
        scores = score_run(run, images[0], labels[0], out_dir=out_dir, progress=progress, tta=tta, tune_on=tune_on)
        (out_dir / SCORED_FROM).write_text(json.dumps(key, indent=2) + "\n")
    else:
        print(f"{out_dir}: the scores of these checkpoints are reused (--rescore scores them again).")
    return {"scores": scores, "training": summary, "wall_seconds_this_invocation": train_seconds}


def scored_dir_name(tta: bool) -> str:
    """The directory in a run where `train_and_score` writes its held-out maps and scores."""
    return "heldout_tta" if tta else "heldout"


SCORED_FROM = "scored_from.json"  # beside results.json: the scoring_key it was computed from


def scoring_key(run: Path, **request) -> dict:
    """What a run's held-out scores depend on, the code aside: its checkpoints (step directories and
    their modification times, ns) and the `request` (volumes, TTA, tuning volume, the rows scored),
    as JSON."""
    steps = sorted((p.name, p.stat().st_mtime_ns) for p in (run / "checkpoints").iterdir()) \
        if (run / "checkpoints").is_dir() else []
    return json.loads(json.dumps({"checkpoints": steps, **request}))


def scores_of(out_dir: Path, key: dict) -> dict | None:
    """The results.json in `out_dir` when it was scored from `key`, else None."""
    results, record = out_dir / "results.json", out_dir / SCORED_FROM
    if results.is_file() and record.is_file() and json.loads(record.read_text()) == key:
        return json.loads(results.read_text())
    return None


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """{row: {metric: {"mean", "std", "values"}}} over the seeds' runs, for the rows of
    jaxem.protocols.isbi2012.ROWS that were scored."""
    from jaxem.protocols.common import over_seeds as scores_over_seeds
    from jaxem.protocols.isbi2012 import rows_of

    first = next(iter(per_seed.values()))["scores"]
    return scores_over_seeds({s: r["scores"] for s, r in per_seed.items()}, rows=rows_of(first))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (trained here when it holds no finished run)")
    parser.add_argument("--config", default="isbi2012_unet:cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one run per seed in <run>/seed<N>, and the scores' mean and std over them")
    parser.add_argument("--tta", action="store_true", help="predict with test-time augmentation (8 flips and rotations)")
    parser.add_argument("--no-tune", action="store_true", help="score with the fixed segmentation settings only")
    parser.add_argument("--rescore", action="store_true",
                        help="score again even where results.json was scored from the same checkpoints and request")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args()

    import jax

    from jaxem.config import apply_overrides, load_config
    from jaxem.protocols.isbi2012 import SCORE_KEYS, format_table

    prepare_isbi()
    config = apply_overrides(load_config(args.config), overrides)
    report = {"benchmark": "isbi2012_heldout_slices_16_19", "config": args.config, "overrides": overrides}
    if args.seeds is None:
        result = train_and_score(config, Path(args.run), not args.no_progress, args.tta, not args.no_tune,
                                 rescore=args.rescore)
        print(format_table(result["scores"]))
        report.update(result)
    else:
        per_seed = {}
        for seed in args.seeds:
            config.seed = seed
            per_seed[seed] = train_and_score(config, Path(args.run) / f"seed{seed}", not args.no_progress, args.tta,
                                             not args.no_tune, rescore=args.rescore)
        summary = over_seeds(per_seed)
        print(f"{'row':<26}{'metric':<20}{'mean':>8}{'std':>8}   seeds {', '.join(map(str, args.seeds))}")
        for row in summary:
            for k in SCORE_KEYS:
                m = summary[row][k]
                print(f"{row:<26}{k:<20}{m['mean']:>8.4f}{m['std']:>8.4f}   " + " ".join(f"{v:.4f}" for v in m["values"]))
        report.update(seeds=args.seeds, over_seeds=summary, per_seed={str(s): r for s, r in per_seed.items()})
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "devices": [str(d) for d in jax.devices()]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(main)
