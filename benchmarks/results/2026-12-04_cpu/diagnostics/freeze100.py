"""Diagnostic: mim pretraining, encoder frozen for the first 100 of 300 fine-tuning steps (then ramped in), 2 slices, seeds 0-2."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository
from benchmarks.label_efficiency import finetune_and_score, labelled_subset

run = Path("runs/label_eff")
subset = labelled_subset(2, run / "labelled_2")
out = {}
for seed in (0, 1, 2):
    r = finetune_and_score("isbi2012_unet:cpu", [f"--config.train.init_encoder={run / 'pretrain_mim'}",
                                                 "--config.train.freeze_encoder_steps=100"], subset,
                           run / "mim_freeze100_2" / f"seed{seed}", seed, False)
    out[seed] = r
    print(seed, r["scores"], flush=True)
json.dump(out, open(run / "mim_freeze100_2.json", "w"), indent=2)
