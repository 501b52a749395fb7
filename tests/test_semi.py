"""Mean-teacher semi-supervised training: ramp, consistency against the EMA teacher, data, resume."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_resume_is_exact, random_semi_batch, tiny_semi_config
from jaxem.cli import main
from jaxem.config import apply_overrides
from jaxem.errors import UserError
from jaxem.semi import mean_teacher
from jaxem.train import parallel
from jaxem.train.trainer import build_training, train


def test_rampup_goes_from_exp_minus_5_to_1():
    assert float(mean_teacher.rampup(jnp.array(0), 100)) == pytest.approx(np.exp(-5.0))
    assert float(mean_teacher.rampup(jnp.array(50), 100)) == pytest.approx(np.exp(-5.0 * 0.25))
    assert float(mean_teacher.rampup(jnp.array(500), 100)) == 1.0
    assert float(mean_teacher.rampup(jnp.array(0), 0)) == 1.0


def _semi_config(tmp_path, **fields):
    return tiny_semi_config(tmp_path, **{**{"train.ema_decay": 0.9, "semi.weight": 2.0}, **fields})


_batch = random_semi_batch


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
    config = _semi_config(tmp_path)  # both loaders resume at their exact positions
    assert_resume_is_exact(config, tmp_path / "run", "ema_params", "consistency")

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
                            ({"train.accumulate_steps": 2, "data.batch_size": 8},
                             "semi.batch_size=4 must split into train.accumulate_steps=2 micro-batches on each of 4"),
                            ({"semi.unlabelled_images": "()"}, "needs semi.unlabelled_images")):
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            train(apply_overrides(config, [f"--config.{k}={v}" for k, v in fields.items()]), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert main(["demo", "--config", "demo:tiny", "--workdir", str(tmp_path / "d"), "--no-progress",
                 "--config.semi.weight=1"]) == 2
    assert "needs semi.unlabelled_images" in capsys.readouterr().err


@pytest.mark.parametrize("fields", [{"semi.noise_std": 0.5},
                                    {"semi.weight": 0.0, "semi.adversarial_weight": 0.5, "semi.discriminator_widths": "(4, 8)"}],
                         ids=["mean_teacher", "adversarial"])
def test_accumulated_semi_step_makes_the_whole_batch_update(tmp_path, fields):
    """train.accumulate_steps=2 splits the labelled and the unlabelled crops into 2 micro-batches
    through the one loss: with group norm (no batch statistics) and terms that are means over
    voxels (BCE; consistency; the adversarial BCE), the update, the EMA teacher, the discriminator's
    step and the logged metrics equal those of the whole batch in one pass."""
    base = _semi_config(tmp_path, **{"model.norm": "group", "loss.terms.dice": 0.0, **fields})
    mesh = parallel.make_mesh(1)
    results = []
    for k in (1, 2):
        config = apply_overrides(base, [f"--config.train.accumulate_steps={k}"])
        _, state, step, _ = build_training(config, mesh)
        new_state, metrics = step(state, _batch(config, mesh))
        results.append(jax.device_get((new_state.params, new_state.ema_params, getattr(new_state, "adversary", {}), metrics)))
    (whole, accumulated) = results
    assert whole[3].keys() == accumulated[3].keys()
    assert ("consistency" in whole[3]) == ("adversarial" not in whole[3])
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
