"""Test setup: 4 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

# XLA's CPU backend spends most of a small test's time optimising the compiled code; level 0 still
# computes the same numbers, about twice as fast end to end. Subprocesses use device_flags(n).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def device_flags(n: int) -> str:
    """XLA_FLAGS for a test process with `n` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}"


os.environ.setdefault("XLA_FLAGS", device_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """The folder of small real EM datasets beside the repo; skips the test when absent."""
    for candidate in (Path(os.environ.get("JAXEM_SHARED_DATA", "")), SHARED_DATA):
        if str(candidate) and candidate.is_dir() and (candidate / "isbi2012").is_dir():
            return candidate
    pytest.skip("../shared/data is not present")


def grid_boundaries(shape, step):
    """A boundary map with membranes (1.0) every `step` voxels along each axis, cells 0.0."""
    prob = np.zeros(shape, np.float32)
    for axis in range(len(shape)):
        index = [slice(None)] * len(shape)
        index[axis] = slice(0, shape[axis], step)
        prob[tuple(index)] = 1.0
    return prob


def tiny_semi_config(tmp_path, **fields):
    """demo:tiny on its synthetic volumes with unlabelled crops of the test volume and `fields`
    (dotted config keys -> values) set; e.g. semi.weight or semi.adversarial_weight turns a method on."""
    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.config import apply_overrides, load_config

    config = load_config("demo:tiny")
    paths = write_synthetic_data(config, tmp_path / "data")
    overrides = {"semi.rampup_steps": 4, "semi.batch_size": 4, "semi.unlabelled_images": f"('{paths['test'][0]}',)",
                 **fields}
    config = apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    return with_data_paths(config, paths)


def random_semi_batch(config, mesh, seed=0):
    """A random labelled batch plus `semi.batch_size` unlabelled crops, sharded on `mesh`."""
    import jax

    from jaxem.train import parallel

    rng = np.random.default_rng(seed)
    shape = (config.data.batch_size, *config.data.crop_shape)
    put = lambda x: jax.device_put(x, parallel.data_sharding(mesh))  # noqa: E731
    return {"image": put(rng.normal(size=shape + (1,)).astype(np.float32)),
            "labels": put((rng.random(shape) < 0.5).astype(np.int32)), "mask": put(np.ones(shape, np.float32)),
            "unlabelled": put(rng.normal(size=(config.semi.batch_size, *config.data.crop_shape, 1)).astype(np.float32))}


def assert_resume_is_exact(config, run_dir, field: str, logged: str):
    """Trains demo:tiny-sized `config` (6 steps, checkpoints at 3 and 6) in `run_dir`, checks every
    train log row has `logged`, deletes checkpoint 6, resumes from 3 and checks that the state's
    `field` at step 6 is what the uninterrupted run had."""
    import json
    import shutil

    import jax

    from jaxem.train.checkpoint import restore_on_this_host
    from jaxem.train.trainer import train

    run_dir = Path(run_dir)
    assert train(config, run_dir, progress=False)["final_step"] == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(logged in r for r in rows if r["split"] == "train")
    whole = restore_on_this_host(run_dir / "checkpoints" / "6" / "state")
    shutil.rmtree(run_dir / "checkpoints" / "6")
    assert train(config, run_dir, progress=False)["start_step"] == 3
    resumed = restore_on_this_host(run_dir / "checkpoints" / "6" / "state")
    for a, b in zip(jax.tree.leaves(whole[field]), jax.tree.leaves(resumed[field])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def cell_batch(batch_size=8, size=32, seed=0):
    """Blocky 'cells' separated by dark one-pixel membranes, and their instance labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch_size, size, size), np.int32)
    for b in range(batch_size):
        cuts_y = np.sort(rng.choice(np.arange(4, size - 4), 2, replace=False))
        cuts_x = np.sort(rng.choice(np.arange(4, size - 4), 2, replace=False))
        ids = (np.searchsorted(cuts_y, np.arange(size))[:, None] * 3 + np.searchsorted(cuts_x, np.arange(size))[None] + 1)
        ids[cuts_y, :] = 0
        ids[:, cuts_x] = 0
        labels[b] = ids
    image = np.where(labels > 0, 0.7, 0.1) + 0.1 * rng.standard_normal(labels.shape)
    image = ((image - image.mean()) / image.std()).astype(np.float32)[..., None]
    return {"image": image, "labels": labels, "mask": np.ones(labels.shape, np.float32)}


# ---------------------------------------------------------------- bad input through the CLI
# (tests/test_bad_input.py and tests/test_bad_input_values.py share these)

NO_PROGRESS = ("predict", "segment", "tune", "train", "pretrain")  # commands that take --no-progress


def cli_argv(line: str, paths: dict) -> list[str]:
    """The argv of a case's command line with `paths`' {placeholders} filled in (and --no-progress)."""
    import shlex

    argv = shlex.split(line.format(**paths))
    return argv + ["--no-progress"] if argv[0] in NO_PROGRESS else argv


def checksums(root) -> dict[str, str]:
    """sha256 of every file under `root` (symlinks by their target's path), by relative path."""
    import hashlib

    sums = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            data = os.readlink(path).encode() if os.path.islink(path) else Path(path).read_bytes()
            sums[os.path.relpath(path, root)] = hashlib.sha256(data).hexdigest()
    return sums


def one_error_line(capsys) -> str:
    """The one non-empty stderr line of the last command (asserting there is one and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_zarr(path, array, axes=None, voxel_size=(40.0, 4.0, 4.0), format="zarr"):
    """`array` written as a new volume at `path` (jaxem.data.volume.create_volume); returns it."""
    from jaxem.data.volume import create_volume

    volume = create_volume(path, array.shape, array.dtype, voxel_size, axes=axes, format=format)
    volume.write(array)
    return volume


def train_tiny_demo(workdir):
    """Trains demo:tiny (6 steps) on its synthetic volumes written to `workdir`/data; returns `workdir`."""
    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.config import load_config
    from jaxem.train.trainer import train

    config = load_config("demo:tiny")
    config = with_data_paths(config, write_synthetic_data(config, workdir / "data"))
    train(config, workdir, progress=False)
    return workdir
