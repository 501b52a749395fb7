"""The same config gives the same loss curve on 1 device, 4 devices and 2 processes x 2 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import device_flags

from jaxem.commands.demo import write_synthetic_data
from jaxem.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(command: list[str], env: dict) -> tuple[list[int], list[str]]:
    """Runs `python *command` as 2 processes of one JAX job (local coordinator, gloo collectives)
    with `env` (which sets each process's device count); returns their exit codes and outputs."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "JAXEM_COORDINATOR": f"127.0.0.1:{port}", "JAXEM_NUM_PROCESSES": "2",
                                   "JAXEM_PROCESS_ID": str(pid), "JAXEM_CPU_COLLECTIVES": "gloo"})
             for pid in range(2)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    return [p.returncode for p in procs], outputs


def run_one_and_two_processes(command: list[str], tmp_path: Path) -> None:
    """Runs `python *command --workdir W` as 1 process x 4 devices (W = tmp_path/one) and as
    2 processes x 2 devices (W = tmp_path/multi); fails the test if either fails."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, *command, "--workdir", str(tmp_path / "one")], check=True, cwd=ROOT,
                   env={**env, "XLA_FLAGS": device_flags(4)}, capture_output=True, timeout=600)
    codes, outputs = run_two_processes([*command, "--workdir", str(tmp_path / "multi")],
                                       {**env, "XLA_FLAGS": device_flags(2)})
    assert codes == [0, 0], outputs


def _train_losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_loss_curve_matches_across_1_device_4_devices_and_2_processes(tmp_path):
    cfg = load_config("demo:tiny")
    paths = write_synthetic_data(cfg, tmp_path / "data")
    args = ["-m", "jaxem.cli", "train", "--config", "demo:tiny", "--no-progress",
            f"--config.data.train_images=('{paths['train'][0]}',)", f"--config.data.train_labels=('{paths['train'][1]}',)",
            "--config.data.val_images=()", "--config.data.val_labels=()", "--config.train.eval_every=0",
            "--config.train.steps=8", "--config.train.log_every=1", "--config.model.norm=batch"]
    base_env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def single(devices: int, name: str) -> list[float]:
        env = {**base_env, "XLA_FLAGS": device_flags(devices)}
        subprocess.run([sys.executable, *args, "--workdir", str(tmp_path / name)], check=True, env=env, cwd=ROOT,
                       capture_output=True, timeout=600)
        return _train_losses(tmp_path / name)

    one, four = single(1, "one"), single(4, "four")
    codes, outputs = run_two_processes([*args, "--workdir", str(tmp_path / "multi")],
                                       {**base_env, "XLA_FLAGS": device_flags(2)})
    assert codes == [0, 0], outputs
    multi = _train_losses(tmp_path / "multi")

    assert len(one) == len(four) == len(multi) == 8
    np.testing.assert_allclose(four, one, rtol=1e-3)
    np.testing.assert_allclose(multi, one, rtol=1e-3)
    assert one[-1] < one[0]


@pytest.mark.slow
def test_predict_with_2_processes_equals_1_process(tmp_path):
    """`jaxem predict` over 2 processes x 2 devices: process 0 creates the output, each process
    predicts its share of the blocks (at least one block per process), and the volume equals a
    single process's prediction (one block); a rerun
    resumes (nothing left to do) and another job's output is refused by both processes. The run
    trained here on 4 devices: inference restores it on 2 (another topology)."""
    from jaxem.commands.demo import with_data_paths
    from jaxem.data.volume import open_volume, read_attributes
    from jaxem.train.trainer import train

    cfg = load_config("demo:tiny")
    paths = write_synthetic_data(cfg, tmp_path / "data")
    train(with_data_paths(cfg, paths), tmp_path / "run", progress=False)
    args = ["-m", "jaxem.cli", "predict", "--run", str(tmp_path / "run"), "--input", str(tmp_path / "data" / "test_raw.zarr"),
            "--no-progress", "--config.predict.block_shape=(32,32)", "--config.predict.halo=(4,4)",
            "--config.predict.chunk_shape=(24,24)"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": device_flags(2)}
    subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one.zarr")], check=True, cwd=ROOT, env=env,
                   capture_output=True, timeout=600)

    def two_processes(*extra) -> tuple[list[int], list[dict]]:
        codes, outputs = run_two_processes([*args, "--output", str(tmp_path / "two.zarr"), *extra], env)
        stats = [json.loads(line) for out in outputs for line in out.splitlines() if line.startswith("{")]
        return codes, stats

    codes, stats = two_processes()
    assert codes == [0, 0] and len(stats) == 1 and not stats[0]["resumed"]  # printed by process 0 only
    assert 0 < stats[0]["chunks"] < 18  # 2 x 64x64 in 24x24 chunks: 18, shared by the processes
    one, two = open_volume(tmp_path / "one.zarr").read(), open_volume(tmp_path / "two.zarr").read()
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    assert read_attributes(tmp_path / "two.zarr")["jaxem_target"]["kind"] == "boundary"
    codes, stats = two_processes()
    assert codes == [0, 0] and stats[0]["resumed"] and stats[0]["chunks"] == 0
    codes, stats = two_processes("--tta")
    assert codes == [2, 2] and not stats


@pytest.mark.slow
def test_pretrain_with_2_processes_equals_1_process(tmp_path):
    """`jaxem pretrain` (MoCo) over 2 processes x 2 devices: process 0 writes the synthetic volume
    while the other waits, both read their halves of each batch, the queue takes the global batch's
    keys, and loss curve and exported encoder equal a 4-device single process's."""
    from jaxem.train.checkpoint import load_encoder

    args = ["-m", "jaxem.cli", "pretrain", "--config", "pretrain:tiny", "--no-progress", "--config.train.log_every=1"]
    run_one_and_two_processes(args, tmp_path)
    one, multi = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "multi")
    assert len(one) == len(multi) == 6
    np.testing.assert_allclose(multi, one, rtol=1e-3)
    for a, b in zip(*(jax.tree.leaves(load_encoder(tmp_path / run)) for run in ("one", "multi"))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_mean_teacher_with_2_processes_equals_1_process(tmp_path):
    """Semi-supervised training over 2 processes x 2 devices: each process reads its rows of the
    labelled and of the unlabelled batches, and the loss curve (consistency included) equals a
    4-device single process's."""
    cfg = load_config("demo:tiny")
    paths = write_synthetic_data(cfg, tmp_path / "data")
    args = ["-m", "jaxem.cli", "train", "--config", "demo:tiny", "--no-progress",
            f"--config.data.train_images=('{paths['train'][0]}',)", f"--config.data.train_labels=('{paths['train'][1]}',)",
            "--config.data.val_images=()", "--config.data.val_labels=()", "--config.train.eval_every=0",
            "--config.train.steps=6", "--config.train.log_every=1", "--config.train.ema_decay=0.9",
            "--config.semi.weight=1.0", "--config.semi.rampup_steps=2", "--config.semi.batch_size=4",
            f"--config.semi.unlabelled_images=('{paths['test'][0]}',)"]
    run_one_and_two_processes(args, tmp_path)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "multi")}
    assert len(rows["one"]) == len(rows["multi"]) == 6
    for key in ("loss", "consistency"):
        np.testing.assert_allclose([r[key] for r in rows["multi"]], [r[key] for r in rows["one"]], rtol=1e-3)
    assert rows["one"][-1]["consistency"] > 0
