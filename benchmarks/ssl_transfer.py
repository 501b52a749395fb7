"""Do unlabelled images help when labels are few? ISBI 2012: a pretrained encoder, a mean teacher, scratch.

    python benchmarks/ssl_transfer.py --run runs/ssl_isbi [--labelled-slices 2] [--seeds 0 1 2]
        [--arms scratch pretrained mean_teacher] [--pretrain-config pretrain] [--pretrain.x=y ...] [--finetune.x=y ...]

1. Pretrains the ISBI CPU recipe's U-Net encoder (configs/isbi2012_unet.py:cpu) with
   `--pretrain-config` (MoCo v2 by default) on the raw images of slices 0-15 and the 30 unlabelled
   test slices: no image of the scored slices 16-19 is seen.
2. Fine-tunes that recipe on only the first `--labelled-slices` labelled slices, once from the
   pretrained encoder and once from scratch, per seed (same seed, same data order for both).
   With `--arms ... mean_teacher`, also trains it semi-supervised (jaxem.semi.mean_teacher: EMA
   teacher 0.99, consistency weight 1) with the pretraining's unlabelled images.
3. Scores every arm on held-out slices 16-19 (VRand/VInfo of watershed cells, as benchmarks/isbi2012.py),
   with the fixed watershed setting: the arms differ in their networks only (no per-arm tuning).

Finished runs are reused; a run directory trained with other settings (another
`--pretrain.x=y` or `--finetune.x=y`) is refused, never scored as this one. Prints JSON: per-seed
and mean scores of both arms, the difference, the times and the machine. Needs the ISBI data (../shared/data/isbi2012 or $JAXEM_DATA).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.isbi2012 import over_seeds, prepare_isbi  # noqa: E402

ARMS = ("scratch", "pretrained", "mean_teacher")


def unlabelled_images() -> tuple[str, ...]:
    """ISBI images no scored slice is in: training slices 0-15 and the 30 unlabelled test slices."""
    from jaxem.data import datasets

    return datasets.split_paths("isbi2012", "train")[0] + datasets.split_paths("isbi2012", "test")[0]


def split_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> tuple[list[str], list[str]]:
    """(pretraining, fine-tuning) config overrides from `--pretrain.x=y` / `--finetune.x=y`
    arguments, as `--config.x=y`; anything else is a parser error."""
    pretrain = ["--config." + a[len("--pretrain."):] for a in rest if a.startswith("--pretrain.")]
    finetune = ["--config." + a[len("--finetune."):] for a in rest if a.startswith("--finetune.")]
    if len(pretrain) + len(finetune) != len(rest):
        parser.error(f"unknown arguments {[a for a in rest if not a.startswith(('--pretrain.', '--finetune.'))]}")
    return pretrain, finetune


SEMI_METHODS = ("mean_teacher", "pseudo_label", "fixmatch")


def semi_overrides(method: str, images: tuple[str, ...]) -> list[str]:
    """The config overrides that train semi-supervised with `method` (jaxem.semi: mean_teacher,
    pseudo_label or fixmatch) on the unlabelled volumes `images`: weight 1 at the end of the ramp,
    and for the teacher-based methods an EMA teacher of decay 0.99."""
    teacher = ["--config.train.ema_decay=0.99"] if method in ("mean_teacher", "pseudo_label") else []
    return [*teacher, "--config.semi.weight=1.0", f"--config.semi.method={method}",
            f"--config.semi.unlabelled_images={tuple(images)!r}"]


def arm_overrides(arm: str, run: Path) -> list[str]:
    """What an arm adds to the fine-tuning config."""
    if arm == "pretrained":
        return [f"--config.train.init_encoder={run / 'pretrain'}"]
    if arm == "mean_teacher":
        return semi_overrides("mean_teacher", unlabelled_images())
    return []


ISBI_SLICES_ATTRIBUTE = "isbi2012_train_slices"  # [first, stop) of the ISBI training stack a subset holds


def labelled_subset(stop: int, out: Path, first: int = 0) -> tuple[str, str]:
    """Writes ISBI training slices [first, stop) (image and labels) to `out` unless they are
    there, recording [first, stop) in their attributes (ISBI_SLICES_ATTRIBUTE, also added to a
    subset written before it was recorded); returns their paths."""
    from jaxem.data import datasets
    from jaxem.data.volume import create_volume, open_volume, read_attributes, write_attributes

    images, labels = datasets.split_paths("isbi2012", "train")
    paths = []
    for source, name in ((images[0], "image.zarr"), (labels[0], "labels.zarr")):
        path = out / name
        if not (path / ".zattrs").exists():
            volume = open_volume(source)
            array = volume.read()[first:stop]
            create_volume(path, array.shape, array.dtype, voxel_size=volume.voxel_size, overwrite=True).write(array)
        if read_attributes(path).get(ISBI_SLICES_ATTRIBUTE) is None:
            write_attributes(path, {ISBI_SLICES_ATTRIBUTE: [first, stop]})
        paths.append(str(path))
    return paths[0], paths[1]


def trained_isbi_slices(run: Path) -> tuple[int, int]:
    """[first, stop) of the ISBI training slices a fine-tuning run trained on, as labelled_subset
    recorded them in its training volume; a UserError when they are not recorded."""
    from jaxem.data.volume import read_attributes
    from jaxem.errors import UserError

    image = json.loads((run / "config.json").read_text())["data"]["train_images"][0]
    recorded = read_attributes(image).get(ISBI_SLICES_ATTRIBUTE)
    if recorded is None:
        raise UserError(f"{image}: expected the ISBI slice range attribute {ISBI_SLICES_ATTRIBUTE!r} that "
                        "benchmarks/label_efficiency.py records (rerun it on this run directory to add it).")
    return int(recorded[0]), int(recorded[1])


def pretrain_encoder(pretrain_config: str, overrides: list[str], model, run: Path, progress: bool) -> dict:
    """Pretrains `model` (the fine-tuning config's model section) with `pretrain_config` on the
    unlabelled ISBI slices (not 16-19) into `run`; returns the summary (resumes or skips a
    finished run; a run there pretrained with other settings is a UserError, not reused)."""
    from jaxem.config import apply_overrides, load_config
    from jaxem.ssl.pretrain import pretrain

    config = load_config(pretrain_config)
    config.model = model
    config.data.train_images = unlabelled_images()
    config = apply_overrides(config, overrides)
    start = time.time()
    summary = pretrain(config, run, progress=progress, exact=True)
    return dict(summary, wall_seconds_this_invocation=time.time() - start)


def finetune_and_score(finetune_config: str, overrides: list[str], subset: tuple[str, str], run: Path, seed: int,
                       progress: bool, tune_on_subset: bool = False, rescore: bool = False, tta: bool = False) -> dict:
    """Trains `finetune_config` on the labelled subset (with `overrides`) into `run` and scores
    slices 16-19 with the fixed watershed setting, and with `tune_on_subset` also with the setting
    tuned on the labelled subset itself (benchmarks.isbi2012.train_and_score's result; `rescore`:
    score again even where the last scoring of these checkpoints can be read back; `tta`: predict
    with test-time augmentation, into RUN/heldout_tta)."""
    from benchmarks.isbi2012 import train_and_score
    from jaxem.config import apply_overrides, load_config

    config = load_config(finetune_config)
    config = apply_overrides(config, [
        "--config.data.dataset=", f"--config.data.train_images=('{subset[0]}',)",
        f"--config.data.train_labels=('{subset[1]}',)", f"--config.seed={seed}",
        *overrides])
    from jaxem.data import datasets

    config.data.val_images, config.data.val_labels = datasets.split_paths("isbi2012", "val")
    return train_and_score(config, run, progress, tta=tta, tune=tune_on_subset, tune_on=subset, rescore=rescore)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="directory for the pretraining and fine-tuning runs")
    parser.add_argument("--labelled-slices", type=int, default=2, help="labelled training slices (of 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["scratch", "pretrained"],
                        help="what to compare (scratch is always included)")
    parser.add_argument("--pretrain-config", default="pretrain")
    parser.add_argument("--finetune-config", default="isbi2012_unet:cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--rescore", action="store_true",
                        help="score again even where results.json was scored from the same checkpoints and request")
    args, rest = parser.parse_known_args()
    pretrain_overrides, finetune_overrides = split_overrides(parser, rest)

    import jax

    from jaxem.config import apply_overrides, load_config
    from jaxem.protocols.isbi2012 import SCORE_KEYS
    from jaxem.xla import use_compilation_cache

    prepare_isbi()
    run, progress = Path(args.run), not args.no_progress
    use_compilation_cache(run / "xla_cache")  # every arm and seed compiles the same network
    subset = labelled_subset(args.labelled_slices, run / f"labelled_{args.labelled_slices}")

    arms = ["scratch"] + [a for a in args.arms if a != "scratch"]
    pretraining = None
    if "pretrained" in arms:
        model = apply_overrides(load_config(args.finetune_config), finetune_overrides).model
        pretraining = pretrain_encoder(args.pretrain_config, pretrain_overrides, model, run / "pretrain", progress)
    results = {arm: {} for arm in arms}
    for seed in args.seeds:
        for arm in arms:
            results[arm][seed] = finetune_and_score(args.finetune_config, [*arm_overrides(arm, run), *finetune_overrides], subset,
                                                    run / f"{arm}_{args.labelled_slices}" / f"seed{seed}", seed,
                                                    progress, rescore=args.rescore)
    summary = {arm: over_seeds(results[arm])["model"] for arm in arms}
    print(f"{'metric':<20}" + "".join(f"{a:>14}" for a in arms) + f"   ({len(args.seeds)} seeds, {args.labelled_slices} labelled slices)")
    for k in SCORE_KEYS:
        print(f"{k:<20}" + "".join(f"{summary[a][k]['mean']:>14.4f}" for a in arms))
    report = {
        "benchmark": "ssl_transfer_isbi2012_heldout_slices_16_19",
        "labelled_slices": args.labelled_slices, "seeds": args.seeds, "arms": arms,
        "pretrain_config": args.pretrain_config, "finetune_config": args.finetune_config,
        "pretrain_overrides": pretrain_overrides, "finetune_overrides": finetune_overrides,
        "pretraining": pretraining,
        "mean": summary,
        **{f"{arm}_minus_scratch": {k: summary[arm][k]["mean"] - summary["scratch"][k]["mean"] for k in SCORE_KEYS}
           for arm in arms[1:]},
        "per_seed": {arm: {str(s): r for s, r in results[arm].items()} for arm in arms},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "devices": [str(d) for d in jax.devices()]},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(main)
