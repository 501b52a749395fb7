"""The demo end to end at a tiny size: data -> train -> predict -> instances -> scores -> files; rerun resumes."""

import json

from jaxem import cli


def test_demo_end_to_end_and_resume(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli.main(["demo", "--workdir", str(workdir), "--config", "demo:tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vrand" in out and "threshold" in out
    for name in ("config.json", "versions.json", "metrics.jsonl", "training_curves.png", "overlay.png",
                 "results.json", "predictions.zarr", "checkpoints", "tensorboard", "tuning.json", "tuning.png",
                 "tune_predictions.zarr"):
        assert (workdir / name).exists(), name
    results = json.loads((workdir / "results.json").read_text())
    assert json.loads((workdir / "tuning.json").read_text())["image"].endswith("val_raw.zarr")  # not the scored volume
    assert set(results["tuned_settings"]) == {"model", "threshold_baseline"}
    for side in ("model", "threshold_baseline", "model_tuned", "threshold_baseline_tuned"):
        for key in ("vrand", "vinfo", "voi_split", "voi_merge", "adapted_rand_error", "dice", "iou"):
            assert 0.0 <= results[side][key] <= (20.0 if key.startswith("voi") else 1.0)
    assert results["training"]["final_step"] == 6
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "val"}

    # Same command again: resumes at the last step (no new training steps), same scores.
    capsys.readouterr()
    assert cli.main(["demo", "--workdir", str(workdir), "--config", "demo:tiny", "--no-progress"]) == 0
    assert "already holds a run trained to step 6 (train.steps=6): nothing to train" in capsys.readouterr().out
    again = json.loads((workdir / "results.json").read_text())
    assert again["training"]["start_step"] == 6
    assert again["model"]["vrand"] == results["model"]["vrand"]


def test_demo_refuses_workdir_of_another_experiment(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli.main(["demo", "--workdir", str(workdir), "--config", "demo:tiny", "--no-progress",
                     "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2"]) == 0
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    code = cli.main(["demo", "--workdir", str(workdir), "--config", "demo:tiny", "--no-progress",
                     "--config.model.widths=(8, 16)"])
    err = capsys.readouterr().err
    assert code == 2 and "different `model` config" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
