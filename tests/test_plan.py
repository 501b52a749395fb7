"""The nnU-Net-style planner: topology from spacing, fingerprint, memory-fitted patch and batch, CLI."""

import math

import numpy as np
import pytest

from jaxem.cli import main
from jaxem.config import apply_overrides, load_config
from jaxem.data.volume import create_volume
from jaxem.errors import UserError
from jaxem.plan.planner import GIB, fingerprint, measure_step_memory, plan, topology


def test_serial_section_spacing_pools_in_plane_until_z_is_within_2x():
    # 40 x 4 x 4 nm: y/x spacing 4 -> 8 -> 16 -> 32; from then z (40) is within 2x and pooled too.
    pools, kernels = topology((32, 256, 256), (40.0, 4.0, 4.0))
    assert pools == ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    assert kernels == ((1, 3, 3), (1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))


def test_isotropic_and_2d_pool_every_axis_until_the_minimum_feature_map():
    pools, kernels = topology((64, 64, 64), (8.0, 8.0, 8.0))  # 64 -> 32 -> 16 -> 8 -> 4 (>= 2 * 4 to pool)
    assert pools == ((2, 2, 2),) * 4 and kernels == ((3, 3, 3),) * 5
    pools, kernels = topology((64, 128), (4.0, 4.0), max_levels=4)  # capped at 4 levels
    assert pools == ((2, 2),) * 3 and len(kernels) == 4
    # y stops at 4 voxels; x goes on until its spacing (64 nm) is more than 2x y's (16 nm).
    pools, kernels = topology((16, 128), (4.0, 4.0))
    assert pools == ((2, 2), (2, 2), (1, 2), (1, 2)) and kernels[-1] == (3, 1)


def _volume(path, array, voxel_size=(40.0, 4.0, 4.0)):
    create_volume(path, array.shape, array.dtype, voxel_size=voxel_size, overwrite=True).write(array)
    return str(path)


def test_fingerprint_reads_shapes_spacing_intensities_and_foreground(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (4, 32, 48)).astype(np.float32)
    labels = (rng.random((4, 32, 48)) < 0.3).astype(np.uint32)
    fp = fingerprint([_volume(tmp_path / "a.zarr", image)], [_volume(tmp_path / "l.zarr", labels)])
    assert fp["shapes"] == [[4, 32, 48]] and fp["voxel_sizes"] == [[40.0, 4.0, 4.0]]
    assert fp["intensity"]["mean"] == pytest.approx(float(image.astype(np.float64).mean()), rel=1e-6)
    assert fp["intensity"]["std"] == pytest.approx(float(image.astype(np.float64).std()), rel=1e-6)
    assert fp["intensity"]["p99_5"] == pytest.approx(float(np.percentile(image.astype(np.float64), 99.5)))
    assert fp["foreground_fraction"] == pytest.approx(float(labels.mean()))
    with pytest.raises(UserError, match="1 image volumes but 2 label volumes"):
        fingerprint([str(tmp_path / "a.zarr")], [str(tmp_path / "l.zarr")] * 2)


def _fp(shape, spacing):
    return {"images": ["a.zarr"], "labels": ["l.zarr"], "shapes": [list(shape)], "voxel_sizes": [list(spacing)],
            "intensity": {}}


def _linear_memory(fixed, per_voxel):
    """A stand-in for XLA: memory = fixed + batch * patch voxels * per_voxel (bytes)."""
    return lambda config, batch: int(fixed + batch * math.prod(config.data.crop_shape) * per_voxel)


def test_plan_shrinks_the_patch_along_its_longest_axis_and_fills_the_budget_with_batch():
    fp = _fp((200, 4000, 4000), (40.0, 4.0, 4.0))
    measure = _linear_memory(0.5 * GIB, 2000.0)
    p = plan(fp, 3, 4.0, measure=measure, progress=lambda _: None)
    patch = p["crop_shape"]
    assert measure(_Cfg(patch), 2) <= 4 * GIB
    # Physically balanced: z (40 nm) has about a tenth of the in-plane voxel count.
    assert patch[1] == patch[2] and 0.5 < patch[0] * 40 / (patch[1] * 4) < 2
    divisor = [math.prod(f[a] for f in p["pool_factors"]) for a in range(3)]
    assert all(s % d == 0 for s, d in zip(patch, divisor))
    batch = p["batch_size"]
    assert 2 <= batch <= 8
    assert batch == 8 or measure(_Cfg(patch), batch + 1) > 4 * GIB  # the largest batch that fits
    assert measure(_Cfg(patch), batch) <= 4 * GIB


class _Cfg:
    def __init__(self, patch):
        self.data = type("D", (), {"crop_shape": tuple(patch)})


def test_plan_refuses_a_budget_nothing_fits_and_tiny_volumes():
    with pytest.raises(UserError, match="even the smallest patch needs"):
        plan(_fp((50, 512, 512), (40.0, 4.0, 4.0)), 3, 0.1, measure=_linear_memory(GIB, 1.0), progress=lambda _: None)
    with pytest.raises(UserError, match="too small to plan"):
        plan(_fp((3, 512, 512), (40.0, 4.0, 4.0)), 3, 8.0, measure=_linear_memory(0, 1.0), progress=lambda _: None)


def test_plan_with_xla_measured_memory_fits_the_budget(tmp_path):
    """Real compiles of a small 2D U-Net: the planned step's measured memory is within the budget
    (and a larger batch would not be)."""
    image = np.random.default_rng(1).normal(size=(2, 256, 256)).astype(np.float32)
    fp = fingerprint([_volume(tmp_path / "a.zarr", image)], [_volume(tmp_path / "l.zarr", (image > 0).astype(np.uint32))])
    fp["shapes"] = [[2, 256, 256 * 64]]  # lift the 5 %-of-the-data batch cap for this check
    budget = 0.04  # 256x256 at batch 2 needs about 0.05 GiB here
    p = plan(fp, 2, budget, base_width=4, max_levels=3, start_size=256, progress=lambda _: None)
    assert p["measured_step_gib"] <= budget
    assert p["crop_shape"][0] < 256  # it had to shrink: 256x256 at batch 2 needs more
    from jaxem.plan.planner import _config
    config = _config(fp, 2, p["crop_shape"], p["pool_factors"], p["kernel_sizes"], p["widths"], p["batch_size"], "boundary")
    if p["batch_size"] < 32:
        assert measure_step_memory(config, p["batch_size"] + 1) > budget * GIB


@pytest.mark.slow
def test_cli_plan_writes_a_config_that_trains(tmp_path, capsys):
    image = np.random.default_rng(2).normal(size=(8, 96, 96)).astype(np.float32)
    images = _volume(tmp_path / "a.zarr", image)
    labels = _volume(tmp_path / "l.zarr", (np.arange(96)[None, None, :] // 12 % 2 * np.ones_like(image)).astype(np.uint32))
    out = tmp_path / "planned.py"
    args = ["plan", "--images", images, "--labels", labels, "--ndim", "3", "--memory-gib", "0.25",
            "--base-width", "4", "--max-levels", "3", "--output", str(out)]
    assert main(args) == 0
    assert f"jaxem train --config {out}" in capsys.readouterr().out
    config = load_config(str(out))
    assert config.model.kernel_sizes[0] == (1, 3, 3) and config.model.pool_factors[0] == (1, 2, 2)
    assert config.data.train_images == (images,)
    config = apply_overrides(config, ["--config.train.steps=2", "--config.train.eval_every=0",
                                      "--config.train.checkpoint_every=2", "--config.train.num_devices=1"])
    from jaxem.train.trainer import train
    assert train(config, tmp_path / "run", progress=False)["final_step"] == 2

    before = out.read_text()
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # not overwritten
    assert out.read_text() == before
    assert main([*args[:-1], str(tmp_path / "x.py"), "--memory-gib", "0.0001"]) == 2
    assert "even the smallest patch needs" in capsys.readouterr().err
    assert main(["plan", "--images", str(tmp_path / "missing.zarr"), "--memory-gib", "1", "--output", str(tmp_path / "y.py")]) == 2
    assert "missing.zarr" in capsys.readouterr().err
