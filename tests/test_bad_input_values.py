"""Bad values in good files (issue #23, items 8 and 9): NaN/Inf in predictions, complex volumes,
float or negative labels, non-positive sizes, corrupt metadata; truncated checkpoints and the best one.

Each CLI case exits 2 with one stderr line naming the culprit, no traceback, and leaves every file
that was there before unchanged.
"""

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxem.cli import main
from jaxem.commands.demo import with_data_paths, write_synthetic_data
from jaxem.config import apply_overrides, load_config
from jaxem.train.checkpoint import Checkpointer, inference_steps, restore_for_inference, restore_on_this_host
from jaxem.train.loop import train

# ---------------------------------------------------------------- checkpoints of a real tiny run

RUN_STEPS = 4


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
    return write_synthetic_data(load_config("demo:tiny"), tmp_path_factory.mktemp("data"))


def tiny(data_paths, *overrides):
    return with_data_paths(apply_overrides(load_config("demo:tiny"), list(overrides)), data_paths)


@pytest.fixture(scope="module")
def trained(data_paths, tmp_path_factory):
    """A demo:tiny run with a checkpoint and validation at every step, all kept, ranked by the
    highest validation loss (mode max: the early steps, so the best is not the latest)."""
    run = tmp_path_factory.mktemp("run")
    config = tiny(data_paths, f"--config.train.steps={RUN_STEPS}", "--config.train.eval_every=1",
                  "--config.train.checkpoint_every=1", "--config.train.log_every=1",
                  f"--config.train.keep_checkpoints={RUN_STEPS}", "--config.train.best_metric=val_loss",
                  "--config.train.best_mode=max", "--config.train.async_checkpoints=false")
    train(config, run, progress=False)
    return run, config


def copy_run(run: Path, tmp_path: Path, best_metric: str | None = None) -> Path:
    """A copy of `run` in tmp_path (with its saved train.best_metric replaced when given)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    if best_metric is not None:
        saved = json.loads((copy / "config.json").read_text())
        saved["train"]["best_metric"] = best_metric
        (copy / "config.json").write_text(json.dumps(saved))
    return copy


def truncate(step_dir: Path) -> None:
    """Cuts every file of a checkpoint's saved state to half its length (a save torn by a crash)."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def assert_same_params(variables: dict, step_dir: Path) -> None:
    saved = restore_on_this_host(step_dir / "state")
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_validation_metrics_are_saved_and_pick_the_best_checkpoint(trained):
    run, _ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_loss = {r["step"]: r["loss"] for r in rows if r["split"] == "val"}
    ckpt = Checkpointer(run, best_metric="val_loss", best_mode="max", async_save=False)
    for step in ckpt.steps():
        assert ckpt.manager.metrics(step)["val_loss"] == pytest.approx(val_loss[step])
    best = max(val_loss, key=val_loss.get)
    assert best != RUN_STEPS and ckpt.best_step() == best and inference_steps(ckpt)[0] == best
    _, _, variables = restore_for_inference(run)
    assert_same_params(variables, run / "checkpoints" / str(best))


def test_without_best_metric_the_latest_checkpoint_is_used(trained, tmp_path):
    run = copy_run(trained[0], tmp_path, best_metric="")
    _, _, variables = restore_for_inference(run)
    assert_same_params(variables, run / "checkpoints" / str(RUN_STEPS))


def test_predict_falls_back_from_a_truncated_latest_checkpoint(trained, data_paths, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path, best_metric="")
    truncate(run / "checkpoints" / str(RUN_STEPS))
    out = tmp_path / "pred.zarr"
    assert main(["predict", "--run", str(run), "--input", data_paths["test"][0], "--output", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / str(RUN_STEPS)} could not be read" in err
    assert f"using checkpoint {RUN_STEPS - 1} instead" in err and "Traceback" not in err
    assert (out / ".zattrs").exists()


def test_an_unreadable_explicit_checkpoint_is_refused(trained, data_paths, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path)
    step_dir = run / "checkpoints" / "1"
    truncate(step_dir)
    assert main(["predict", "--checkpoint", str(step_dir), "--input", data_paths["test"][0],
                 "--output", str(tmp_path / "o")]) == 2
    assert main_error(capsys, f"checkpoint {step_dir} cannot be read")


def test_resumed_training_rewrites_a_truncated_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path)
    truncate(run / "checkpoints" / str(RUN_STEPS))
    config = apply_overrides(trained[1], [f"--config.train.steps={RUN_STEPS + 1}"])
    summary = train(config, run, progress=False)
    assert summary["start_step"] == RUN_STEPS - 1 and summary["final_step"] == RUN_STEPS + 1
    assert "could not be read" in capsys.readouterr().err
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert RUN_STEPS in steps and RUN_STEPS + 1 in steps
    for step in steps:  # every checkpoint left on disk reads
        restore_on_this_host(run / "checkpoints" / str(step) / "state")


# ---------------------------------------------------------------- helpers of the CLI cases


def main_error(capsys, expected: str) -> bool:
    """Whether the last command printed exactly one stderr line, holding `expected`, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return True


def checksums(root: Path) -> dict:
    """{relative path: sha256} of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
