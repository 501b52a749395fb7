"""Diagnostic: the linear membrane probe of the mim-pretrained ISBI encoder vs a random one (5 labelled slices)."""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repository
import jax
from jaxem import models
from jaxem.config import load_config
from jaxem.train.checkpoint import load_encoder
from jaxem.ssl.probe import make_probe

cfg = load_config("pretrain:mim")
cfg.model = load_config("isbi2012_unet:cpu").model
cfg.data.crop_shape = (128, 128)
cfg.ssl.probe_images = ("runs/label_eff/labelled_5/image.zarr",)
cfg.ssl.probe_labels = ("runs/label_eff/labelled_5/labels.zarr",)
cfg.train.eval_every = 50
probe = make_probe(cfg)
enc = models.build(cfg.model).encoder
out = {}
for seed in (0, 1, 2):
    v = enc.clone(parent=None).init(jax.random.PRNGKey(seed), jax.numpy.zeros((1, 128, 128, 1)), train=False)
    out[f"random_init_{seed}"] = probe.score_variables(dict(v))
v = load_encoder("runs/label_eff/pretrain_mim")
out["mim"] = probe.score_variables({c: t["encoder"] for c, t in v.items()})
print(json.dumps(out, indent=1))
