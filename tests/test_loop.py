"""The training loop's guards and bookkeeping: NaN stop, SIGTERM save, EMA, best checkpoint, logs."""

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest

from jaxem.commands.demo import with_data_paths, write_synthetic_data
from jaxem.config import apply_overrides, load_config
from jaxem.errors import UserError
from jaxem.train.checkpoint import Checkpointer, restore_for_inference
from jaxem.train.loop import TrainingDiverged
from jaxem.train.trainer import train


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
    return write_synthetic_data(load_config("demo:tiny"), tmp_path_factory.mktemp("data"))


def tiny(data_paths, *overrides):
    return with_data_paths(apply_overrides(load_config("demo:tiny"), list(overrides)), data_paths)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(data_paths, tmp_path):
    cfg = tiny(data_paths, "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=1e12",
               "--config.optimizer.grad_clip=0", "--config.optimizer.warmup_steps=0", "--config.optimizer.schedule=constant",
               "--config.train.steps=40", "--config.train.checkpoint_every=1", "--config.train.log_every=1",
               "--config.train.eval_every=0")
    with pytest.raises(TrainingDiverged, match="became (nan|inf)"):
        train(cfg, tmp_path, progress=False)
    steps = Checkpointer(tmp_path).steps()
    assert steps, "no checkpoint before divergence"
    _, _, variables = restore_for_inference(tmp_path)
    import jax
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


def test_sigterm_saves_a_checkpoint_and_stops(data_paths, tmp_path):
    cfg = tiny(data_paths, "--config.train.steps=400", "--config.train.checkpoint_every=1000",
               "--config.train.eval_every=0", "--config.train.log_every=1")

    def send_sigterm_after_first_log():
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_after_first_log, daemon=True).start()
    summary = train(cfg, tmp_path, progress=False)
    stopped = summary["preempted_at"]
    assert 0 < stopped < 400
    assert Checkpointer(tmp_path).steps() == [stopped]
    resumed = train(apply_overrides(cfg, ["--config.train.steps=" + str(stopped + 2)]), tmp_path, progress=False)
    assert resumed["start_step"] == stopped and resumed["final_step"] == stopped + 2


def test_ema_weights_are_used_for_inference_and_differ_from_raw(data_paths, tmp_path):
    cfg = tiny(data_paths, "--config.train.ema_decay=0.5", "--config.train.eval_every=0")
    train(cfg, tmp_path, progress=False)
    _, _, ema_vars = restore_for_inference(tmp_path)
    ckpt = Checkpointer(tmp_path, async_save=False)
    import orbax.checkpoint as ocp
    raw = ckpt.manager.restore(ckpt.steps()[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    import jax
    ema_leaves, raw_leaves, param_leaves = (jax.tree.leaves(t) for t in (ema_vars["params"], raw["ema_params"], raw["params"]))
    for a, b in zip(ema_leaves, raw_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(raw_leaves, param_leaves))


def test_best_checkpoint_is_kept_beyond_the_last_n(data_paths, tmp_path):
    cfg = tiny(data_paths, "--config.train.steps=8", "--config.train.eval_every=1", "--config.train.checkpoint_every=1",
               "--config.train.keep_checkpoints=2", "--config.train.best_metric=val_dice", "--config.train.best_mode=max",
               "--config.train.async_checkpoints=false")
    train(cfg, tmp_path, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["dice"] for r in rows if r["split"] == "val"}
    best = max(val, key=lambda s: (val[s], s))
    kept = Checkpointer(tmp_path).steps()
    assert {7, 8} <= set(kept) and best in kept and len(kept) <= 3
    for name in ("config.json", "versions.json", "training_curves.png"):
        assert (tmp_path / name).exists()
    assert any((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "versions.json").read_text())["jax"]


def test_without_best_metric_inference_takes_the_latest_checkpoint(data_paths, tmp_path):
    """best_metric='' (recipes whose validation slices are the scored ones) selects nothing:
    the last N checkpoints are kept and inference loads the newest, whatever the losses were."""
    import jax
    import orbax.checkpoint as ocp

    cfg = tiny(data_paths, "--config.train.steps=4", "--config.train.eval_every=1", "--config.train.checkpoint_every=1",
               "--config.train.keep_checkpoints=2", "--config.train.best_metric=", "--config.train.async_checkpoints=false")
    train(cfg, tmp_path, progress=False)
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.steps() == [3, 4]
    newest = ckpt.manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    _, _, variables = restore_for_inference(tmp_path)
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(newest["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_another_layout_is_refused_and_kept(tmp_path):
    """A readable checkpoint whose arrays differ from the run's state (an array added or reshaped by
    a change of config or jaxem) is refused by name, not deleted as if torn by a crash."""
    import flax.struct
    import jax.numpy as jnp

    @flax.struct.dataclass
    class State:
        step: jnp.ndarray
        params: dict

    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, State(jnp.array(5), {"conv": jnp.ones(3)}), {"epoch": 1}, {"run": "a"})
    ckpt.close()
    same = Checkpointer(tmp_path, async_save=False).restore_latest(State(jnp.array(0), {"conv": jnp.zeros(3)}))
    np.testing.assert_array_equal(np.asarray(same[0].params["conv"]), np.ones(3))
    assert same[1:] == ({"epoch": 1}, {"run": "a"})
    for template, path, saved, expected in [
            (State(jnp.array(0), {"conv": jnp.zeros(4)}), "params/conv", "shape (3,)", "shape (4,)"),
            (State(jnp.array(0), {"conv": jnp.zeros(3), "teacher": jnp.zeros(2)}), "params/teacher", "absent",
             "shape (2,)")]:
        with pytest.raises(UserError, match=f"'{path}' is .*{re.escape(saved)} there and .*{re.escape(expected)} "
                                            "for this run; resume with the config that wrote it"):
            Checkpointer(tmp_path, async_save=False).restore_latest(template)
        assert Checkpointer(tmp_path).steps() == [5]


def test_checkpointer_refuses_a_directory_with_square_brackets(tmp_path):
    """orbax finds checkpoint parts by glob: under 'run[1]' it writes checkpoints it cannot read.
    Every Checkpointer (writer or reader) refuses such a path before touching anything."""
    workdir = tmp_path / "run[1]"
    for read_only in (False, True):
        with pytest.raises(UserError, match=r"square brackets in its path"):
            Checkpointer(workdir, read_only=read_only)
    assert not workdir.exists()
    Checkpointer(tmp_path / "run1").close()
