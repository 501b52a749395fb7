"""Mean-teacher semi-supervised training: ramp, consistency against the EMA teacher, data, resume."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem.cli import main
from jaxem.commands.demo import with_data_paths, write_synthetic_data
from jaxem.config import apply_overrides, load_config
from jaxem.errors import UserError
from jaxem.semi import mean_teacher
from jaxem.train import parallel
from jaxem.train.loop import build_training, train


def test_rampup_goes_from_exp_minus_5_to_1():
    assert float(mean_teacher.rampup(jnp.array(0), 100)) == pytest.approx(np.exp(-5.0))
    assert float(mean_teacher.rampup(jnp.array(50), 100)) == pytest.approx(np.exp(-5.0 * 0.25))
    assert float(mean_teacher.rampup(jnp.array(500), 100)) == 1.0
    assert float(mean_teacher.rampup(jnp.array(0), 0)) == 1.0


def _semi_config(tmp_path, **fields):
    config = load_config("demo:tiny")
    paths = write_synthetic_data(config, tmp_path / "data")
    overrides = {"train.ema_decay": 0.9, "semi.weight": 2.0, "semi.rampup_steps": 4, "semi.batch_size": 4,
                 "semi.unlabelled_images": f"('{paths['test'][0]}',)", **fields}
    config = apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    return with_data_paths(config, paths)


def _batch(config, mesh, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.data.batch_size, *config.data.crop_shape)
    put = lambda x: jax.device_put(x, parallel.data_sharding(mesh))  # noqa: E731
    return {"image": put(rng.normal(size=shape + (1,)).astype(np.float32)),
            "labels": put((rng.random(shape) < 0.5).astype(np.int32)), "mask": put(np.ones(shape, np.float32)),
            "unlabelled": put(rng.normal(size=(config.semi.batch_size, *config.data.crop_shape, 1)).astype(np.float32))}


def test_teacher_sees_the_students_crop_and_the_term_adds_to_the_loss(tmp_path):
    """At step 0 the teacher (EMA) equals the student, so without input noise (and with group norm
    and no dropout) their probabilities agree exactly: the consistency term compares the same
    augmented crop, flips and warps included. With noise it is positive and enters the loss with
    weight * ramp."""
    mesh = parallel.make_mesh(1)
    quiet = _semi_config(tmp_path, **{"semi.noise_std": 0.0})
    _, state, step, _ = build_training(quiet, mesh)
    _, metrics = step(state, _batch(quiet, mesh))
    assert float(metrics["consistency"]) < 1e-10

    noisy = _semi_config(tmp_path, **{"semi.noise_std": 0.5})
    _, state, step, _ = build_training(noisy, mesh)
    _, metrics = step(state, _batch(noisy, mesh))
    m = jax.device_get(metrics)
    assert m["consistency"] > 1e-6
    assert m["consistency_weight"] == pytest.approx(2.0 * np.exp(-5.0))
    assert m["loss"] == pytest.approx(m["loss_bce"] + m["loss_dice"] + m["consistency_weight"] * m["consistency"], rel=1e-6)


def test_semi_supervised_run_resumes_exactly_and_scores(tmp_path):
    config = _semi_config(tmp_path)  # 6 steps, checkpoints at 3 and 6
    first = train(config, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert first["final_step"] == 6 and all("consistency" in r for r in rows if r["split"] == "train")
    from jaxem.train.checkpoint import restore_on_this_host
    whole = restore_on_this_host(tmp_path / "run" / "checkpoints" / "6" / "state")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    assert train(config, tmp_path / "run", progress=False)["start_step"] == 3  # both loaders resume
    resumed = restore_on_this_host(tmp_path / "run" / "checkpoints" / "6" / "state")
    for a, b in zip(jax.tree.leaves(whole["ema_params"]), jax.tree.leaves(resumed["ema_params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # Turning the mean teacher off (or on) in a workdir: refused by the loader's resume, either way.
    shutil.copytree(tmp_path / "run", tmp_path / "sup")
    with pytest.raises(UserError, match="semi-supervised training turned on or off"):
        train(apply_overrides(config, ["--config.semi.weight=0", "--config.train.steps=8"]), tmp_path / "sup", progress=False)
    train(apply_overrides(config, ["--config.semi.weight=0"]), tmp_path / "plain", progress=False)
    with pytest.raises(UserError, match="semi-supervised training turned on or off"):
        train(apply_overrides(config, ["--config.train.steps=8"]), tmp_path / "plain", progress=False)


def test_semi_settings_that_cannot_work_are_named(tmp_path, capsys):
    config = _semi_config(tmp_path)
    for fields, message in (({"train.ema_decay": 0.0}, "set train.ema_decay > 0"),
                            ({"train.accumulate_steps": 2}, "accumulate_steps=1"),
                            ({"semi.unlabelled_images": "()"}, "needs semi.unlabelled_images")):
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            train(apply_overrides(config, [f"--config.{k}={v}" for k, v in fields.items()]), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert main(["demo", "--config", "demo:tiny", "--workdir", str(tmp_path / "d"), "--no-progress",
                 "--config.semi.weight=1"]) == 2
    assert "needs semi.unlabelled_images" in capsys.readouterr().err
