"""Does pretraining on unlabelled EM pay off when labels are few? ISBI 2012, 1/2/5 labelled slices.

    python benchmarks/label_efficiency.py --run runs/label_efficiency [--slices 1 2 5] [--first-slice 0 [5 10]] [--seeds 0 1 2]
        [--methods mim simclr] [--semi fixmatch pseudo_label mean_teacher] [--combine] [--control]
        [--finetune-config isbi2012_unet:cpu] [--pretrain.x=y ...] [--finetune.x=y ...] [--transfer.x=y ...]
        [--out results.json] [--plot label_efficiency.png] [--rescore] [--tta]

1. Pretrains the fine-tuning recipe's network once per `--methods` entry (`configs/pretrain.py:<method>`
   with the recipe's model section) on all unlabelled ISBI raw EM that holds no scored pixel: the
   training volume's slices 0-15 (labels not read) and the 30-slice test volume. Cached in
   RUN/pretrain_<method>: later invocations reuse it. `--pretrain.x=y` overrides pretrain into
   RUN/pretrain_<method>@x=y instead, and its arms are "<method>@pretrain.x=y[,...]" (e.g. twice the
   budget: `--pretrain.train.steps=4000`); scratch and the controls are reused.
2. For every number of labelled slices n (slices F .. F+n-1 of 0-15, for each F of `--first-slice`,
   default 0) and seed, fine-tunes the recipe from random init ("scratch") and from each pretraining,
   with the same budget, seed and data order (RUN/<arm>_<n>/seed<s>, RUN/<arm>_<n>_from<F>/seed<s>
   when F > 0; reused when finished, refused when trained with other settings, e.g. another
   `--finetune.x=y`: use another --run). Each (F, seed) is one replicate: statistics and gains pool
   them (JSON keys "<s>" for F = 0, "<s>_from<F>" otherwise), so that a claim is tested over which
   sections are labelled as well as over seeds. Each `--semi` method (jaxem.semi:
   mean_teacher, pseudo_label, fixmatch) adds an arm trained from random init with the same
   labelled slices plus all unlabelled ISBI raw EM (the pretraining's images); `--combine` adds
   "<pretraining>+<semi>" arms: the pretrained encoder fine-tuned semi-supervised. `--transfer.x=y`
   overrides the fine-tuning of the pretrained arms only (e.g. `--transfer.train.llrd=0.5`), which are
   then named "<pretraining>@x=y" (their own run directories; scratch and the semi arms are reused).
   `--control` adds "random@x=y": random init fine-tuned with the same overrides, the control that
   tells what the pretraining adds from what the recipe (e.g. a frozen encoder) does by itself.
3. Scores every run on the held-out slices 16-19 (jaxem.protocols.isbi2012) in three protocols:
   - fixed: the fixed watershed setting for every run (VRand, VInfo, cell-interior IoU and Dice),
     so arms differ in their networks only;
   - tuned: the segmentation setting tuned (jaxem.segment.tune) on the run's own labelled slices,
     which is what a user holding those n labelled slices would do (VRand, VInfo: "*_tuned");
   - matched: that tuned setting on the held-out map matched to the quantiles of the run's map of
     its labelled slices (`jaxem segment --match-quantiles`; "*_matched");
   and the membrane map's average precision, which no threshold or setting affects.

Prints a table and JSON (also to --out): per arm and n the mean and std over replicates, each arm's
gain over scratch (mean of the per-replicate differences, and their std), whether the goal is met
per protocol (at 1 and 2 slices the best pretrained arm, alone or with a semi method, beats scratch
by >= 0.03 VRand or >= 5 IoU points; `goal_met_same_recipe` the same with each pretrained arm measured
against random init fine-tuned the same way (its `--control` arm; <semi> for "<pretraining>+<semi>"),
so that what the pretraining itself adds decides;
`best_of_all_arms` the same over every arm),
times and the machine. --plot draws VRand and IoU against n. Needs the ISBI data
(../shared/data/isbi2012 or $JAXEM_DATA).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.isbi2012 import prepare_isbi  # noqa: E402
from benchmarks import ssl_transfer  # noqa: E402
from benchmarks.ssl_transfer import (SEMI_METHODS, labelled_subset, semi_overrides, split_overrides,  # noqa: E402
                                      unlabelled_images)

METRICS = ("vrand", "vinfo", "iou", "dice", "membrane_ap", "vrand_tuned", "vinfo_tuned", "vrand_matched", "vinfo_matched")
# protocol -> its VRand key (IoU: the map thresholded at 0.5, the same in every protocol)
PROTOCOLS = {"fixed": "vrand", "tuned": "vrand_tuned", "matched": "vrand_matched"}
GOAL = {"slices": (1, 2), "vrand": 0.03, "iou": 0.05}
HELD_OUT_FIRST = 16  # slices 16-19 are scored; labelled slices come from 0-15
# The fine-tuning budget of every arm: short enough for 2 CPU cores x (arms x slices x seeds) runs.
FINETUNE_DEFAULTS = ("--config.train.steps=300", "--config.data.crop_shape=(128, 128)",
                     "--config.train.eval_every=0", "--config.train.checkpoint_every=300")
PRETRAIN_DEFAULTS = ("--config.data.crop_shape=(128, 128)", "--config.data.batch_size=16",
                     "--config.train.steps=2000", "--config.train.checkpoint_every=250",
                     "--config.train.log_every=25")


def pretrain_network(method: str, model, overrides: list[str], run: Path, progress: bool) -> dict:
    """Pretrains `model` (the recipe's model section) with configs/pretrain.py:<method> and this
    benchmark's budget on the unlabelled ISBI images into `run`; returns the summary (resumes or
    skips a finished run)."""
    return ssl_transfer.pretrain_encoder(f"pretrain:{method}", [*PRETRAIN_DEFAULTS, *overrides], model, run, progress)


def pretraining_dir_name(method: str, pretrain: list[str] = ()) -> str:
    """The directory (under RUN) of `method`'s pretraining with the `pretrain` overrides ("x=y",
    from `--pretrain.x=y`): "pretrain_mim", or "pretrain_mim@train.steps=4000". Each pretraining
    budget gets its own run: the loop would otherwise resume a finished 2000-step run to 4000 steps
    on a schedule it was not started with."""
    return f"pretrain_{method}@{','.join(pretrain)}" if pretrain else f"pretrain_{method}"


def pretrained_arm(method: str, transfer: list[str], pretrain: list[str] = ()) -> str:
    """The arm (and run directory) name of `method`'s pretraining (with the `pretrain` overrides,
    written "pretrain.x=y") fine-tuned with the `transfer` overrides ("x=y"): "mim",
    "mim@train.llrd=0.5" or "mim@pretrain.train.steps=4000,train.llrd=0.5". (No brackets: orbax
    cannot write readable checkpoints under a path that holds one.)"""
    overrides = [*(f"pretrain.{p}" for p in pretrain), *transfer]
    return f"{method}@{','.join(overrides)}" if overrides else method


def finetune_and_score(finetune_config: str, overrides: list[str], subset: tuple[str, str], run: Path,
                       seed: int, progress: bool, rescore: bool = False, tta: bool = False) -> dict:
    """Trains the recipe with this benchmark's budget on the labelled `subset` (with `overrides`)
    into `run` and scores slices 16-19 with the fixed watershed setting, with the setting tuned
    on `subset` (keys "*_tuned"), and with that setting on the held-out map matched to the
    quantiles of the map of `subset` (keys "*_matched": `jaxem segment --match-quantiles`). `tta`:
    both maps predicted with test-time augmentation (scored into RUN/heldout_tta)."""
    start = time.time()
    result = ssl_transfer.finetune_and_score(finetune_config, [*FINETUNE_DEFAULTS, *overrides], subset, run, seed,
                                             progress, tune_on_subset=True, rescore=rescore, tta=tta)
    fixed, tuned, matched = (result["scores"][row] for row in ("model", "model_tuned", "model_tuned_matched"))
    return {"scores": {**{k: fixed[k] for k in ("vrand", "vinfo", "iou", "dice", "membrane_ap")},
                       "vrand_tuned": tuned["vrand"], "vinfo_tuned": tuned["vinfo"],
                       "vrand_matched": matched["vrand"], "vinfo_matched": matched["vinfo"]},
            "tuned_setting": result["scores"]["tuned_settings"]["model"],
            "train_seconds": result["training"].get("seconds"), "wall_seconds_this_invocation": time.time() - start}


def from_suffix(first: int) -> str:
    """The run-directory suffix of runs labelled from slice `first`: "" for 0 (the original names)."""
    return f"_from{first}" if first else ""


def run_dir(root: Path, arm: str, n: int, first: int, seed: int) -> Path:
    """The run directory of `arm` fine-tuned on n slices from `first` with `seed`."""
    return root / f"{arm}_{n}{from_suffix(first)}" / f"seed{seed}"


def labelled_dir(root: Path, n: int, first: int) -> Path:
    """The directory of the labelled subset (n slices from `first`: image.zarr, labels.zarr)."""
    return root / f"labelled_{n}{from_suffix(first)}"


def replicate_name(first: int, seed: int) -> str:
    """The JSON key of the replicate (first labelled slice, seed): "1", or "1_from5"."""
    return f"{seed}{from_suffix(first)}"


def summarise(results: dict, arms: list[str], slices: list[int], controls: dict | None = None) -> dict:
    """{n: {arm: {metric: {mean, std, values}}, gain_<arm>: {metric: {mean, std, values}}}} from
    results[arm][n][replicate]["scores"] (replicate: a seed, or a (first slice, seed) pair); gains
    are per-replicate differences to scratch (same seed and labelled slices). An arm
    with a same-recipe baseline (`same_recipe_baseline`) also gets "pretraining_gain_<arm>": its
    per-replicate difference to that baseline, what the pretraining adds with the fine-tuning recipe held fixed."""
    table = {}
    for n in slices:
        row = {}
        for arm in arms:
            runs = results[arm][n]
            row[arm] = {m: replicate_stats([runs[r]["scores"][m] for r in sorted(runs)]) for m in METRICS}
        for arm in arms[1:]:
            row[f"gain_{arm}"] = _gain(results, arm, "scratch", n)
            baseline = same_recipe_baseline(arm, results, controls or {})
            if baseline:
                row[f"pretraining_gain_{arm}"] = _gain(results, arm, baseline, n)
        table[n] = row
    return table


def same_recipe_baseline(arm: str, results: dict, controls: dict) -> str | None:
    """The arm trained from random init with `arm`'s fine-tuning recipe: its `--control` arm
    ("random@x=y", from `controls`), or for a "<pretraining>+<semi>" arm the <semi> arm; None
    when there is none (the baseline is then scratch)."""
    if arm in controls:
        return controls[arm]
    _, plus, semi = arm.rpartition("+")  # the semi method is last: a transfer override may hold '+'
    return semi if plus and semi in results else None


def _gain(results: dict, arm: str, baseline: str, n: int) -> dict:
    """{metric: stats} of the per-replicate differences arm - baseline at n labelled slices."""
    replicates = sorted(set(results[arm][n]) & set(results[baseline][n]))
    return {m: replicate_stats([results[arm][n][r]["scores"][m] - results[baseline][n][r]["scores"][m] for r in replicates])
            for m in METRICS}


def replicate_stats(values: list[float]) -> dict:
    """{mean, std (ddof 1; 0 for one value), values} of one metric (or difference) over replicates."""
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values}


def goal_met(table: dict, candidates: list[str], gain: str = "gain_") -> dict:
    """{protocol: {n: verdict}} per goal slice count: the best of the `candidates` arms (not scratch)
    by mean gain, its VRand (that protocol's) and IoU gains, and whether it beats scratch by >= 0.03
    VRand or >= 0.05 IoU (means over seeds). The issue's goal reads the pretrained arms only.
    `gain="pretraining_gain_"` reads the gains over the same recipe from random init instead."""
    verdict = {}
    for protocol, vrand_key in PROTOCOLS.items():
        verdict[protocol] = {}
        for n in GOAL["slices"]:
            if n not in table or not candidates:
                continue
            gains = {arm: table[n].get(f"{gain}{arm}", table[n][f"gain_{arm}"]) for arm in candidates}
            best = max(gains, key=lambda a: max(gains[a][vrand_key]["mean"] / GOAL["vrand"],
                                                gains[a]["iou"]["mean"] / GOAL["iou"]))
            vrand, iou = gains[best][vrand_key]["mean"], gains[best]["iou"]["mean"]
            verdict[protocol][n] = {"best_arm": best, "vrand_gain": vrand, "iou_gain": iou,
                                    "met": bool(vrand >= GOAL["vrand"] or iou >= GOAL["iou"])}
    return verdict


def format_table(table: dict, arms: list[str]) -> str:
    """Markdown: one row per (n, arm), mean ± std over seeds, and each arm's gain over scratch
    (VRand with the fixed setting, the tuned one and the tuned one on a matched map, IoU, membrane AP)."""
    columns = (("vrand", "VRand fixed", 1, ".3f"), ("vrand_tuned", "VRand tuned", 1, ".3f"),
               ("vrand_matched", "VRand tuned, matched", 1, ".3f"), ("iou", "IoU", 1, ".3f"),
               ("membrane_ap", "membrane AP", 1, ".3f"))
    gain_columns = (("vrand", "VRand fixed gain", 1, "+.3f"), ("vrand_tuned", "VRand tuned gain", 1, "+.3f"),
                    ("vrand_matched", "VRand matched gain", 1, "+.3f"), ("iou", "IoU gain (pts)", 100, "+.1f"),
                    ("membrane_ap", "AP gain (pts)", 100, "+.1f"))
    head = ["labelled slices", "arm", *(c[1] for c in columns), *(c[1] for c in gain_columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(stats: dict, scale: float, fmt: str) -> str:
        return f"{scale * stats['mean']:{fmt}} ± {scale * stats['std']:.{fmt[-2]}f}"

    for n, row in table.items():
        for arm in arms:
            gain = row.get(f"gain_{arm}")
            cells = [cell(row[arm][k], sc, f) for k, _, sc, f in columns]
            cells += [cell(gain[k], sc, f) if gain else "" for k, _, sc, f in gain_columns]
            lines.append(f"| {n} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: dict, arms: list[str], path: Path, title: str) -> None:
    """VRand (fixed setting, tuned, tuned on a matched map) and membrane AP on slices 16-19 (mean ± std over seeds) against
    the number of labelled slices, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = sorted(table)
    panels = (("vrand", "VRand, fixed setting"), ("vrand_tuned", "VRand, setting tuned on the labelled slices"),
              ("vrand_matched", "VRand, tuned setting, map matched to the tuning map"),
              ("membrane_ap", "membrane average precision"))
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 3.8))
    for ax, (metric, label) in zip(axes, panels):
        for i, arm in enumerate(arms):
            mean = [table[n][arm][metric]["mean"] for n in slices]
            std = [table[n][arm][metric]["std"] for n in slices]
            ax.errorbar(np.array(slices) * (1 + 0.03 * (i - len(arms) / 2)), mean, yerr=std, marker="o", capsize=3,
                        label=arm)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(slices, [str(n) for n in slices])
        ax.set_xlabel("labelled training slices")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    # below the panels, not inside one: arm names with --transfer overrides are long
    handles, labels = axes[0].get_legend_handles_labels()
    labels = [textwrap.fill(label.replace(",", ", "), 48, break_on_hyphens=False) for label in labels]
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(arms), 3), fontsize=8,
               frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="directory for the pretraining and fine-tuning runs (reused)")
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 2, 5], help="labelled training slices (of 0-15)")
    parser.add_argument("--first-slice", type=int, nargs="+", default=[0],
                        help="first labelled slice(s) F: n labelled slices are F .. F+n-1 (all < 16); several "
                             "F are pooled with the seeds as replicates")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["mim"],
                        help="pretraining methods (configs/pretrain.py args); none: the scratch arm only")
    parser.add_argument("--semi", nargs="*", default=[], choices=SEMI_METHODS,
                        help="semi-supervised arms from random init, on all unlabelled ISBI raw EM")
    parser.add_argument("--combine", action="store_true",
                        help="also every pretraining x semi method: '<pretraining>+<semi>' arms")
    parser.add_argument("--control", action="store_true",
                        help="also random init fine-tuned with the --transfer overrides ('random@x=y'): the "
                             "same-recipe control each pretrained arm's pretraining_gain_ is measured against")
    parser.add_argument("--finetune-config", default="isbi2012_unet:cpu")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--plot", type=Path, help="write VRand/IoU against labelled slices here (PNG)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--rescore", action="store_true",
                        help="score again even where results.json was scored from the same checkpoints and request")
    parser.add_argument("--tta", action="store_true",
                        help="predict held-out and labelled slices with test-time augmentation (8 flips and "
                             "rotations; scores in RUN/<arm>_<n>/seed<s>/heldout_tta, beside those without)")
    args, rest = parser.parse_known_args()
    transfer = [a[len("--transfer."):] for a in rest if a.startswith("--transfer.")]
    if args.control and not transfer:
        parser.error("--control needs --transfer.x=y overrides: without them the same-recipe control is scratch")
    for first in args.first_slice:
        if first < 0 or first + max(args.slices) > HELD_OUT_FIRST:
            parser.error(f"--first-slice {first} with --slices {max(args.slices)} reaches past slice "
                         f"{HELD_OUT_FIRST - 1}: slices {HELD_OUT_FIRST}-19 are held out for scoring")
    pretrain_overrides, finetune_overrides = split_overrides(parser, [a for a in rest if not a.startswith("--transfer.")])

    import jax

    from jaxem.config import apply_overrides, load_config
    from jaxem.xla import use_compilation_cache

    prepare_isbi()
    run, progress = Path(args.run), not args.no_progress
    use_compilation_cache(run / "xla_cache")  # every arm and seed compiles the same network
    pretrain_named = [o[len("--config."):] for o in pretrain_overrides]  # "x=y", for the names
    pretrained = {pretrained_arm(m, transfer, pretrain_named): m for m in args.methods}  # arm -> its pretraining
    controls = {a: pretrained_arm("random", transfer) for a in pretrained} if args.control else {}
    combined = [(a, s) for a in pretrained for s in args.semi] if args.combine else []
    combined_arms = [f"{a}+{s}" for a, s in combined]
    candidates = [*pretrained, *combined_arms]  # the arms the goal reads
    arms = ["scratch", *pretrained, *sorted(set(controls.values())), *args.semi, *combined_arms]
    model = apply_overrides(load_config(args.finetune_config), finetune_overrides).model
    pretrain_dirs = {m: run / pretraining_dir_name(m, pretrain_named) for m in args.methods}
    pretraining = {m: pretrain_network(m, model, pretrain_overrides, pretrain_dirs[m], progress) for m in args.methods}
    init = {a: [f"--config.train.init_encoder={pretrain_dirs[m]}", *(f"--config.{t}" for t in transfer)]
            for a, m in pretrained.items()}
    semi = {s: semi_overrides(s, unlabelled_images()) for s in args.semi}
    same_recipe = {c: [f"--config.{t}" for t in transfer] for c in controls.values()}
    arm_overrides = {"scratch": [], **init, **same_recipe, **semi,
                     **{f"{a}+{s}": init[a] + semi[s] for a, s in combined}}
    results = {arm: {n: {} for n in args.slices} for arm in arms}
    subsets = {(n, first): labelled_subset(first + n, labelled_dir(run, n, first), first=first)
               for n in args.slices for first in args.first_slice}
    for arm in [*arms[1:], "scratch"]:  # scratch last: it may be trained meanwhile by `--methods` (none)
        for n in args.slices:
            for first in args.first_slice:
                for seed in args.seeds:
                    results[arm][n][first, seed] = finetune_and_score(
                        args.finetune_config, [*arm_overrides[arm], *finetune_overrides], subsets[n, first],
                        run_dir(run, arm, n, first, seed), seed, progress, args.rescore,
                        args.tta)
    table = summarise(results, arms, args.slices, controls)
    print(format_table(table, arms))
    report = {
        "benchmark": "label_efficiency_isbi2012_heldout_slices_16_19",
        "slices": args.slices, "first_slice": args.first_slice, "seeds": args.seeds, "tta": args.tta, "arms": arms,
        "goal": GOAL,
        # the goal: a pretrained arm (alone or with a semi method); for reference, the best of every arm
        "goal_met": goal_met(table, candidates),
        # the same, each pretrained arm against random init fine-tuned the same way (its --control
        # arm, its semi arm, else scratch): what the pretraining itself adds
        "goal_met_same_recipe": goal_met(table, candidates, "pretraining_gain_"),
        "best_of_all_arms": goal_met(table, arms[1:]),
        "finetune_config": args.finetune_config, "finetune_overrides": [*FINETUNE_DEFAULTS, *finetune_overrides],
        "transfer_overrides": [f"--config.{t}" for t in transfer],
        "pretrain_overrides": [*PRETRAIN_DEFAULTS, *pretrain_overrides], "pretraining": pretraining,
        "table": {str(n): row for n, row in table.items()},
        "per_run": {arm: {str(n): {replicate_name(*key): r for key, r in per_n.items()} for n, per_n in by_n.items()}
                    for arm, by_n in results.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "devices": [str(d) for d in jax.devices()]},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.plot:
        firsts = ", ".join(map(str, args.first_slice))
        plot(table, arms, args.plot, f"ISBI 2012, {len(args.seeds)} seeds x first labelled slice {firsts}, "
                                     f"fine-tuning {args.finetune_config}")


if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(main)
