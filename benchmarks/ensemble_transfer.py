"""Does a pretrained network add to a scratch network? Two-network ensembles of the runs that
benchmarks/label_efficiency.py trained, scored without training anything.

    python benchmarks/ensemble_transfer.py --run runs/isbi --recipe ARM --control ARM \\
        --slices 1 2 --first-slice 0 5 10 --seeds 0 1 2 [--tta] --out ensembles.json --plot ensembles.png

For every replicate (n labelled slices, first labelled slice F, seed s) it averages the stored
membrane probability maps of two runs (RUN/heldout/predictions.zarr on the held-out ISBI slices
16-19 and RUN/heldout/tune_predictions.zarr on the labelled slices: what `jaxem predict --run A
--run B` computes, the mean of the models' probabilities) and scores the mean map as
label_efficiency scores one run: VRand per slice with the fixed watershed setting ("fixed"), with
the setting `jaxem tune` picks on the labelled slices ("tuned"), and with that setting after the
held-out map is matched to the tuning map's quantiles ("matched"). The ensembles, with S = the
`scratch` arm, R = `--recipe` (a pretrained arm), C = `--control` (its same-recipe random init):

    S        scratch alone (scored by this code: checked against the run's own results.json)
    S+S'     scratch seed s with scratch seed (s + 1) mod len(seeds): two scratch networks
    S+C      scratch with the control
    S+R      scratch with the pretrained network

and per replicate and protocol G1 = (S+R) - (S+S'), G2 = (S+R) - (S+C), G3 = (S+R) - S.
`--tta` ensembles the maps predicted with test-time augmentation (RUN/heldout_tta, written by
`label_efficiency.py --tta`). Scores are cached per ensemble in RUN/ensembles/ (rerunning reuses
them). Prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.isbi2012 import scored_dir_name  # noqa: E402
from benchmarks.label_efficiency import labelled_dir, replicate_name, run_dir  # noqa: E402

PROTOCOLS = {"fixed": "model", "tuned": "model_tuned", "matched": "model_tuned_matched"}  # -> score row
ENSEMBLES = ("S", "S+S'", "S+C", "S+R")
GAINS = {"G1": ("S+R", "S+S'"), "G2": ("S+R", "S+C"), "G3": ("S+R", "S")}


def members(root: Path, recipe: str, control: str, n: int, first: int, seed: int, seeds: list[int]) -> dict:
    """{ensemble name: its member run directories} for one replicate (module docstring)."""
    partner = seeds[(seeds.index(seed) + 1) % len(seeds)]
    scratch = run_dir(root, "scratch", n, first, seed)
    return {"S": [scratch], "S+S'": [scratch, run_dir(root, "scratch", n, first, partner)],
            "S+C": [scratch, run_dir(root, control, n, first, seed)],
            "S+R": [scratch, run_dir(root, recipe, n, first, seed)]}


def mean_map(runs: list[Path], name: str, scored: str = "heldout") -> np.ndarray:
    """The mean (z, y, x) float32 of the runs' stored probability maps RUN/`scored`/`name`."""
    from jaxem.protocols.common import prediction_channel

    return np.mean([prediction_channel(run / scored / name) for run in runs], axis=0, dtype=np.float32)


def score_ensemble(runs: list[Path], held_out_gt: np.ndarray, labelled: tuple[str, str],
                   scored: str = "heldout") -> dict:
    """The scores (`isbi2012.score_slices`) of the runs' mean map (of their maps in RUN/`scored`) on
    the held-out slices with the fixed setting, tuned on the `labelled` (image, labels) slices, and
    tuned and matched: {"model", "model_tuned", "model_tuned_matched", "tuned_setting"}."""
    from jaxem.data.volume import open_volume
    from jaxem.protocols.isbi2012 import FIXED_SETTING, score_slices, segment_slices, sweep_settings, tuned_rows

    held_out, tune_map = mean_map(runs, "predictions.zarr", scored), mean_map(runs, "tune_predictions.zarr", scored)
    voxel_size = tuple(open_volume(labelled[0]).voxel_size)
    sweep = sweep_settings(tune_map, open_volume(labelled[1]).read(), voxel_size, progress=False)
    return {"model": score_slices(segment_slices(held_out, FIXED_SETTING), held_out, held_out_gt),
            **tuned_rows(held_out, held_out_gt, sweep["best"], np.asarray(sweep["quantiles"]), voxel_size),
            "tuned_setting": sweep["best"]}


def cached_score(root: Path, runs: list[Path], held_out_gt: np.ndarray, labelled: tuple[str, str],
                 scored: str = "heldout") -> dict:
    """`score_ensemble`, kept in ROOT/ensembles/<digest of the members and `scored`>.json and reused."""
    members_and_maps = [str(r.resolve()) for r in runs] + ([scored] if scored != "heldout" else [])
    key = hashlib.sha256("\n".join(members_and_maps).encode()).hexdigest()[:16]
    path = root / "ensembles" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["scores"]
    missing = [str(r) for r in runs if not (r / scored / "tune_predictions.zarr").exists()]
    if missing:
        print(f"{missing[0]}: expected a run scored by label_efficiency.py ({scored}/predictions.zarr "
              f"and {scored}/tune_predictions.zarr); score it first.", file=sys.stderr)
        raise SystemExit(2)  # bad input, as the CLI exits
    scores = score_ensemble(runs, held_out_gt, labelled, scored)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"members": [str(r) for r in runs], "maps": scored, "scores": scores}, indent=2) + "\n")
    return scores


def summarise(replicates: dict, slices: list[int]) -> dict:
    """Per slice count: each ensemble's mean VRand per protocol, and per gain (GAINS) and protocol
    the mean, the number of replicates ahead and the values."""
    table = {}
    for n in slices:
        reps = [r for r in replicates.values() if r["slices"] == n]
        table[str(n)] = {
            "replicates": len(reps),
            "mean_vrand": {e: {p: float(np.mean([r["vrand"][e][p] for r in reps])) for p in PROTOCOLS} for e in ENSEMBLES},
            **{g: {p: {"mean": float(np.mean(v)), "ahead": int(sum(x > 0 for x in v)), "values": v}
                   for p in PROTOCOLS
                   for v in [[r["vrand"][a][p] - r["vrand"][b][p] for r in reps]]}
               for g, (a, b) in GAINS.items()}}
    return table


def verdict(table: dict) -> str:
    """The preregistered rule (docs/ssl.md, session 25) on the matched protocol."""
    g1 = [table[n]["G1"]["matched"] for n in table]
    g2 = [table[n]["G2"]["matched"] for n in table]
    if all(g["mean"] >= 0.02 and g["ahead"] >= 2 * table[n]["replicates"] / 3 for g, n in zip(g1, table)) \
            and all(g["mean"] > 0 for g in g2):
        return "a pretrained partner pays"
    if all(g["mean"] <= -0.02 for g in g1):
        return "a second scratch network is the better partner"
    return "level"


def plot(table: dict, path: Path, title: str) -> None:
    """Mean VRand of each ensemble per protocol (one panel each) against labelled slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = sorted(table, key=int)
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(4 * len(PROTOCOLS), 3.4), sharey=True)
    for ax, protocol in zip(axes, PROTOCOLS):
        for e, marker in zip(ENSEMBLES, "osD^"):
            ax.plot([int(n) for n in slices], [table[n]["mean_vrand"][e][protocol] for n in slices], marker=marker, label=e)
        ax.set(title=protocol, xlabel="labelled slices", xticks=[int(n) for n in slices])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out VRand (mean of replicates)")
    axes[-1].legend(title="S scratch, R recipe, C control", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="label_efficiency.py's --run directory")
    parser.add_argument("--recipe", required=True, help="the pretrained arm's name, e.g. 'mim@train.x=y'")
    parser.add_argument("--control", required=True, help="its same-recipe random-init arm, e.g. 'random@train.x=y'")
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--first-slice", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tta", action="store_true",
                        help="the maps predicted with test-time augmentation (RUN/heldout_tta: label_efficiency.py --tta)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--plot", type=Path, help="write the PNG here")
    args = parser.parse_args()
    scored = scored_dir_name(args.tta)
    if len(args.seeds) < 2:
        parser.error("--seeds: expected at least 2 seeds (S+S' pairs each scratch run with the next seed's).")

    from jaxem.data import datasets
    from jaxem.data.volume import open_volume

    held_out_gt = open_volume(datasets.split_paths("isbi2012", "val")[1][0]).read()
    replicates, checks = {}, []
    for n in args.slices:
        for first in args.first_slice:
            subset = labelled_dir(args.run, n, first)
            labelled = (str(subset / "image.zarr"), str(subset / "labels.zarr"))
            for seed in args.seeds:
                ensembles = members(args.run, args.recipe, args.control, n, first, seed, args.seeds)
                scores = {e: cached_score(args.run, runs, held_out_gt, labelled, scored) for e, runs in ensembles.items()}
                stored = json.loads((ensembles["S"][0] / scored / "results.json").read_text())
                checks.append(max(abs(scores["S"][row]["vrand"] - stored[row]["vrand"]) for row in PROTOCOLS.values()))
                replicates[f"{n}/{replicate_name(first, seed)}"] = {
                    "slices": n, "first_slice": first, "seed": seed,
                    "vrand": {e: {p: s[row]["vrand"] for p, row in PROTOCOLS.items()} for e, s in scores.items()}}
                print(f"{n} slice(s) from {first}, seed {seed}: matched VRand "
                      + ", ".join(f"{e} {scores[e]['model_tuned_matched']['vrand']:.3f}" for e in ENSEMBLES), file=sys.stderr)
    table = summarise(replicates, args.slices)
    report = {"benchmark": "ensemble_transfer_isbi2012_heldout_slices_16_19", "recipe": args.recipe,
              "control": args.control, "first_slices": args.first_slice, "seeds": args.seeds, "tta": args.tta,
              # S scored here against its own results.json: the same maps, grid and code, so ~0
              "single_scratch_max_abs_difference_to_stored": max(checks),
              "verdict_matched": verdict(table), "table": table, "replicates": replicates,
              "machine": {"platform": platform.platform()}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.plot:
        plot(table, args.plot, f"ISBI 2012, two-network ensembles, {len(replicates) // len(args.slices)} replicates "
                               f"(first slice {', '.join(map(str, args.first_slice))} x seeds)"
                               + (", maps with TTA" if args.tta else ""))


if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(main)
