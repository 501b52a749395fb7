"""Diagnostic: the mim pretraining's encoder alone (decoder from random init), 2 labelled slices, seeds 0-2."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository
from benchmarks.label_efficiency import finetune_and_score, labelled_subset
from jaxem.train.checkpoint import load_encoder, save_tree

run = Path("runs/label_eff")
src = run / "pretrain_mim" / "encoder"
dst = run / "pretrain_mim_encoder_only" / "encoder"
if not (dst / "model.json").exists():
    v = load_encoder(src)
    only = {c: {"encoder": t["encoder"]} for c, t in v.items()}
    save_tree(dst / "variables", only)
    rec = json.loads((src / "model.json").read_text()); rec["parts"] = ["encoder"]
    (dst / "model.json").write_text(json.dumps(rec, indent=2, default=list) + "\n")
subset = labelled_subset(2, run / "labelled_2")
out = {}
for seed in (0, 1, 2):
    r = finetune_and_score("isbi2012_unet:cpu", [f"--config.train.init_encoder={dst.parent}"], subset,
                           run / "mim_encoder_only_2" / f"seed{seed}", seed, False)
    out[seed] = r
    print(seed, r["scores"], flush=True)
json.dump(out, open(run / "mim_encoder_only_2.json", "w"), indent=2)
