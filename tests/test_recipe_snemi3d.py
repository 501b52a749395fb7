"""The 3D neuron recipe: affinities -> instances (mws, affinity watershed), 3D scoring, the config,
`jaxem segment` on affinities, and the benchmark end to end at tiny size."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxem.cli import main
from jaxem.config import load_config
from jaxem.data.targets import affinity_target
from jaxem.data.volume import create_volume, open_volume
from jaxem.errors import UserError
from jaxem.metrics.clustering import clustering_scores, contingency_table
from jaxem.segment.instances import boundary_from_affinities, fill_small, instances_from_affinities

OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -4, 0), (0, 0, -4)]


def cells_3d():
    """(6, 24, 24) ids: four columns of cells split by 1-voxel membranes (0), one ending at z = 3."""
    gt = np.zeros((6, 24, 24), np.int32)
    gt[:, :11, :11], gt[:, :11, 12:], gt[:, 12:, :11], gt[:, 12:, 12:] = 1, 2, 3, 4
    gt[3:, 12:, 12:] = 5  # a different neuron above z = 3 in the same column
    return gt


def true_affinities(gt, offsets):
    target, _ = affinity_target(jnp.asarray(gt[None]), jnp.ones((1,) + gt.shape), offsets)
    return np.array(np.moveaxis(np.asarray(target[0]), -1, 0))


def same_partition(seg, gt):
    """True when `seg` and `gt` split gt's foreground into the same groups (one-to-one ids)."""
    table = contingency_table(seg[gt > 0], gt[gt > 0])
    return len(set(table.pred_ids)) == len(set(table.gt_ids)) == len(table.counts)


@pytest.mark.parametrize("method", ["mws", "watershed"])
def test_true_affinities_give_back_the_neurons_in_3d(method):
    gt = cells_3d()
    aff = true_affinities(gt, OFFSETS)
    seg = instances_from_affinities(aff, OFFSETS, method, min_size=20, h=1.0)
    assert same_partition(seg, gt)
    assert (seg > 0).all()  # dense: membrane voxels flooded into a neighbour
    assert seg.max() == 5


def test_mws_separates_touching_neurons_that_the_boundary_map_merges():
    """A gap in the membrane between cells 1 and 2: the nearest-neighbour boundary map has a bridge,
    but the long-range repulsive affinities across the gap still keep the two neurons apart."""
    gt = cells_3d()
    aff = true_affinities(gt, OFFSETS)
    gap = (slice(None), slice(4, 7), slice(10, 13))  # the membrane between 1 and 2 at y 4..6
    aff[1:3][(slice(None),) + gap] = 0.9  # nearest-neighbour affinities wrongly say "same cell" there
    seg = instances_from_affinities(aff, OFFSETS, "mws", min_size=20)
    assert seg[0, 5, 5] != seg[0, 5, 18]
    cc = instances_from_affinities(aff, OFFSETS, "watershed", min_size=20, h=100.0)  # one seed per basin
    assert cc[0, 5, 5] == cc[0, 5, 18]


def test_boundary_from_affinities_is_one_minus_the_lowest_nearest_neighbour_affinity():
    aff = np.random.default_rng(0).uniform(size=(6, 3, 5, 5)).astype(np.float32)
    expected = 1 - np.minimum(np.minimum(aff[0], aff[1]), aff[2])
    np.testing.assert_allclose(boundary_from_affinities(aff, OFFSETS), expected, rtol=1e-6)
    with pytest.raises(UserError, match="no nearest-neighbour offset"):
        boundary_from_affinities(aff[3:], OFFSETS[3:])


def test_fill_small_floods_fragments_from_the_neighbour_downhill():
    labels = np.zeros((1, 1, 9), np.uint64)
    labels[0, 0, :4], labels[0, 0, 4], labels[0, 0, 5:] = 1, 3, 2
    elevation = np.array([[[0, 0, 0, 0.5, 0.9, 0.2, 0, 0, 0]]], np.float32)  # the ridge is at x = 4
    out = fill_small(labels, elevation, min_size=2)
    assert out.tolist() == [[[1, 1, 1, 1, 1, 2, 2, 2, 2]]] or out.tolist() == [[[1, 1, 1, 1, 2, 2, 2, 2, 2]]]
    assert set(np.unique(out)) == {1, 2}


def test_unknown_affinity_method_is_refused():
    with pytest.raises(UserError, match="not one of mws, watershed"):
        instances_from_affinities(np.zeros((3, 2, 4, 4), np.float32), OFFSETS[:3], "cc")


def test_config_arguments_and_shapes():
    from jaxem import models
    from jaxem.data.targets import num_target_channels

    for arg in ("", "cpu", "tiny", "cpu,synthetic", "tiny,synthetic"):
        config = load_config(f"snemi3d_affinities:{arg}")
        models.check_input_shape(config.model, config.data.crop_shape)
        assert config.model.out_channels == num_target_channels(config.target, 3)
        assert config.data.dataset == ("synthetic" if "synthetic" in arg else "snemi3d")
    with pytest.raises(UserError, match="does not know argument"):
        load_config("snemi3d_affinities:gpu")


def test_segment_cli_on_3d_affinities_floods_small_fragments(tmp_path):
    gt = cells_3d()
    aff = true_affinities(gt, OFFSETS)
    create_volume(tmp_path / "aff", aff.shape, np.float32, (40.0, 4.0, 4.0), axes=("c", "z", "y", "x")).write(aff)
    base = ["segment", "--input", str(tmp_path / "aff"), "--offsets", json.dumps([list(o) for o in OFFSETS])]
    assert main(base + ["--output", str(tmp_path / "mws"), "--method", "mws", "--min-size", "20"]) == 0
    seg = open_volume(tmp_path / "mws").read()
    assert same_partition(seg, gt) and (seg > 0).all()
    assert main(base + ["--output", str(tmp_path / "ws"), "--method", "watershed", "--kind", "affinities",
                        "--min-size", "20", "--h", "4"]) == 0
    # the watershed may flood a few voxels of the z = 3 boundary plane from the wrong side
    assert clustering_scores(open_volume(tmp_path / "ws").read(), gt)["adapted_rand_error"] < 0.05
    assert main(base + ["--output", str(tmp_path / "cc"), "--method", "cc", "--kind", "affinities"]) == 2
    assert not (tmp_path / "cc").exists()


def test_crop_segmenter_scores_mws_on_affinity_crops():
    from jaxem.train.trainer import crop_segmenter

    config = load_config("snemi3d_affinities:tiny")
    gt = cells_3d()
    probs = np.moveaxis(true_affinities(gt, config.target.offsets), 0, -1)  # (*S, K) as eval_step returns
    seg = crop_segmenter(config.target)(probs)
    assert same_partition(seg, gt)
    config.target.kind = "foreground"
    assert crop_segmenter(config.target) is None


@pytest.mark.slow
def test_snemi3d_benchmark_trains_and_scores_in_3d(tmp_path, monkeypatch):
    """Tiny run on the synthetic neuropil: trains, predicts affinities, segments three ways, writes
    results and an overlay; training logged the mws validation scores. Then the CREMI benchmark
    scores that run by CREMI's protocol."""
    monkeypatch.setenv("JAXEM_DATA", str(tmp_path / "data"))
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "benchmarks/snemi3d.py", "--run", str(run), "--config",
                          "snemi3d_affinities:tiny,synthetic", "--no-progress", "--min-size", "20"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    for row in ("mws", "watershed", "threshold_baseline"):
        scores = report["scores"][row]
        assert 0 <= scores["adapted_rand_error"] <= 1 and scores["voi_split"] >= 0 and 0 <= scores["dice"] <= 1
    assert report["training"]["final_step"] == 4
    assert (run / "heldout" / "overlay.png").stat().st_size > 0
    results = json.loads((run / "heldout" / "results.json").read_text())
    assert results["settings"]["offsets"] == [list(o) for o in load_config("snemi3d_affinities:tiny").target.offsets]
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert val and all(0 <= v["vrand"] <= 1 for v in val)

    # benchmarks/cremi.py: its tiny config is this one, so the finished run is scored by CREMI's
    # protocol without training again; --tune adds each method's settings tuned on the train volume.
    out = subprocess.run([sys.executable, "benchmarks/cremi.py", "--run", str(run), "--config",
                          "cremi_affinities:tiny,synthetic", "--no-progress", "--min-size", "20", "--tune"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["protocol"] == "cremi" and report["training"]["final_step"] == 4
    assert report["training"]["start_step"] == 4
    for row in ("mws", "watershed", "threshold_baseline"):
        scores = report["scores"][row]
        assert scores["cremi_score"] >= 0 and 0 < scores["cremi_masked_fraction"] < 1
    results = json.loads((run / "heldout" / "results.json").read_text())
    assert results["settings"]["protocol"] == "cremi" and results["settings"]["cremi_border_threshold_nm"] == 25
    sweeps = json.loads((run / "heldout" / "tuning.json").read_text())
    assert "/train/" in sweeps["image"]  # tuned on the train split, scored on val
    for method in ("mws", "watershed", "agglomerate"):
        table = sweeps[method]["table"]
        assert {row["setting"]["method"] for row in table} == {method} and sweeps[method]["metric"] == "voi"
        best = table[int(np.argmin([row["scores"]["voi"] for row in table]))]["setting"]
        assert results["tuned_settings"][method] == best
        tuned = report["scores"][f"{method}_tuned"]
        assert tuned["cremi_score"] >= 0 and tuned["voi_split"] + tuned["voi_merge"] >= 0
    assert "mws tuned" in out.stdout and "agglo tuned" in out.stdout


def test_over_seeds_gives_mean_sample_std_and_values_per_row_and_metric():
    from jaxem.protocols.common import over_seeds

    per_seed = {0: {"mws": {"voi_split": 0.2, "note": "x"}, "watershed": {"voi_split": 1.0}, "settings": 3},
                1: {"mws": {"voi_split": 0.4, "note": "y"}, "watershed": {"voi_split": 3.0}, "settings": 3}}
    out = over_seeds(per_seed)
    assert set(out) == {"mws", "watershed"} and set(out["mws"]) == {"voi_split"}
    assert out["mws"]["voi_split"]["mean"] == pytest.approx(0.3)
    assert out["mws"]["voi_split"]["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert out["watershed"]["voi_split"]["values"] == [1.0, 3.0]
    assert set(over_seeds(per_seed, rows=["watershed"])) == {"watershed"}


def test_segment_cli_default_seed_depth_is_two_pixels_not_one_nm(tmp_path):
    """At 40x4x4 nm, h = 1 nm puts a seed on every ripple of a noisy distance map; the default
    (2 in-plane pixels = 8 nm) splits far less and is what `--h 8` gives."""
    gt = cells_3d()
    noisy = np.clip(true_affinities(gt, OFFSETS) + np.random.default_rng(0).normal(0, 0.25, (6,) + gt.shape), 0, 1)
    create_volume(tmp_path / "aff", noisy.shape, np.float32, (40.0, 4.0, 4.0), axes=("c", "z", "y", "x")).write(
        noisy.astype(np.float32))
    base = ["segment", "--input", str(tmp_path / "aff"), "--offsets", json.dumps([list(o) for o in OFFSETS]),
            "--method", "watershed", "--kind", "affinities"]
    counts = {}
    for name, extra in (("default", []), ("h8", ["--h", "8"]), ("h1", ["--h", "1"])):
        assert main(base + ["--output", str(tmp_path / name)] + extra) == 0
        counts[name] = int(open_volume(tmp_path / name).read().max())
    assert counts["default"] == counts["h8"] < counts["h1"], counts
