"""`jaxem predict` + `jaxem segment` end to end from a real (tiny) trained run; SIGKILL resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import train_tiny_demo

from jaxem.cli import main
from jaxem.data.volume import create_volume, open_volume, read_attributes
from jaxem.infer.output import DoneLog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A demo:tiny run (6 steps, checkpoints at 3 and 6) and its synthetic test volume."""
    return train_tiny_demo(tmp_path_factory.mktemp("run"))


def predict(*args) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_predict_then_segment_from_run(run_dir, tmp_path, capsys):
    raw = run_dir / "data" / "test_raw.zarr"  # (2, 64, 64) uint8, voxel (40, 4, 4) nm
    out = tmp_path / "pred.zarr"
    assert predict("--run", run_dir, "--input", raw, "--output", out) == 0
    stats = last_json(capsys)
    assert stats["chunks"] == 1 and stats["recompute_factor"] == 1.0 and not stats["resumed"]
    pred = open_volume(out)  # the group itself opens: OME-Zarr, level 0
    assert pred.format == "ome-zarr" and (out / "0" / ".zarray").is_file()
    assert pred.axes == ("c", "z", "y", "x") and pred.shape == (1, 2, 64, 64) and pred.dtype == np.float32
    assert pred.voxel_size == (40.0, 4.0, 4.0)
    p = pred.read()
    assert 0.0 <= p.min() < p.max() <= 1.0 and p.std() > 1e-3
    assert read_attributes(out)["jaxem_target"] == {"kind": "boundary", "channels": 1}

    assert predict("--run", run_dir, "--input", raw, "--output", out) == 0  # same job: resumes, nothing to do
    assert last_json(capsys)["chunks"] == 0
    np.testing.assert_array_equal(open_volume(out).read(), p)
    assert predict("--run", run_dir, "--input", raw, "--output", out, "--tta") == 2  # different job
    assert "different job" in capsys.readouterr().err

    seg = tmp_path / "seg.zarr"
    assert main(["segment", "--input", str(out), "--output", str(seg), "--method", "watershed", "--per-slice"]) == 0
    labels = open_volume(seg)
    assert labels.format == "ome-zarr" and "image-label" in read_attributes(seg)
    assert labels.shape == (2, 64, 64) and labels.dtype == np.uint64 and labels.voxel_size == (40.0, 4.0, 4.0)
    assert labels.read().max() > 1


def test_predict_checkpoint_tta_uint8_roi(run_dir, tmp_path, capsys):
    raw = run_dir / "data" / "test_raw.zarr"
    out = tmp_path / "roi.zarr"
    step3 = run_dir / "checkpoints" / "3"
    assert predict("--checkpoint", step3, "--input", raw, "--output", out, "--tta", "--dtype", "uint8", "--roi", "1:2,8:56,16:64") == 0
    pred = open_volume(out)
    assert pred.shape == (1, 1, 48, 48) and pred.dtype == np.uint8
    assert read_attributes(out)["offset"] == [1, 8, 16]
    transforms = read_attributes(out)["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert {"type": "translation", "translation": [0.0, 40.0, 32.0, 64.0]} in transforms
    assert read_attributes(out)["jaxem_job"]["checkpoints"] == [str(step3)]
    # the same job in float32: uint8 is exactly rint(255 p); TTA and the checkpoint step matter
    roi = ("--input", raw, "--roi", "1:2,8:56,16:64")
    for name, extra in (("f32", ("--checkpoint", step3, "--tta")), ("plain", ("--checkpoint", step3)), ("run", ("--run", run_dir, "--tta"))):
        assert predict(*extra, *roi, "--output", tmp_path / name) == 0
    p = open_volume(tmp_path / "f32").read()
    np.testing.assert_array_equal(pred.read(), np.rint(p * 255).astype(np.uint8))
    assert not np.allclose(p, open_volume(tmp_path / "plain").read(), atol=1e-3)
    assert not np.allclose(p, open_volume(tmp_path / "run").read(), atol=1e-3)


def test_score_run_tuned_on_another_labelled_volume(run_dir, tmp_path):
    """score_run(tune_on=...) predicts the tuning volume the same way (here with TTA), picks each
    row's best setting there and scores the held-out volume with it: the tuned rows are exactly the
    scores of that setting, and the tuning table's best is its argmax."""
    from jaxem.protocols.common import UINT8_RANGE, otsu_dark, prediction_channel
    from jaxem.protocols.isbi2012 import score_run, score_slices
    from jaxem.segment.calibration import map_quantiles, match_quantiles
    from jaxem.segment.setting import SegmentSetting, segment_volume

    data = run_dir / "data"
    test = (str(data / "test_raw.zarr"), str(data / "test_instances.zarr"))
    results = score_run(run_dir, *test, out_dir=tmp_path, progress=False, tta=True,
                        tune_on=(str(data / "val_raw.zarr"), str(data / "val_instances.zarr")))
    assert set(results) == {"model", "model_tuned", "model_tuned_matched", "threshold_baseline",
                            "threshold_baseline_tuned", "tuned_settings"}
    sweeps = json.loads((tmp_path / "tuning.json").read_text())
    for row in ("model", "threshold_baseline"):
        table = sweeps[row]["table"]
        assert results["tuned_settings"][row] == table[int(np.argmax([r["scores"]["vrand"] for r in table]))]["setting"]
    assert read_attributes(tmp_path / "predictions.zarr")["jaxem_job"]["tta"]
    assert read_attributes(tmp_path / "tune_predictions.zarr")["jaxem_job"]["tta"]
    raw, gt = open_volume(test[0]).read(), open_volume(test[1]).read()
    for row, boundary in (("model", prediction_channel(tmp_path / "predictions.zarr")), ("threshold_baseline", otsu_dark(raw, UINT8_RANGE))):
        setting = SegmentSetting.from_dict(results["tuned_settings"][row])
        labels = segment_volume(boundary, setting, per_slice=True, voxel_size=(40.0, 4.0, 4.0))
        assert score_slices(labels, boundary, gt) == pytest.approx(results[f"{row}_tuned"])
    # matched: the model's tuned setting on its held-out map matched to its tuning map's quantiles
    boundary = prediction_channel(tmp_path / "predictions.zarr")
    tuned_quantiles = np.asarray(sweeps["model"]["quantiles"])
    np.testing.assert_allclose(tuned_quantiles, map_quantiles(prediction_channel(tmp_path / "tune_predictions.zarr")))
    matched = match_quantiles(boundary, map_quantiles(boundary), tuned_quantiles)
    labels = segment_volume(matched, SegmentSetting.from_dict(results["tuned_settings"]["model"]), per_slice=True,
                            voxel_size=(40.0, 4.0, 4.0))
    assert score_slices(labels, matched, gt) == pytest.approx(results["model_tuned_matched"])
    assert (tmp_path / "tuning.png").stat().st_size > 0


def test_score_run_sweeps_the_threshold_baseline_once_per_tuning_volume(run_dir, tmp_path, monkeypatch):
    """The baseline's map depends on the EM alone: scoring a second run (here the same one again)
    on the same tuning volume reuses its sweep, identical to the first; another volume is swept."""
    from jaxem.protocols import isbi2012
    from jaxem.segment.tune import tune

    sweeps = []
    monkeypatch.setattr(isbi2012, "_BASELINE_SWEEPS", {})
    monkeypatch.setattr(isbi2012, "tune", lambda *a, **k: sweeps.append(a[0]) or tune(*a, **k))
    data = run_dir / "data"
    test, val = ((str(data / f"{s}_raw.zarr"), str(data / f"{s}_instances.zarr")) for s in ("test", "val"))
    first, again = (isbi2012.score_run(run_dir, *test, out_dir=tmp_path / d, progress=False, tune_on=val) for d in "ab")
    assert len(sweeps) == 3  # the model's twice, the baseline's once
    tables = [json.loads((tmp_path / d / "tuning.json").read_text())["threshold_baseline"] for d in "ab"]
    assert tables[0] == tables[1] and first == again
    isbi2012.score_run(run_dir, *val, out_dir=tmp_path / "c", progress=False, tune_on=test)
    assert len(sweeps) == 5


def test_checkpoint_not_matching_config_exits_2(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad_run"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("data", "tensorboard"))
    config = json.loads((bad / "config.json").read_text())
    config["model"]["widths"] = [4, 16]
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o.zarr"
    assert predict("--run", bad, "--input", run_dir / "data" / "test_raw.zarr", "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match its config" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sigkill_then_rerun_equals_uninterrupted(run_dir, tmp_path, capsys):
    raw = open_volume(run_dir / "data" / "test_raw.zarr").read()
    big = np.tile(raw, (4, 12, 12))  # (8, 768, 768): 144 chunks of (8, 64, 64), ~10 s on 2 cores
    create_volume(tmp_path / "in.zarr", big.shape, big.dtype, (40.0, 4.0, 4.0)).write(big)
    # blocks of 2x2 chunks (4 MiB windows), so the run is killed between blocks
    args = ["--run", run_dir, "--input", tmp_path / "in.zarr", "--config.predict.block_gib=0.004"]
    assert predict(*args, "--output", tmp_path / "whole.zarr") == 0
    total = last_json(capsys)["chunks"]

    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "jaxem.cli", "predict", *map(str, args), "--output", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # counted through DoneLog, not os.listdir: a marker half-written at the kill is a temp file
    done_log = DoneLog(str(out))
    deadline = time.monotonic() + 120
    while len(done_log.done()) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(done_log.done())
    assert proc.returncode == -signal.SIGKILL and 3 <= killed_at < total, (proc.returncode, killed_at, total)

    assert predict(*args, "--output", out) == 0
    stats = last_json(capsys)
    assert stats["resumed"] and stats["chunks"] == total - killed_at
    np.testing.assert_array_equal(open_volume(out).read(), open_volume(tmp_path / "whole.zarr").read())


def test_deep_supervision_run_predicts_its_whole_slice_forward(tmp_path, capsys):
    """A run trained with deep supervision (the U-Net returns (logits, {"deep_supervision": [...]}))
    predicts with `jaxem predict`: with one tile per slice (block = the slice, halo 0) the output
    equals the model's own forward on each normalised slice, and a rerun gives the same bytes."""
    import jax

    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.config import apply_overrides, load_config
    from jaxem.infer.job import make_normalizer
    from jaxem.train.checkpoint import restore_for_inference
    from jaxem.train.trainer import train

    config = apply_overrides(load_config("demo:tiny"), ["--config.model.deep_supervision=true",
                                                        "--config.model.widths=(4,8,16)"])
    train(with_data_paths(config, write_synthetic_data(config, tmp_path / "data")), tmp_path / "run", progress=False)
    raw = tmp_path / "data" / "test_raw.zarr"
    one_tile = ("--config.predict.block_shape=(64,64)", "--config.predict.halo=(0,0)")
    for name in ("a.zarr", "b.zarr"):
        assert predict("--run", tmp_path / "run", "--input", raw, "--output", tmp_path / name, *one_tile) == 0
    got = open_volume(tmp_path / "a.zarr").read()
    np.testing.assert_array_equal(got, open_volume(tmp_path / "b.zarr").read())
    saved, model, variables = restore_for_inference(tmp_path / "run")
    logits, aux = model.apply(variables, make_normalizer(open_volume(raw), saved.data)(open_volume(raw).read())[..., None],
                              train=False)
    assert aux["deep_supervision"]  # the run really has auxiliary outputs
    assert got.shape == (1, 2, 64, 64) and np.isfinite(got).all()
    np.testing.assert_allclose(got, np.moveaxis(np.asarray(jax.nn.sigmoid(logits)), -1, 0), atol=1e-5)


def test_ensemble_of_two_checkpoints_inside_the_window(run_dir, tmp_path):
    """`--checkpoint 3 --checkpoint 6`: the models are combined inside the jitted window; the mean
    equals the mean of the two single-model outputs (blending is linear), median of two is their
    mean, and with one tile per slice majority is exactly the vote of the two single-model
    outputs: 1 where both say > 0.5, 0.5 where one does, else 0."""
    raw, steps = run_dir / "data" / "test_raw.zarr", [run_dir / "checkpoints" / s for s in ("3", "6")]
    both = [a for s in steps for a in ("--checkpoint", s)]
    for name, extra in (("s3", ("--checkpoint", steps[0])), ("s6", ("--checkpoint", steps[1])), ("mean", both),
                        ("majority", (*both, "--reduce", "majority")), ("median", (*both, "--reduce", "median"))):
        assert predict(*extra, "--input", raw, "--output", tmp_path / name, "--config.predict.block_shape=(64,64)",
                       "--config.predict.halo=(0,0)") == 0
    p3, p6, mean, majority, median = (open_volume(tmp_path / n).read() for n in ("s3", "s6", "mean", "majority", "median"))
    np.testing.assert_allclose(mean, (p3 + p6) / 2, atol=1e-6)
    np.testing.assert_allclose(median, mean, atol=1e-6)
    votes = ((p3 > 0.5).astype(np.float32) + (p6 > 0.5)) / 2
    np.testing.assert_array_equal(majority, votes)
    assert len(np.unique(votes)) > 1
