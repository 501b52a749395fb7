"""Self-supervised pretraining: contrastive losses, views, MoCo/SimCLR steps, runs, export, fine-tune."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxem import models
from jaxem.cli import main
from jaxem.commands.pretrain import with_synthetic_images
from jaxem.config import apply_overrides, load_config
from jaxem.data import augment, pipeline
from jaxem.errors import UserError
from jaxem.ssl.contrastive import (build_contrastive_model, check_ssl_config, create_contrastive_state,
                                   default_ssl_config, make_contrastive_step)
from jaxem.ssl.pretrain import build_pretraining, pretrain
from jaxem.train import parallel
from jaxem.train.checkpoint import load_encoder
from jaxem.train.losses import moco_infonce, nt_xent
from jaxem.train.trainer import build_training


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_nt_xent_equals_the_definition():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    t = 0.3
    z = _unit(np.concatenate([z1, z2]))
    losses, hits = [], []
    for i in range(10):
        partner = (i + 5) % 10
        sims = np.array([z[i] @ z[j] / t for j in range(10)])
        others = [j for j in range(10) if j != i]
        losses.append(-sims[partner] + np.log(np.sum(np.exp(sims[others]))))
        hits.append(others[int(np.argmax(sims[others]))] == partner)
    loss, accuracy = nt_xent(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), t)
    np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
    assert float(accuracy) == pytest.approx(np.mean(hits))


def test_moco_infonce_equals_the_definition_and_only_queries_get_gradients():
    rng = np.random.default_rng(1)
    q, k, queue = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), _unit(rng.normal(size=(9, 6)))
    t = 0.2
    qn, kn = _unit(q), _unit(k)
    expected = []
    for i in range(4):
        logits = np.concatenate([[qn[i] @ kn[i]], queue @ qn[i]]) / t
        expected.append(-logits[0] + np.log(np.sum(np.exp(logits))))
    f = lambda q, k, queue: moco_infonce(q, k, queue, t)[0]  # noqa: E731
    args = tuple(jnp.asarray(a, jnp.float32) for a in (q, k, queue))
    np.testing.assert_allclose(float(f(*args)), np.mean(expected), rtol=1e-5)
    grads = jax.grad(f, argnums=(0, 1, 2))(*args)
    assert float(jnp.abs(grads[0]).max()) > 0
    assert float(jnp.abs(grads[1]).max()) == 0 and float(jnp.abs(grads[2]).max()) == 0


def test_random_resized_crop_zooms_into_a_window_of_the_plane():
    ramp = jnp.broadcast_to(jnp.arange(32, dtype=jnp.float32), (3, 32, 32))  # value = x
    image = jnp.stack([ramp, ramp])[..., None]  # (2, z=3, y, x, 1)
    assert jnp.array_equal(augment.random_resized_crop(jax.random.key(0), image, (1.0, 1.0), (1.0, 1.0)), image)
    out = augment.random_resized_crop(jax.random.key(1), image, (0.25, 0.25), (1.0, 1.0))
    slope = jnp.diff(out[..., 0], axis=-1)[..., 1:-1]  # interior: a half-size window is a 2x zoom
    np.testing.assert_allclose(np.asarray(slope), 0.5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jnp.diff(out[..., 0], axis=-2)), 0.0, atol=1e-5)
    for example in out[..., 0]:  # z untouched: every section is the same crop of the same ramp
        assert jnp.allclose(example, example[0])
        assert 0 <= float(example.min()) and float(example.max()) <= 31
    with pytest.raises(UserError, match="crop scale"):
        augment.random_resized_crop(jax.random.key(0), image, (0.0, 1.0))


def _tiny_ssl(method, **fields):
    cfg = default_ssl_config()
    cfg.update(dict(method=method, queue_size=16, projection_hidden=16, projection_dim=8, crop_scale=(0.5, 1.0)))
    cfg.update(fields)
    model_cfg = models.default_config("unet", 2)
    model_cfg.widths = (4, 8)
    return cfg, build_contrastive_model(models.build(model_cfg).encoder, cfg)


def test_moco_step_moves_the_key_encoder_by_momentum_and_enqueues_the_keys():
    cfg, model = _tiny_ssl("moco", momentum=0.9)
    state = create_contrastive_state(model, optax.adam(1e-2), jax.random.key(0), (1, 16, 16, 1), cfg)
    views = augment.make_two_view_fn(augment.default_augment_config(2), 2, tuple(cfg.crop_scale))
    step = jax.jit(make_contrastive_step(model, cfg, views))
    image = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
    old = state
    new, metrics = step(state, {"image": image})
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "positive_cosine", "embedding_std"}
    expected_keys = jax.tree.map(lambda k, q: 0.9 * k + 0.1 * q, old.ema_params, new.params)
    for a, b in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(expected_keys)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(old.params)[0])
    # The queue's 4 oldest rows are now the unit keys of the second views, by the old key encoder.
    _, view2 = views(jax.random.fold_in(old.rng, old.step), image)
    keys, _ = model.apply({"params": old.ema_params, "batch_stats": old.key_batch_stats}, view2, train=True,
                          mutable=["batch_stats"])
    np.testing.assert_allclose(new.queue[:4], _unit(np.asarray(keys)), atol=1e-3)  # jit vs eager rounding
    np.testing.assert_array_equal(new.queue[4:], old.queue[4:])
    assert int(new.queue_ptr) == 4
    for _ in range(3):
        new, _ = step(new, {"image": image})
    assert int(new.queue_ptr) == 0  # 16 rows, 4 per step: wrapped around


@pytest.mark.parametrize("method,batch_norm", [("simclr", False), ("moco", False), ("simclr", True)])
def test_negatives_span_devices(method, batch_norm, tmp_path):
    """The same global batch on 1 and on 4 devices gives the same loss and update: every device's
    views are negatives for every other device's (per-device negatives would change the loss by
    tens of percent). With batch norm in the projector its statistics are global too; they differ
    only by rounding (flax's one-pass variance), hence the looser tolerance: the largest update
    difference was 1.02e-3 of the largest update on an Intel Xeon 2-core VM (2026-11-26), within
    1e-3 on the AMD EPYC ones before."""
    # SGD at a constant, large rate: with warm-up the rate is 0 at step 0 and the update would
    # compare nothing; Adam's first step (g / |g|) would blow rounding noise in near-zero gradients
    # up to lr; a small rate would drown the update in float32 rounding of the parameters.
    config = _tiny_run_config(tmp_path, method, **{
        "ssl.projection_batch_norm": batch_norm, "optimizer.name": "sgd", "optimizer.learning_rate": 1.0,
        "optimizer.schedule": "constant", "optimizer.warmup_steps": 0, "optimizer.grad_clip": 0.0})
    batch = {"image": jax.random.normal(jax.random.key(3), (8, 32, 32, 1))}
    results = []
    for n in (1, 4):
        mesh = parallel.make_mesh(n)
        state, step = build_pretraining(config, mesh)
        initial = jax.device_get(state.params)
        state, metrics = step(state, jax.device_put(batch, parallel.data_sharding(mesh)))
        update = jax.tree.map(lambda new, old: new - old, jax.device_get(state.params), initial)
        results.append((jax.device_get(metrics), update))
    (m1, u1), (m4, u4) = results
    rtol = 2e-3 if batch_norm else 1e-4
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=rtol)
    u1, u4 = np.concatenate([u.ravel() for u in jax.tree.leaves(u1)]), np.concatenate([u.ravel() for u in jax.tree.leaves(u4)])
    assert np.abs(u4).max() > 0
    assert np.abs(u1 - u4).max() <= rtol * np.abs(u4).max()


def _tiny_run_config(tmp_path, method="moco", **overrides):
    config = load_config(f"pretrain:tiny,{method}")
    config = apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    return with_synthetic_images(config, tmp_path / "data")


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_contrastive_training_learns_to_match_views(method, tmp_path):
    """Real learning on synthetic EM: after 60 steps the two views of a crop are far more alike than
    in the first 10, the loss fell, and the embeddings have not collapsed to one point."""
    config = _tiny_run_config(tmp_path, method, **{
        "train.steps": 60, "train.log_every": 10, "train.checkpoint_every": 60, "data.batch_size": 16,
        "optimizer.learning_rate": 3e-3, "ssl.crop_scale": "(0.5, 1.0)", "ssl.momentum": 0.9,
        "ssl.queue_size": 64, "model.widths": "(8, 16)", "synthetic.shape": "(8, 96, 96)"})
    pretrain(config, tmp_path / "run", progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = logs[0], logs[-1]
    assert last["positive_cosine"] > first["positive_cosine"] + 0.2
    assert last["loss"] < first["loss"]
    assert last["embedding_std"] > 0.25 / math.sqrt(config.ssl.projection_dim)  # 0 when collapsed
    if method == "simclr":  # picks the partner among 2 * 16 - 1 views: chance is 1/31
        assert last["accuracy"] > 3 / 31


def test_pretrain_resumes_exactly_and_exports_an_encoder_that_fine_tuning_starts_from(tmp_path):
    config = _tiny_run_config(tmp_path, "moco")  # checkpoints at steps 3 and 6
    whole = pretrain(config, tmp_path / "whole", progress=False)
    assert whole["final_step"] == 6
    a = load_encoder(tmp_path / "whole")
    shutil.rmtree(tmp_path / "whole" / "checkpoints" / "6")  # as if the run had stopped after step 3
    shutil.rmtree(tmp_path / "whole" / "encoder")
    resumed = pretrain(config, tmp_path / "whole", progress=False)  # queue, key encoder, data position
    assert resumed["start_step"] == 3
    b = load_encoder(tmp_path / "whole")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    saved = json.loads((tmp_path / "whole" / "encoder" / "model.json").read_text())
    assert saved["model"]["widths"] == [4, 8] and saved["step"] == 6

    seg = load_config("demo:tiny")
    seg = apply_overrides(seg, [f"--config.train.init_encoder={tmp_path / 'whole'}"])
    _, state, _, _ = build_training(seg, parallel.make_mesh(1))
    for x, y in zip(jax.tree.leaves(state.params["encoder"]), jax.tree.leaves(a["params"])):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(jax.tree.leaves(state.ema_params["encoder"])[0], jax.tree.leaves(a["params"])[0])
    scratch = apply_overrides(load_config("demo:tiny"), [])
    _, fresh, _, _ = build_training(scratch, parallel.make_mesh(1))
    for x, y in zip(jax.tree.leaves(state.params["head"]), jax.tree.leaves(fresh.params["head"])):
        np.testing.assert_array_equal(x, y)  # only the encoder changed


def test_loader_without_labels_reads_images_only(tmp_path):
    config = _tiny_run_config(tmp_path)
    mesh = parallel.make_mesh(1)
    batch = next(pipeline.make_loader(config.data, mesh=mesh, ndim=2, seed=0, labelled=False))
    assert set(batch) == {"image", "mask"} and batch["image"].shape == (8, 32, 32, 1)
    labelled = pipeline.make_loader(apply_overrides(config, [f"--config.data.train_labels=('{tmp_path}/none.zarr',)"]).data,
                                    mesh=mesh, ndim=2, seed=0, labelled=False)  # labels named but never opened
    np.testing.assert_array_equal(next(labelled)["image"], batch["image"])
    with pytest.raises(UserError, match="train_images has 1 volumes but data.train_labels has 0"):
        pipeline.make_loader(config.data, mesh=mesh, ndim=2, seed=0)


def test_bad_ssl_settings_are_named():
    cfg = default_ssl_config()
    with pytest.raises(UserError, match=r"ssl.queue_size=100 must be a positive multiple of data.batch_size=32"):
        check_ssl_config(apply_overrides_dict(cfg, queue_size=100), 32)
    with pytest.raises(UserError, match="ssl.method must be one of simclr, moco"):
        check_ssl_config(apply_overrides_dict(cfg, method="byol"), 32)
    with pytest.raises(UserError, match="ssl.temperature"):
        check_ssl_config(apply_overrides_dict(cfg, temperature=0.0), 32)


def apply_overrides_dict(cfg, **fields):
    cfg = cfg.copy_and_resolve_references()
    cfg.update(fields)
    return cfg


def test_cli_pretrain_then_fine_tune_and_refusals(tmp_path, capsys):
    run = tmp_path / "pretrain"
    assert main(["pretrain", "--config", "pretrain:tiny", "--workdir", str(run), "--no-progress"]) == 0
    assert (run / "encoder" / "model.json").is_file()
    import matplotlib.pyplot as plt
    assert plt.imread(run / "training_curves.png").shape[1] == 4 * 450  # loss + the 3 collapse monitors
    assert "--config.train.init_encoder=" in capsys.readouterr().out

    # Another ssl config in the same workdir, or a supervised run there: refused, nothing touched.
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["pretrain", "--config", "pretrain:tiny,simclr", "--workdir", str(run), "--no-progress"]) == 2
    assert "different `ssl` config" in capsys.readouterr().err
    assert main(["train", "--config", "pretrain:tiny", "--workdir", str(run), "--no-progress"]) == 2
    assert "run it with `jaxem pretrain`" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    capsys.readouterr()

    # An encoder of other widths does not fit: one sentence naming the field and the parameter.
    code = main(["demo", "--config", "demo:tiny", "--workdir", str(tmp_path / "ft"), "--no-progress",
                 f"--config.train.init_encoder={run}", "--config.model.widths=(8, 16)"])
    err = capsys.readouterr().err
    assert code == 2 and f"train.init_encoder={run}" in err and "has shape" in err
    assert main(["predict", "--run", str(run), "--input", str(run / "data" / "pretrain_raw.zarr"),
                 "--output", str(tmp_path / "p.zarr")]) == 2
    assert "is a self-supervised pretraining run" in capsys.readouterr().err
    assert main(["pretrain", "--config", "pretrain:tiny,byol", "--workdir", str(tmp_path / "x")]) == 2
    assert "get_config('tiny,byol')" in capsys.readouterr().err
    finetune = ["demo", "--config", "demo:tiny", "--workdir", str(tmp_path / "ft2"), "--no-progress",
                f"--config.train.init_encoder={run}"]
    assert main(finetune) == 0
    # Resuming (here: a finished run) takes the run's own checkpoint: the encoder may be gone by then.
    shutil.rmtree(run / "encoder")
    assert main([*finetune, "--config.train.steps=8"]) == 0


@pytest.mark.parametrize("name,fields", [
    ("unet_3d", {}),
    ("unet_resnet_encoder", {"model.encoder": "resnet", "model.resnet_blocks": "(1, 1)"}),
    ("vit", None),
])
def test_every_encoder_kind_pretrains(name, fields, tmp_path):
    """One MoCo step for a 3D anisotropic U-Net encoder, a U-Net's ResNet encoder and a ViT: finite
    loss, and the exported encoder is the model's 'encoder' subtree."""
    config = _tiny_run_config(tmp_path, "moco,3d" if name == "unet_3d" else "moco", **(fields or {}))
    if name == "vit":
        config.model = models.default_config("vit", 2)
        config.model.update(dict(hidden=16, depth=2, heads=2, patch_size=(8, 8)))
    config.train.steps = 1
    summary = pretrain(config, tmp_path / "run", progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["final_step"] == 1 and np.isfinite(logs[-1]["loss"])
    exported = load_encoder(tmp_path / "run")
    x = jnp.zeros((1,) + tuple(config.data.crop_shape) + (1,))
    expected = jax.eval_shape(lambda: models.build(config.model).init(jax.random.key(0), x))["params"]["encoder"]
    assert jax.tree.map(jnp.shape, exported["params"]) == jax.tree.map(lambda s: s.shape, expected)


# --- DenseCL ------------------------------------------------------------------------------------

def test_dense_infonce_equals_the_definition_and_only_queries_get_gradients():
    """Hand-made dense maps: query location i of example b against the key at match[b, i] and the
    queue, over all B * prod(Sq) locations (maps of different spatial shapes)."""
    from jaxem.train.losses import dense_infonce

    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(2, 2, 3, 5)), rng.normal(size=(2, 3, 2, 5))
    queue, match, t = _unit(rng.normal(size=(7, 5))), rng.integers(0, 6, size=(2, 6)), 0.3
    qf, kf = q.reshape(2, 6, 5), k.reshape(2, 6, 5)
    expected, hits = [], []
    for b in range(2):
        for i in range(6):
            qi, ki = _unit(qf[b, i]), _unit(kf[b, match[b, i]])
            logits = np.concatenate([[qi @ ki], queue @ qi]) / t
            expected.append(-logits[0] + np.log(np.sum(np.exp(logits))))
            hits.append(np.argmax(logits) == 0)
    f = lambda q, k, queue: dense_infonce(q, k, jnp.asarray(match), queue, t)  # noqa: E731
    args = tuple(jnp.asarray(a, jnp.float32) for a in (q, k, queue))
    loss, accuracy = f(*args)
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
    assert float(accuracy) == pytest.approx(np.mean(hits))
    grads = jax.grad(lambda *a: f(*a)[0], argnums=(0, 1, 2))(*args)
    assert float(jnp.abs(grads[0]).max()) > 0
    assert float(jnp.abs(grads[1]).max()) == 0 and float(jnp.abs(grads[2]).max()) == 0
    zero_query = args[0].at[0, 0, 0].set(0.0)  # an all-zero vector (ReLU'd features at init): no NaN
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda q: f(q, *args[1:])[0])(zero_query))))


def test_matching_picks_the_key_location_of_highest_cosine():
    """Keys are the query vectors at permuted locations, rescaled (cosine, not dot product, decides)
    and slightly perturbed: matching recovers the permutation; random maps match numpy's argmax."""
    from jaxem.train.losses import match_locations

    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 3, 4, 16))
    perm = np.stack([rng.permutation(12) for _ in range(2)])  # key location j holds query perm[b, j]
    scales = rng.uniform(0.01, 100.0, size=(2, 12, 1))
    k = np.take_along_axis(q.reshape(2, 12, 16), perm[..., None], axis=1) * scales
    k = k + 1e-3 * rng.normal(size=k.shape)
    match = np.asarray(match_locations(jnp.asarray(q, jnp.float32), jnp.asarray(k.reshape(2, 4, 3, 16), jnp.float32)))
    np.testing.assert_array_equal(np.take_along_axis(perm, match, axis=1), np.tile(np.arange(12), (2, 1)))
    a, b = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 2, 3, 8))
    sims = np.einsum("bic,bjc->bij", _unit(a), _unit(b.reshape(3, 6, 8)))
    np.testing.assert_array_equal(np.asarray(match_locations(jnp.asarray(a), jnp.asarray(b))), sims.argmax(-1))


def test_densecl_step_trains_the_dense_head_and_encoder_alike_on_1_and_4_devices(tmp_path):
    """One step with dense_weight = 1 (only the dense loss drives the update): the dense head and the
    encoder move, the global projector does not, both queues take the global batch of keys; and
    the same global batch on 1 and on 4 devices gives the same losses, update and queues (matching
    is per example; the queues take every device's keys)."""
    config = _tiny_run_config(tmp_path, "densecl", **{
        "ssl.projection_batch_norm": False, "ssl.dense_weight": 1.0, "optimizer.warmup_steps": 0,
        "optimizer.name": "sgd", "augment.enabled": False})  # views: random resized crops; compiles faster
    batch = {"image": jax.random.normal(jax.random.key(3), (8, 32, 32, 1))}
    results = []
    for n in (1, 4):
        mesh = parallel.make_mesh(n)
        state, step = build_pretraining(config, mesh)
        new, metrics = step(jax.tree.map(jnp.copy, state), jax.device_put(batch, parallel.data_sharding(mesh)))
        results.append(jax.device_get((metrics, new.params, new.queue, new.dense_queue, new.queue_ptr)))
    (m1, *s1), (m4, *s4) = results
    for key in ("loss", "loss_dense", "dense_accuracy"):
        np.testing.assert_allclose(m1[key], m4[key], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    np.testing.assert_allclose(m1["loss"], m1["loss_dense"], rtol=1e-6)
    old = jax.device_get(state)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old.params, s1[0])
    assert all(jax.tree.leaves(changed["dense_projector"])) and any(jax.tree.leaves(changed["encoder"]))
    assert not any(jax.tree.leaves(changed["projector"]))
    for before, after in ((old.queue, s1[1]), (old.dense_queue, s1[2])):
        assert not np.allclose(after[:8], before[:8])
        np.testing.assert_array_equal(after[8:], before[8:])
        np.testing.assert_allclose(np.linalg.norm(after[:8], axis=-1), 1.0, rtol=1e-5)
    assert int(s1[3]) == 8


def test_densecl_resumes_exactly_and_its_encoder_fits_the_unet(tmp_path):
    """An interrupted DenseCL run ends with the same encoder and queues as an uninterrupted one; the
    exported encoder goes into the demo U-Net (what --config.train.init_encoder does)."""
    from jaxem.train.checkpoint import restore_on_this_host

    config = _tiny_run_config(tmp_path, "densecl", **{"train.steps": 2, "train.checkpoint_every": 1,
                                                       "train.num_devices": 1, "augment.enabled": False})
    run = tmp_path / "run"

    def last_state():
        tree = restore_on_this_host(run / "checkpoints" / "2" / "state")
        return jax.device_get((tree["queue"], tree["dense_queue"], tree["queue_ptr"])), load_encoder(run)

    pretrain(config, run, progress=False)
    whole = last_state()
    shutil.rmtree(run / "checkpoints" / "2")
    shutil.rmtree(run / "encoder")
    assert pretrain(config, run, progress=False)["start_step"] == 1
    for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(last_state())):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert int(whole[0][2]) == 2 * config.data.batch_size
    seg_model = models.build(load_config("demo:tiny").model)
    seg = seg_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    moved = models.transfer_encoder_params(seg, whole[1])
    for x, y in zip(jax.tree.leaves(moved["params"]["encoder"]), jax.tree.leaves(whole[1]["params"])):
        np.testing.assert_array_equal(x, y)


def test_bad_densecl_settings_are_named():
    cfg = apply_overrides_dict(default_ssl_config(), method="densecl")
    with pytest.raises(UserError, match=r"ssl.dense_weight must be in \[0, 1\]"):
        check_ssl_config(apply_overrides_dict(cfg, dense_weight=1.5), 32)
    with pytest.raises(UserError, match="ssl.queue_size=100 must be a positive multiple"):
        check_ssl_config(apply_overrides_dict(cfg, queue_size=100), 32)
    with pytest.raises(UserError, match="ssl.momentum"):
        check_ssl_config(apply_overrides_dict(cfg, momentum=1.0), 32)
    with pytest.raises(UserError, match="conflicting"):
        load_config("pretrain:moco,densecl")
