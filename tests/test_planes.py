"""Orthoplane consensus (`jaxem predict --planes xy,xz,yz`): a 2D model over the three section
orientations of a 3D volume, combined inside the device window (jaxem/infer/planes.py)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import one_error_line, write_zarr

from jaxem.cli import main
from jaxem.data.volume import create_volume, open_volume, read_attributes
from jaxem.errors import UserError
from jaxem.infer import job
from jaxem.infer.device import predict_volume
from jaxem.infer.output import create_output
from jaxem.infer.planes import check_planes, parse_planes, planes_forward, warn_if_anisotropic
from jaxem.infer.tiling import make_tiling
from jaxem.metrics.pixel import average_precision


def image_fn(xp, x):
    """A deterministic 2D 'model' (N, H, W, 1) -> (N, H, W, 1) in (0, 1) that tells rows from
    columns (so a plane read the wrong way round shows): zero-padded neighbours, radius 1."""
    pad = xp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return 1 / (1 + xp.exp(-(x + 0.5 * pad[:, :-2, 1:-1] - 0.25 * pad[:, 1:-1, 2:] + 0.1 * pad[:, 2:, 2:] - 0.3)))


def reference(volume, planes):
    """Per plane, `image_fn` on each section cut out by hand, put back: (P, z, y, x) for a (z, y, x) volume."""
    f = lambda image: image_fn(np, image[None, ..., None])[0, ..., 0]  # noqa: E731
    out = []
    for plane in planes:
        p = np.zeros_like(volume)
        for i in range(volume.shape[{"xy": 0, "xz": 1, "yz": 2}[plane]]):
            if plane == "xy":
                p[i] = f(volume[i])
            elif plane == "xz":
                p[:, i, :] = f(volume[:, i, :])
            else:
                p[:, :, i] = f(volume[:, :, i])
        out.append(p)
    return np.stack(out)


def test_planes_forward_equals_sections_cut_by_hand():
    """Every reduction of every plane set equals numpy on hand-cut sections (non-cubic tiles, 2 per batch)."""
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(2, 6, 8, 10, 1)).astype(np.float32)
    for planes in (("xy",), ("xz",), ("yz",), ("xy", "xz", "yz"), ("yz", "xy")):
        refs = np.stack([reference(t[..., 0], planes) for t in tiles])  # (B, P, z, y, x)
        expected = {"mean": refs.mean(1), "median": np.median(refs, 1),
                    "majority": np.where((refs > 0.5).mean(1) > 0.5, 1.0, np.where((refs > 0.5).mean(1) == 0.5, 0.5, 0.0))}
        for reduce in ("mean", "median", "majority") if len(planes) > 1 else ("mean",):
            got = np.asarray(planes_forward(lambda x: image_fn(jnp, x), tiles.shape[1:4], planes, reduce)(tiles))
            assert got.shape == tiles.shape
            np.testing.assert_allclose(got[..., 0], expected[reduce], atol=1e-6, err_msg=f"{planes} {reduce}")


def test_planes_tta_on_non_square_sections():
    """TTA per plane flips and turns each plane's own sections (8x10, 6x10, 6x8 here): a pointwise
    'model' is unchanged by it."""
    pointwise = lambda x: jnp.tanh(x) ** 2  # noqa: E731
    tiles = np.random.default_rng(1).normal(size=(1, 6, 8, 10, 1)).astype(np.float32)
    plain = planes_forward(pointwise, (6, 8, 10), ("xy", "xz", "yz"))(tiles)
    np.testing.assert_allclose(planes_forward(pointwise, (6, 8, 10), ("xy", "xz", "yz"), tta=True)(tiles), plain, atol=1e-6)


def test_blockwise_planes_equal_the_whole_volume(tmp_path):
    """Blocks of 3D tiles with center blending and halo >= the 2D radius give what the planes of
    the whole volume give (several blocks, tiles shifted inside the volume at its edges)."""
    volume = np.random.default_rng(2).normal(size=(13, 18, 21)).astype(np.float32)
    src = create_volume(tmp_path / "in", volume.shape, volume.dtype, (1.0,) * 3)
    src.write(volume)
    tiling = make_tiling(volume.shape, None, (8, 8, 8), (2, 2, 2), (4, 4, 8), "center")
    out, _ = create_output(str(tmp_path / "out"), (1, *volume.shape), np.float32, (1.0,) * 3, (1, *tiling.chunk),
                           ("c", "z", "y", "x"), (0, 0, 0), {"t": 1}, True)
    forward = planes_forward(lambda x: image_fn(jnp, x), tiling.block, ("xy", "xz", "yz"), "median")
    stats = predict_volume(forward, src, out, tiling, 3, budget=40_000)
    assert stats["blocks"] > 1
    np.testing.assert_allclose(out.read()[0], np.median(reference(volume, ("xy", "xz", "yz")), 0), atol=1e-6)


def test_parse_and_check_planes(capsys):
    assert parse_planes(None) == parse_planes("xy") == ("xy",)
    assert parse_planes("xy, xz,yz") == ("xy", "xz", "yz")
    for bad in ("xy,zz", "xy,xy", "xy,"):
        with pytest.raises(UserError, match="--planes"):
            parse_planes(bad)
    three = ("xy", "xz", "yz")
    check_planes(three, "majority", 2, 3, "foreground")
    for args, words in (((three, "mean", 3, 3, "boundary"), "3D"), ((three, "mean", 2, 2, "boundary"), "(z, y, x)"),
                        ((three, "mean", 2, 3, "affinities"), "affinities"), ((three, "vote", 2, 3, "boundary"), "vote"),
                        ((("xz",), "median", 2, 3, "boundary"), "one"), ((("xy",), "median", 2, 3, "boundary"), "xy alone")):
        with pytest.raises(UserError, match=words):
            check_planes(*args)
    assert warn_if_anisotropic(three, (8.0, 8.0, 8.0)) == 1.0 and capsys.readouterr().err == ""
    assert warn_if_anisotropic(three, (40.0, 4.0, 4.0)) == 10.0 and "anisotropy 10.0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real 2D model

@pytest.fixture(scope="module")
def iso_run(tmp_path_factory):
    """A 2D U-Net (widths 8, 16) trained 60 steps on xy sections of an isotropic synthetic volume
    (8 nm voxels, round cells: elongation 1), and a 32^3 isotropic test volume (~25 s on 2 cores)."""
    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.config import apply_overrides, load_config
    from jaxem.train.trainer import train

    work = tmp_path_factory.mktemp("iso")
    config = apply_overrides(load_config("demo:tiny"), [
        "--config.demo.voxel_size=(8.0,8.0,8.0)", "--config.demo.train_shape=(16,64,64)",
        "--config.demo.val_shape=(2,64,64)", "--config.demo.test_shape=(32,32,32)", "--config.model.widths=(8,16)",
        "--config.train.steps=60", "--config.train.checkpoint_every=60", "--config.train.eval_every=60",
        "--config.train.log_every=10", "--config.optimizer.warmup_steps=5"])
    paths = write_synthetic_data(config, work / "data", elongation=1.0, mitochondria=False, cell_diameter=(150.0, 300.0))
    train(with_data_paths(config, paths), work, progress=False)
    return work


def predict(*args) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def scores(prediction, instances) -> dict:
    """Foreground Dice of (boundary < 0.5) and membrane average precision against the ground truth."""
    membrane, foreground = instances == 0, prediction < 0.5
    dice = 2 * (foreground & ~membrane).sum() / (foreground.sum() + (~membrane).sum())
    return {"dice": round(float(dice), 4), "ap": round(float(average_precision(prediction, membrane)), 4)}


@pytest.mark.slow
def test_consensus_scores_at_least_as_well_as_xy(iso_run, tmp_path, capsys):
    raw = iso_run / "data" / "test_raw.zarr"
    gt = open_volume(iso_run / "data" / "test_instances.zarr").read()
    measured = {}
    for planes in ("xy", "xy,xz,yz"):
        out = tmp_path / f"{planes.replace(',', '_')}.zarr"
        assert predict("--run", iso_run, "--input", raw, "--output", out, "--planes", planes) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["chunks"] >= 1
        measured[planes] = scores(open_volume(out).read()[0], gt)
    print(measured)
    assert measured["xy,xz,yz"]["dice"] >= measured["xy"]["dice"]
    assert measured["xy,xz,yz"]["ap"] >= measured["xy"]["ap"]
    job_attrs = read_attributes(tmp_path / "xy_xz_yz.zarr")["jaxem_job"]
    assert job_attrs["planes"] == ["xy", "xz", "yz"] and job_attrs["planes_reduce"] == "mean"
    assert job_attrs["block"] == [32, 32, 32] and "planes" not in read_attributes(tmp_path / "xy.zarr")["jaxem_job"]


@pytest.mark.slow
def test_partial_run_then_rerun_equals_one_run(iso_run, tmp_path, capsys, monkeypatch):
    """Half the blocks (a block filter, as a killed run leaves it), then the same command: resumed,
    byte for byte one uninterrupted run; other planes on that output are refused."""
    args = ["--run", iso_run, "--input", iso_run / "data" / "test_raw.zarr", "--planes", "xy,xz,yz", "--dtype", "uint8",
            "--config.predict.block_shape=(16,16)", "--config.predict.halo=(4,4)", "--config.predict.chunk_shape=(16,16)",
            "--config.predict.block_gib=0.0001"]
    last = lambda: json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # noqa: E731
    assert predict(*args, "--output", tmp_path / "whole.zarr") == 0
    whole = last()
    assert whole["blocks"] == whole["chunks"] == 8
    with monkeypatch.context() as m:
        m.setattr(job, "block_filter", lambda: lambda rank, blocks: rank % 2 == 0)
        assert predict(*args, "--output", tmp_path / "part.zarr") == 0
    assert last()["chunks"] == 4
    assert predict(*args, "--output", tmp_path / "part.zarr") == 0
    stats = last()
    assert stats["resumed"] and stats["chunks"] == 4
    np.testing.assert_array_equal(open_volume(tmp_path / "part.zarr").read(), open_volume(tmp_path / "whole.zarr").read())
    other = [a if a != "xy,xz,yz" else "xy,xz" for a in args]
    assert predict(*other, "--output", tmp_path / "part.zarr") == 2
    assert "different job" in one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown plane", "2D input", "tile", "reduce"])
def test_bad_planes_exit_2_and_write_nothing(iso_run, tmp_path, capsys, case):
    raw = open_volume(iso_run / "data" / "test_raw.zarr").read()
    inputs = {"unknown plane": raw, "2D input": raw[0], "tile": raw[:17], "reduce": raw}
    write_zarr(tmp_path / "in.zarr", inputs[case], voxel_size=(8.0,) * inputs[case].ndim)
    planes = {"unknown plane": ("--planes", "xy,xw")}.get(case, ("--planes", "xy,xz,yz"))
    extra = ("--planes-reduce", "vote") if case == "reduce" else ()
    assert predict("--run", iso_run, "--input", tmp_path / "in.zarr", "--output", tmp_path / "out.zarr", *planes, *extra) == 2
    words = {"unknown plane": "'xy,xw'", "2D input": "(z, y, x)", "tile": "17x32x32", "reduce": "'vote'"}[case]
    line = one_error_line(capsys)
    assert words in line and "--planes" in line, line
    assert not (tmp_path / "out.zarr").exists()
