"""Diagnostic: the linear membrane probe (jaxem.ssl.probe) of the 500-, 2000- and 4000-step mim encoders
against three random initialisations, on the 5 labelled ISBI slices 0-4 (label_efficiency's
RUN/labelled_5). Usage: python probe_budgets.py RUN > probe_budgets.json"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository
import jax  # noqa: E402

from jaxem import models  # noqa: E402
from jaxem.config import load_config  # noqa: E402
from jaxem.ssl.probe import make_probe  # noqa: E402
from jaxem.train.checkpoint import load_encoder  # noqa: E402

run = Path(sys.argv[1])
cfg = load_config("pretrain:mim")
cfg.model = load_config("isbi2012_unet:cpu").model
cfg.data.crop_shape = (128, 128)
cfg.ssl.probe_images = (str(run / "labelled_5/image.zarr"),)
cfg.ssl.probe_labels = (str(run / "labelled_5/labels.zarr"),)
cfg.train.eval_every = 50
probe = make_probe(cfg)
encoder = models.build(cfg.model).encoder
out = {}
for seed in (0, 1, 2):
    v = encoder.clone(parent=None).init(jax.random.PRNGKey(seed), jax.numpy.zeros((1, 128, 128, 1)), train=False)
    out[f"random_init_{seed}"] = probe.score_variables(dict(v))
for name in ("pretrain_mim@train.steps=500", "pretrain_mim", "pretrain_mim@train.steps=4000"):
    v = load_encoder(run / name)
    out[name] = probe.score_variables({c: t["encoder"] for c, t in v.items()})
print(json.dumps(out, indent=1))
