"""Masked image modelling of a whole network (ssl.method = "mim"): masks, loss, learning, transfer."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxem.commands.pretrain import with_synthetic_images
from jaxem.config import apply_overrides, load_config
from jaxem.errors import UserError
from jaxem.ssl.contrastive import default_ssl_config
from jaxem.ssl.masked import check_masked_config, masked_inputs, random_patch_mask, reconstruction_loss
from jaxem.ssl.pretrain import pretrain
from jaxem.train import parallel
from jaxem.train.checkpoint import load_encoder
from jaxem.train.trainer import build_training


@pytest.mark.parametrize("spatial,patch", [((64, 48), (16, 16)), ((4, 32, 32), (1, 8, 8)), ((4, 32, 32), (2, 8, 16))])
def test_mask_hides_whole_patches_at_the_ratio(spatial, patch):
    mask = np.asarray(random_patch_mask(jax.random.PRNGKey(0), spatial, 5, patch, 0.6))
    grid = tuple(s // p for s, p in zip(spatial, patch))
    n = int(np.prod(grid))
    blocks = mask.reshape(5, *[v for g, p in zip(grid, patch) for v in (g, p)])
    within = tuple(2 + 2 * i for i in range(len(spatial)))  # the axes inside a patch
    assert np.all(blocks.min(axis=within) == blocks.max(axis=within))  # constant over each patch
    per_example = blocks.max(axis=within).reshape(5, n).sum(axis=1)
    assert np.all(per_example == round(0.6 * n))
    assert not np.array_equal(mask[0], mask[1])  # each example its own mask


def test_inputs_hide_the_masked_patches_and_noise_is_optional():
    cfg = default_ssl_config()
    image = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 1))
    inputs, mask = masked_inputs(jax.random.PRNGKey(2), image, cfg)
    assert np.all(np.asarray(inputs)[np.asarray(mask) == 1] == 0)
    np.testing.assert_array_equal(np.asarray(inputs)[np.asarray(mask) == 0], np.asarray(image)[np.asarray(mask) == 0])
    cfg.noise_std = 0.5
    noisy, mask2 = masked_inputs(jax.random.PRNGKey(2), image, cfg)
    np.testing.assert_array_equal(mask, mask2)
    residual = np.asarray(noisy - inputs)
    assert 0.4 < residual.std() < 0.6


def test_loss_scores_hidden_pixels_only_and_r2_reads_zero_for_the_mean_and_one_for_perfect():
    target = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 1))
    mask = jnp.zeros_like(target).at[:, :8].set(1.0)
    perfect = target
    wrong_outside = jnp.where(mask == 1, target, 5.0)
    loss_a, metrics_a = reconstruction_loss(perfect, target, mask)
    loss_b, metrics_b = reconstruction_loss(wrong_outside, target, mask)
    assert float(loss_a) == 0.0 and float(loss_b) == 0.0
    assert float(metrics_a["masked_r2"]) == pytest.approx(1.0)
    assert float(metrics_b["visible_mse"]) > 1.0
    hidden_mean = jnp.sum(target * mask) / jnp.sum(mask)
    _, metrics_c = reconstruction_loss(jnp.full_like(target, hidden_mean), target, mask)
    assert float(metrics_c["masked_r2"]) == pytest.approx(0.0, abs=1e-5)
    loss_all, _ = reconstruction_loss(wrong_outside, target, mask, "all")
    expected = np.mean(np.where(np.asarray(mask) == 1, 0.0, np.square(5.0 - np.asarray(target))))
    assert float(loss_all) == pytest.approx(expected, rel=1e-5)  # every pixel, hidden ones exact


def test_bad_mim_settings_are_named():
    cfg = default_ssl_config()
    for field, value, crop in (("mask_ratio", 1.0, (32, 32)), ("mask_loss", "some", (32, 32)),
                               ("noise_std", -1.0, (32, 32)), ("mask_patch", (16,), (40, 40)),
                               ("mask_patch", (4, 4), (4, 32, 32))):
        bad = ml_collections.ConfigDict(cfg.to_dict())
        bad[field] = value
        with pytest.raises(UserError, match=f"ssl.{field}"):
            check_masked_config(bad, crop)


def _tiny_mim(tmp_path, **overrides):
    config = load_config("pretrain:tiny,mim")
    config = apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    return with_synthetic_images(config, tmp_path / "data")


def test_mim_learns_to_paint_in_hidden_patches(tmp_path):
    """Real learning on synthetic EM: the hidden pixels' R^2 rises well above predicting the mean."""
    config = _tiny_mim(tmp_path, **{"train.steps": 80, "train.log_every": 10, "train.checkpoint_every": 80,
                                    "data.batch_size": 8, "optimizer.learning_rate": 3e-3,
                                    "model.widths": "(8, 16)", "synthetic.shape": "(8, 96, 96)"})
    pretrain(config, tmp_path / "run", progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = logs[0]["masked_r2"], np.mean([r["masked_r2"] for r in logs[-3:]])
    assert first < 0.1 and last > 0.15 and last > first + 0.15  # measured: about 0.0 -> 0.23
    assert np.mean([r["loss"] for r in logs[-3:]]) < 0.85 * logs[0]["loss"]


def test_mim_resumes_exactly_and_fine_tuning_starts_from_the_whole_network_but_its_head_or_the_encoder_alone(tmp_path):
    import shutil

    config = _tiny_mim(tmp_path)  # checkpoints at steps 3 and 6
    pretrain(config, tmp_path / "run", progress=False)
    exported = load_encoder(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "encoder" / "model.json").read_text())
    assert record["parts"] == sorted(exported["params"]) and "head" not in record["parts"]
    assert {"encoder", "dec0", "up0"} <= set(record["parts"])
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    shutil.rmtree(tmp_path / "run" / "encoder")
    resumed = pretrain(config, tmp_path / "run", progress=False)
    assert resumed["start_step"] == 3
    again = load_encoder(tmp_path / "run")
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(again)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

    seg = apply_overrides(load_config("demo:tiny"), [f"--config.train.init_encoder={tmp_path / 'run'}"])
    _, state, _, _ = build_training(seg, parallel.make_mesh(1))
    _, fresh, _, _ = build_training(load_config("demo:tiny"), parallel.make_mesh(1))
    for part in record["parts"]:
        for x, y in zip(jax.tree.leaves(state.params[part]), jax.tree.leaves(exported["params"][part])):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(state.params["head"]), jax.tree.leaves(fresh.params["head"])):
        np.testing.assert_array_equal(x, y)  # the head starts fresh
    # train.init_decoder=False: the encoder alone; the decoder and head as from random init
    encoder_only = apply_overrides(seg, ["--config.train.init_decoder=False"])
    _, alone, _, _ = build_training(encoder_only, parallel.make_mesh(1))
    for part in record["parts"]:
        expected = exported["params"][part] if part == "encoder" else fresh.params[part]
        for x, y in zip(jax.tree.leaves(alone.params[part]), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(exported["params"]["dec0"]),
                                                         jax.tree.leaves(fresh.params["dec0"])))


def test_fine_tuning_a_pretrained_network_with_ema_trains(tmp_path):
    """init_encoder with an EMA (the pseudo-label / mean-teacher runs): params and their EMA copy are
    separate buffers (the train step donates both), and both move from the pretrained weights."""
    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.train.trainer import train

    pretrain(_tiny_mim(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2}), tmp_path / "pt", progress=False)
    seg = with_data_paths(apply_overrides(load_config("demo:tiny"), [
        f"--config.train.init_encoder={tmp_path / 'pt'}", "--config.train.ema_decay=0.5", "--config.train.steps=2"]),
        write_synthetic_data(load_config("demo:tiny"), tmp_path / "data"))
    _, state, _, _ = build_training(seg, parallel.make_mesh(1))
    pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)}  # noqa: E731
    assert not pointers(state.params) & pointers(state.ema_params)
    assert train(seg, tmp_path / "run", progress=False)["final_step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")


def test_mim_network_that_does_not_fit_is_refused_by_name(tmp_path):
    config = _tiny_mim(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2})
    pretrain(config, tmp_path / "run", progress=False)
    seg = apply_overrides(load_config("demo:tiny"), [f"--config.train.init_encoder={tmp_path / 'run'}",
                                                     "--config.model.widths=(4, 16)"])
    with pytest.raises(UserError, match=r"params/(encoder|dec0|up0)/.*has shape"):
        build_training(seg, parallel.make_mesh(1))


@pytest.mark.parametrize("model", ["unet3d", "unetr"])
def test_mim_pretrains_3d_unets_and_unetr_and_exports_their_decoders(model, tmp_path):
    from jaxem import models

    if model == "unet3d":
        config = load_config("pretrain:tiny,mim,3d")
    else:
        config = load_config("pretrain:tiny,mim")
        config.model = models.default_config("unetr", 2)
        config.model.update(dict(hidden=16, depth=2, heads=2, patch_size=(8, 8), feature_size=4))
    config = with_synthetic_images(apply_overrides(config, ["--config.train.steps=2", "--config.train.checkpoint_every=2"]),
                                   tmp_path / "data")
    pretrain(config, tmp_path / "run", progress=False)
    parts = json.loads((tmp_path / "run" / "encoder" / "model.json").read_text())["parts"]
    assert "encoder" in parts and any(p.startswith("dec") for p in parts) and "head" not in parts
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(logs[-1]["masked_r2"])
