"""The nnU-Net-style planner: topology from spacing, fingerprint, memory-fitted patch and batch, the
decisions (dimensionality, normalisation, augmentation, segmentation) and the written config, CLI."""

import math
import re

import numpy as np
import pytest

from jaxem.cli import main
from jaxem.config import apply_overrides, load_config
from jaxem.data.volume import create_volume
from jaxem.errors import UserError
from jaxem.plan.decisions import HEAVY_TAIL_RATIO, follow_up, object_extents
from jaxem.plan.planner import (GIB, fingerprint, measure_step_memory, plan, planned_config, step_memory, topology,
                                write_config)


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
    assert fp["intensity"]["p25"] == pytest.approx(float(np.percentile(image.astype(np.float64), 25)))
    ids = _blocks((4, 32, 48), 2, 8).astype(np.float64)  # whole-number float ids are read as ids
    assert object_extents([_volume(tmp_path / "f.zarr", ids)]) == {"count": 2 * 4 * 6, "z_sections": 2.0, "yx_voxels": 8.0}
    with pytest.raises(UserError, match="1 image volumes but 2 label volumes"):
        fingerprint([str(tmp_path / "a.zarr")], [str(tmp_path / "l.zarr")] * 2)


GAUSSIAN = {"mean": 0.0, "std": 1.0, "p00_5": -2.58, "p25": -0.674, "p50": 0.0, "p75": 0.674, "p99_5": 2.58}


def _fp(shape, spacing, objects=None):
    fp = {"images": ["a.zarr"], "labels": ["l.zarr"], "shapes": [list(shape)], "voxel_sizes": [list(spacing)],
          "intensity": GAUSSIAN}
    return dict(fp, objects=objects) if objects else fp


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
    if p["batch_size"] < 32:
        assert measure_step_memory(planned_config(p), p["batch_size"] + 1) > budget * GIB


def test_measured_memory_is_that_of_the_real_state():
    """The planner lowers the step with an abstract state (shapes only, nothing initialised): the
    same tree of shapes and dtypes as the initialised state, and the same measured bytes."""
    import jax

    from jaxem.train import parallel
    from jaxem.train.trainer import build_training

    config = load_config("demo:tiny")
    mesh = parallel.make_mesh(1)
    _, real, step, _ = build_training(config, mesh)
    _, abstract, _, _ = build_training(config, mesh, abstract=True)
    shapes = lambda tree: jax.tree.leaves(jax.tree.map(lambda x: (x.shape, x.dtype), tree))  # noqa: E731
    assert shapes(abstract) == shapes(real)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert measure_step_memory(config, 2) == step_memory(step, real, config.data.crop_shape, 2, mesh) > 0


@pytest.mark.slow
def test_cli_plan_writes_a_config_that_trains(tmp_path, capsys):
    image = np.random.default_rng(2).normal(size=(8, 96, 96)).astype(np.float32)
    images = _volume(tmp_path / "a.zarr", image)
    labels = _volume(tmp_path / "l.zarr", (np.arange(96)[None, None, :] // 12 % 2 * np.ones_like(image)).astype(np.uint32))
    out = tmp_path / "planned.py"
    args = ["plan", "--images", images, "--labels", labels, "--val-images", images, "--val-labels", labels,
            "--tune-after-training", "--memory-gib", "0.25", "--base-width", "4", "--max-levels", "3", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"jaxem train --config {out}" in printed and f"jaxem tune --input runs/planned/val_prediction.zarr --labels {labels}" in printed
    config = load_config(str(out))  # the planner's choices: anisotropic 3D, z-score, watershed to be tuned
    assert config.model.kernel_sizes[0] == (1, 3, 3) and config.model.pool_factors[0] == (1, 2, 2)
    assert config.data.normalize == "meanstd" and config.segment.method == "watershed" and config.segment.tune
    assert "# Dimensionality: objects span a median 8 sections (>= 3); anisotropy 10.0" in out.read_text()
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


def _blocks(shape, side_z, side_yx):
    """Instance ids: boxes of side_z sections x side_yx voxels tiling `shape` (z, y, x)."""
    z, y, x = np.indices(shape)
    return (1 + z // side_z * 10_000 + y // side_yx * 100 + x // side_yx).astype(np.uint32)


def _planned(tmp_path, image, labels, voxel_size, **kwargs):
    """Fingerprint of volumes written by jaxem's writer, planned with a linear stand-in for XLA."""
    fp = fingerprint([_volume(tmp_path / "a.zarr", image, voxel_size)],
                     [_volume(tmp_path / "l.zarr", labels, voxel_size)])
    return plan(fp, kwargs.pop("ndim", None), 1.0, measure=_linear_memory(0, 100.0), progress=lambda _: None, **kwargs)


def _noise(shape, seed=0):
    return np.random.default_rng(seed).normal(128, 10, shape).astype(np.float32)


def test_isotropic_fib_sem_gets_an_isotropic_3d_unet_with_3d_augmentation(tmp_path):
    p = _planned(tmp_path, _noise((48, 48, 48)), _blocks((48, 48, 48), 12, 12), (8.0, 8.0, 8.0))
    assert p["dimensionality"] == "isotropic_3d" and p["ndim"] == 3 and p["anisotropy"] == 1.0
    assert all(k == [3, 3, 3] for k in p["kernel_sizes"]) and all(f == [2, 2, 2] for f in p["pool_factors"])
    assert "anisotropy 1.0 (spacing 8 x 8 x 8 nm) < 3" in p["decisions"]["dimensionality"]["why"]
    config = planned_config(p)
    assert config.augment.isotropic and p["crop_shape"] == [48, 48, 48] and config.augment.transpose.p > 0


def test_serial_section_em_gets_an_anisotropic_3d_unet_with_in_plane_first_levels(tmp_path):
    p = _planned(tmp_path, _noise((16, 64, 64)), _blocks((16, 64, 64), 8, 16), (40.0, 4.0, 4.0))
    assert p["dimensionality"] == "anisotropic_3d" and p["anisotropy"] == 10.0
    assert p["kernel_sizes"][:3] == [[1, 3, 3]] * 3 and p["pool_factors"][:3] == [[1, 2, 2]] * 3
    assert p["kernel_sizes"][3] == [3, 3, 3]  # in-plane 32 nm is within 2x of z's 40 nm
    assert "anisotropy 10.0 (spacing 40 x 4 x 4 nm) >= 3" in p["decisions"]["dimensionality"]["why"]
    assert "kernels (1, 3, 3) at levels 0-2" in p["decisions"]["topology"]["why"]
    assert not planned_config(p).augment.isotropic


def test_single_sections_shallow_stacks_and_per_section_labels_get_a_2d_unet(tmp_path):
    image = _noise((1, 96, 96))[0]
    p = _planned(tmp_path / "yx", image, _blocks((1, 96, 96), 1, 16)[0], (4.0, 4.0))  # a (y, x) volume
    assert p["dimensionality"] == "2d" and p["ndim"] == 2 and len(p["crop_shape"]) == 2
    assert "a single section" in p["decisions"]["dimensionality"]["why"]
    p = _planned(tmp_path / "shallow", _noise((4, 96, 96)), _blocks((4, 96, 96), 4, 16), (40.0, 4.0, 4.0))
    assert p["ndim"] == 2 and "4 sections, fewer than the 8" in p["decisions"]["dimensionality"]["why"]
    # ids drawn section by section: every object spans 1 section -> 2D, segmented section by section
    p = _planned(tmp_path / "drawn", _noise((16, 96, 96)), _blocks((16, 96, 96), 1, 16), (40.0, 4.0, 4.0))
    assert p["ndim"] == 2 and "objects span a median 1 sections" in p["decisions"]["dimensionality"]["why"]
    assert p["fingerprint"]["objects"]["z_sections"] == 1.0 and p["segment"]["per_slice"] is True
    # --ndim overrides the rule, and says so
    p = _planned(tmp_path / "forced", _noise((16, 96, 96)), _blocks((16, 96, 96), 1, 16), (40.0, 4.0, 4.0), ndim=3)
    assert p["dimensionality"] == "anisotropic_3d" and "--ndim 3" in p["decisions"]["dimensionality"]["why"]


def test_heavy_tailed_intensities_get_percentile_scaling_and_gaussian_ones_a_z_score(tmp_path):
    from jaxem.data.sampling import normalize_stats
    from jaxem.data.volume import open_volume

    image = _noise((16, 64, 64), seed=3)
    hot = np.random.default_rng(4).random(image.shape) < 0.003
    p = _planned(tmp_path / "clean", image, _blocks(image.shape, 8, 16), (40.0, 4.0, 4.0))
    assert planned_config(p).data.normalize == "meanstd"
    assert p["decisions"]["normalisation"]["why"].startswith("well-behaved intensities: std / bulk std 0.99 <= 1.5")

    spiky = np.where(hot, 10_000.0, image).astype(np.float32)  # detector spikes: 0.3 % of voxels
    p = _planned(tmp_path / "spiky", spiky, _blocks(image.shape, 8, 16), (40.0, 4.0, 4.0))
    config, intensity = planned_config(p), p["fingerprint"]["intensity"]
    assert intensity["std"] / ((intensity["p75"] - intensity["p25"]) / 1.349) > HEAVY_TAIL_RATIO
    assert config.data.normalize == "percentile" and tuple(config.data.percentiles) == (0.5, 99.5)
    lo, hi = np.percentile(spiky.astype(np.float64), [0.5, 99.5])
    assert f"p0.5 {lo:.4g}, p99.5 {hi:.4g}" in p["decisions"]["normalisation"]["why"]
    # the pipeline maps those percentiles to -1 and +1: the spikes do not set the scale
    a, b = normalize_stats(open_volume(str(tmp_path / "spiky" / "a.zarr")), config.data.normalize, (0.5, 99.5))
    assert (lo - a) / b == pytest.approx(-1, abs=1e-6) and (hi - a) / b == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("target, kind, method, channel", [
    ("boundary", "boundary", "watershed", 0), ("affinities", "affinities", "mws", 0),
    ("foreground", "foreground", "cc", 0), ("multiclass", "foreground", "cc", 1)])
def test_the_segmentation_section_and_commands_follow_the_target(target, kind, method, channel):
    from jaxem.segment.setting import SETTING_KEYS, SegmentSetting

    p = plan(_fp((32, 256, 256), (40.0, 4.0, 4.0)), None, 1.0, target=target, measure=_linear_memory(0, 1.0),
             progress=lambda _: None)
    segment = p["segment"]
    assert (segment["kind"], segment["method"], segment["channel"], segment["tune"]) == (kind, method, channel, False)
    assert SegmentSetting.from_dict({k: segment[k] for k in SETTING_KEYS if k in segment}).h == 8.0  # 2 x 4 nm
    *_, command = follow_up("c.py", segment, (), ())
    assert f"--kind {kind}" in command and f"--method {method}" in command
    assert ("--channel 1" in command) == (channel == 1)


def test_tuning_after_training_needs_a_validation_split_and_plans_jaxem_tune():
    with pytest.raises(UserError, match="--tune-after-training needs --val-images and --val-labels"):
        plan(_fp((32, 256, 256), (40.0, 4.0, 4.0)), None, 1.0, tune=True, measure=_linear_memory(0, 1.0))
    with pytest.raises(UserError, match="--target 'membranes' is not one of"):
        plan(_fp((32, 256, 256), (40.0, 4.0, 4.0)), None, 1.0, target="membranes", measure=_linear_memory(0, 1.0))
    p = plan(_fp((32, 256, 256), (40.0, 4.0, 4.0)), None, 1.0, tune=True, val_images=["v.zarr"],
             val_labels=["vl.zarr"], measure=_linear_memory(0, 1.0), progress=lambda _: None)
    train, predict_val, tune, predict, segment = follow_up("c.py", p["segment"], ["v.zarr"], ["vl.zarr"])
    assert train == "jaxem train --config c.py --workdir runs/planned"
    assert predict_val.endswith("--input v.zarr --output runs/planned/val_prediction.zarr")
    assert tune.startswith("jaxem tune --input runs/planned/val_prediction.zarr --labels vl.zarr "
                           "--output runs/planned/segment_params.json --kind boundary")
    assert segment.endswith("--params runs/planned/segment_params.json")


def test_the_written_config_loads_and_explains_each_decision(tmp_path):
    p = _planned(tmp_path, _noise((16, 64, 64)), _blocks((16, 64, 64), 8, 16), (40.0, 4.0, 4.0),
                 val_images=["v.zarr"], val_labels=["vl.zarr"], tune=True)
    path = write_config(p, tmp_path / "planned.py")
    raw = path.read_text()
    assert all(f"    # {name[0].upper()}{name[1:]}: " in raw for name in p["decisions"])  # a comment per decision
    text = re.sub(r"\n +# ", " ", raw)  # comments unwrapped
    for line in ("Dimensionality: objects span a median 8 sections (>= 3); anisotropy 10.0 (spacing 40 x 4 x 4 nm) "
                 ">= 3 (nnU-Net's threshold): anisotropic 3D U-Net.",
                 "Normalisation: well-behaved intensities", "Topology: 5 levels", "Patch and batch: crop (",
                 "Augmentation: voxels not isotropic", "Segmentation: boundary predictions -> seeded watershed",
                 "    jaxem tune --input runs/planned/val_prediction.zarr --labels vl.zarr"):
        assert line in text, line
    config = load_config(str(path))
    assert config.to_dict() == planned_config(p).to_dict() | {"train": config.train.to_dict()}
    assert config.segment.method == "watershed" and config.segment.tune and config.data.val_labels == ("vl.zarr",)
    assert config.model.kernel_sizes[0] == (1, 3, 3) and config.data.normalize == "meanstd"
