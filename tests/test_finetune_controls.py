"""Fine-tuning controls in the optimizer: layer-wise lr decay, encoder freezing, encoder lr scale."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import cell_batch
from jaxem import models
from jaxem.errors import UserError
from jaxem.train import parallel
from jaxem.train.checkpoint import Checkpointer
from jaxem.train.defaults import base_config
from jaxem.train.trainer import build_training
from jaxem.train.state import encoder_layers, hold_frozen_batch_stats, make_optimizer


def unet_config(widths=(4, 8, 16), norm="group", **train):
    cfg = base_config(ndim=2)
    cfg.data.crop_shape = (32, 32)
    cfg.data.batch_size = 8
    cfg.model.widths = widths
    cfg.model.norm = norm
    cfg.optimizer.update(dict(name="sgd", momentum=0.0, schedule="constant", warmup_steps=0, grad_clip=0.0,
                              learning_rate=0.1))
    cfg.train.steps = 20
    cfg.train.update(train)
    return cfg


def train_steps(cfg, steps, mesh=None, state=None):
    """(state before, [host copies of the state after each step]) of `steps` real jitted steps."""
    mesh = mesh or parallel.make_mesh(1)
    _, initial, step, _ = build_training(cfg, mesh, load_encoder=False)
    state = initial if state is None else state
    batch = jax.device_put(cell_batch(), parallel.data_sharding(mesh))
    before, history = jax.device_get(state), []
    for _ in range(steps):
        state, _ = step(state, batch)  # the step donates its input state: keep host copies
        history.append(jax.device_get(state))
    return before, history


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def leaf_scale(delta, reference):
    """The least-squares factor s of delta = s * reference."""
    d, r = np.ravel(delta).astype(np.float64), np.ravel(reference).astype(np.float64)
    return float(d @ r / (r @ r))


def init_params(cfg):
    model = models.build(cfg.model)
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False)["params"]


# --- layer numbering --------------------------------------------------------------------------------

def test_layer_numbering_of_each_encoder():
    unet = init_params(unet_config(widths=(4, 8, 16)))["encoder"]
    assert encoder_layers(unet) == ({"level0": 0, "level1": 1, "level2": 2}, 3)

    resnet_cfg = unet_config(widths=(8, 16))
    resnet_cfg.model.update(dict(encoder="resnet", resnet_blocks=(1, 2)))
    resnet = init_params(resnet_cfg)["encoder"]
    assert encoder_layers(resnet) == ({"stem": 0, "level0_block0": 1, "level1_block0": 2, "level1_block1": 2}, 3)

    vit = {"patch_embed": {}, "block0": {}, "block1": {}, "block2": {}, "final_norm": {},
           # entries a ViT may grow: embeddings go to layer 0, anything else to the deepest layer
           "pos_embed": 0, "cls_token": 0, "register_tokens": 0, "neck": {}, "post_norm": {}}
    layers, num = encoder_layers(vit)
    assert num == 4
    assert layers == {"patch_embed": 0, "pos_embed": 0, "cls_token": 0, "register_tokens": 0, "block0": 1,
                      "block1": 2, "block2": 3, "final_norm": 3, "neck": 3, "post_norm": 3}
    with pytest.raises(UserError, match="train.llrd needs an encoder"):
        encoder_layers({"conv": {}, "norm": {}})


@pytest.mark.parametrize("variant, extra, expected", [
    ("timm", dict(pos_embed="learned", pos_grid=(4, 4), class_token=True, reg_tokens=2, prefix_pos=True),
     {"cls_token": 0, "reg_token": 0, "pos_embed": 0, "pos_embed_prefix": 0, "final_norm": 2}),
    ("sam", dict(pos_embed="learned", pos_grid=(4, 4), neck_dim=8), {"pos_embed": 0, "neck": 2}),
])
def test_layer_numbering_of_the_foundation_vit_variants(variant, extra, expected):
    cfg = models.default_config("unetr", 2)
    cfg.update(dict(size="tiny", hidden=16, depth=2, heads=2, patch_size=(8, 8), variant=variant, **extra))
    model = models.build(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False))["params"]
    assert encoder_layers(params["encoder"]) == ({"patch_embed": 0, "block0": 1, "block1": 2, **expected}, 3)


def one_update(cfg, params):
    """The optimizer's first update for gradients of ones (SGD, no momentum: -lr x multiplier)."""
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.train)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    return updates


def check_scales(updates, expected: dict, lr: float):
    """Every leaf of updates['encoder'][name] equals -lr * expected[name]; the rest -lr."""
    for name, tree in updates["encoder"].items():
        for leaf in jax.tree.leaves(tree):
            np.testing.assert_allclose(np.asarray(leaf), -lr * expected[name], rtol=1e-6, err_msg=name)
    for name, tree in updates.items():
        if name != "encoder":
            for leaf in jax.tree.leaves(tree):
                np.testing.assert_allclose(np.asarray(leaf), -lr, rtol=1e-6, err_msg=name)


def test_llrd_and_encoder_scale_rates_for_unet_resnet_and_vit():
    llrd, scale = 0.5, 0.3
    cfg = unet_config(widths=(4, 8, 16), llrd=llrd)
    cfg.optimizer.encoder_lr_scale = scale
    check_scales(one_update(cfg, init_params(cfg)), {f"level{k}": scale * llrd ** (3 - k) for k in range(3)}, 0.1)

    cfg.model.update(dict(widths=(8, 16), encoder="resnet", resnet_blocks=(1, 1)))
    check_scales(one_update(cfg, init_params(cfg)),
                 {"stem": scale * llrd ** 3, "level0_block0": scale * llrd ** 2, "level1_block0": scale * llrd}, 0.1)

    vit_cfg = base_config(ndim=2, model="unetr")
    vit_cfg.model.update(dict(size="tiny", hidden=16, depth=3, heads=2, patch_size=(8, 8)))
    vit_cfg.optimizer.update(cfg.optimizer)
    vit_cfg.train.llrd = llrd
    expected = {"patch_embed": scale * llrd ** 4, "block0": scale * llrd ** 3, "block1": scale * llrd ** 2,
                "block2": scale * llrd, "final_norm": scale * llrd}
    check_scales(one_update(vit_cfg, init_params(vit_cfg)), expected, 0.1)


def test_llrd_in_real_train_steps():
    """One real step: each encoder level moves llrd^(L - i) x encoder_lr_scale as far as without the
    controls (same init, same batch, SGD), the decoder as far."""
    _, plain = train_steps(unet_config(), 1)
    cfg = unet_config(llrd=0.5)
    cfg.optimizer.encoder_lr_scale = 2.0
    before, scaled = train_steps(cfg, 1)
    ref = jax.tree.map(lambda a, b: a - b, plain[0].params, before.params)
    got = jax.tree.map(lambda a, b: a - b, scaled[0].params, before.params)
    for k in range(3):
        for r, g in zip(jax.tree.leaves(ref["encoder"][f"level{k}"]), jax.tree.leaves(got["encoder"][f"level{k}"])):
            assert leaf_scale(g, r) == pytest.approx(2.0 * 0.5 ** (3 - k), rel=1e-3)
    for name in ("dec0", "dec1", "up0", "head"):
        for r, g in zip(jax.tree.leaves(ref[name]), jax.tree.leaves(got[name])):
            assert leaf_scale(g, r) == pytest.approx(1.0, rel=1e-3)


# --- freezing ------------------------------------------------------------------------------------------

def test_frozen_encoder_params_and_batch_stats_do_not_move_then_thaw():
    cfg = unet_config(norm="batch", freeze_encoder_steps=3, llrd=0.8)
    cfg.optimizer.update(dict(name="adamw", weight_decay=0.1, warmup_steps=2, grad_clip=1.0, learning_rate=1e-2))
    before, history = train_steps(cfg, 5)
    for frozen in history[:3]:
        assert same(frozen.params["encoder"], before.params["encoder"])  # bitwise: no update, no weight decay
        assert same(frozen.batch_stats["encoder"], before.batch_stats["encoder"])
    assert not same(history[2].params["dec0"], before.params["dec0"])
    assert not same(history[2].batch_stats["dec0"], before.batch_stats["dec0"])
    # Step 4 (update count 3) is the first after the frozen ones: lr ramps in at 1/2, then 1.
    for level in ("level0", "level1", "level2"):
        for a, b in zip(jax.tree.leaves(history[3].params["encoder"][level]),
                        jax.tree.leaves(before.params["encoder"][level])):
            assert not np.array_equal(a, b), level
    assert not same(history[3].batch_stats["encoder"], before.batch_stats["encoder"])
    first = jax.tree.map(lambda a, b: np.abs(a - b).mean(), history[3].params["encoder"], history[2].params["encoder"])
    assert np.isfinite(jax.tree.leaves(first)).all()


def test_frozen_encoder_can_let_its_batch_stats_track_the_data():
    """train.freeze_encoder_batch_stats=False (AdaBN): the frozen encoder's weights stay bitwise
    fixed while its batch-norm running averages move toward the training batches' statistics."""
    cfg = unet_config(norm="batch", freeze_encoder_steps=-1, freeze_encoder_batch_stats=False)
    before, history = train_steps(cfg, 3)
    assert same(history[-1].params["encoder"], before.params["encoder"])
    means = [[v for k, v in jax.tree_util.tree_flatten_with_path(s.batch_stats["encoder"])[0]
              if "mean" in jax.tree_util.keystr(k)] for s in (before, *history)]
    assert means[0]
    for old, new in zip(means, means[1:]):  # each step moves every running mean
        assert all(not np.array_equal(a, b) for a, b in zip(old, new))
    cfg.train.freeze_encoder_batch_stats = True
    before, history = train_steps(cfg, 3)
    assert same(history[-1].batch_stats["encoder"], before.batch_stats["encoder"])


def test_freeze_encoder_batch_stats_must_be_a_bool():
    cfg = ml_collections.ConfigDict(dict(freeze_encoder_batch_stats="yes"))
    with pytest.raises(UserError, match="train.freeze_encoder_batch_stats='yes' must be True"):
        hold_frozen_batch_stats(cfg)
    assert hold_frozen_batch_stats(ml_collections.ConfigDict()) is True


def test_encoder_frozen_for_the_whole_run_with_gradient_accumulation():
    """freeze_encoder_steps=-1 with 2 micro-batches on 4 devices: the encoder never moves, and the
    decoder ends where the same run without accumulation ends."""
    cfg = unet_config(freeze_encoder_steps=-1, llrd=0.5)
    mesh = parallel.make_mesh(4)
    before, full = train_steps(cfg, 3, mesh)
    cfg.train.accumulate_steps = 2
    _, micro = train_steps(cfg, 3, mesh)
    assert same(full[-1].params["encoder"], before.params["encoder"])
    assert same(micro[-1].params["encoder"], before.params["encoder"])
    assert not same(micro[-1].params["dec0"], before.params["dec0"])
    for a, b in zip(jax.tree.leaves(full[-1].params), jax.tree.leaves(micro[-1].params)):
        np.testing.assert_allclose(a, b, rtol=5e-3, atol=5e-4)


def test_clipping_ignores_the_frozen_encoder():
    cfg = unet_config(freeze_encoder_steps=1)
    cfg.optimizer.grad_clip = 1.0
    params = {"encoder": {"level0": {"w": jnp.zeros(3)}}, "head": {"w": jnp.zeros(2)}}
    grads = {"encoder": {"level0": {"w": jnp.full(3, 100.0)}}, "head": {"w": jnp.full(2, 0.1)}}
    tx = make_optimizer(cfg.optimizer, 10, cfg.train)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["encoder"]["level0"]["w"], 0.0)
    np.testing.assert_allclose(updates["head"]["w"], -0.1 * 0.1, rtol=1e-6)  # norm 0.14 < 1: not clipped
    updates, _ = tx.update(grads, state, params)  # thawed: the encoder counts, everything is clipped
    norm = float(jnp.sqrt(3 * 100.0 ** 2 + 2 * 0.1 ** 2))
    np.testing.assert_allclose(updates["head"]["w"], -0.1 * 0.1 / norm, rtol=1e-5)
    np.testing.assert_allclose(updates["encoder"]["level0"]["w"], -0.1 * 100.0 / norm, rtol=1e-5)


# --- validation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, field, value, message", [
    ("train", "llrd", 0.0, "train.llrd=0.0 must be a number in \\(0, 1\\]"),
    ("train", "llrd", 1.5, "train.llrd=1.5 must be a number in \\(0, 1\\]"),
    ("train", "llrd", -0.2, "train.llrd=-0.2"),
    ("train", "freeze_encoder_steps", -2, "train.freeze_encoder_steps=-2 must be an integer >= -1"),
    ("optimizer", "encoder_lr_scale", 0.0, "optimizer.encoder_lr_scale=0.0 must be > 0"),
    ("optimizer", "encoder_lr_scale", -1.0, "optimizer.encoder_lr_scale=-1.0 must be > 0"),
])
def test_bad_values_name_the_field(section, field, value, message):
    cfg = unet_config()
    cfg[section][field] = value
    with pytest.raises(UserError, match=message):
        make_optimizer(cfg.optimizer, 10, cfg.train)


def test_model_without_encoder_and_pretraining_are_refused():
    cfg = unet_config(llrd=0.5, freeze_encoder_steps=4)
    tx = make_optimizer(cfg.optimizer, 10, cfg.train)
    with pytest.raises(UserError, match="train.llrd=0.5, train.freeze_encoder_steps=4 set, but the model has no 'encoder'"):
        jax.jit(tx.init)({"conv": {"w": jnp.zeros(3)}})  # the error survives jit tracing (create_train_state)
    cfg.optimizer.encoder_lr_scale = 0.5
    with pytest.raises(UserError, match="optimizer.encoder_lr_scale=0.5 applies to fine-tuning"):
        make_optimizer(cfg.optimizer, 10)  # no train config: pretraining


def test_controls_off_is_the_plain_optimizer():
    cfg = unet_config()
    cfg.optimizer.grad_clip = 1.0
    params = init_params(cfg)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    plain, controlled = make_optimizer(cfg.optimizer, 10), make_optimizer(cfg.optimizer, 10, cfg.train)
    a, _ = plain.update(grads, plain.init(params), params)
    b, _ = controlled.update(grads, controlled.init(params), params)
    assert same(a, b)


# --- resume ------------------------------------------------------------------------------------------------

def test_checkpoint_with_controls_restores_into_any_setting(tmp_path):
    """The controls keep no optimizer state of their own: a checkpoint written with them restores into
    a run with other values (here: frozen for the whole run -> thawed, llrd changed) or none."""
    cfg = unet_config(widths=(4, 8), freeze_encoder_steps=-1, llrd=0.7)
    cfg.optimizer.update(dict(name="adamw", grad_clip=1.0))
    _, history = train_steps(cfg, 2)
    saved = history[-1]
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, saved, {"next": 2}, {})
    ckpt.wait()
    mesh = parallel.make_mesh(1)
    batch = jax.device_put(cell_batch(), parallel.data_sharding(mesh))
    for other in (unet_config(widths=(4, 8), freeze_encoder_steps=5, llrd=0.9), unet_config(widths=(4, 8))):
        other.optimizer.update(dict(name="adamw", grad_clip=1.0))
        _, template, step, _ = build_training(other, mesh, load_encoder=False)
        restored, data_state, _ = Checkpointer(tmp_path, async_save=False).restore_latest(template)
        assert data_state == {"next": 2} and int(restored.step) == 2
        assert same(restored.opt_state, saved.opt_state) and same(restored.params, saved.params)
        after, _ = step(restored, batch)  # and trains on
        assert int(after.step) == 3


def test_command_line_fields_and_refusal_before_the_workdir_is_written(tmp_path):
    from jaxem.config import apply_overrides, load_config
    from jaxem.train.trainer import train
    from jaxem.train.state import encoder_controls

    cfg = apply_overrides(load_config("isbi2012_unet:cpu"), [  # the example of docs/training.md
        "--config.train.llrd=0.75", "--config.train.freeze_encoder_steps=100", "--config.optimizer.encoder_lr_scale=0.5"])
    controls = encoder_controls(cfg.optimizer, cfg.train, cfg.train.steps)
    assert (controls.llrd, controls.freeze_steps, controls.lr_scale) == (0.75, 100, 0.5)
    bad = apply_overrides(load_config("demo:tiny"), ["--config.train.llrd=1.5"])
    with pytest.raises(UserError, match="train.llrd=1.5"):
        train(bad, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
