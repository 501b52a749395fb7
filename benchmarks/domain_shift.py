"""Domain shift: a model trained on one microscope's EM, used on another's. Does unlabelled target
EM help? Synthetic source and target domains, so the target's ground truth is exact.

    python benchmarks/domain_shift.py --run runs/domain_shift [--seeds 0 1 2]
        [--arms source_only adversarial dann mean_teacher both pseudo_label fixmatch adabn oracle] [--adversarial-weight 0.01] [--config.x=y ...]

Source domain: the demo's synthetic ssTEM (configs/demo.py, 40x4x4 nm). Target domains
(`TARGET_DOMAINS`, `--target`):

- acquisition: the same tissue imaged differently: 2.5x the noise, 2x the blur, darker contrast
  (gamma 1.8) -- another microscope or detector;
- tissue_and_acquisition: that, and thinner membranes (9 nm instead of 14) and larger neurites --
  also another animal, region or staining, so correct predictions look different too.

Arms, each the demo config trained per seed in <run>/<target>/seed<N>/<arm>[_w<weight>] (arms that never see
target EM in training, source_only and adabn, in <run>/seed<N>/<arm>, shared by the targets):

- source_only: source labels only (what a user without target labels has today);
- adversarial: + output-space adversarial adaptation on unlabelled target crops (jaxem.semi.adversarial);
- dann: + feature-level adaptation on unlabelled target crops: a domain classifier on the encoder's
  deepest features through gradient reversal (jaxem.semi.dann, semi.dann_weight=`DANN_WEIGHT`);
- mean_teacher: + a mean teacher on unlabelled target crops (self-ensembling, French et al. 2018);
- both: adversarial + mean teacher;
- pseudo_label: + self-training across domains: the EMA teacher's confident hard labels of
  unlabelled target crops (semi.method=pseudo_label);
- fixmatch: + FixMatch on unlabelled target crops: the weak view's confident labels train the
  strong (photometrically turned-up) view (semi.method=fixmatch);
- adabn: source labels only, with batch norm instead of group norm, predicted with its batch-norm
  statistics re-estimated on `--adabn-crops` crops of the target volume (jaxem.infer.adapt; no
  training on target EM at all); also scored without adaptation ("target_unadapted");
- oracle: trained on target labels instead (the bound adaptation aims at).

Every arm is scored on a held-out target volume (VRand/VInfo etc. of watershed cells, per slice,
jaxem.protocols.isbi2012.score_run); source_only also on a held-out source volume (the in-domain
score the shift costs). Finished runs are reused (refused when trained with other settings).
Prints JSON with per-seed scores, mean ± std over seeds and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ssl_transfer import SEMI_METHODS, semi_overrides  # noqa: E402

ARMS = ("source_only", "adversarial", "dann", "mean_teacher", "both", "pseudo_label", "fixmatch", "adabn", "oracle")
DANN_WEIGHT = 0.1  # semi.dann_weight of the dann arm
SOURCE_ONLY_ARMS = ("source_only", "adabn")  # their training does not depend on the target
# Target domains: arguments of jaxem.data.synthetic.generate, and a contrast gamma on the raw image.
TARGET_DOMAINS = {
    "acquisition": dict(noise=2.5, blur=2.0, gamma=1.8),
    "tissue_and_acquisition": dict(noise=2.5, blur=2.0, gamma=1.8, membrane_thickness=9.0,
                                   cell_diameter=(250.0, 800.0)),
}


def write_target_domain(config, data_dir: Path, domain: str) -> dict[str, tuple[str, str]]:
    """Writes target domain `domain`'s train/val/test volumes (raw, instances) as zarr, once, with
    the shapes and voxel size of the demo config; returns split -> (raw path, labels path)."""
    from jaxem.commands.demo import write_synthetic_data

    settings = dict(TARGET_DOMAINS[domain])
    gamma = settings.pop("gamma")
    darker = lambda raw: (255.0 * (raw / 255.0) ** gamma).astype(np.uint8)  # noqa: E731
    return write_synthetic_data(config, data_dir, first_seed=500, raw_transform=darker, **settings)


def arm_config(arm: str, config, source: dict, target: dict, adversarial_weight: float):
    """The demo config of one arm: its training data and its `semi` settings."""
    from jaxem.commands.demo import with_data_paths
    from jaxem.config import apply_overrides

    config = with_data_paths(config, target if arm == "oracle" else source)
    unlabelled = f"--config.semi.unlabelled_images=('{target['train'][0]}',)"
    adversarial = [f"--config.semi.adversarial_weight={adversarial_weight}", unlabelled]
    extra = {"adversarial": adversarial, "both": adversarial + semi_overrides("mean_teacher", (target["train"][0],)),
             "dann": [f"--config.semi.dann_weight={DANN_WEIGHT}", unlabelled],
             # mean_teacher, pseudo_label (cross-domain self-training), fixmatch: on unlabelled target crops
             **{m: semi_overrides(m, (target["train"][0],)) for m in SEMI_METHODS},
             "adabn": ["--config.model.norm=batch"]}.get(arm, [])
    return apply_overrides(config, extra)


def run_arm(arm: str, config, run: Path, source: dict, target: dict, domain: str, progress: bool,
            adabn_crops: int) -> dict:
    """Trains one arm into `run` (reusing a finished run) and scores it on the held-out volumes
    (into <run>/<domain>_test, <run>/source_test)."""
    from jaxem.protocols.common import train_to_completion
    from jaxem.protocols.isbi2012 import score_run

    summary, seconds = train_to_completion(config, run, progress)
    adapt = adabn_crops if arm == "adabn" else 0
    result = {"target": score_run(run, *target["test"], out_dir=run / f"{domain}_test", progress=progress,
                                  adapt_batch_norm=adapt),
              "training": summary, "wall_seconds_this_invocation": seconds}
    if arm == "adabn":
        result["target_unadapted"] = score_run(run, *target["test"], out_dir=run / f"{domain}_test_unadapted",
                                               progress=progress)
    if arm == "source_only":
        result["source"] = score_run(run, *source["test"], out_dir=run / "source_test", progress=progress)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="directory for the data and one run per seed and arm")
    parser.add_argument("--target", choices=TARGET_DOMAINS, default="acquisition", help="the target domain")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--adversarial-weight", type=float, default=0.01)
    parser.add_argument("--adabn-crops", type=int, default=64, help="target crops for the adabn arm's statistics")
    parser.add_argument("--config", default="demo", help="the source-domain config (FILE[:ARG])")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args()

    import jax

    from jaxem.commands.demo import write_synthetic_data
    from jaxem.config import apply_overrides, load_config
    from jaxem.protocols.common import over_seeds

    run = Path(args.run)
    base = apply_overrides(load_config(args.config), overrides)
    source = write_synthetic_data(base, run / "data" / "source")
    target = write_target_domain(base, run / "data" / args.target, args.target)
    per_seed = {}
    for seed in args.seeds:
        config = apply_overrides(base, [f"--config.seed={seed}"])
        per_seed[seed] = {}
        for arm in args.arms:
            name = f"{arm}_w{args.adversarial_weight:g}" if arm in ("adversarial", "both") else arm
            arm_dir = run / f"seed{seed}" / arm if arm in SOURCE_ONLY_ARMS else run / args.target / f"seed{seed}" / name
            per_seed[seed][arm] = run_arm(arm, arm_config(arm, config, source, target, args.adversarial_weight), arm_dir,
                                          source, target, args.target, not args.no_progress, args.adabn_crops)
    scores = {seed: {arm: r["target"]["model"] for arm, r in arms.items()} for seed, arms in per_seed.items()}
    summary = over_seeds(scores, rows=args.arms)
    print(f"held-out {args.target} target volume, mean ± std over seeds {', '.join(map(str, args.seeds))}")
    print(f"{'arm':<14}" + "".join(f"{k:>20}" for k in ("vrand", "vinfo", "adapted_rand_error")))
    for arm in args.arms:
        print(f"{arm:<14}" + "".join(f"{summary[arm][k]['mean']:>12.4f} ± {summary[arm][k]['std']:.4f}"
                                     for k in ("vrand", "vinfo", "adapted_rand_error")))
    report = {"benchmark": "domain_shift_synthetic", "config": args.config, "overrides": overrides,
              "target": args.target, "target_domain": TARGET_DOMAINS[args.target], "adversarial_weight": args.adversarial_weight,
              "adabn_crops": args.adabn_crops,
              "seeds": args.seeds, "arms": args.arms, "target_over_seeds": summary,
              "per_seed": {str(s): r for s, r in per_seed.items()},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "devices": [str(d) for d in jax.devices()]}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(main)
