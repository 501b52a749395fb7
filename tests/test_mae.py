"""MAE pretraining of the ViT (ssl.method = "mae"): token dropping, loss, learning, transfer."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxem import models
from jaxem.commands.pretrain import with_synthetic_images
from jaxem.config import apply_overrides, load_config
from jaxem.errors import UserError
from jaxem.models import vit
from jaxem.ssl.mae import MAE, check_mae_config, mae_loss, normalise_patches, patchify, random_keep
from jaxem.ssl.pretrain import pretrain
from jaxem.train import parallel
from jaxem.train.checkpoint import load_encoder
from jaxem.train.trainer import build_training


def _tiny_vit(ndim=2, **fields):
    cfg = vit.default_config(ndim)
    cfg.update(dict(hidden=16, depth=2, heads=2, patch_size=(8,) * ndim, **fields))
    return vit.encoder_from_config(cfg)


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (64, 0.6), (10, 0.33)])
def test_keeps_exactly_the_unmasked_tokens_per_example(n, ratio):
    keep, mask = random_keep(jax.random.PRNGKey(0), 5, n, ratio)
    keep, mask = np.asarray(keep), np.asarray(mask)
    assert keep.shape == (5, n - round(ratio * n))
    assert np.all(mask.sum(axis=1) == round(ratio * n))
    for k, m in zip(keep, mask):
        assert len(set(k)) == len(k) and np.all(np.diff(k) > 0)
        assert np.all(m[k] == 0) and m.sum() + len(k) == n
    assert not np.array_equal(keep[0], keep[1])  # each example its own tokens


@pytest.mark.parametrize("ndim,variant", [(2, "jaxem"), (3, "jaxem"), (2, "timm")])
def test_masked_forward_runs_the_blocks_on_the_gathered_tokens(ndim, variant):
    fields = dict(variant=variant, class_token=True) if variant == "timm" else {}
    encoder = _tiny_vit(ndim, **fields)
    shape = (2,) + ((16, 32, 32) if ndim == 3 else (32, 32)) + (1,)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    variables = encoder.init(jax.random.PRNGKey(2), x)
    full = encoder.apply(variables, x)  # default: token grids, parameter names unchanged
    grid = tuple(s // 8 for s in shape[1:-1])
    assert full[-1].shape == (2, *grid, 16)
    n = int(np.prod(grid))
    keep, _ = random_keep(jax.random.PRNGKey(3), 2, n, 0.75)
    states = encoder.apply(variables, x, keep=keep)
    assert len(states) == 2 and states[-1].shape == (2, keep.shape[1], 16)

    # by hand: the embedded tokens, gathered, through the same blocks and final norm
    params = variables["params"]
    patches = jax.lax.conv_general_dilated(x, params["patch_embed"]["kernel"], (8,) * ndim, "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC") if ndim == 2
                                           else ("NDHWC", "DHWIO", "NDHWC"))
    tokens = (patches + params["patch_embed"]["bias"]).reshape(2, n, 16)
    tokens = tokens + vit.sincos_position_embedding(grid, 16)
    tokens = jnp.take_along_axis(tokens, keep[..., None], axis=1)
    prefix = 0
    if variant == "timm":
        tokens = jnp.concatenate([jnp.broadcast_to(params["cls_token"], (2, 1, 16)), tokens], axis=1)
        prefix = 1
    for i in range(2):
        block = vit.TransformerBlock(2, 64, variant=variant, grid=grid)
        tokens = block.apply({"params": params[f"block{i}"]}, tokens, False)
    norm = nn_layer_norm(variant)
    tokens = norm.apply({"params": params["final_norm"]}, tokens)
    np.testing.assert_allclose(states[-1], tokens[:, prefix:], rtol=1e-5, atol=1e-5)
    # keeping every token in order is the full forward
    every = jnp.broadcast_to(jnp.arange(n), (2, n))
    np.testing.assert_allclose(encoder.apply(variables, x, keep=every)[-1].reshape(full[-1].shape), full[-1],
                               rtol=1e-5, atol=1e-5)


def nn_layer_norm(variant):
    import flax.linen as nn

    return nn.LayerNorm() if variant == "jaxem" else nn.LayerNorm(use_fast_variance=False)


def test_sam_variant_refuses_token_dropping():
    encoder = _tiny_vit(2, variant="sam", window_size=(2,), rel_pos=True, pos_grid=(4, 4))
    x = jnp.zeros((1, 32, 32, 1))
    variables = encoder.init(jax.random.PRNGKey(0), x)
    with pytest.raises(UserError, match="model.variant"):
        encoder.apply(variables, x, keep=jnp.zeros((1, 4), jnp.int32))


def test_patchify_follows_the_token_order_2d_and_3d():
    image = jnp.arange(2 * 4 * 6, dtype=jnp.float32).reshape(1, 4, 6, 2)
    patches = np.asarray(patchify(image, (2, 3)))
    assert patches.shape == (1, 4, 12)
    np.testing.assert_array_equal(patches[0, 1], np.asarray(image)[0, 0:2, 3:6].reshape(-1))
    np.testing.assert_array_equal(patches[0, 2], np.asarray(image)[0, 2:4, 0:3].reshape(-1))
    volume = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8, 1))
    patches = np.asarray(patchify(volume, (2, 4, 4)))
    assert patches.shape == (2, 8, 32)
    np.testing.assert_array_equal(patches[1, 5], np.asarray(volume)[1, 2:4, 0:4, 4:8].reshape(-1))  # (1, 0, 1)


def test_per_patch_normalisation():
    patches = 3.0 + 5.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 7, 64))
    normalised = np.asarray(normalise_patches(patches))
    np.testing.assert_allclose(normalised.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalised.std(axis=-1), 1.0, atol=1e-4)


def test_loss_uses_the_dropped_patches_only():
    target = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 64))
    prediction = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 64))
    _, mask = random_keep(jax.random.PRNGKey(2), 2, 16, 0.75)
    loss, metrics = mae_loss(prediction, target, mask)
    changed = jnp.where(mask[..., None] == 0, 100.0, prediction)  # only the visible patches change
    loss2, metrics2 = mae_loss(changed, target, mask)
    assert float(loss) == float(loss2) and float(metrics["masked_r2"]) == float(metrics2["masked_r2"])
    m = np.asarray(mask, bool)
    expected = np.mean(np.square(np.asarray(prediction) - np.asarray(target))[m])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    perfect, _ = mae_loss(jnp.where(mask[..., None] == 1, target, 7.0), target, mask)
    assert float(perfect) == 0.0


def test_decoder_predicts_every_patch():
    model = MAE(_tiny_vit(2), decoder_dim=8, decoder_depth=1, decoder_heads=2)
    x = jnp.zeros((2, 32, 48, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert set(variables["params"]) == {"encoder", "decoder_embed", "mask_token", "decoder_block0", "decoder_norm",
                                        "decoder_pred"}
    keep, _ = random_keep(jax.random.PRNGKey(1), 2, 24, 0.75)
    assert model.apply(variables, x, keep).shape == (2, 24, 64)


def _tiny_mae(tmp_path, **overrides):
    config = load_config("pretrain:tiny,mae")
    config = apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    return with_synthetic_images(config, tmp_path / "data")


def test_mae_learns_and_its_encoder_fine_tunes_a_unetr(tmp_path):
    """Real learning on synthetic EM: the dropped patches' R^2 rises well above predicting the mean
    (raw pixel targets: in 80 steps a tiny ViT learns no more than each normalised patch's mean,
    R^2 about 0, with ssl.norm_pix_loss); the export is the ViT alone."""
    config = _tiny_mae(tmp_path, **{"train.steps": 80, "train.log_every": 10, "train.checkpoint_every": 80,
                                    "optimizer.learning_rate": 3e-3, "synthetic.shape": "(8, 96, 96)",
                                    "model.hidden": 32, "ssl.decoder_dim": 32, "ssl.norm_pix_loss": False})
    pretrain(config, tmp_path / "run", progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = logs[0]["masked_r2"], np.mean([r["masked_r2"] for r in logs[-3:]])
    assert last > 0.1 and last > first + 0.5, (first, last)  # measured: about -1.2 (step 10) -> 0.21
    assert np.mean([r["loss"] for r in logs[-3:]]) < 0.7 * logs[0]["loss"]

    exported = load_encoder(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "encoder" / "model.json").read_text())
    assert record["parts"] == ["encoder"]
    assert "block0" in exported["params"] and "decoder_embed" not in exported["params"]
    seg = load_config("demo:tiny")
    seg.model = ml_collections.ConfigDict(config.model.to_dict())  # a UNETR of the same ViT fields
    seg = apply_overrides(seg, [f"--config.train.init_encoder={tmp_path / 'run'}", "--config.data.crop_shape=(32, 32)"])
    _, state, _, _ = build_training(seg, parallel.make_mesh(1))
    leaves = jax.tree_util.tree_leaves_with_path(exported["params"])
    target = jax.tree_util.tree_leaves_with_path(state.params["encoder"])
    assert [p for p, _ in leaves] == [p for p, _ in target]
    for (_, x), (_, y) in zip(leaves, target):
        np.testing.assert_array_equal(x, y)


def test_bad_mae_inputs_are_named():
    base = load_config("pretrain:tiny,mae")
    cases = [("model", models.default_config("unet", 2), "model.name"),
             ("ssl.mask_ratio", 1.0, "ssl.mask_ratio"), ("ssl.mask_ratio", 0.0, "ssl.mask_ratio"),
             ("data.crop_shape", (36, 36), "data.crop_shape"), ("model.variant", "sam", "model.variant"),
             ("ssl.decoder_heads", 3, "ssl.decoder_dim")]
    for field, value, name in cases:
        config = ml_collections.ConfigDict(base.to_dict())
        section, _, key = field.rpartition(".")
        (config[section] if section else config)[key] = value
        with pytest.raises(UserError, match=name):
            check_mae_config(config)
