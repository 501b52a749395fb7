"""`jaxem segment` end to end: cc / watershed / mws, blockwise, bad input -> exit 2."""

import json

import numpy as np

from conftest import grid_boundaries
from jaxem.cli import main
from jaxem.data.volume import create_volume, open_volume
from jaxem.segment.instances import mutex_watershed


def test_segment_cc_and_watershed_blockwise(tmp_path):
    pred = grid_boundaries((17, 33, 33), 8)[None]  # (c, z, y, x) as written by jaxem predict
    create_volume(tmp_path / "pred", pred.shape, np.float32, (1.0, 1.0, 1.0), axes=("c", "z", "y", "x")).write(pred)
    for method in ("cc", "watershed"):
        out = tmp_path / method
        rc = main(["segment", "--input", str(tmp_path / "pred"), "--output", str(out), "--method", method, "--block", "8,16,16"])
        assert rc == 0
        assert open_volume(out).read().max() == 32
    rc = main(["segment", "--input", str(tmp_path / "pred"), "--output", str(tmp_path / "cc"), "--method", "cc"])
    assert rc == 2  # exists, no --overwrite


def test_segment_mws_on_affinities(tmp_path):
    gt = np.zeros((24, 24), int)
    gt[:, 12:] = 1
    gt[8:16, 3:8] = 2
    offsets = [(1, 0), (0, 1), (-3, 0), (0, -3)]
    aff = np.stack([(np.roll(gt, (-o[0], -o[1]), (0, 1)) == gt) for o in offsets]).astype(np.float32)
    labels = mutex_watershed(aff, offsets)
    assert labels.max() == 3
    create_volume(tmp_path / "aff", aff.shape, np.float32, (1.0, 1.0), axes=("c", "y", "x")).write(aff)
    rc = main(["segment", "--input", str(tmp_path / "aff"), "--output", str(tmp_path / "m"), "--method", "mws",
               "--offsets", json.dumps(offsets)])
    assert rc == 0 and open_volume(tmp_path / "m").read().max() == 3


def test_segment_bad_input_is_exit_2(tmp_path, capsys):
    assert main(["segment", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_segment_mws_strides_and_bad_offsets(tmp_path, capsys):
    """--strides subsamples the repulsive edges as mutex_watershed(strides=...) does; malformed
    --offsets / --strides are one-sentence errors with exit code 2 and no output written."""
    rng = np.random.default_rng(0)
    offsets = [(1, 0), (0, 1), (0, 4), (4, 0)]
    aff = rng.uniform(size=(4, 32, 32)).astype(np.float32)
    create_volume(tmp_path / "aff", aff.shape, np.float32, (1.0, 1.0), axes=("c", "y", "x")).write(aff)
    base = ["segment", "--input", str(tmp_path / "aff"), "--method", "mws", "--offsets", json.dumps(offsets)]
    assert main(base + ["--output", str(tmp_path / "s"), "--strides", "2,2"]) == 0
    expected = mutex_watershed(aff, offsets, strides=(2, 2))
    assert open_volume(tmp_path / "s").read().max() == expected.max() != mutex_watershed(aff, offsets).max()
    for bad, message in [(["--offsets", "[[1,0],"], "is not JSON"), (["--offsets", '[[1,0],"x"]'], "integer lists"),
                         (["--strides", "2,x"], "--strides '2,x' must be integers"), (["--strides", "2"], "2 positive values")]:
        args = base + ["--output", str(tmp_path / "bad")] + bad
        assert main(args) == 2, bad
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_mws_takes_the_offsets_jaxem_predict_recorded(tmp_path, capsys):
    """A 2D affinity model's offsets, recorded by predict in the volume's axes, are what
    `jaxem segment --method mws` uses when no --offsets are given."""
    from jaxem.config import load_config
    from jaxem.data.volume import write_attributes
    from jaxem.infer.job import target_description

    config = load_config("demo")
    config.target.kind, config.target.offsets, config.model.out_channels = "affinities", ((-1, 0), (0, -1), (0, -4)), 3
    described = target_description(config, volume_ndim=3)
    assert described == {"kind": "affinities", "channels": 3, "offsets": [[0, -1, 0], [0, 0, -1], [0, 0, -4]]}

    rng = np.random.default_rng(1)
    aff = rng.uniform(size=(3, 2, 16, 16)).astype(np.float32)
    create_volume(tmp_path / "aff", aff.shape, np.float32, (40.0, 4.0, 4.0), axes=("c", "z", "y", "x")).write(aff)
    rc = main(["segment", "--input", str(tmp_path / "aff"), "--output", str(tmp_path / "none"), "--method", "mws"])
    assert rc == 2 and "records none" in capsys.readouterr().err
    write_attributes(tmp_path / "aff", {"jaxem_target": described})
    assert main(["segment", "--input", str(tmp_path / "aff"), "--output", str(tmp_path / "m"), "--method", "mws"]) == 0
    expected, got = mutex_watershed(aff, described["offsets"]), open_volume(tmp_path / "m").read()
    pairs = np.unique(np.stack([got.ravel(), expected.ravel()]), axis=1)
    assert got.max() == expected.max() == pairs.shape[1] > 1  # the same partition


def test_segment_agglomerate_blockwise_and_bad_merge(tmp_path, capsys):
    """Cells split in two by a faint crack: the over-seeded watershed keeps both halves, and
    `--method agglomerate` joins them, across block borders too; --merge outside [0, 1] is exit 2."""
    from test_agglomerate import split_cells_case

    prob, _ = split_cells_case()
    pred = np.stack([prob] * 6)[None]
    create_volume(tmp_path / "pred", pred.shape, np.float32, (40.0, 4.0, 4.0), axes=("c", "z", "y", "x")).write(pred)
    base = ["segment", "--input", str(tmp_path / "pred"), "--threshold", "0.2", "--seeds", "threshold", "--block", "6,24,24"]
    assert main(base + ["--output", str(tmp_path / "ws"), "--method", "watershed"]) == 0
    assert open_volume(tmp_path / "ws").read().max() == 32
    assert main(base + ["--output", str(tmp_path / "agg"), "--method", "agglomerate", "--merge", "0.5"]) == 0
    assert open_volume(tmp_path / "agg").read().max() == 16
    assert main(base + ["--output", str(tmp_path / "bad"), "--method", "agglomerate", "--merge", "1.5"]) == 2
    assert "--merge 1.5 must lie in [0, 1]" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_segment_shows_progress_bars_unless_told_not_to(tmp_path, capsys):
    """Each blockwise stage has its bar on stderr (segment blocks, match faces, relabel blocks);
    --no-progress hides them."""
    pred = grid_boundaries((17, 33, 33), 8)[None]
    create_volume(tmp_path / "pred", pred.shape, np.float32, (1.0, 1.0, 1.0), axes=("c", "z", "y", "x")).write(pred)
    base = ["segment", "--input", str(tmp_path / "pred"), "--method", "watershed", "--block", "8,16,16"]
    assert main(base + ["--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    for stage, tasks in (("segment blocks", 27), ("match faces", 54), ("relabel blocks", 27)):  # 3x3x3 blocks
        assert f"{stage}: 100%" in err and f"{tasks}/{tasks}" in err, err
    assert main(base + ["--output", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "segment blocks" not in capsys.readouterr().err
