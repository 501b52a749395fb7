"""The linear probe of pretraining (jaxem.ssl.probe): what it measures, determinism, bad settings,
and that `jaxem pretrain` logs it for a contrastive method and for masked image modelling."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem.cli import main
from jaxem.config import apply_overrides, load_config
from jaxem.data.synthetic import generate
from jaxem.data.targets import boundary_target
from jaxem.data.volume import create_volume
from jaxem.errors import UserError
from jaxem.ssl.probe import METRICS, fit_and_score, make_probe


def test_ridge_probe_scores_informative_features_high_and_noise_at_chance():
    rng = np.random.default_rng(0)
    y = (rng.random((2, 4000, 1)) < 0.3).astype(np.float64)  # 30% "membrane"
    mask = np.ones_like(y, bool)
    noise = rng.normal(size=(2, 4000, 6))
    informative = np.concatenate([3 * y + 0.1 * rng.normal(size=y.shape) - 1, noise], axis=-1)
    good = fit_and_score(informative[:1], y[:1], mask[:1], informative[1:], y[1:], mask[1:], 1e-3)
    bad = fit_and_score(noise[:1], y[:1], mask[:1], noise[1:], y[1:], mask[1:], 1e-3)
    assert good["probe_f1"] > 0.99 and good["probe_balanced_accuracy"] > 0.99 and good["probe_r2"] > 0.9
    assert abs(bad["probe_balanced_accuracy"] - 0.5) < 0.05 and abs(bad["probe_r2"]) < 0.05
    # Masked-out pixels are neither fitted nor scored: corrupting them changes nothing.
    corrupt, keep = y.copy(), mask.copy()
    corrupt[:, :100], keep[:, :100] = 1 - corrupt[:, :100], False
    masked = fit_and_score(informative[:1], corrupt[:1], keep[:1], informative[1:], corrupt[1:], keep[1:], 1e-3)
    cut = fit_and_score(informative[:1, 100:], y[:1, 100:], mask[:1, 100:], informative[1:, 100:], y[1:, 100:],
                        mask[1:, 100:], 1e-3)
    assert masked == pytest.approx(cut, abs=1e-6)  # (features are standardised over all fit pixels)


def _probe_volumes(tmp_path):
    """A synthetic instance volume and, as its "EM image", its own 2D boundary map (the target)."""
    labels = generate(shape=(4, 64, 64), voxel_size=(40.0, 4.0, 4.0), seed=3).instances.astype(np.uint32)
    boundary = np.asarray(boundary_target(jnp.asarray(labels, jnp.int32), jnp.ones(labels.shape), (1, 1))[0][..., 0])
    paths = {}
    for name, array in (("image", (boundary * 200 + 20).astype(np.uint8)), ("labels", labels)):
        paths[name] = str(tmp_path / f"{name}.zarr")
        create_volume(paths[name], array.shape, array.dtype, voxel_size=(40.0, 4.0, 4.0)).write(array)
    return paths


def _config(paths, **fields):
    overrides = {"train.eval_every": 1, "ssl.probe_images": f"('{paths['image']}',)",
                 "ssl.probe_labels": f"('{paths['labels']}',)", **fields}
    return apply_overrides(load_config("pretrain:tiny"), [f"--config.{k}={v}" for k, v in overrides.items()])


class _Identity(nn.Module):
    """A fake encoder whose feature maps are the image itself, at full and at half resolution."""

    @nn.compact
    def __call__(self, x, train=False):
        return [x, x[:, ::2, ::2]]


class _Noise(nn.Module):
    """A fake encoder whose features are noise, the same whatever the image."""

    @nn.compact
    def __call__(self, x, train=False):
        return [jax.random.normal(jax.random.key(0), x.shape[:-1] + (8,)), jnp.zeros(x.shape[:1] + (4, 4, 2))]


def test_probe_of_features_that_carry_the_target_is_perfect_and_of_noise_at_chance(tmp_path):
    paths = _probe_volumes(tmp_path)
    config = _config(paths)
    sees = make_probe(config, _Identity())
    assert sees.images.shape == (16, 32, 32, 1) and sees.pixels.shape == (16, 1024)
    assert 0.1 < sees.target.mean() < 0.6  # membranes and cells both present
    good = sees.score_variables({"params": {}})
    assert good["probe_f1"] > 0.99 and good["probe_balanced_accuracy"] > 0.99 and good["probe_r2"] > 0.99
    bad = make_probe(config, _Noise()).score_variables({"params": {}})
    assert bad["probe_balanced_accuracy"] < 0.6 and bad["probe_r2"] < 0.05
    assert bad["probe_f1"] < good["probe_f1"] - 0.3
    # Deterministic: the same numbers again, and from a probe built anew.
    assert sees.score_variables({"params": {}}) == good
    assert make_probe(config, _Identity()).score_variables({"params": {}}) == good
    assert make_probe(_config(paths, **{"ssl.probe_pixels": 100}), _Identity()).pixels.shape == (16, 100)


def test_bad_probe_settings_are_named(tmp_path):
    paths = _probe_volumes(tmp_path)
    other = str(tmp_path / "other.zarr")
    create_volume(other, (4, 64, 32), np.uint8, voxel_size=(40.0, 4.0, 4.0)).write(np.zeros((4, 64, 32), np.uint8))
    cases = [
        ({"ssl.probe_labels": "()"}, r"ssl.probe_images names 1 volumes but ssl.probe_labels names 0"),
        ({"ssl.probe_images": "()"}, r"ssl.probe_images names 0 volumes but ssl.probe_labels names 1"),
        ({"ssl.probe_labels": f"('{tmp_path}/missing.zarr',)"}, r"ssl.probe_labels\[0\]: volume .*missing.zarr does not exist"),
        ({"ssl.probe_labels": f"('{other}',)"}, r"ssl.probe_labels\[0\] .* has shape \(4, 64, 32\) but its image"),
        ({"data.crop_shape": "(128, 128)"}, r"data.crop_shape \(128, 128\) does not fit in ssl.probe_images\[0\]"),
        ({"ssl.probe_crops": 1}, r"ssl.probe_crops must be at least 2"),
        ({"ssl.probe_ridge": 0.0}, r"ssl.probe_ridge must be > 0"),
        ({"train.best_metric": "val_loss"}, r"train.best_metric='val_loss': with a linear probe"),
        ({"train.best_metric": "val_probe_f1"}, r"train.best_mode must be 'max'"),
    ]
    for fields, message in cases:
        with pytest.raises(UserError, match=message):
            make_probe(_config(paths, **fields))
    assert make_probe(_config(paths, **{"train.eval_every": 0})) is None  # named, but off
    assert make_probe(_config(paths, **{"ssl.probe_images": "()", "ssl.probe_labels": "()"})) is None


@pytest.mark.parametrize("method,train_panels", [("moco", 3), ("mim", 2)])
def test_pretrain_logs_the_probe_from_the_random_init_on(method, train_panels, tmp_path, capsys):
    """`jaxem pretrain` on its synthetic volume probes with its labels by default: a 'val' row at
    step 0 (the random-init encoder) and at every train.eval_every steps, a panel per probe metric,
    the latest checkpoints kept (best_metric ""), the random-init numbers in the summary."""
    run = tmp_path / "run"
    args = ["pretrain", "--config", f"pretrain:tiny,{method}", "--workdir", str(run), "--no-progress",
            "--config.train.eval_every=3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 3, 6]
    for r in val:
        assert set(METRICS) <= set(r) and 0 < r["probe_f1"] <= 1 and 0 < r["probe_balanced_accuracy"] <= 1
    assert all(summary[f"{m}_random_init"] == val[0][m] for m in METRICS)
    assert summary["val_probe_f1"] == val[-1]["probe_f1"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    import matplotlib.pyplot as plt
    assert plt.imread(run / "training_curves.png").shape[1] == (1 + train_panels + len(METRICS)) * 450
    if method == "moco":
        # The probe settings are not part of what a workdir's checkpoints hold: a run made before
        # they existed, or with other ones, resumes; a rerun logs no second random-init row.
        saved = json.loads((run / "config.json").read_text())
        saved["ssl"] = {k: v for k, v in saved["ssl"].items() if not k.startswith("probe_")}
        (run / "config.json").write_text(json.dumps(saved))
        assert main([*args, "--config.ssl.probe_pixels=100"]) == 0
        assert "already holds a run trained to step 6" in capsys.readouterr().out
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["split"] == "val"] == [0, 3, 6]
