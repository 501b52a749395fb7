"""The speed benchmarks run and report what they claim (smoke sizes on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import models as models_bench
from jaxem import models
from jaxem.models import flops

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_TIMEOUT_S = 1800  # an end-to-end benchmark subprocess: a hang guard, not a speed check


def test_benchmarks_that_import_their_siblings_run_as_documented_from_anywhere(tmp_path):
    """`python benchmarks/<name>.py` works on a fresh clone, with no PYTHONPATH and from any
    directory, for every script that imports `benchmarks.*` (each puts the repository on sys.path)."""
    scripts = [p for p in sorted((ROOT / "benchmarks").glob("*.py"))
               if any(line.startswith(("from benchmarks", "import benchmarks")) for line in p.read_text().splitlines())]
    assert len(scripts) >= 8
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    running = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=tmp_path, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in scripts}
    for name, process in running.items():
        out, err = process.communicate(timeout=BENCHMARK_TIMEOUT_S)
        assert process.returncode == 0 and "usage:" in out, f"{name}: {err[-500:]}"


def test_models_benchmark_counts_three_forwards_per_step():
    """A training step's model FLOPs are its forward's convolutions and matmuls x 3 (input and
    kernel gradients) less the input gradient of the first conv (the image needs none), and the
    record's rates follow from them."""
    record = models_bench.bench("unet3d", small=True, dtype="float32", remat=False, steps=1, batch=None)
    cfg, spatial, _ = models_bench.config_for("unet3d", True, "float32", False)
    model = models.build(cfg, conv_form="xla")
    x = jnp.zeros((2, *spatial, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    forward = flops.matmul_flops(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    pairs = (3 * 4 - 2) * (3 * 16 - 2) ** 2  # (output, tap) pairs of a 3x3x3 'SAME' conv on 4x16x16
    first_conv_input_grad = 2 * 2 * 1 * cfg.widths[0] * pairs  # 2 flops x batch x 1 -> widths[0] channels
    assert record["model_flops"] == 3 * forward - first_conv_input_grad
    assert record["achieved_flops_per_s"] == record["model_flops"] / record["step_s"]
    assert record["voxels_per_s"] == 2 * 4 * 16 * 16 / record["step_s"]


def test_ssl_step_benchmark_times_both_methods_beside_the_supervised_step():
    out = subprocess.run([sys.executable, "benchmarks/ssl_step.py", "--small", "--steps", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(out.stdout)
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"moco", "simclr", "supervised"}
    for r in rows.values():
        assert r["step_s"] > 0 and r["crops_per_s"] == pytest.approx(r["batch"] / r["step_s"])
    assert rows["moco"]["crop"] == rows["supervised"]["crop"] == [32, 32]


def test_merge_speed_benchmark_times_both_merges_on_the_same_partition():
    out = subprocess.run([sys.executable, "benchmarks/merge_speed.py", "--side", "12", "--volume", "16", "48", "48"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(out.stdout)
    for graph in ("grid", "watershed"):
        row = report[graph]
        assert row["same_partition"] and row["edges"] > 0 and row["rounds_s"] > 0 and row["heap_s"] > 0
        assert 0 < row["objects"]
    assert report["grid"]["edges"] == 3 * 11 * 12 * 12


def test_profile_step_finds_the_convolutions():
    out = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--small", "--top", "40"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(out.stdout)
    assert report["kernel_ms_per_step"] > 0
    assert 0 < sum(r["share"] for r in report["top"]) <= 1 + 1e-9
    convs = [r for r in report["top"] if "convolution(" in r["hlo"]]
    assert convs, "no convolution among the step's top XLA ops"


def test_conv_ceiling_reports_each_level():
    out = subprocess.run([sys.executable, "benchmarks/conv_ceiling.py", "--small", "--steps", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads(out.stdout)
    assert [lv["input"][-1] for lv in report["levels"]] == [4, 8]
    assert all(lv["tflops"] > 0 and lv["mfu"] is None for lv in report["levels"])  # no peak for CPUs


@pytest.mark.parametrize("ndim,fields", [
    (3, dict(widths=(4, 8, 16))),                                      # the default: plain, GroupNorm
    (3, dict(widths=(4, 8, 16), block="residual", norm="batch", kernel_sizes=((1, 3, 3), 3, 3),
             pool_factors=((1, 2, 2), 2), activation="gelu")),
    (2, dict(widths=(8, 16), norm="instance", activation="leaky_relu", out_channels=3)),
    (2, dict(widths=(8, 16), norm="none", block="residual", activation="silu")),
])
def test_torch_twin_computes_the_jaxem_unet(ndim, fields):
    """benchmarks/torch_unet.py's PyTorch twin, given the flax variables, has the same parameter
    count and the same outputs as the jaxem U-Net (so the side-by-side times the same FLOPs)."""
    torch = pytest.importorskip("torch")
    from benchmarks import torch_unet

    cfg = models.default_config("unet", ndim)
    cfg.update(fields)
    model = models.build(cfg)
    shape = (2, 4, 16, 16, 1) if ndim == 3 else (2, 16, 16, 1)
    x = jax.random.normal(jax.random.key(0), shape)
    variables = model.init(jax.random.key(1), x, train=False)
    variables = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(2), v.shape), variables)  # non-trivial norms
    twin = torch_unet.build_twin(cfg)
    assert sum(p.numel() for p in twin.parameters()) == flops.count_params({"params": variables["params"]})
    torch_unet.load_flax_variables(twin, variables)
    x_torch = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
    for train in (False, True):
        ours = model.apply(variables, x, train=train, mutable=["batch_stats"])[0][0]
        theirs = twin.train(train)(x_torch).detach().numpy()
        np.testing.assert_allclose(np.moveaxis(theirs, 1, -1), ours, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_isbi_benchmark_over_seeds(shared_data, tmp_path):
    """--seeds trains one run per seed (its config.seed set) and reports each score's mean and std
    over them (a 2-step recipe: this checks the bookkeeping, not the accuracy; --no-tune saves the
    ~40 s per seed of tuning on slices 0-15)."""
    tiny = ["--config.train.steps=2", "--config.train.eval_every=0", "--config.train.checkpoint_every=2",
            "--config.data.crop_shape=(64,64)", "--config.data.batch_size=4", "--config.optimizer.warmup_steps=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXEM_DATA": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "benchmarks/isbi2012.py", "--run", str(tmp_path / "r"), "--seeds", "0", "3",
                          "--no-progress", "--no-tune", *tiny], cwd=ROOT, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_S, check=True, env=env)
    report = json.loads(out.stdout[out.stdout.index("\n{") + 1:])
    assert report["seeds"] == [0, 3] and set(report["per_seed"]) == {"0", "3"}
    assert "model_tuned" not in report["per_seed"]["0"]["scores"]  # --no-tune (tuning: test_infer_e2e)
    for seed in (0, 3):
        assert json.loads((tmp_path / "r" / f"seed{seed}" / "config.json").read_text())["seed"] == seed
    vrand = [report["per_seed"][s]["scores"]["model"]["vrand"] for s in ("0", "3")]
    summary = report["over_seeds"]["model"]["vrand"]
    assert summary["values"] == vrand
    assert summary["mean"] == pytest.approx(np.mean(vrand)) and summary["std"] == pytest.approx(np.std(vrand, ddof=1))
    assert "vrand" in out.stdout.splitlines()[1]


@pytest.mark.slow
def test_ssl_transfer_benchmark_compares_pretrained_and_scratch(shared_data, tmp_path):
    """The ISBI label-efficiency benchmark pretrains on unscored slices only, fine-tunes both arms on
    the labelled subset (the pretrained arm from the exported encoder) and reports the difference
    (2-step runs: this checks the bookkeeping, not the accuracy)."""
    tiny = ["--pretrain.train.steps=2", "--pretrain.data.batch_size=8", "--pretrain.ssl.queue_size=64",
            "--finetune.train.steps=2", "--finetune.train.eval_every=0", "--finetune.train.checkpoint_every=2",
            "--finetune.data.crop_shape=(64,64)", "--finetune.data.batch_size=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXEM_DATA": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "benchmarks/ssl_transfer.py", "--run", str(tmp_path / "r"), "--no-progress",
                          "--labelled-slices", "3", "--arms", "pretrained", "mean_teacher", *tiny], cwd=ROOT, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_S,
                         check=True, env=env)
    report = json.loads(out.stdout[out.stdout.index("\n{") + 1:])
    pretrain_cfg = json.loads((tmp_path / "r" / "pretrain" / "config.json").read_text())
    assert len(pretrain_cfg["data"]["train_images"]) == 2  # slices 0-15 and the 30 unlabelled test slices
    assert all("/val/" not in p for p in pretrain_cfg["data"]["train_images"])
    runs = {arm: json.loads((tmp_path / "r" / f"{arm}_3" / "seed0" / "config.json").read_text())
            for arm in ("scratch", "pretrained", "mean_teacher")}
    assert runs["scratch"]["train"]["init_encoder"] == "" and runs["pretrained"]["train"]["init_encoder"].endswith("pretrain")
    assert runs["scratch"]["semi"]["weight"] == 0 and runs["mean_teacher"]["semi"]["weight"] == 1.0
    assert runs["mean_teacher"]["semi"]["unlabelled_images"] == pretrain_cfg["data"]["train_images"]
    assert report["arms"] == ["scratch", "pretrained", "mean_teacher"] and "mean_teacher_minus_scratch" in report
    assert runs["pretrained"]["model"] == pretrain_cfg["model"]
    from jaxem.data.volume import open_volume
    assert open_volume(runs["pretrained"]["data"]["train_images"][0]).shape == (3, 512, 512)
    diff = report["pretrained_minus_scratch"]["vrand"]
    assert diff == pytest.approx(report["mean"]["pretrained"]["vrand"]["mean"] - report["mean"]["scratch"]["vrand"]["mean"])


def test_label_efficiency_gains_are_per_seed_differences_and_the_goal_reads_them():
    from benchmarks.label_efficiency import format_table, goal_met, summarise

    def run(vrand, iou, vrand_tuned=0.9):
        return {"scores": {"vrand": vrand, "vinfo": 0.9, "iou": iou, "dice": 0.9, "membrane_ap": 0.8,
                           "vrand_tuned": vrand_tuned, "vinfo_tuned": 0.9, "vrand_matched": 0.95, "vinfo_matched": 0.9}}

    results = {"scratch": {1: {0: run(0.70, 0.80), 1: run(0.80, 0.82)}, 2: {0: run(0.80, 0.85), 1: run(0.82, 0.85)}},
               "mim": {1: {0: run(0.75, 0.81), 1: run(0.81, 0.83)}, 2: {0: run(0.81, 0.92), 1: run(0.82, 0.90)}}}
    table = summarise(results, ["scratch", "mim"], [1, 2])
    assert table[1]["gain_mim"]["vrand"]["values"] == pytest.approx([0.05, 0.01])
    assert table[1]["gain_mim"]["vrand"]["mean"] == pytest.approx(0.03)
    assert table[1]["gain_mim"]["vrand"]["std"] == pytest.approx(np.std([0.05, 0.01], ddof=1))
    verdict = goal_met(table, ["mim"])
    assert verdict["fixed"][1]["met"] and verdict["fixed"][2]["met"]  # 1: +0.03 VRand; 2: +6 IoU points, +0.005 VRand
    assert verdict["fixed"][2]["vrand_gain"] == pytest.approx(0.005) and verdict["fixed"][2]["iou_gain"] == pytest.approx(0.06)
    assert not verdict["tuned"][1]["met"] and verdict["tuned"][1]["vrand_gain"] == pytest.approx(0.0)  # equal tuned VRand
    results["mim"][1][1] = run(0.79, 0.80, vrand_tuned=0.98)
    verdict = goal_met(summarise(results, ["scratch", "mim"], [1, 2]), ["mim"])
    assert not verdict["fixed"][1]["met"] and verdict["tuned"][1]["met"]  # +0.04 tuned VRand
    # A semi arm from random init that does better is not a pretrained arm: the goal reads mim only.
    results["fixmatch"] = {n: {s: run(0.95, 0.95) for s in (0, 1)} for n in (1, 2)}
    both = summarise(results, ["scratch", "mim", "fixmatch"], [1, 2])
    assert goal_met(both, ["mim"])["fixed"][1]["best_arm"] == "mim" and not goal_met(both, ["mim"])["fixed"][1]["met"]
    assert goal_met(both, ["mim", "fixmatch"])["fixed"][1]["best_arm"] == "fixmatch"
    # mim+fixmatch beats scratch by far, but fixmatch from random init by +0.01 / -0.01 VRand only: the
    # same-recipe goal reads that pretraining adds nothing.
    results["mim+fixmatch"] = {n: {0: run(0.96, 0.95), 1: run(0.94, 0.95)} for n in (1, 2)}
    combo = summarise(results, ["scratch", "mim", "fixmatch", "mim+fixmatch"], [1, 2])
    assert combo[1]["pretraining_gain_mim+fixmatch"]["vrand"]["values"] == pytest.approx([0.01, -0.01])
    assert "pretraining_gain_mim" not in combo[1] and "pretraining_gain_fixmatch" not in combo[1]
    assert goal_met(combo, ["mim+fixmatch"])["fixed"][1]["met"]
    same_recipe = goal_met(combo, ["mim", "mim+fixmatch"], "pretraining_gain_")["fixed"][1]
    assert not same_recipe["met"] and same_recipe["best_arm"] == "mim" and same_recipe["vrand_gain"] == pytest.approx(0.02)
    # --control: a pretrained arm fine-tuned another way is measured against random init fine-tuned that way.
    results["mim@f"] = {n: {0: run(0.90, 0.80), 1: run(0.90, 0.80)} for n in (1, 2)}
    results["random@f"] = {n: {0: run(0.88, 0.80), 1: run(0.84, 0.80)} for n in (1, 2)}
    controlled = summarise(results, ["scratch", "mim@f", "random@f"], [1, 2], {"mim@f": "random@f"})
    assert controlled[1]["gain_mim@f"]["vrand"]["values"] == pytest.approx([0.20, 0.10])
    assert controlled[1]["pretraining_gain_mim@f"]["vrand"]["values"] == pytest.approx([0.02, 0.06])
    assert "pretraining_gain_random@f" not in controlled[1]
    assert goal_met(controlled, ["mim@f"], "pretraining_gain_")["fixed"][1]["vrand_gain"] == pytest.approx(0.04)
    results["random@f"] = {n: {0: run(0.89, 0.80), 1: run(0.89, 0.80)} for n in (1, 2)}
    controlled = summarise(results, ["scratch", "mim@f", "random@f"], [1, 2], {"mim@f": "random@f"})
    assert goal_met(controlled, ["mim@f"])["fixed"][1]["met"]  # +0.15 over scratch ...
    assert not goal_met(controlled, ["mim@f"], "pretraining_gain_")["fixed"][1]["met"]  # ... +0.01 over its control
    text = format_table(table, ["scratch", "mim"])
    assert "| 2 | mim | 0.815 ± 0.007 | 0.900 ± 0.000 | 0.950 ± 0.000 | 0.910 ± 0.014 | 0.800 ± 0.000 | +0.005 ± 0.007 |" in text
    assert "+6.0 ± 1.4 |" in text  # IoU gain in points: +7 and +5


def test_plateau_scores_average_each_setting_with_its_grid_neighbours():
    """benchmarks/tuning_selection.plateau_scores: neighbours are one grid step away in one swept
    value with every other field equal; other methods and seeds are not neighbours."""
    from benchmarks.tuning_selection import plateau_scores

    grid = [{"method": "agglomerate", "threshold": t, "merge": m} for t in (0.3, 0.5) for m in (0.2, 0.4, 0.6)]
    grid += [{"method": "cc", "threshold": 0.3}, {"method": "watershed", "seeds": "threshold", "threshold": 0.3}]
    score = [0.9, 0.5, 0.8, 0.7, 0.7, 0.7, 0.1, 0.3]
    table = [{"setting": s, "scores": {"vrand": v}} for s, v in zip(grid, score)]
    plateau = plateau_scores(table, "vrand")
    assert plateau[0] == pytest.approx((0.9 + 0.5 + 0.7) / 3)  # merge 0.4 and threshold 0.5 away
    assert plateau[1] == pytest.approx((0.5 + 0.9 + 0.8 + 0.7) / 4)
    assert plateau[4] == pytest.approx(0.7 * 3 / 4 + 0.5 / 4)  # a plateau, one step from a dip
    assert list(plateau[6:]) == pytest.approx([0.1, 0.3])  # alone on their lines
    assert int(np.argmax(score)) == 0 and int(np.argmax(plateau)) == 3  # the peak beside a dip loses to a plateau


def test_held_out_scores_are_reused_only_for_the_same_checkpoints_and_request(tmp_path):
    """benchmarks/isbi2012.scores_of reads results.json back when scored_from.json records the
    same checkpoints (names and modification times) and request; a new or rewritten checkpoint,
    or another request, needs scoring again."""
    from benchmarks.isbi2012 import SCORED_FROM, scores_of, scoring_key

    run, out = tmp_path / "run", tmp_path / "run" / "heldout"
    (run / "checkpoints" / "300").mkdir(parents=True)
    out.mkdir()
    key = scoring_key(run, image="val.zarr", labels="val_labels.zarr", tta=False, tune_on=("a.zarr", "b.zarr"))
    assert scores_of(out, key) is None  # never scored
    (out / "results.json").write_text(json.dumps({"model": {"vrand": 0.9}}))
    (out / SCORED_FROM).write_text(json.dumps(key))
    assert scores_of(out, key) == {"model": {"vrand": 0.9}}
    assert scores_of(out, scoring_key(run, image="val.zarr", labels="val_labels.zarr", tta=True,
                                      tune_on=("a.zarr", "b.zarr"))) is None
    (run / "checkpoints" / "400").mkdir()
    assert scores_of(out, scoring_key(run, image="val.zarr", labels="val_labels.zarr", tta=False,
                                      tune_on=("a.zarr", "b.zarr"))) is None
    os.utime(run / "checkpoints" / "300", ns=(1, 1))
    (run / "checkpoints" / "400").rmdir()
    assert scores_of(out, scoring_key(run, image="val.zarr", labels="val_labels.zarr", tta=False,
                                      tune_on=("a.zarr", "b.zarr"))) is None  # step 300 rewritten


def test_label_efficiency_pools_first_slices_and_seeds_as_replicates():
    """With several --first-slice values every (first slice, seed) is one replicate: the mean pools
    them all and a gain pairs each arm's run with scratch's run on the same slices and seed."""
    from benchmarks.label_efficiency import replicate_name, summarise

    def run(vrand):
        return {"scores": {m: vrand for m in ("vrand", "vinfo", "iou", "dice", "membrane_ap", "vrand_tuned",
                                              "vinfo_tuned", "vrand_matched", "vinfo_matched")}}

    scratch = {(0, 0): 0.70, (0, 1): 0.72, (5, 0): 0.90, (5, 1): 0.86}
    mim = {(0, 0): 0.80, (0, 1): 0.80, (5, 0): 0.85, (5, 1): 0.85}
    results = {"scratch": {1: {k: run(v) for k, v in scratch.items()}}, "mim": {1: {k: run(v) for k, v in mim.items()}}}
    table = summarise(results, ["scratch", "mim"], [1])
    assert table[1]["scratch"]["vrand"]["mean"] == pytest.approx(0.795)
    assert table[1]["gain_mim"]["vrand"]["values"] == pytest.approx([0.10, 0.08, -0.05, -0.01])
    assert table[1]["gain_mim"]["vrand"]["mean"] == pytest.approx(0.03)
    assert [replicate_name(*k) for k in sorted(mim)] == ["0", "1", "0_from5", "1_from5"]


def test_label_efficiency_labels_slices_from_first_slice_and_never_a_held_out_one(shared_data, tmp_path, monkeypatch):
    """--first-slice F labels slices F .. F+n-1 (the subset holds exactly those slices, images and
    labels); a range reaching the scored slices 16-19 is refused before anything runs."""
    from benchmarks.isbi2012 import prepare_isbi
    from benchmarks.ssl_transfer import ISBI_SLICES_ATTRIBUTE, labelled_subset
    from benchmarks.tuning_selection import unseen_refusal
    from jaxem.data import datasets
    from jaxem.data.volume import open_volume, read_attributes, write_attributes
    from jaxem.errors import UserError

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXEM_DATA": str(tmp_path / "data")}
    refused = subprocess.run([sys.executable, "benchmarks/label_efficiency.py", "--run", str(tmp_path / "r"),
                              "--slices", "1", "2", "--first-slice", "15"], cwd=ROOT, capture_output=True, text=True,
                             timeout=BENCHMARK_TIMEOUT_S, env=env)
    assert refused.returncode == 2 and "held out for scoring" in refused.stderr and not (tmp_path / "r").exists()
    monkeypatch.setenv("JAXEM_DATA", str(tmp_path / "data"))
    prepare_isbi()
    train = [open_volume(paths[0]).read() for paths in datasets.split_paths("isbi2012", "train")]
    paths = labelled_subset(7, tmp_path / "labelled_2_from5", first=5)
    for whole, path in zip(train, paths):
        np.testing.assert_array_equal(open_volume(path).read(), whole[5:7])
        assert read_attributes(path)[ISBI_SLICES_ATTRIBUTE] == [5, 7]
    # tuning_selection.py --unseen refuses slices such a run trained on, and only those
    run = tmp_path / "mim_2_from5" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"train_images": [paths[0]]}}))
    assert unseen_refusal([run], 0, 5) is None and unseen_refusal([run], 7, 9) is None
    assert "trained on slices [5, 7)" in unseen_refusal([run], 0, 6)
    assert "trained on slices [5, 7)" in unseen_refusal([run], 6, 8)
    assert "before 16" in unseen_refusal([run], 14, 17) and "non-empty" in unseen_refusal([run], 3, 3)
    # a subset written before the range was recorded: the refusal names it; labelled_subset adds it
    write_attributes(paths[0], {ISBI_SLICES_ATTRIBUTE: None})
    with pytest.raises(UserError, match="labelled_2_from5/image.zarr: expected the ISBI slice range"):
        unseen_refusal([run], 0, 1)
    labelled_subset(7, tmp_path / "labelled_2_from5", first=5)
    assert "trained on slices [5, 7)" in unseen_refusal([run], 4, 6)


def test_label_efficiency_tta_scores_into_heldout_tta(monkeypatch, tmp_path):
    """label_efficiency.py --tta reaches the scoring: finetune_and_score asks train_and_score for
    TTA (which scores into RUN/heldout_tta, beside the scores without it)."""
    import benchmarks.isbi2012
    from benchmarks import label_efficiency

    asked = []
    scores = {"model": {"vrand": 0.5, "vinfo": 0.6, "iou": 0.7, "dice": 0.8, "membrane_ap": 0.9},
              "tuned_settings": {"model": {"method": "watershed"}}}
    scores["model_tuned"] = scores["model_tuned_matched"] = scores["model"]

    def train_and_score(config, run, progress, tta=False, **kwargs):
        asked.append(tta)
        return {"scores": scores, "training": {}}

    monkeypatch.setattr(benchmarks.isbi2012, "train_and_score", train_and_score)
    monkeypatch.setattr("jaxem.data.datasets.split_paths", lambda *a: (["v.zarr"], ["l.zarr"]))
    for tta in (False, True):
        label_efficiency.finetune_and_score("isbi2012_unet:cpu", [], ("a.zarr", "b.zarr"), tmp_path, 0, False, tta=tta)
    assert asked == [False, True]


def _cells(z: int = 2, size: int = 48) -> np.ndarray:
    """Ground truth (z, size, size) uint32: 4 cells per slice separated by 2-pixel membranes (0)."""
    gt = np.zeros((z, size, size), np.uint32)
    h = size // 2
    for i, (ys, xs) in enumerate([(slice(0, h - 1), slice(0, h - 1)), (slice(0, h - 1), slice(h + 1, size)),
                                  (slice(h + 1, size), slice(0, h - 1)), (slice(h + 1, size), slice(h + 1, size))]):
        gt[:, ys, xs] = i + 1
    return gt


def test_ensemble_transfer_scores_the_mean_map_and_decides_by_the_preregistered_rule(tmp_path):
    """benchmarks/ensemble_transfer.py: an ensemble's map is the mean of its members' stored maps;
    scoring a map alone equals scoring it with itself; a map that marks the membranes segments the
    cells (VRand ~1) and a uniform one does not; the verdict reads the matched G1/G2 as
    docs/ssl.md preregistered it."""
    from benchmarks import ensemble_transfer as et
    from jaxem.data.volume import create_volume

    gt = _cells()
    membrane = (gt == 0).astype(np.float32)
    rng = np.random.default_rng(0)
    labelled = []
    for name, array in (("image.zarr", (rng.random(gt.shape) * 255).astype(np.uint8)), ("labels.zarr", gt)):
        create_volume(tmp_path / "labelled" / name, array.shape, array.dtype, voxel_size=(1.0, 1.0, 1.0)).write(array)
        labelled.append(str(tmp_path / "labelled" / name))
    runs = {}
    for run, value in (("good", 0.1 + 0.8 * membrane), ("flat", np.full(gt.shape, 0.3, np.float32))):
        for name in ("predictions.zarr", "tune_predictions.zarr"):
            create_volume(tmp_path / run / "heldout" / name, (1, *gt.shape), np.float32, voxel_size=(1.0, 1.0, 1.0),
                          axes=("c", "z", "y", "x")).write(value[None])
        runs[run] = tmp_path / run
    np.testing.assert_allclose(et.mean_map([runs["good"], runs["flat"]], "predictions.zarr"),
                               (0.1 + 0.8 * membrane + 0.3) / 2, rtol=1e-6)
    alone = et.score_ensemble([runs["good"]], gt, tuple(labelled))
    assert et.score_ensemble([runs["good"], runs["good"]], gt, tuple(labelled)) == alone
    assert min(alone[row]["vrand"] for row in et.PROTOCOLS.values()) > 0.99
    flat = et.score_ensemble([runs["flat"]], gt, tuple(labelled))
    assert flat["model"]["vrand"] < 0.5
    # --tta: the maps of RUN/heldout_tta (here the flat map stored there for the good run), cached apart
    for name in ("predictions.zarr", "tune_predictions.zarr"):
        create_volume(runs["good"] / "heldout_tta" / name, (1, *gt.shape), np.float32, voxel_size=(1.0, 1.0, 1.0),
                      axes=("c", "z", "y", "x")).write(np.full((1, *gt.shape), 0.3, np.float32))
    assert et.cached_score(tmp_path, [runs["good"]], gt, tuple(labelled)) == alone
    assert et.cached_score(tmp_path, [runs["good"]], gt, tuple(labelled), "heldout_tta") == flat
    assert len(list((tmp_path / "ensembles").glob("*.json"))) == 2
    assert et.cached_score(tmp_path, [runs["good"]], gt, tuple(labelled)) == alone  # read back, not mixed up
    with pytest.raises(SystemExit) as refused:  # a member never scored: one sentence, exit 2, nothing cached
        et.cached_score(tmp_path, [runs["good"], tmp_path / "unscored"], gt, tuple(labelled))
    assert refused.value.code == 2 and len(list((tmp_path / "ensembles").glob("*.json"))) == 2

    def replicates(g1: float, g2: float) -> dict:
        return {f"{n}/{s}": {"slices": n, "vrand": {e: {p: 0.8 + {"S+R": g1, "S+C": g1 - g2}.get(e, 0.0) + 0.01 * s
                                                        for p in et.PROTOCOLS} for e in et.ENSEMBLES}}
                for n in (1, 2) for s in range(3)}

    table = et.summarise(replicates(0.03, 0.01), [1, 2])
    assert table["1"]["G1"]["matched"]["mean"] == pytest.approx(0.03) and table["2"]["G1"]["matched"]["ahead"] == 3
    assert table["1"]["G2"]["fixed"]["mean"] == pytest.approx(0.01) and table["1"]["G3"]["tuned"]["ahead"] == 3
    assert et.verdict(table) == "a pretrained partner pays"
    assert et.verdict(et.summarise(replicates(0.03, -0.01), [1, 2])) == "level"  # the pretraining is not the reason
    assert et.verdict(et.summarise(replicates(-0.03, 0.0), [1, 2])) == "a second scratch network is the better partner"
    assert et.verdict(et.summarise(replicates(0.01, 0.01), [1, 2])) == "level"


@pytest.mark.slow
def test_label_efficiency_benchmark_pretrains_once_and_fine_tunes_every_arm(shared_data, tmp_path):
    """Bookkeeping of benchmarks/label_efficiency.py at 2-step sizes (not the accuracy): one
    pretraining on unscored slices, reused by every pretrained arm; every (slices, seed, arm) run
    with its seed, init and semi settings (a semi arm, a pretrained + semi arm, a same-recipe
    control); gains per seed. One seed, not the default 0 (the arithmetic over several seeds:
    the test above); each run costs ~40 s of CPU, mostly scoring 512x512 slices."""
    from benchmarks.label_efficiency import pretrained_arm, pretraining_dir_name

    tiny_pretraining = ["train.steps=2", "train.checkpoint_every=2", "data.crop_shape=(64,64)"]
    tiny = [*(f"--pretrain.{o}" for o in tiny_pretraining), "--finetune.train.steps=2",
            "--finetune.train.checkpoint_every=2", "--finetune.data.crop_shape=(64,64)", "--finetune.data.batch_size=4"]
    # a pretraining with overrides is its own run, and its arms carry them in their names
    mim, pretrain_dir = pretrained_arm("mim", [], tiny_pretraining), pretraining_dir_name("mim", tiny_pretraining)
    assert mim == "mim@pretrain.train.steps=2,pretrain.train.checkpoint_every=2,pretrain.data.crop_shape=(64,64)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXEM_DATA": str(tmp_path / "data")}
    command = [sys.executable, "benchmarks/label_efficiency.py", "--run", str(tmp_path / "r"), "--no-progress",
               "--slices", "1", "--seeds", "1", "--methods", "mim", "--out", str(tmp_path / "r.json"),
               "--plot", str(tmp_path / "p.png"), *tiny]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_S, check=True, env=env)
    report = json.loads((tmp_path / "r.json").read_text())
    pretrain_cfg = json.loads((tmp_path / "r" / pretrain_dir / "config.json").read_text())
    assert pretrain_cfg["ssl"]["method"] == "mim" and len(pretrain_cfg["data"]["train_images"]) == 2
    assert all("/val/" not in p for p in pretrain_cfg["data"]["train_images"])  # no scored slice
    ft = {arm: json.loads((tmp_path / "r" / f"{arm}_1" / "seed1" / "config.json").read_text()) for arm in ("scratch", mim)}
    assert ft["scratch"]["train"]["init_encoder"] == "" and ft[mim]["train"]["init_encoder"].endswith(pretrain_dir)
    assert ft[mim]["seed"] == ft["scratch"]["seed"] == 1 and ft[mim]["model"] == pretrain_cfg["model"]
    assert pretrain_cfg["train"]["steps"] == 2 and report["arms"] == ["scratch", mim]
    runs = report["per_run"]
    gain = runs[mim]["1"]["1"]["scores"]["vrand"] - runs["scratch"]["1"]["1"]["scores"]["vrand"]
    assert report["table"]["1"][f"gain_{mim}"]["vrand"]["values"] == pytest.approx([gain])
    assert set(report["goal_met"]["tuned"]["1"]) == set(report["goal_met"]["matched"]["1"]) \
        == {"best_arm", "vrand_gain", "iou_gain", "met"}
    assert report["goal_met"]["fixed"]["1"]["best_arm"] == mim and "1" in report["best_of_all_arms"]["fixed"]
    tuned = runs[mim]["1"]["1"]
    assert {"vrand_tuned", "vrand_matched", "membrane_ap"} <= set(tuned["scores"]) and tuned["tuned_setting"]["method"]
    assert (tmp_path / "p.png").stat().st_size > 1000 and f"| 1 | {mim} |" in out.stdout
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_S, check=True, env=env)
    assert json.loads((tmp_path / "r.json").read_text())["table"] == report["table"]  # finished runs reused
    assert "nothing to train" in again.stdout
    assert again.stdout.count("scores of these checkpoints are reused") == 2  # scratch and mim, not scored again
    # another --finetune setting in the same --run: refused by name (exit 2), the finished runs left as they were
    scratch_config = (tmp_path / "r" / "scratch_1" / "seed1" / "config.json").read_text()
    changed = subprocess.run([*command, "--finetune.optimizer.learning_rate=0.001"], cwd=ROOT, capture_output=True,
                             text=True, timeout=BENCHMARK_TIMEOUT_S, env=env)
    assert changed.returncode == 2 and "other settings (optimizer.learning_rate 0.003 -> 0.001)" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert (tmp_path / "r" / "scratch_1" / "seed1" / "config.json").read_text() == scratch_config
    # benchmarks/tuning_selection.py on these runs: its argmax rule re-derives each run's tuned score
    runs = [tmp_path / "r" / f"{arm}_1" / "seed1" for arm in ("scratch", mim)]
    # (and with --unseen 1 2: tuned on training slice 1, which the 1-slice runs never saw)
    selection = subprocess.run([sys.executable, "benchmarks/tuning_selection.py", *map(str, runs), "--unseen", "1", "2"],
                               cwd=ROOT, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_S, check=True, env=env)
    selection = json.loads(selection.stdout)
    for run, arm in zip(runs, ("scratch", mim)):
        picked = selection["per_run"][str(run)]
        tuned = report["per_run"][arm]["1"]["1"]["scores"]["vrand_tuned"]
        assert picked["argmax"]["heldout_vrand"] == pytest.approx(tuned)
        # the matched rule: the argmax setting on the matched map, as the benchmark's matched protocol scores it
        assert picked["matched"]["setting"] == picked["argmax"]["setting"]
        assert picked["matched"]["heldout_vrand"] == pytest.approx(
            report["per_run"][arm]["1"]["1"]["scores"]["vrand_matched"])
        assert picked["oracle"]["heldout_vrand"] >= max(tuned, picked["plateau"]["heldout_vrand"], picked["unseen"]["heldout_vrand"])
        sweep = json.loads((run / "tuned_on_unseen" / "tuning.json").read_text())
        assert sweep["model"]["best"] == picked["unseen"]["setting"] and sweep["image"] == str(tmp_path / "r" / "unseen_1_2" / "image.zarr")
    refused = subprocess.run([sys.executable, "benchmarks/tuning_selection.py", str(runs[0]), "--unseen", "0", "1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_S, env=env)
    assert refused.returncode == 2 and "trained on slices [0, 1)" in refused.stderr
    # A semi arm and a pretrained + semi arm: semi-supervised on the pretraining's unlabelled images;
    # --transfer.x=y: the pretrained arms (alone and with the semi method) fine-tuned otherwise, under their own name.
    semi = subprocess.run([*command, "--semi", "fixmatch", "--combine", "--control", "--transfer.train.llrd=0.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=BENCHMARK_TIMEOUT_S, check=True, env=env)
    tuned_mim = pretrained_arm("mim", ["train.llrd=0.5"], tiny_pretraining)
    assert f"| 1 | {tuned_mim}+fixmatch |" in semi.stdout
    ft = {arm: json.loads((tmp_path / "r" / f"{arm}_1" / "seed1" / "config.json").read_text())
          for arm in ("scratch", mim, tuned_mim, "fixmatch", f"{tuned_mim}+fixmatch")}
    assert ft["scratch"]["semi"]["weight"] == ft[tuned_mim]["semi"]["weight"] == 0
    assert ft["fixmatch"]["train"]["init_encoder"] == ""
    assert ft[f"{tuned_mim}+fixmatch"]["train"]["init_encoder"] == ft[tuned_mim]["train"]["init_encoder"] \
        == ft[mim]["train"]["init_encoder"]
    assert ft[tuned_mim]["train"]["llrd"] == ft[f"{tuned_mim}+fixmatch"]["train"]["llrd"] == 0.5
    assert ft["scratch"]["train"]["llrd"] == ft["fixmatch"]["train"]["llrd"] == ft[mim]["train"]["llrd"] == 1.0
    control = json.loads((tmp_path / "r" / "random@train.llrd=0.5_1" / "seed1" / "config.json").read_text())
    assert control["train"]["init_encoder"] == "" and control["train"]["llrd"] == 0.5 and control["seed"] == 1
    combined = json.loads((tmp_path / "r.json").read_text())
    assert combined["goal_met"]["fixed"]["1"]["best_arm"] in (tuned_mim, f"{tuned_mim}+fixmatch")
    assert f"pretraining_gain_{tuned_mim}+fixmatch" in combined["table"]["1"]
    control_gain = combined["table"]["1"][f"pretraining_gain_{tuned_mim}"]["vrand"]["values"]
    assert control_gain == pytest.approx([combined["per_run"][tuned_mim]["1"]["1"]["scores"]["vrand"]
                                          - combined["per_run"]["random@train.llrd=0.5"]["1"]["1"]["scores"]["vrand"]])
    assert combined["goal_met_same_recipe"]["fixed"]["1"]["best_arm"] in (tuned_mim, f"{tuned_mim}+fixmatch")
    for arm in ("fixmatch", f"{tuned_mim}+fixmatch"):
        assert ft[arm]["semi"]["method"] == "fixmatch" and ft[arm]["semi"]["weight"] == 1.0
        assert ft[arm]["semi"]["unlabelled_images"] == pretrain_cfg["data"]["train_images"]


def test_label_efficiency_gives_each_pretraining_budget_its_own_run_and_arm():
    """A pretraining override must not resume the default pretraining (the loop would extend a
    finished 2000-step run on a schedule it was not started with): it gets its own directory, and
    its fine-tuned arms their own names; the default's names are those of the cached runs."""
    from benchmarks.label_efficiency import pretrained_arm, pretraining_dir_name

    assert pretraining_dir_name("mim") == "pretrain_mim"
    longer = pretraining_dir_name("mim", ["train.steps=4000"])
    assert longer != pretraining_dir_name("mim") and longer.startswith("pretrain_mim@")
    frozen = ["train.freeze_encoder_steps=-1"]
    assert pretrained_arm("mim", frozen) == "mim@train.freeze_encoder_steps=-1"
    assert pretrained_arm("mim", frozen, ["train.steps=4000"]) == \
        "mim@pretrain.train.steps=4000,train.freeze_encoder_steps=-1"
    assert pretrained_arm("random", frozen) == pretrained_arm("random", frozen, [])  # controls do not pretrain


RECIPE = "mim@train.freeze_encoder_steps=-1,train.freeze_encoder_batch_stats=False"
CONTROL = "random@train.freeze_encoder_steps=-1,train.freeze_encoder_batch_stats=False"
SLICES_5_10 = Path("benchmarks/results/2026-12-07_cpu/label_efficiency_mim_frozen_control_first_slices_5_10.json")


def test_paired_difference_of_two_arms_equals_the_gain_label_efficiency_reported(tmp_path):
    """On a committed report (slices 5 / 10 labelled, seeds 0-2): recipe - control, paired by
    replicate, is the report's own pretraining gain, and the rule reads it as docs/ssl.md did."""
    report = json.loads(SLICES_5_10.read_text())
    out = tmp_path / "d.json"
    done = subprocess.run([sys.executable, "benchmarks/paired_difference.py", str(SLICES_5_10), "--arm", RECIPE,
                           "--versus", CONTROL, "--metrics", "vrand", "vrand_matched", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    differences = json.loads(out.read_text())["differences"]
    for n in ("1", "2"):
        reported = report["table"][n][f"pretraining_gain_{RECIPE}"]
        for metric in ("vrand", "vrand_matched"):
            mine = differences[n][metric]
            assert mine["mean"] == pytest.approx(reported[metric]["mean"], abs=1e-12)
            assert sorted(mine["values"]) == pytest.approx(sorted(reported[metric]["values"]), abs=1e-12)
            assert mine["ahead"] == sum(v > 0 for v in reported[metric]["values"])
    assert differences["1"]["vrand"]["verdict"] == "ahead"  # +0.113, 6 of 6 (docs/ssl.md)
    assert differences["2"]["vrand_matched"]["verdict"] == "level"  # +0.027, 3 of 6


def test_paired_difference_refuses_an_unpaired_replicate_or_another_fine_tuning(tmp_path):
    """A replicate one arm lacks, or arms fine-tuned differently, exit 2 with one sentence naming it."""
    report = json.loads(SLICES_5_10.read_text())
    del report["per_run"][CONTROL]["2"]["1_from10"]
    gapped = tmp_path / "gapped.json"
    gapped.write_text(json.dumps(report))
    done = subprocess.run([sys.executable, "benchmarks/paired_difference.py", str(gapped), "--arm", RECIPE,
                           "--versus", CONTROL], capture_output=True, text=True)
    assert done.returncode == 2 and "1_from10" in done.stderr and "2 labelled slices" in done.stderr
    other = {"finetune_overrides": ["--config.train.steps=600"],
             "per_run": {"scratch600": json.loads(SLICES_5_10.read_text())["per_run"]["scratch"]}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    done = subprocess.run([sys.executable, "benchmarks/paired_difference.py", str(SLICES_5_10), str(tmp_path / "other.json"),
                           "--arm", RECIPE, "--versus", "scratch600"], capture_output=True, text=True)
    assert done.returncode == 2 and "different --finetune overrides" in done.stderr
    done = subprocess.run([sys.executable, "benchmarks/paired_difference.py", str(SLICES_5_10), "--arm", "mim",
                           "--versus", CONTROL], capture_output=True, text=True)
    assert done.returncode == 2 and "no report holds the arm 'mim'" in done.stderr
