"""Training: the step learns, gives the same result on 1 and 4 devices, checkpoints and resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cell_batch, device_flags

from jaxem import models
from jaxem.config import apply_overrides, load_config
from jaxem.data import augment, targets
from jaxem.train import parallel
from jaxem.train.checkpoint import Checkpointer, restore_for_inference
from jaxem.train.defaults import base_config
from jaxem.train.state import create_train_state, make_optimizer
from jaxem.train.supervised import make_train_step

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(norm="group"):
    cfg = base_config(ndim=2)
    cfg.model.widths = (4, 8)
    cfg.model.norm = norm
    cfg.model.out_channels = 1
    cfg.optimizer.learning_rate = 1e-2
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.schedule = "constant"
    return cfg


def run_steps(cfg, mesh, batch, steps):
    model = models.build(cfg.model)
    tx = make_optimizer(cfg.optimizer, steps)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    state = jax.jit(lambda r: create_train_state(model, tx, r, (1, 32, 32, 1)), out_shardings=rep)(jax.random.PRNGKey(0))
    cfg.augment = augment.default_augment_config(2)
    step = jax.jit(make_train_step(model, cfg.loss, augment.make_augment_fn(cfg.augment, 2),
                                   targets.make_target_fn(cfg.target, 2), accumulate_steps=cfg.train.accumulate_steps),
                   in_shardings=(rep, data), out_shardings=(rep, rep))
    batch = jax.device_put(batch, data)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_train_step_decreases_loss():
    _, losses = run_steps(tiny_config(), parallel.make_mesh(1), cell_batch(), 25)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_same_result_on_1_and_4_devices(norm):
    assert len(jax.devices()) == 4
    cfg = tiny_config(norm)
    state1, losses1 = run_steps(cfg, parallel.make_mesh(1), cell_batch(), 4)
    state4, losses4 = run_steps(cfg, parallel.make_mesh(4), cell_batch(), 4)
    np.testing.assert_allclose(losses1, losses4, rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)


def test_gradient_accumulation_matches_full_batch():
    cfg = tiny_config()
    cfg.optimizer.name = "sgd"  # Adam's g/|g| would amplify float noise in near-zero gradients
    full, losses_full = run_steps(cfg, parallel.make_mesh(4), cell_batch(), 2)
    cfg.train.accumulate_steps = 2
    micro, losses_micro = run_steps(cfg, parallel.make_mesh(4), cell_batch(), 2)
    np.testing.assert_allclose(losses_full, losses_micro, rtol=1e-3, atol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(micro.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-3, atol=5e-4)


def test_batch_size_must_divide_devices():
    from jaxem.errors import UserError

    with pytest.raises(UserError, match="not divisible by the 4 devices"):
        parallel.check_batch_size(6, parallel.make_mesh(4))
    with pytest.raises(UserError, match="only 4 exist"):
        parallel.make_mesh(8)


def test_checkpoint_round_trip_and_corrupt_fallback(tmp_path):
    cfg = tiny_config()
    mesh = parallel.make_mesh(1)
    state, _ = run_steps(cfg, mesh, cell_batch(), 2)
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    ckpt.save(1, state.replace(step=jnp.asarray(1, jnp.int32)), {"next": 1}, {"m": "a"})
    ckpt.save(2, state, {"next": 2}, {"m": "a"})
    ckpt.wait()
    restored, data_state, _ = ckpt.restore_latest(state)
    assert data_state == {"next": 2} and int(restored.step) == int(state.step)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Corrupt every file of the newest checkpoint's state: the previous one is used instead.
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    restored, data_state, _ = Checkpointer(tmp_path, keep=3, async_save=False).restore_latest(state)
    assert data_state == {"next": 1}


def _demo_cfg_args(workdir):
    return [sys.executable, "-m", "jaxem.cli", "train", "--config", "demo:tiny", "--workdir", str(workdir),
            "--no-progress"]


def _read_final_params(workdir):
    _, _, variables = restore_for_inference(workdir)
    return variables


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_parameters(tmp_path):
    """A run killed with SIGKILL mid-training and restarted ends exactly where an uninterrupted run does."""
    from jaxem.commands.demo import write_synthetic_data

    cfg = load_config("demo:tiny")
    paths = write_synthetic_data(cfg, tmp_path / "data")
    data_args = [f"--config.data.train_images=('{paths['train'][0]}',)", f"--config.data.train_labels=('{paths['train'][1]}',)",
                 f"--config.data.val_images=('{paths['val'][0]}',)", f"--config.data.val_labels=('{paths['val'][1]}',)",
                 "--config.train.steps=12", "--config.train.checkpoint_every=4", "--config.train.eval_every=4",
                 "--config.train.log_every=1", "--config.train.async_checkpoints=false"]
    env = {**os.environ, "XLA_FLAGS": device_flags(2), "JAX_PLATFORMS": "cpu"}
    subprocess.run(_demo_cfg_args(tmp_path / "full") + data_args, check=True, env=env, cwd=ROOT, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_demo_cfg_args(killed) + data_args, env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill between checkpoints: after step 6 is logged (checkpoint at 4)
        text = (killed / "metrics.jsonl").read_text() if (killed / "metrics.jsonl").exists() else ""
        rows = text.split("\n")[:-1]  # complete lines only: the last one may be half-written
        if any(json.loads(r)["step"] >= 6 for r in rows):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 12, steps
    subprocess.run(_demo_cfg_args(killed) + data_args, check=True, env=env, cwd=ROOT, capture_output=True)

    full, resumed = _read_final_params(tmp_path / "full"), _read_final_params(killed)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logged = [json.loads(r)["step"] for r in (killed / "metrics.jsonl").read_text().splitlines()
              if json.loads(r)["split"] == "train"]
    assert logged == sorted(set(logged)), "resumed run logged duplicate steps"


def test_workdir_of_other_experiment_is_refused(tmp_path):
    from jaxem.errors import UserError
    from jaxem.config import save_config
    from jaxem.train.loop import check_workdir
    from jaxem.train.trainer import run_shape

    cfg = load_config("demo:tiny")
    save_config(cfg, tmp_path)
    check_workdir(cfg, tmp_path, run_shape)  # same experiment: fine
    other = apply_overrides(cfg, ["--config.model.widths=(8, 16)"])
    with pytest.raises(UserError, match="different `model` config"):
        check_workdir(other, tmp_path, run_shape)


def test_changed_settings_on_resume_are_recorded_and_refused_where_a_run_is_reused(tmp_path, capsys):
    """More steps continue a run and resumed.jsonl says what changed at which step; a finished run
    asked for with another learning rate trains nothing and keeps the config.json it was trained
    with; with exact=True (the benchmarks' reuse) that request is a UserError naming the field."""
    from jaxem.commands.demo import write_synthetic_data
    from jaxem.config import config_differences, load_saved_config
    from jaxem.errors import UserError
    from jaxem.train.trainer import train

    cfg = load_config("demo:tiny")
    paths = write_synthetic_data(cfg, tmp_path / "data")
    cfg = apply_overrides(cfg, [
        f"--config.data.train_images=('{paths['train'][0]}',)", f"--config.data.train_labels=('{paths['train'][1]}',)",
        "--config.data.val_images=()", "--config.data.val_labels=()", "--config.train.steps=2",
        "--config.train.checkpoint_every=2", "--config.train.eval_every=0", "--config.train.async_checkpoints=false"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    trained_with = (run / "config.json").read_text()
    other_lr = apply_overrides(cfg, ["--config.optimizer.learning_rate=0.5"])
    assert config_differences(load_saved_config(run), other_lr) == {
        "optimizer.learning_rate": (cfg.optimizer.learning_rate, 0.5)}

    with pytest.raises(UserError, match=r"other settings \(optimizer.learning_rate .* -> 0.5\)"):
        train(other_lr, run, progress=False, exact=True)
    train(cfg, run, progress=False, exact=True)  # the same settings: reused
    assert train(other_lr, run, progress=False)["start_step"] == 2  # finished: nothing trained...
    assert (run / "config.json").read_text() == trained_with and not (run / "resumed.jsonl").exists()  # ...or rewritten

    capsys.readouterr()
    longer = apply_overrides(cfg, ["--config.train.steps=4"])
    with pytest.raises(UserError, match="train.steps 2 -> 4"):
        train(longer, run, progress=False, exact=True)
    train(longer, run, progress=False)
    assert "continuing at step 2 with changed settings: train.steps 2 -> 4" in capsys.readouterr().out
    assert [json.loads(line) for line in (run / "resumed.jsonl").read_text().splitlines()] == [
        {"step": 2, "changed": {"train.steps": [2, 4]}}]
    assert load_saved_config(run).train.steps == 4
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
    # a field jaxem gained after the run was trained (absent from its config.json) is not held against it
    saved = json.loads((run / "config.json").read_text())
    del saved["train"]["llrd"]
    (run / "config.json").write_text(json.dumps(saved))
    assert train(longer, run, progress=False, exact=True)["start_step"] == 4
