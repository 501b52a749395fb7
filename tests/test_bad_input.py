"""Bad input through the CLI (issue #23): exit code 2, one sentence on stderr, nothing lost.

Every case in CASES (and OTHER_CASES) runs `jaxem.cli.main` in-process on small volumes built once
per module, and checks: exit code 2, exactly one non-empty stderr line without "Traceback" that
holds the expected words, every file that was in the folder before unchanged (sha256) and no new
file left behind. The crash tests kill a write midway and check that the rerun, without
--overwrite, finishes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import checksums, cli_argv, grid_boundaries, one_error_line, write_zarr
from jaxem.cli import main
from jaxem.data.volume import Volume, create_volume, open_volume

# (id, command line with {placeholders} of `world`, words the one stderr line must hold)
CASES = [
    # item 6: an output that is, holds or lies inside an input is refused before anything is removed
    ("predict-onto-input", "predict --run {run} --input {raw} --output {raw} --overwrite", "is the same path as --input"),
    ("predict-into-checkpoints", "predict --run {run} --input {raw} --output {run}/checkpoints/p.zarr",
     "is inside --run"),
    ("predict-onto-run", "predict --run {run} --input {pred} --output {run} --overwrite", "is a folder holding --run"),
    ("import-onto-src", "data import {raw} {raw} --overwrite", "is the same path as SRC"),
    ("import-onto-symlinked-src", "data import {link} {raw} --overwrite", "is the same path as SRC"),
    ("import-over-src-folder", "data import {nest}/raw.zarr {nest} --overwrite", "is a folder holding SRC"),
    ("segment-onto-input", "segment --input {pred} --output {pred} --overwrite", "is the same path as --input"),
    ("segment-inside-input", "segment --input {pred} --output {pred}/seg --overwrite", "is inside --input"),
    ("evaluate-onto-gt", "evaluate --pred {pred} --gt {labels} --task boundary --out {labels} --overwrite",
     "is the same path as --gt"),
    ("evaluate-existing-report", "evaluate --pred {pred} --gt {labels} --task boundary --out {report}",
     "already exists; pass --overwrite"),
    ("evaluate-overwrite-other-folder", "evaluate --pred {pred} --gt {labels} --task boundary --out {nest} --overwrite",
     "holding no report.json"),
    ("tune-inside-input", "tune --input {pred} --labels {labels} --output {pred}/tuned.json", "is inside --input"),
    ("train-workdir-is-data", ("train --config demo:tiny --workdir {raw} --config.data.train_images=\"('{raw}',)\" "
                               "--config.data.train_labels=\"('{labels}',)\""),
     "--workdir {raw} is the same path as data.train_images"),
    ("pretrain-workdir-inside-data",
     "pretrain --config pretrain:mim --workdir {raw}/run --config.data.train_images=\"('{raw}',)\"",
     "is inside data.train_images"),
    ("convert-weights-onto-input", "convert-weights {file} {file} --overwrite", "OUT {file} is the same path as IN"),
    # item 7: a sentence, not a traceback
    ("import-corrupt-chunk", "data import {bad} {w}/out.zarr", "chunk {bad}/0.0.0 of"),
    ("evaluate-corrupt-chunk", "evaluate --pred {badpred} --gt {labels} --task boundary --out {w}/ev", "chunk {badpred}/0.0.0 of"),
    ("segment-corrupt-chunk", "segment --input {badpred} --output {w}/seg.zarr", "chunk {badpred}/0.0.0 of"),
    ("predict-corrupt-chunk", "predict --run {run} --input {bad} --output {w}/p.zarr", "chunk {bad}/0.0.0 of"),
    ("import-empty-axis", "data import {empty} {w}/out.zarr --voxel-size 1,1,1", "with an empty axis"),
    ("segment-empty-axis", "segment --input {empty} --output {w}/seg.zarr", "with an empty axis"),
    ("import-zero-chunk-metadata", "data import {zerochunk} {w}/out.zarr", "is not a readable zarr volume"),
    ("predict-3-channels", "predict --run {run} --input {rgb} --output {w}/p.zarr", "has 3 channels"),
    ("predict-5d", "predict --run {run} --input {five} --output {w}/p.zarr", "predict takes (z, y, x) or (y, x)"),
    ("predict-negative-block-budget", "predict --run {run} --input {raw} --output {w}/p.zarr --config.predict.block_gib=-1",
     "predict.block_gib=-1.0 must be >= 0"),
    ("evaluate-out-is-file", "evaluate --pred {pred} --gt {labels} --task boundary --out {file}", "is a file"),
    ("import-under-a-file", "data import {raw} {file}/out.zarr", "cannot write {file}/out.zarr"),
    ("segment-under-a-file", "segment --input {pred} --output {file}/seg.zarr", "cannot write {file}/seg.zarr"),
    ("evaluate-under-a-file", "evaluate --pred {pred} --gt {labels} --task boundary --out {file}/ev", "cannot write {file}/ev"),
    ("predict-under-a-file", "predict --run {run} --input {raw} --output {file}/p.zarr", "cannot write {file}/p.zarr"),
    ("tune-under-a-file", "tune --input {pred} --labels {labels} --output {file}/t.json", "cannot write {file}/t.json"),
    ("tune-all-zero-labels", "tune --input {pred} --labels {zeros} --output {w}/tuned.json", "holds no objects"),
    ("train-batch-size-0", ("train --config demo:tiny --workdir {w}/work --config.data.train_images=\"('{raw}',)\" "
                            "--config.data.train_labels=\"('{labels}',)\" --config.data.batch_size=0"),
     "data.batch_size=0 must be a positive"),
]

# ---- other engineers' cases (NaN in predictions, steps=-5, truncated checkpoints, pyramid
# --min-size 0, ...): append (id, command line, expected words) here; the same checks apply.
OTHER_CASES: list[tuple[str, str, str]] = [
]



def _edit_zarray(path, **fields) -> None:
    meta = json.loads(Path(path, ".zarray").read_text())
    Path(path, ".zarray").write_text(json.dumps({**meta, **fields}))


def _corrupt(path: Path) -> Path:
    (path / "0.0.0").write_bytes(b"not blosc at all")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained run and small volumes, good and bad; {name: path} for CASES' placeholders."""
    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.config import load_config
    from jaxem.train.trainer import train

    w = tmp_path_factory.mktemp("world")
    run = w / "run"
    config = load_config("demo:tiny")
    config = with_data_paths(config, write_synthetic_data(config, run / "data"))
    train(config, run, progress=False)
    raw, labels = run / "data" / "test_raw.zarr", run / "data" / "test_instances.zarr"  # (2, 64, 64)
    p = {"w": w, "run": run, "raw": raw, "labels": labels, "pred": w / "pred.zarr", "link": w / "link.zarr",
         "nest": w / "nest", "report": w / "report", "file": w / "a_file.txt", "bad": w / "bad.zarr",
         "badpred": w / "badpred.zarr", "empty": w / "empty.zarr", "zerochunk": w / "zerochunk.zarr",
         "rgb": w / "rgb.zarr", "five": w / "five.zarr", "zeros": w / "zeros.zarr"}
    prob = grid_boundaries((2, 64, 64), 8)
    write_zarr(p["pred"], prob)
    os.symlink(raw, p["link"])
    shutil.copytree(raw, p["nest"] / "raw.zarr")
    p["report"].mkdir()
    (p["report"] / "report.json").write_text("{}\n")
    p["file"].write_text("not a folder\n")
    _corrupt(shutil.copytree(raw, p["bad"]))
    _corrupt(shutil.copytree(p["pred"], p["badpred"]))
    _edit_zarray(create_volume(p["empty"], (1, 64, 64), np.uint8, (40.0, 4.0, 4.0)).path, shape=[0, 64, 64])
    _edit_zarray(shutil.copytree(raw, p["zerochunk"]), chunks=[0, 64, 64])
    write_zarr(p["rgb"], np.zeros((3, 2, 64, 64), np.uint8))
    write_zarr(p["five"], np.zeros((1, 1, 2, 64, 64), np.uint8), axes=("t", "c", "z", "y", "x"))
    write_zarr(p["zeros"], np.zeros((2, 64, 64), np.uint32))
    return {k: str(v) for k, v in p.items()}


def test_the_fixture_volumes_are_what_the_cases_expect(world):
    assert open_volume(world["raw"]).shape == (2, 64, 64)
    assert json.loads(Path(world["zerochunk"], ".zarray").read_text())["chunks"][0] == 0
    assert json.loads(Path(world["empty"], ".zarray").read_text())["shape"][0] == 0


@pytest.mark.parametrize("case", CASES + OTHER_CASES, ids=[c[0] for c in CASES + OTHER_CASES])
def test_bad_input_is_one_sentence_exit_2_and_nothing_changes(case, world, capsys):
    _, line, expected = case
    before = checksums(world["w"])
    capsys.readouterr()
    assert main(cli_argv(line, world)) == 2
    line = one_error_line(capsys)
    assert expected.format(**world) in line, line
    assert checksums(world["w"]) == before


def test_unwritable_folder(world, tmp_path, capsys):
    """A folder without write permission (root writes anyway, so this runs only as a user)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for line in ("data import {raw} %s/out.zarr", "segment --input {pred} --output %s/seg.zarr",
                     "evaluate --pred {pred} --gt {labels} --task boundary --out %s/ev",
                     "predict --run {run} --input {raw} --output %s/p.zarr"):
            assert main(cli_argv(line % locked, world)) == 2
            assert "cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert not any(locked.iterdir())


def test_subprocess_prints_one_line_without_traceback(world):
    """The real entry point (`python -m jaxem.cli`), for a refused overlap and a corrupt chunk."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    before = checksums(world["w"])
    for line, expected in (("data import {raw} {raw} --overwrite", "is the same path as SRC"),
                           ("segment --input {badpred} --output {w}/seg.zarr", "0.0.0")):
        proc = subprocess.run([sys.executable, "-m", "jaxem.cli", *cli_argv(line, world)], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        lines = [text for text in proc.stderr.splitlines() if text.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert checksums(world["w"]) == before


# ---------------------------------------------------------------- a crash, then the rerun


def _crash_on_write(monkeypatch, after: int, cls=Volume, name="write"):
    """Makes `cls.name` raise RuntimeError from its `after + 1`-th call on."""
    original, calls = getattr(cls, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, failing)


def _no_leftovers(folder) -> None:
    assert not [p for p in os.listdir(folder) if p.endswith(".partial")]


def test_import_crash_leaves_nothing_and_the_rerun_finishes(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "imp.zarr"
    argv = ["data", "import", world["raw"], str(out), "--chunks", "1,64,64"]
    with monkeypatch.context() as patch:
        _crash_on_write(patch, after=1)
        with pytest.raises(RuntimeError):
            main(argv)
    assert not out.exists()
    _no_leftovers(tmp_path)
    assert main(argv) == 0
    np.testing.assert_array_equal(open_volume(out).read(), open_volume(world["raw"]).read())


def test_import_crash_with_overwrite_keeps_the_old_output(world, tmp_path, monkeypatch):
    out = tmp_path / "imp.zarr"
    assert main(["data", "import", world["labels"], str(out)]) == 0
    before = checksums(out)
    with monkeypatch.context() as patch:
        _crash_on_write(patch, after=0)
        with pytest.raises(RuntimeError):
            main(["data", "import", world["raw"], str(out), "--overwrite"])
    assert checksums(out) == before
    _no_leftovers(tmp_path)


def test_segment_crash_leaves_nothing_and_the_rerun_finishes(world, tmp_path, monkeypatch):
    out = tmp_path / "seg.zarr"
    argv = ["segment", "--input", world["pred"], "--output", str(out), "--method", "cc", "--block", "1,32,32",
            "--no-progress"]
    with monkeypatch.context() as patch:
        _crash_on_write(patch, after=2)
        with pytest.raises(RuntimeError):
            main(argv)
    assert not out.exists()
    _no_leftovers(tmp_path)
    assert main(argv) == 0
    assert open_volume(out).read().max() > 1


def test_evaluate_crash_leaves_no_report_and_the_rerun_finishes(world, tmp_path, monkeypatch):
    from jaxem.protocols import report

    out = tmp_path / "ev"
    argv = ["evaluate", "--pred", world["pred"], "--gt", world["labels"], "--task", "boundary", "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(report, "_clean", lambda v: (_ for _ in ()).throw(RuntimeError("simulated crash")))
        with pytest.raises(RuntimeError):
            main(argv)
    assert not out.exists()
    _no_leftovers(tmp_path)
    assert main(argv) == 0 and (out / "report.json").exists()
    assert main(argv) == 2  # a second report needs --overwrite
    assert main(argv + ["--overwrite"]) == 0


def test_predict_crash_then_the_rerun_resumes(world, tmp_path, monkeypatch, capsys):
    """predict keeps its finished chunks (jaxem_done markers): the same command resumes."""
    from jaxem.infer import output

    raw = open_volume(world["raw"]).read()
    big = tmp_path / "big.zarr"
    write_zarr(big, np.tile(raw, (1, 2, 2)))  # (2, 128, 128): 4 output chunks
    out = tmp_path / "p.zarr"
    argv = ["predict", "--run", world["run"], "--input", str(big), "--output", str(out), "--no-progress"]
    with monkeypatch.context() as patch:
        _crash_on_write(patch, after=1, cls=output.DoneLog, name="mark")
        with pytest.raises(RuntimeError):
            main(argv)
    capsys.readouterr()
    assert main(argv) == 0
    stats = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"resumed": true' in stats
    assert main(argv[:-3] + ["--output", str(tmp_path / "whole.zarr"), "--no-progress"]) == 0
    np.testing.assert_array_equal(open_volume(out).read(), open_volume(tmp_path / "whole.zarr").read())


def test_predict_crash_before_any_chunk_does_not_block_another_job(world, tmp_path, monkeypatch, capsys):
    """An output whose run finished no chunk holds nothing: a different job replaces it without
    --overwrite; once a chunk is finished, a different job is refused."""
    from jaxem.infer import output

    out = tmp_path / "p.zarr"
    argv = ["predict", "--run", world["run"], "--input", world["raw"], "--output", str(out), "--no-progress"]
    with monkeypatch.context() as patch:
        _crash_on_write(patch, after=0, cls=output.DoneLog, name="mark")
        with pytest.raises(RuntimeError):
            main(argv)
    assert main(argv + ["--dtype", "uint8"]) == 0
    assert open_volume(out).dtype == np.uint8
    capsys.readouterr()
    assert main(argv) == 2
    assert "written by a different job" in capsys.readouterr().err

