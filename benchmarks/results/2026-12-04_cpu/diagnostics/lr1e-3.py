"""Diagnostic: scratch and the whole mim network fine-tuned at AdamW 1e-3 (the recipe: 3e-3), 2 labelled slices, seeds 0-2."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository
from benchmarks.label_efficiency import finetune_and_score, labelled_subset

run = Path("runs/label_eff")
subset = labelled_subset(2, run / "labelled_2")
arms = {"scratch": [], "mim": [f"--config.train.init_encoder={run / 'pretrain_mim'}"]}
out = {arm: {} for arm in arms}
for seed in (0, 1, 2):
    for arm, overrides in arms.items():
        r = finetune_and_score("isbi2012_unet:cpu", [*overrides, "--config.optimizer.learning_rate=1e-3"], subset,
                               run / f"{arm}_lr1e-3_2" / f"seed{seed}", seed, False)
        out[arm][seed] = r
        print(arm, seed, r["scores"], flush=True)
        json.dump(out, open(run / "lr1e-3_2.json", "w"), indent=2)
