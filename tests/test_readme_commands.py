"""Every `jaxem ...` line of the README's fenced bash blocks runs as written, in order, in one
directory laid out like a fresh checkout (configs/ copied in), with the data files it names
generated small, and at tiny size: the overrides in TINY are appended to commands that train.

A line is skipped only when it is in SKIP, with the reason; a new README line that trains with a
config not in TINY fails here until TINY says how to make it tiny.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import device_flags

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The start of a skipped line -> why it cannot run here.
SKIP = {
    "jaxem convert-weights --format sam sam_vit_b_01ec64.pth":
        "needs Meta's 375 MB SAM checkpoint (a download) and torch; tests/test_foundation.py converts a small one",
}

# Config file stem -> overrides that shrink a run to seconds (the sizes of its `tiny` argument).
_COMMON = ["--config.train.steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
           "--config.data.crop_shape=(32,32)", "--config.model.widths=(4,8)"]
TINY = {
    "demo": _COMMON + ["--config.demo.train_shape=(4,64,64)", "--config.demo.val_shape=(2,64,64)",
                       "--config.demo.test_shape=(2,64,64)", "--config.data.batch_size=4",
                       "--config.train.eval_every=2", "--config.train.eval_batches=1",
                       "--config.semi.batch_size=4", "--config.semi.rampup_steps=2",
                       "--config.predict.block_shape=(32,32)", "--config.predict.halo=(8,8)"],
    "pretrain": _COMMON + ["--config.synthetic.shape=(4,64,64)", "--config.data.batch_size=8",
                           "--config.train.eval_every=0", "--config.ssl.mask_patch=(8,)",
                           "--config.ssl.queue_size=32", "--config.ssl.projection_hidden=32",
                           "--config.ssl.projection_dim=16"],
}
DEFAULT_CONFIG = {"pretrain": "pretrain"}  # commands whose --config is optional -> their default
TRAINING = ("train", "pretrain", "demo")
VOXEL_SIZE = (40.0, 4.0, 4.0)


def readme_commands(text: str) -> list[str]:
    """The `jaxem ...` command lines of the fenced bash blocks of `text`, continuation lines
    joined and comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "jaxem":
                commands.append(shlex.join(words))
    return commands


def skip_reason(command: str) -> str | None:
    """Why `command` is skipped, or None when it runs."""
    return next((why for start, why in SKIP.items() if command.startswith(start)), None)


def option(argv: list[str], name: str, default: str | None = None) -> str | None:
    """The value of `--name VALUE` in `argv`, or `default`."""
    return argv[argv.index(name) + 1] if name in argv else default


def tiny_argv(argv: list[str]) -> list[str]:
    """`argv` (without the leading `jaxem`) with the TINY overrides of its config appended when it
    trains, and --no-progress."""
    if argv[0] not in TRAINING:
        return argv
    spec = option(argv, "--config", DEFAULT_CONFIG.get(argv[0], "demo"))
    stem = Path(spec.partition(":")[0]).stem
    assert stem in TINY, f"README trains with config {spec!r}: add its tiny overrides to TINY"
    return argv + TINY[stem] + ["--no-progress"]


def write_named_data(folder: Path) -> None:
    """The small volumes the README's lines name: raw/volume/gt (one synthetic stack), another
    microscope's raw, a boundary prediction with its labels (val_*), affinities (aff.zarr), the
    stack's boundary map (membranes.zarr: 1 on a boundary)."""
    from jaxem.data.synthetic import generate
    from jaxem.data.volume import create_volume, write_attributes

    em, other = generate((8, 64, 64), voxel_size=VOXEL_SIZE, seed=7), generate((8, 64, 64), voxel_size=VOXEL_SIZE, seed=8)
    boundary = np.stack([_boundaries(s) for s in em.instances]).astype(np.float32)[None]
    affinities = np.stack([_affinity(em.instances, axis) for axis in range(3)]).astype(np.float32)
    volumes = {"raw.zarr": em.raw, "volume.zarr": em.raw, "gt.zarr": em.instances, "val_gt.zarr": em.instances,
               "other_microscope.zarr": other.raw, "val_pred.zarr": boundary, "aff.zarr": affinities,
               "membranes.zarr": boundary[0].astype(np.uint8)}
    for name, array in volumes.items():
        axes = ("c", "z", "y", "x") if array.ndim == 4 else None
        create_volume(folder / name, array.shape, array.dtype, VOXEL_SIZE, axes=axes).write(array)
    write_attributes(folder / "val_pred.zarr", {"jaxem_target": {"kind": "boundary", "channels": 1}})
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    write_attributes(folder / "aff.zarr", {"jaxem_target": {"kind": "affinities", "channels": 3, "offsets": offsets}})


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """1.0 where a pixel's right or lower neighbour has another id, else 0.0."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge


def _affinity(labels: np.ndarray, axis: int) -> np.ndarray:
    """1.0 where a voxel and its predecessor along `axis` share an id (offset -1), else 0.0."""
    return np.roll(labels, 1, axis) == labels


def assert_wrote(argv: list[str], stdout: str, folder: Path) -> None:
    """The output the command names exists: a run's checkpoint (and a pretrained encoder), a
    volume, a config or JSON file, a report; `data info` prints JSON."""
    workdir, output = option(argv, "--workdir"), option(argv, "--output")
    if workdir:
        steps = [int(p.name) for p in (folder / workdir / "checkpoints").iterdir() if p.name.isdigit()]
        assert max(steps) == 2, f"{workdir} has checkpoints {steps}"
        assert (folder / workdir / "config.json").is_file()
        if argv[0] == "pretrain":
            assert (folder / workdir / "encoder").is_dir()
    elif output:
        assert (folder / output).exists(), f"{output} was not written"
    elif argv[0] == "evaluate":
        assert (folder / option(argv, "--out") / "report.json").is_file()
    elif argv[:2] == ["data", "info"]:
        assert "shape" in json.loads(stdout)
    else:
        raise AssertionError(f"no expected output known for `jaxem {shlex.join(argv)}`: add it to assert_wrote")


def jaxem_executable() -> list[str]:
    """The installed `jaxem` script beside this Python, else `python -m jaxem.cli`."""
    script = Path(sys.executable).parent / "jaxem"
    return [str(script)] if script.exists() else [sys.executable, "-m", "jaxem.cli"]


def test_train_demo_config_without_volumes_uses_synthetic_data(tmp_path):
    """`jaxem train` of the demo config naming no volumes writes the demo's synthetic ones into
    WORKDIR/data and trains on them."""
    from jaxem import cli

    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "demo:tiny", "--workdir", str(workdir), "--config.train.steps=2",
                     "--no-progress"]) == 0
    assert (workdir / "data" / "train_raw.zarr").is_dir() and (workdir / "checkpoints" / "2").is_dir()
    trained_on = json.loads((workdir / "config.json").read_text())["data"]["train_images"]
    assert trained_on == [str(workdir / "data" / "train_raw.zarr")]


def test_train_without_volumes_or_demo_section_is_refused(tmp_path, capsys):
    """A config naming no volumes and without a `demo` section: one sentence, exit 2, no workdir."""
    from jaxem import cli

    config = tmp_path / "bare.py"
    config.write_text("from jaxem.train.defaults import base_config\n\n\ndef get_config(arg=''):\n    return base_config(ndim=2)\n")
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--workdir", str(workdir), "--config.train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "data.train_images is empty" in err and "Traceback" not in err
    assert not workdir.exists()


def test_readme_lists_commands():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 10 and commands[0].startswith("jaxem train --config configs/demo.py")
    assert all(any(c.startswith(start) for c in commands) for start in SKIP), "a SKIP entry no longer matches a README line"


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    """The README's lines in order in one directory: each exits 0 and writes what it names."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    write_named_data(tmp_path)
    env = {**os.environ, "XLA_FLAGS": device_flags(1), "JAX_PLATFORMS": "cpu", "JAXEM_DATA": str(tmp_path / "cache")}
    for command in readme_commands(README.read_text()):
        if skip_reason(command):
            continue
        argv, start = tiny_argv(shlex.split(command)[1:]), time.perf_counter()
        done = subprocess.run(jaxem_executable() + argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        print(f"{time.perf_counter() - start:6.1f} s  {command}")  # shown with pytest -s
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
        assert_wrote(argv, done.stdout, tmp_path)


def test_a_refused_demo_training_leaves_no_workdir(tmp_path, capsys):
    """The demo's synthetic data is written before train() checks the config: a refusal removes it."""
    from jaxem import cli

    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "demo", "--workdir", str(workdir), "--no-progress",
                     "--config.data.batch_size=0"]) == 2
    assert "data.batch_size=0" in capsys.readouterr().err
    assert not workdir.exists()


def test_a_workdir_with_square_brackets_is_refused_before_anything_is_written(tmp_path, capsys):
    """orbax finds a checkpoint's parts by glob, so under `run[1]` it would write checkpoints it
    cannot read: the run is refused with one sentence, exit 2, and no workdir is left."""
    from jaxem import cli

    workdir = tmp_path / "run[1]"
    assert cli.main(["train", "--config", "demo:tiny", "--workdir", str(workdir), "--no-progress",
                     "--config.train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "square brackets" in err and "run[1]" in err and "Traceback" not in err
    assert not workdir.exists()
