"""Which tuned segmentation setting transfers to held-out data: the tuning sweep's argmax, or the
best plateau of it?

    python benchmarks/tuning_selection.py RUN [RUN ...] [--unseen FIRST STOP] [--out selection.json]

Each RUN is a fine-tuning run scored by `jaxem.protocols.isbi2012.score_run` with `tune_on` (as
benchmarks/label_efficiency.py and isbi2012.py score them): RUN/heldout/tuning.json holds the sweep
of the default grid on the labelled slices, RUN/heldout/predictions.zarr the held-out prediction.
For every run this scores every setting of that grid on the held-out slices (ISBI slices 16-19,
VRand per slice, as the benchmarks do) and reports the held-out VRand of the setting each rule
picks from the tuning sweep: "argmax" (what `jaxem tune` picks) and "plateau" (the argmax of
`plateau_scores`: each setting's score averaged with its grid neighbours'),
beside the best setting in hindsight ("oracle"), and "matched": the argmax setting applied to the
held-out prediction after `jaxem.segment.calibration.match_quantiles` maps its value distribution
onto that of the run's prediction of the labelled slices (RUN/heldout/tune_predictions.zarr), as
`jaxem segment --match-quantiles` does, so a map that marks fewer
pixels as membrane on new data than on the slices it was trained on meets the tuned thresholds as
it did there. `--unseen FIRST STOP` adds "unseen": the argmax of the sweep on labelled ISBI
training slices the runs never trained on. Prints JSON: per run, and per arm (the run directory's
parent) the mean of plateau - argmax and of matched - argmax.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.isbi2012 import prepare_isbi  # noqa: E402
from benchmarks.ssl_transfer import labelled_subset, trained_isbi_slices  # noqa: E402


SWEPT_KEYS = ("threshold", "h", "merge", "min_size")  # the numeric values a grid steps through


def plateau_scores(table: list[dict], metric: str) -> np.ndarray:
    """Each row's `metric` averaged with its grid neighbours' (N,): the settings of the same
    method and seeds one grid step away in one swept value (SWEPT_KEYS), all else equal. A setting
    on a plateau keeps its score; one at a cliff edge is pulled down (or up) by the cliff."""
    settings = [row["setting"] for row in table]
    values = np.array([row["scores"][metric] for row in table], np.float64)
    neighbours: list[set[int]] = [{i} for i in range(len(table))]
    for key in SWEPT_KEYS:
        lines: dict[tuple, list[int]] = {}  # every other field equal -> the rows along `key`
        for i, setting in enumerate(settings):
            if key in setting:
                rest = tuple(sorted((k, repr(v)) for k, v in setting.items() if k != key))
                lines.setdefault(rest, []).append(i)
        for rows in lines.values():
            steps = sorted({float(settings[i][key]) for i in rows})
            position = {i: steps.index(float(settings[i][key])) for i in rows}
            for i in rows:
                neighbours[i] |= {j for j in rows if abs(position[j] - position[i]) == 1}
    return np.array([np.nanmean(values[sorted(n)]) for n in neighbours])


def held_out_choices(run: Path, labels_path: str, unseen: tuple[str, str] | None = None) -> dict:
    """{rule: {"setting", "heldout_vrand", "tuning_vrand"}} for argmax, plateau and oracle (and
    "unseen" with `unseen` = (image, labels) the run never trained on: the argmax of the sweep
    there), plus the number of grid settings, for one run (module docstring)."""
    from jaxem.data.volume import open_volume
    from jaxem.protocols.common import prediction_channel
    from jaxem.protocols.isbi2012 import tune_settings
    from jaxem.segment.calibration import map_quantiles, match_quantiles
    from jaxem.segment.tune import tune

    sweep = json.loads((run / "heldout" / "tuning.json").read_text())["model"]
    table = sweep["table"]
    grid = [row["setting"] for row in table]
    labels = open_volume(labels_path)
    prediction = prediction_channel(run / "heldout" / "predictions.zarr")
    held_out = tune(prediction, labels.read(), "boundary", grid=grid, metric="vrand", per_slice=True,
                    voxel_size=labels.voxel_size, progress=False)["table"]
    vrand = np.array([row["scores"]["vrand"] for row in held_out])
    tuning = np.array([row["scores"]["vrand"] for row in table])
    picks = {"argmax": int(np.nanargmax(tuning)), "plateau": int(np.nanargmax(plateau_scores(table, "vrand"))),
             "oracle": int(np.nanargmax(vrand))}
    matched_map = match_quantiles(prediction, map_quantiles(prediction),
                                  map_quantiles(prediction_channel(run / "heldout" / "tune_predictions.zarr")))
    matched = tune(matched_map, labels.read(), "boundary", grid=[grid[picks["argmax"]]], metric="vrand",
                   per_slice=True, voxel_size=labels.voxel_size, progress=False)["table"][0]
    choices = {"matched": {"setting": matched["setting"], "heldout_vrand": float(matched["scores"]["vrand"]),
                           "tuning_vrand": float(tuning[picks["argmax"]])}}
    if unseen is not None:
        out_dir = run / "tuned_on_unseen"
        out_dir.mkdir(exist_ok=True)
        setting = tune_settings(run, unseen, out_dir, progress=False)[0]["model"]
        picks["unseen"] = grid.index(setting)
    return {"settings": len(table),
            **{rule: {"setting": table[i]["setting"], "heldout_vrand": float(vrand[i]), "tuning_vrand": float(tuning[i])}
               for rule, i in picks.items()}, **choices}


def gain_over_argmax(per_run: dict, rule: str) -> dict:
    """`rule`'s held-out VRand minus the argmax's, per run: the mean, in how many runs they differ
    and in how many `rule` is better, and per arm (the run directory's parent) the mean and values."""
    arms: dict[str, list[float]] = {}
    for run, r in per_run.items():
        arms.setdefault(Path(run).parent.name, []).append(r[rule]["heldout_vrand"] - r["argmax"]["heldout_vrand"])
    gains = [g for values in arms.values() for g in values]
    differ = [g for g in gains if g != 0]
    return {"mean": float(np.mean(gains)), "runs_where_they_differ": len(differ), "wins": sum(g > 0 for g in differ),
            "per_arm": {arm: {"mean": float(np.mean(v)), "values": v} for arm, v in arms.items()}}


def unseen_refusal(runs: list[Path], first: int, stop: int) -> str | None:
    """Why ISBI training slices [first, stop) cannot be the unseen tuning slices of `runs` (one
    sentence), or None: they must be a non-empty range before the scored slices 16-19 that no run
    trained on (trained_isbi_slices, which also holds for runs that labelled slices F to F+n-1)."""
    if not first < stop <= 16:
        return f"--unseen {first} {stop}: expected a non-empty range of ISBI training slices before 16."
    for run in runs:
        trained = trained_isbi_slices(run)
        if first < trained[1] and trained[0] < stop:
            return (f"--unseen {first} {stop}: expected slices none of the runs trained on, but {run} trained on "
                    f"slices [{trained[0]}, {trained[1]}).")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="scored fine-tuning runs (RUN/heldout/tuning.json)")
    parser.add_argument("--unseen", type=int, nargs=2, metavar=("FIRST", "STOP"),
                        help="also tune on ISBI training slices [FIRST, STOP), which no run may have trained on "
                             "(rule 'unseen'; the slices in RUN/../../unseen_FIRST_STOP, predictions and sweep in "
                             "RUN/tuned_on_unseen)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    from jaxem.data import datasets
    from jaxem.errors import UserError

    prepare_isbi()
    labels_path = datasets.split_paths("isbi2012", "val")[1][0]
    unseen = None
    if args.unseen:
        try:
            refusal = unseen_refusal(args.runs, *args.unseen)
        except UserError as error:
            refusal = str(error)
        if refusal:
            parser.error(refusal)
        # beside the runs' arm directories, as label_efficiency.py keeps its labelled_<n> slices
        first, stop = args.unseen
        unseen = labelled_subset(stop, args.runs[0].resolve().parents[1] / f"unseen_{first}_{stop}", first=first)
    per_run = {str(run): held_out_choices(run, labels_path, unseen) for run in args.runs}
    report = {
        "benchmark": "tuning_selection_isbi2012_heldout_slices_16_19", "runs": len(per_run),
        **{f"{rule}_minus_argmax": gain_over_argmax(per_run, rule) for rule in ("plateau", "matched")},
        "unseen_slices": args.unseen,
        "mean_heldout_vrand": {rule: float(np.mean([r[rule]["heldout_vrand"] for r in per_run.values()]))
                               for rule in ("argmax", "plateau", "matched", "oracle", *(["unseen"] if unseen else []))},
        "per_run": per_run, "machine": {"platform": platform.platform()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
