"""Bad values in good files (issue #23, items 8 and 9): NaN/Inf in predictions, complex volumes,
float or negative labels, non-positive sizes, corrupt metadata; truncated checkpoints and the best one.

Each CLI case exits 2 with one stderr line naming the culprit, no traceback, and leaves every file
that was there before unchanged.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import checksums, cli_argv, one_error_line, write_zarr
from jaxem.cli import main
from jaxem.commands.demo import with_data_paths, write_synthetic_data
from jaxem.config import apply_overrides, load_config
from jaxem.data.volume import open_volume
from jaxem.train.checkpoint import (
    Checkpointer,
    inference_steps,
    restore_for_inference,
    restore_on_this_host,
)
from jaxem.train.trainer import train

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


def truncate(step_dir: Path, part: str = "") -> None:
    """Cuts every file of a checkpoint (or of its `part`, e.g. "state") to half its length: a save
    torn by a crash."""
    for f in (step_dir / part).rglob("*"):
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


@pytest.mark.parametrize("best_metric", ["", "val_loss"])
def test_predict_falls_back_from_an_unreadable_checkpoint(trained, data_paths, tmp_path, capsys, best_metric):
    """Without best_metric the newest checkpoint is torn (all its files): predict uses the one
    before. With it, the best checkpoint's state is torn: predict uses the newest instead."""
    run = copy_run(trained[0], tmp_path, best_metric=best_metric)
    ckpt = Checkpointer(run, best_metric="val_loss", best_mode="max", read_only=True)
    torn, fallback = (ckpt.best_step(), RUN_STEPS) if best_metric else (RUN_STEPS, RUN_STEPS - 1)
    truncate(run / "checkpoints" / str(torn), "state" if best_metric else "")
    out = tmp_path / "pred.zarr"
    assert main(["predict", "--run", str(run), "--input", data_paths["test"][0], "--output", str(out),
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / str(torn)} could not be read" in err
    assert f"using checkpoint {fallback} instead" in err and "Traceback" not in err
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


# ---------------------------------------------------------------- the CLI cases

# (id, command line with {placeholders} of `world`, words the one stderr line must hold)
TRAIN = ("train --config demo:tiny --workdir {w}/work --config.data.val_images=() --config.data.val_labels=() "
         "--config.data.train_images=\"('{raw}',)\" ")
CASES = [
    ("segment-nan", "segment --input {nanpred} --output {w}/seg.zarr", "{nanpred} holds 4 NaN or infinite voxels"),
    ("tune-nan", "tune --input {nanpred} --labels {labels} --output {w}/tuned.json", "{nanpred} holds 4 NaN or infinite"),
    ("evaluate-nan", "evaluate --pred {nanpred} --gt {labels} --task semantic --out {w}/ev",
     "{nanpred} holds 4 NaN or infinite voxels"),
    ("evaluate-block-voxels-0", "evaluate --pred {pred} --gt {labels} --task semantic --out {w}/ev --block-voxels 0",
     "--block-voxels 0 must be at least 1"),
    ("train-steps-negative", TRAIN + "--config.data.train_labels=\"('{labels}',)\" --config.train.steps=-5",
     "train.steps=-5 must be at least 1"),
    ("train-float-labels", TRAIN + "--config.data.train_labels=\"('{floatlabels}',)\"",
     "{floatlabels} holds 1 float64 label values that are not whole numbers"),
    ("train-negative-labels", TRAIN + "--config.data.train_labels=\"('{neglabels}',)\"",
     "{neglabels} holds negative label ids (down to -3)"),
    ("predict-reduce-unknown", "predict --run {run} --input {raw} --output {w}/p.zarr --reduce max",
     "--reduce 'max' is not one of mean, median, majority"),
    ("predict-reduce-one-model", "predict --run {run} --input {raw} --output {w}/p.zarr --reduce median",
     "one model was given"),
    ("predict-complex", "predict --run {run} --input {complex} --output {w}/p.zarr",
     "{complex} holds complex numbers (complex64)"),
    ("segment-complex", "segment --input {complex} --output {w}/seg.zarr", "{complex} holds complex numbers (complex64)"),
    ("pyramid-min-size-0", "data pyramid {ome} --min-size 0", "--min-size 0 must be at least 1"),
    ("pyramid-levels-negative", "data pyramid {ome} --levels -1", "--levels -1 must be at least 1"),
    ("segment-5d", "segment --input {five} --output {w}/seg.zarr", "--input {five} has axes (t, c, z, y, x)"),
    ("info-truncated-zarray", "data info {badjson}", "{badjson}/.zarray is not valid JSON"),
    ("segment-truncated-zarray", "segment --input {badjson} --output {w}/seg.zarr", "{badjson}/.zarray is not valid JSON"),
]


def _complex_zarr(path, array):
    """A zarr v2 array of complex numbers (create_volume's fill value 0 does not fit complex dtypes)."""
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(array.shape), "chunks": list(array.shape), "dtype": array.dtype.str,
                         "fill_value": None, "compressor": None}}
    ts.open(spec, create=True).result().write(array).result()


@pytest.fixture(scope="module")
def world(trained, data_paths, tmp_path_factory):
    """The trained run and small volumes, good and bad: {name: path} for CASES' placeholders."""
    w = tmp_path_factory.mktemp("world")
    raw, labels = data_paths["test"]
    p = {"w": w, "run": trained[0], "raw": raw, "labels": labels}
    for name in ("pred", "nanpred", "complex", "five", "ome", "badjson", "floatlabels", "neglabels", "nanraw"):
        p[name] = w / f"{name}.zarr"
    prob = np.zeros((2, 64, 64), np.float32)
    prob[:, ::8], prob[:, :, ::8] = 1.0, 1.0
    write_zarr(p["pred"], prob)
    bad = prob.copy()
    bad[0, 1, 1:4], bad[1, 5, 5] = np.nan, np.inf
    write_zarr(p["nanpred"], bad)
    _complex_zarr(p["complex"], prob.astype(np.complex64))
    write_zarr(p["five"], prob[None, None], axes=("t", "c", "z", "y", "x"))
    write_zarr(p["ome"], prob, format="ome-zarr")
    shutil.copytree(raw, p["badjson"])
    zarray = p["badjson"] / ".zarray"
    zarray.write_text(zarray.read_text()[:40])
    ids = np.asarray(open_volume(labels).read())
    floats = ids.astype(np.float64)
    floats[1, 2, 3] = 2.5
    write_zarr(p["floatlabels"], floats)
    negative = ids.astype(np.int32)
    negative[0, 0, 0] = -3
    write_zarr(p["neglabels"], negative)
    image = np.asarray(open_volume(raw).read(), np.float32)
    image[0, 10, 10:15] = np.nan
    write_zarr(p["nanraw"], image)
    return {k: str(v) for k, v in p.items()}


def main_error(capsys, expected: str) -> bool:
    """Whether the last command's one stderr line holds `expected`."""
    line = one_error_line(capsys)
    assert expected in line, line
    return True


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_sentence_exit_2_and_nothing_changes(case, world, capsys):
    _, line, expected = case
    before = checksums(world["w"]), checksums(world["run"])
    capsys.readouterr()
    assert main(cli_argv(line, world)) == 2
    assert main_error(capsys, expected.format(**world))
    assert (checksums(world["w"]), checksums(world["run"])) == before


def test_nan_in_training_images_names_the_file(world, capsys):
    before = checksums(world["w"])
    line = (TRAIN.replace("{raw}", "{nanraw}") + "--config.data.train_labels=\"('{labels}',)\" "
            "--config.train.log_every=1 --config.train.steps=2 --config.train.eval_every=0")
    line = line.replace("{w}/work", "{w}/nanwork")
    assert main(cli_argv(line, world)) == 2
    assert main_error(capsys, "{nanraw} holds 5 NaN or infinite voxels".format(**world))
    after = checksums(world["w"])
    assert {k: v for k, v in after.items() if not k.startswith("nanwork/")} == before


def test_allow_nan_reads_nan_as_probability_0(world, tmp_path, capsys):
    clean, nan = (["--input", world[k]] for k in ("pred", "nanpred"))
    for name, inp in (("clean", clean), ("nan", nan)):
        extra = ["--allow-nan"] if name == "nan" else []
        assert main(["segment", *inp, "--output", str(tmp_path / f"{name}.zarr"), "--method", "cc", "--no-progress",
                     *extra]) == 0
    assert "4 NaN or infinite voxels; --allow-nan reads NaN as probability 0" in capsys.readouterr().err
    segments = [np.asarray(open_volume(tmp_path / f"{n}.zarr").read()) for n in ("clean", "nan")]
    assert (segments[0] > 0).sum() - 3 <= (segments[1] > 0).sum() <= (segments[0] > 0).sum() + 3
    assert main(["evaluate", "--pred", world["nanpred"], "--gt", world["labels"], "--task", "semantic",
                 "--out", str(tmp_path / "ev"), "--allow-nan"]) == 0
    assert (tmp_path / "ev" / "report.json").exists()
    assert main(["tune", "--input", world["nanpred"], "--labels", world["labels"], "--output", str(tmp_path / "t.json"),
                 "--methods", "cc", "--allow-nan", "--no-progress"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["best"]["method"] == "cc"
    assert main(["segment", *nan, "--output", str(tmp_path / "agg.zarr"), "--method", "agglomerate", "--allow-nan",
                 "--no-progress"]) == 2
    assert "--allow-nan does not apply to --method agglomerate" in capsys.readouterr().err


def test_whole_valued_float_labels_are_accepted(world):
    from jaxem.data.pipeline import check_labels, label_problem

    check_labels([world["labels"]])
    whole = Path(world["w"]) / "wholefloat.zarr"
    write_zarr(whole, np.asarray(open_volume(world["labels"]).read(), np.float64))
    try:
        assert label_problem(open_volume(whole)) == ""
        check_labels([str(whole)])
    finally:
        shutil.rmtree(whole)
