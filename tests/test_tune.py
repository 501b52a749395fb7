"""Segmentation settings tuned on labelled predictions (jaxem.segment.tune, `jaxem tune`,
`jaxem segment --params`)."""

import json

import numpy as np
import pytest

from conftest import grid_boundaries
from jaxem.cli import main
from jaxem.data.volume import create_volume, open_volume
from jaxem.errors import UserError
from jaxem.segment import tune as tuning
from jaxem.segment.setting import SegmentSetting, segment_volume


def weak_membrane_case():
    """(boundary map, ground truth) of 2 x 4 x 4 cells, 3 slices of 33 x 33, where the membrane
    between the two left columns of cells reads 0.45: thresholds up to 0.4 keep it, higher ones
    merge those cells."""
    prob = np.stack([grid_boundaries((33, 33), 8)] * 3)
    prob[:, :, 8] = np.where(prob[:, :, 8] > 0, 0.45, 0.0)
    prob[:, :, 8][:, ::8] = 1.0  # the grid's crossings stay strong
    gt = np.zeros(prob.shape, np.uint64)
    cell = 1
    for z in range(3):
        for y in range(4):
            for x in range(4):
                gt[z, 8 * y + 1: 8 * y + 8, 8 * x + 1: 8 * x + 8] = cell
                cell += 1
    return prob, gt


def test_tune_picks_the_threshold_that_keeps_the_weak_membrane():
    prob, gt = weak_membrane_case()
    grid = [{"method": "cc", "threshold": t} for t in (0.3, 0.4, 0.5, 0.6)]
    result = tuning.tune(prob, gt, grid=grid, metric="vrand", per_slice=True, progress=False)
    vrand = [row["scores"]["vrand"] for row in result["table"]]
    assert vrand[0] == pytest.approx(1.0) and vrand[1] == pytest.approx(1.0)
    assert vrand[2] < 0.95 and vrand[3] == pytest.approx(vrand[2])  # the weak membrane is gone: merged cells
    assert result["best"] == {"method": "cc", "threshold": 0.3}  # ties go to the earlier setting
    assert result["best_score"] == pytest.approx(1.0) and result["better"] == "higher"
    # a lower-is-better metric picks the same setting
    assert tuning.tune(prob, gt, grid=grid, metric="voi", per_slice=True, progress=False, workers=1)["best"] == grid[0]


def test_per_slice_scores_are_the_mean_over_slices():
    prob, gt = weak_membrane_case()
    labels = segment_volume(prob, SegmentSetting("cc", threshold=0.6), per_slice=True)
    labels[0] = segment_volume(prob[0], SegmentSetting("cc", threshold=0.3))  # one good slice of three
    per_slice = tuning.score(labels, gt, per_slice=True)
    from jaxem.metrics.clustering import clustering_scores

    expected = np.mean([clustering_scores(labels[z], gt[z])["vrand"] for z in range(3)])
    assert per_slice["vrand"] == pytest.approx(expected)
    assert per_slice["vrand"] != pytest.approx(tuning.score(labels, gt)["vrand"])


def test_default_grids_and_h_in_nm():
    grid = tuning.default_grid("boundary", voxel_size=(50.0, 4.0, 4.0))
    hs = sorted({s["h"] for s in grid if s.get("seeds") == "distance"})
    assert hs == [4.0 * k for k in tuning.H_STEPS]  # multiples of the finest voxel size, in nm
    assert {s["method"] for s in grid} == {"watershed", "cc", "agglomerate"}
    merged = [s for s in grid if s["method"] == "agglomerate"]
    assert sorted({s["merge"] for s in merged}) == list(tuning.MERGES) and {s["h"] for s in merged} == {4.0}
    affinity_grid = tuning.default_grid("affinities")
    assert {s["method"] for s in affinity_grid} == {"mws", "watershed", "agglomerate"}
    assert all("min_size" in s for s in affinity_grid)
    with pytest.raises(UserError, match="kind 'membrane'"):
        tuning.default_grid("membrane")


def test_tune_affinities_with_mws():
    gt = np.zeros((24, 24), np.uint64)
    gt[:, 12:] = 1
    gt[8:16, 3:8] = 2
    gt[gt == 0] = 3
    offsets = [(1, 0), (0, 1), (-3, 0), (0, -3)]
    aff = np.stack([(np.roll(gt, (-o[0], -o[1]), (0, 1)) == gt) for o in offsets]).astype(np.float32)
    grid = [{"method": "mws", "min_size": m} for m in (0, 1000)]
    result = tuning.tune(aff, gt, "affinities", grid=grid, metric="adapted_rand_error", offsets=offsets, progress=False)
    assert result["best"] == grid[0] and result["best_score"] == pytest.approx(0.0, abs=1e-9)
    assert result["table"][1]["scores"]["adapted_rand_error"] > 0.1  # min_size 1000 leaves one object


def test_settings_that_share_fragments_score_as_if_each_were_segmented_alone(monkeypatch):
    """The sweep segments each group of settings that differ only in merge and min_size from one
    computation of their fragments (and one region graph): every row of the default grids is
    still the score of `segment_volume` with that setting alone, on boundary maps per slice,
    foreground maps in 3D and affinities."""
    rng = np.random.default_rng(0)
    prob, gt = weak_membrane_case()
    prob = np.clip(prob + rng.normal(0, 0.15, prob.shape), 0, 1).astype(np.float32)
    aff_gt = np.zeros((24, 24), np.uint64)
    aff_gt[:, 12:], aff_gt[8:16, 3:8] = 1, 2
    aff_gt[aff_gt == 0] = 3
    offsets = [(1, 0), (0, 1), (-3, 0), (0, -3)]
    aff = np.stack([(np.roll(aff_gt, (-o[0], -o[1]), (0, 1)) == aff_gt) for o in offsets]).astype(np.float32)
    aff = np.clip(aff + rng.normal(0, 0.2, aff.shape), 0, 1).astype(np.float32)
    computed = []
    real = tuning.setting_fragments
    monkeypatch.setattr(tuning, "setting_fragments", lambda *a, **k: computed.append(a[1]) or real(*a, **k))
    for prediction, truth, kind, per_slice, extra in ((prob, gt, "boundary", True, {}), (1 - prob, gt, "foreground", False, {}),
                                                      (aff, aff_gt, "affinities", False, {"offsets": offsets})):
        computed.clear()
        result = tuning.tune(prediction, truth, kind, per_slice=per_slice, progress=False, **extra)
        grid = tuning.default_grid(kind)
        assert [row["setting"] for row in result["table"]] == grid
        assert len(computed) == len({tuning.fragment_key(SegmentSetting.from_dict(s)) for s in grid}) < len(grid)
        for row in result["table"]:
            alone = segment_volume(prediction, SegmentSetting.from_dict(row["setting"]), kind, per_slice, **extra)
            scores = tuning.score(alone, truth, per_slice)
            assert row["scores"] == {k: float(scores[k]) for k in tuning.METRICS}, row["setting"]


def test_bad_settings_and_shapes_are_one_sentence():
    prob, gt = weak_membrane_case()
    with pytest.raises(UserError, match="unknown keys"):
        tuning.tune(prob, gt, grid=[{"method": "cc", "thresh": 0.5}], progress=False)
    with pytest.raises(UserError, match="differs from the labels' shape"):
        tuning.tune(prob[:2], gt, progress=False)
    with pytest.raises(UserError, match="not one of"):
        tuning.tune(prob, gt, metric="dice", progress=False)


def test_tune_cli_then_segment_with_params(tmp_path, capsys):
    prob, gt = weak_membrane_case()
    create_volume(tmp_path / "pred", (1, *prob.shape), np.float32, (40.0, 4.0, 4.0), axes=("c", "z", "y", "x")).write(prob[None])
    create_volume(tmp_path / "gt", gt.shape, np.uint64, (40.0, 4.0, 4.0)).write(gt)
    out = tmp_path / "tuned.json"
    args = ["tune", "--input", str(tmp_path / "pred"), "--labels", str(tmp_path / "gt"), "--output", str(out),
            "--per-slice", "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tuned = json.loads(out.read_text())
    assert printed["best"] == tuned["best"] and printed["vrand"] == pytest.approx(1.0)
    assert tuned["per_slice"] and tuned["kind"] == "boundary" and tuned["voxel_size"] == [40.0, 4.0, 4.0]
    assert len(tuned["table"]) == len(tuning.default_grid("boundary", (40.0, 4.0, 4.0)))
    assert (tmp_path / "tuned.png").stat().st_size > 0

    before = out.read_text()
    assert main(args) == 2  # exists, no --overwrite: refused, untouched
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == before

    seg = tmp_path / "seg"
    assert main(["segment", "--input", str(tmp_path / "pred"), "--output", str(seg), "--params", str(out)]) == 0
    expected = segment_volume(prob, SegmentSetting.from_dict(tuned["best"]), per_slice=True, voxel_size=(40.0, 4.0, 4.0))
    labels = open_volume(seg).read()
    assert labels.max() == expected.max() == 3 * 16
    assert tuning.score(labels, gt, per_slice=True)["vrand"] == pytest.approx(1.0)
    # a flag given on the command line wins over the file: threshold 0.6 merges the weak membrane's cells
    merged = tmp_path / "merged"
    assert main(["segment", "--input", str(tmp_path / "pred"), "--output", str(merged), "--params", str(out),
                 "--method", "cc", "--threshold", "0.6"]) == 0
    assert open_volume(merged).read().max() == 3 * 12
    # --no-per-slice overrides the file's per-slice choice: cc in 3D joins each column of cells over z
    whole = tmp_path / "whole"
    assert main(["segment", "--input", str(tmp_path / "pred"), "--output", str(whole), "--params", str(out),
                 "--method", "cc", "--threshold", "0.3", "--no-per-slice"]) == 0
    assert open_volume(whole).read().max() == 16


def test_segment_params_file_errors_name_the_file(tmp_path, capsys):
    prob, _ = weak_membrane_case()
    create_volume(tmp_path / "pred", prob.shape, np.float32, (1.0, 1.0, 1.0)).write(prob)
    bad = tmp_path / "bad.json"
    for text, message in (("{", "is not JSON"), ('{"table": []}', "has no 'best' setting"),
                          ('{"best": {"method": "cc", "sigma": 2}}', "unknown keys")):
        bad.write_text(text)
        assert main(["segment", "--input", str(tmp_path / "pred"), "--output", str(tmp_path / "s"), "--params", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad) in err
    assert not (tmp_path / "s").exists()
    assert main(["segment", "--input", str(tmp_path / "pred"), "--output", str(tmp_path / "s"),
                 "--params", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tune_cli_bad_input_is_exit_2_and_writes_nothing(tmp_path, capsys):
    prob, gt = weak_membrane_case()
    create_volume(tmp_path / "pred", prob.shape, np.float32, (1.0, 1.0, 1.0)).write(prob)
    create_volume(tmp_path / "gt2", gt[:2].shape, np.uint64, (1.0, 1.0, 1.0)).write(gt[:2])
    base = ["tune", "--input", str(tmp_path / "pred"), "--no-progress"]
    cases = ((["--labels", str(tmp_path / "gt2"), "--output", str(tmp_path / "t.json")], "differs from the labels' shape"),
             (["--labels", str(tmp_path / "gt2"), "--output", str(tmp_path / "t.txt")], "must be a .json file"),
             (["--labels", str(tmp_path / "nope"), "--output", str(tmp_path / "t.json")], "does not exist"),
             (["--labels", str(tmp_path / "gt2"), "--output", str(tmp_path / "t.json"), "--methods", "cc,mws"],
              "the boundary grid's methods are agglomerate, cc, watershed"))
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "t.png").exists()


def test_tune_cli_methods_keeps_only_those_settings(tmp_path, capsys):
    prob, gt = weak_membrane_case()
    create_volume(tmp_path / "pred", prob.shape, np.float32, (40.0, 4.0, 4.0)).write(prob)
    create_volume(tmp_path / "gt", gt.shape, np.uint64, (40.0, 4.0, 4.0)).write(gt)
    out = tmp_path / "tuned.json"
    assert main(["tune", "--input", str(tmp_path / "pred"), "--labels", str(tmp_path / "gt"), "--output", str(out),
                 "--per-slice", "--no-progress", "--methods", "cc, agglomerate"]) == 0
    table = json.loads(out.read_text())["table"]
    expected = [s for s in tuning.default_grid("boundary", (40.0, 4.0, 4.0)) if s["method"] in ("cc", "agglomerate")]
    assert [row["setting"] for row in table] == expected


def test_uint8_predictions_read_as_probabilities(tmp_path, capsys):
    """`jaxem predict --dtype uint8` writes rint(255 p): tune and segment (cc, watershed,
    agglomerate) read it as p = v / 255, giving what the float map of those values gives (a uint8
    map read as 0-255 would put every membrane above any threshold)."""
    prob, gt = weak_membrane_case()
    prob = np.clip(prob + np.random.default_rng(0).normal(0, 0.02, prob.shape), 0, 1).astype(np.float32)
    as_uint8 = np.rint(prob * 255).astype(np.uint8)
    quantised = as_uint8.astype(np.float32) / np.float32(255.0)
    for name, array in (("float", quantised), ("uint8", as_uint8)):
        create_volume(tmp_path / name, (1, *prob.shape), array.dtype, (40.0, 4.0, 4.0),
                      axes=("c", "z", "y", "x")).write(array[None])
    create_volume(tmp_path / "gt", gt.shape, np.uint64, (40.0, 4.0, 4.0)).write(gt)
    tuned = {}
    for name in ("float", "uint8"):
        assert main(["tune", "--input", str(tmp_path / name), "--labels", str(tmp_path / "gt"), "--output",
                     str(tmp_path / f"{name}.json"), "--per-slice", "--no-progress"]) == 0
        tuned[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert tuned["uint8"]["table"] == tuned["float"]["table"] and tuned["uint8"]["best_score"] == pytest.approx(1.0)
    capsys.readouterr()
    objects = {}
    for method, merge in (("cc", 0.5), ("watershed", 0.5), ("agglomerate", 0.5), ("agglomerate", 0.0)):
        labels = {}
        for name in ("float", "uint8"):
            out = tmp_path / f"{name}_{method}_{merge}"
            assert main(["segment", "--input", str(tmp_path / name), "--output", str(out), "--method", method,
                         "--threshold", "0.3", "--merge", str(merge), "--per-slice", "--block", "3,16,16",
                         "--no-progress"]) == 0
            labels[name] = open_volume(out).read()
        np.testing.assert_array_equal(labels["uint8"], labels["float"])
        objects[method, merge] = len(np.unique(labels["uint8"][labels["uint8"] > 0]))
    # cc and watershed keep the 0.45 membrane at threshold 0.3: 16 cells per slice; agglomerate at
    # merge 0.5 joins fragments, which merge scores read as 0-255 could never do
    assert objects["cc", 0.5] == objects["watershed", 0.5] == 3 * 16
    assert objects["agglomerate", 0.5] < objects["agglomerate", 0.0]


def test_quantiles_blockwise_and_matching(tmp_path):
    """Quantiles from the block-by-block histogram equal numpy's to the bin width, whatever the
    blocks; matching maps a map's distribution onto another's, keeping the voxels' order."""
    from jaxem.segment import calibration

    rng = np.random.default_rng(1)
    tuned = rng.beta(0.3, 0.6, (3, 40, 40)).astype(np.float32)  # confident: most mass near 0 and 1
    new = (0.2 + 0.5 * rng.random((2, 3, 40, 40))).astype(np.float32)  # 2 channels, less confident
    levels = np.linspace(0, 1, calibration.LEVELS)
    source = calibration.map_quantiles(new, channel_axis=True)
    assert source.shape == (2, calibration.LEVELS)
    width, n = 1.0 / calibration.HISTOGRAM_BINS, new[0].size
    for c in range(2):  # each quantile between the order statistics around its level, to a bin's width
        ordered = np.sort(new[c].ravel())
        below = ordered[np.maximum(np.floor(levels * (n - 1)).astype(int) - 1, 0)] - width
        above = ordered[np.minimum(np.ceil(levels * n).astype(int), n - 1)] + width
        assert np.all((below <= source[c]) & (source[c] <= above))
    volume = create_volume(tmp_path / "q", new.shape, np.float32, (1.0, 1.0, 1.0), axes=("c", "z", "y", "x"))
    volume.write(new)
    blockwise = calibration.volume_quantiles(volume, "all", block_voxels=500, progress=False)
    np.testing.assert_array_equal(blockwise, source)  # the same histogram, however it is read
    np.testing.assert_array_equal(calibration.volume_quantiles(volume, 1, block_voxels=700, progress=False), source[1:])
    target = np.repeat(calibration.map_quantiles(tuned), 2, axis=0)
    matched = calibration.match_quantiles(new, source, target, channel_axis=True)
    for c in range(2):
        np.testing.assert_allclose(np.quantile(matched[c], levels), np.quantile(tuned, levels), atol=0.01)
        order = np.argsort(new[c].ravel(), kind="stable")
        assert np.all(np.diff(matched[c].ravel()[order]) >= 0)  # monotone: ranks kept
    with pytest.raises(UserError, match="channels"):
        calibration.match_quantiles(new, source[:1], target[:1], channel_axis=True)


def test_match_quantiles_carries_a_tuned_setting_to_a_less_confident_map(tmp_path, capsys):
    """tune on a confident map (weak membrane 0.45, membranes 1), then segment the same cells seen
    by a less confident network (every value x 0.6: the weak membrane reads 0.27, under every tuned
    threshold): with --match-quantiles the tuned setting cuts the cells as it did where it was
    chosen; without, it merges across the weak membrane."""
    prob, gt = weak_membrane_case()
    voxel = (40.0, 4.0, 4.0)
    for name, array in (("tuned", prob), ("shy", 0.6 * prob)):
        create_volume(tmp_path / name, (1, *prob.shape), np.float32, voxel, axes=("c", "z", "y", "x")).write(array[None])
    create_volume(tmp_path / "gt", gt.shape, np.uint64, voxel).write(gt)
    params = tmp_path / "tuned.json"
    assert main(["tune", "--input", str(tmp_path / "tuned"), "--labels", str(tmp_path / "gt"), "--output", str(params),
                 "--per-slice", "--no-progress"]) == 0
    stored = json.loads(params.read_text())["quantiles"]
    np.testing.assert_allclose(stored, tuning.map_quantiles(prob))
    scores = {}
    for flags in ([], ["--match-quantiles"]):
        out = tmp_path / f"seg{len(flags)}"
        assert main(["segment", "--input", str(tmp_path / "shy"), "--output", str(out), "--params", str(params),
                     "--no-progress", *flags]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert ("matched_quantiles" in printed) == bool(flags)
        scores[bool(flags)] = tuning.score(open_volume(out).read(), gt, per_slice=True)["vrand"]
    assert scores[True] == pytest.approx(1.0) and scores[False] < 0.95
    # every method, agglomeration's merge scores included, reads the matched map: the shy map then
    # segments as the map the setting was tuned on
    for method in ("watershed", "agglomerate"):
        labels = []
        for name, flags in (("tuned", []), ("shy", ["--match-quantiles"])):
            out = tmp_path / f"{name}_{method}"
            assert main(["segment", "--input", str(tmp_path / name), "--output", str(out), "--params", str(params),
                         "--method", method, "--merge", "0.4", "--no-progress", *flags]) == 0
            labels.append(open_volume(out).read())
        np.testing.assert_array_equal(*labels)

    # refused, nothing written: no --params; a file from before tune stored quantiles; other channels
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(params.read_text()).items() if k != "quantiles"}))
    two = tmp_path / "two.json"
    two.write_text(json.dumps(dict(json.loads(params.read_text()), quantiles=stored * 2)))
    for extra, message in ((["--match-quantiles"], "pass --params"),
                           (["--params", str(old), "--match-quantiles"], "run `jaxem tune` again"),
                           (["--params", str(two), "--match-quantiles"], "quantiles of 2 channels")):
        assert main(["segment", "--input", str(tmp_path / "shy"), "--output", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
