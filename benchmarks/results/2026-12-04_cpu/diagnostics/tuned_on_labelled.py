"""Diagnostic: the held-out errors of both arms are splits (vrand_split 0.43-0.69, vrand_merge 0.97-0.99 at 2
slices), i.e. they depend on where the fixed watershed cuts the membrane map. Re-score the label-efficiency
runs (300 steps, seeds 0-2, 1 and 2 slices) with the watershed setting tuned per run on *its own labelled
training slices* (what a user with those few labels can do; slices 16-19 stay unseen), and a threshold-free
pixel measure: average precision of membrane pixels on slices 16-19.
"""
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository
from benchmarks.label_efficiency import labelled_subset
from jaxem.data import datasets
from jaxem.data.volume import open_volume
from jaxem.protocols.common import prediction_channel
from jaxem.protocols.isbi2012 import score_run


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve of `scores` ranking the `positive` pixels (step-wise)."""
    order = np.argsort(-scores.ravel(), kind="stable")
    hits = positive.ravel()[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    return float(np.sum(precision[hits]) / max(hits.sum(), 1))


run = Path("runs/label_eff")
images, labels = datasets.split_paths("isbi2012", "val")
membrane = open_volume(labels[0]).read() == 0  # ISBI labels: 0 = membrane
out_path = run / "tuned_on_labelled.json"
out = json.loads(out_path.read_text()) if out_path.exists() else {}
for n in (2, 1):
    subset = labelled_subset(n, run / f"labelled_{n}")
    for seed in (0, 1, 2):
        for arm in ("scratch", "mim"):
            key = f"{arm}_{n}/seed{seed}"
            if key in out:
                continue
            rdir = run / f"{arm}_{n}" / f"seed{seed}"
            res = score_run(rdir, images[0], labels[0], out_dir=rdir / "heldout_tuned_own", progress=False, tune_on=subset)
            ap = average_precision(prediction_channel(rdir / "heldout_tuned_own" / "predictions.zarr"), membrane)
            out[key] = {"fixed": {k: res["model"][k] for k in ("vrand", "vinfo", "iou")},
                        "tuned_own": {k: res["model_tuned"][k] for k in ("vrand", "vinfo", "iou")},
                        "setting": res["tuned_settings"]["model"], "membrane_ap": ap}
            print(key, json.dumps(out[key]), flush=True)
            out_path.write_text(json.dumps(out, indent=2))
