"""Diagnostic: held-out learning curves (in-loop validation on slices 16-19 every 50 steps, 8 batches of
8 crops 128²) of scratch vs the whole mim network, 2 labelled slices, 600 steps, seeds 0-1.

Question: the mim arm reaches a lower training loss than scratch yet scores worse on slices 16-19.
Is it ahead early and then overfits (a regularisation problem), or behind all along (a transfer problem)?
"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository
from benchmarks.label_efficiency import finetune_and_score, labelled_subset

run = Path("runs/label_eff")
subset = labelled_subset(2, run / "labelled_2")
curve = ["--config.train.steps=600", "--config.train.eval_every=50", "--config.train.eval_batches=8",
         "--config.train.checkpoint_every=600"]
arms = {"scratch": [], "mim": [f"--config.train.init_encoder={run / 'pretrain_mim'}"]}
out = {}
for seed in (0, 1):
    for arm, extra in arms.items():
        workdir = run / f"curve_{arm}_2" / f"seed{seed}"
        r = finetune_and_score("isbi2012_unet:cpu", [*extra, *curve], subset, workdir, seed, False)
        rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
        val = [{k: r_[k] for k in ("step", "loss", "dice", "vrand") if k in r_} for r_ in rows if r_.get("split") == "val"]
        out[f"{arm}/seed{seed}"] = {"final_scores": r["scores"], "val_curve": val}
        print(arm, seed, r["scores"], [(v["step"], round(v.get("vrand", 0), 3)) for v in val], flush=True)
        json.dump(out, open(run / "curves_2.json", "w"), indent=2)
