"""Semi-supervised training: the mean teacher (ramp, consistency against the EMA teacher, data,
resume), self-training with pseudo-labels (EMA or run teacher, rounds, slice propagation) and
FixMatch (weak view labels, strong view learns)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_resume_is_exact, random_semi_batch, tiny_semi_config
from jaxem.cli import main
from jaxem.config import apply_overrides
from jaxem.errors import UserError
from jaxem.data.augment import make_photometric_fn, strong_photometric_config
from jaxem.semi import mean_teacher, pseudo_label
from jaxem.train import parallel
from jaxem.train.defaults import base_config
from jaxem.train.trainer import build_training, train, validate_training_config


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
                                    {"semi.weight": 0.0, "semi.adversarial_weight": 0.5, "semi.discriminator_widths": "(4, 8)"},
                                    {"semi.method": "pseudo_label", "semi.confidence": 0.52, "semi.noise_std": 0.5},
                                    {"semi.method": "fixmatch", "semi.confidence": 0.52},
                                    {"semi.weight": 0.0, "semi.dann_weight": 0.5, "semi.dann_widths": "(8,)"}],
                         ids=["mean_teacher", "adversarial", "pseudo_label", "fixmatch", "dann"])
def test_accumulated_semi_step_makes_the_whole_batch_update(tmp_path, fields):
    """train.accumulate_steps=2 splits the labelled and the unlabelled crops into 2 micro-batches
    through the one loss: with group norm (no batch statistics) and terms that are means over
    voxels or crops (BCE; consistency; the adversarial BCE; the pseudo-label BCE, whose confident
    voxels are counted over the whole batch; DANN's domain BCE per crop), the update, the EMA
    teacher, the discriminator's and the domain classifier's steps and the logged metrics equal
    those of the whole batch in one pass."""
    base = _semi_config(tmp_path, **{"model.norm": "group", "loss.terms.dice": 0.0, **fields})
    mesh = parallel.make_mesh(1)
    results = []
    for k in (1, 2):
        config = apply_overrides(base, [f"--config.train.accumulate_steps={k}"])
        _, state, step, _ = build_training(config, mesh)
        new_state, metrics = step(state, _batch(config, mesh))
        results.append(jax.device_get((new_state.params, new_state.ema_params, getattr(new_state, "adversary", {}),
                                       getattr(new_state, "domain_classifier", {}), metrics)))
    (whole, accumulated) = results
    assert whole[-1].keys() == accumulated[-1].keys()
    terms = [t for t in ("consistency", "adversarial", "pseudo_label", "dann") if t in whole[-1]]
    assert len(terms) == 1 and float(whole[-1][terms[0]]) > 0
    if "pseudo_label" in whole[-1]:
        assert 0 < float(whole[-1]["pseudo_confident"]) < 1
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pseudo_label_loss_is_bce_on_confident_voxels_only():
    """Teacher probabilities 0.95, 0.6, 0.02, 0.5 at confidence 0.9: voxels 0 (label 1) and 2
    (label 0) are confident; the loss is their mean BCE, whatever the student says elsewhere."""
    probs = jnp.array([0.95, 0.6, 0.02, 0.5]).reshape(1, 2, 2, 1)
    logits = jnp.array([0.3, -2.0, 1.5, 4.0]).reshape(1, 2, 2, 1)
    pseudo, fraction = pseudo_label.pseudo_targets("boundary", probs, 0.9)
    bce = lambda x, y: -(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-x))))  # noqa: E731
    assert float(fraction) == 0.5
    assert float(pseudo_label.loss("boundary", logits, **pseudo)) == pytest.approx((bce(0.3, 1) + bce(1.5, 0)) / 2, rel=1e-6)
    grad = jax.grad(lambda x: pseudo_label.loss("boundary", x, **pseudo))(logits)
    np.testing.assert_array_equal(np.asarray(grad).ravel()[[1, 3]], 0.0)
    # Multiclass: the largest softmax probability decides; cross-entropy against its class.
    probs3 = jnp.array([[0.92, 0.05, 0.03], [0.4, 0.35, 0.25]]).reshape(1, 2, 1, 3)
    logits3 = jnp.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]).reshape(1, 2, 1, 3)
    pseudo, fraction = pseudo_label.pseudo_targets("multiclass", probs3, 0.9)
    expected = -np.log(np.exp(0.0) / np.exp([0.0, 1.0, -1.0]).sum())
    assert float(fraction) == 0.5
    assert float(pseudo_label.loss("multiclass", logits3, **pseudo)) == pytest.approx(expected, rel=1e-6)
    # Nothing confident: the term is 0, not 0 / 0.
    none, fraction = pseudo_label.pseudo_targets("boundary", jnp.full((1, 2, 2, 1), 0.5), 0.9)
    assert float(fraction) == 0 and float(pseudo_label.loss("boundary", logits, **none)) == 0


def test_slice_propagation_labels_the_unannotated_neighbours():
    """Section 2 of 7 annotated, k = 2: sections 0, 1, 3, 4 get the teacher's confident labels;
    2 (already labelled) and 5, 6 (too far) do not."""
    mask = np.zeros((1, 7, 2, 2), np.float32)
    mask[0, 2, 0, 0] = 1  # one labelled voxel marks the section as annotated
    near = np.asarray(pseudo_label.near_annotated_sections(jnp.asarray(mask), 2))
    np.testing.assert_array_equal(near[0, :, 0, 0], [1, 1, 0, 1, 1, 0, 0])
    probs = np.full((1, 7, 2, 2, 1), 0.97, np.float32)
    probs[0, 1] = 0.6  # unconfident: left out
    pseudo, fraction = pseudo_label.propagated_targets("boundary", jnp.asarray(probs), jnp.asarray(mask), 2, 0.9)
    assert float(fraction) == pytest.approx(3 / 7)
    np.testing.assert_array_equal(np.asarray(pseudo["weight"])[0, :, 0, 0, 0] > 0, [1, 0, 0, 1, 1, 0, 0])


def test_strong_view_changes_intensities_not_geometry():
    """FixMatch's strong view is the weak view with more photometric ops only: the image changes,
    but without noise and blur (per-voxel monotone maps: contrast, brightness, gamma) every voxel's
    rank is kept, so a bright square stays exactly where it was; with them it still correlates."""
    image = np.zeros((4, 16, 16, 1), np.float32)
    image[:, 4:9, 6:12] = 1.0
    image = jnp.asarray(image + 0.01 * np.arange(16 * 16).reshape(1, 16, 16, 1) / 256)
    cfg = strong_photometric_config()
    strong = make_photometric_fn(cfg, 2)(jax.random.PRNGKey(0), image)
    assert strong.shape == image.shape and not np.allclose(strong, image, atol=0.05)
    for a, b in zip(np.asarray(image), np.asarray(strong)):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5
    cfg.noise.p, cfg.blur.p = 0.0, 0.0
    monotone = np.asarray(make_photometric_fn(cfg, 2)(jax.random.PRNGKey(1), image))
    for a, b in zip(np.asarray(image), monotone):
        np.testing.assert_array_equal(np.argsort(a.ravel(), kind="stable"), np.argsort(b.ravel(), kind="stable"))


def _train_rows(config, workdir, fields):
    train(apply_overrides(config, [f"--config.{k}={v}" for k, v in fields.items()]), workdir, progress=False)
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_pseudo_label_and_fixmatch_runs_train_and_report_confidence(tmp_path):
    """A few steps of each method (pseudo_label with the EMA teacher, then with that run as a frozen
    teacher over 2 rounds; fixmatch): finite losses, the term, its weight and the confident fraction logged."""
    config = _semi_config(tmp_path, **{"semi.confidence": 0.55, "train.steps": 4, "train.eval_every": 0})
    runs = {"ema": {"semi.method": "pseudo_label"}, "fixmatch": {"semi.method": "fixmatch"},
            "run_teacher": {"semi.method": "pseudo_label", "semi.teacher": str(tmp_path / "ema"), "semi.rounds": 2}}
    logged = {}
    for name, fields in runs.items():
        rows = logged[name] = _train_rows(config, tmp_path / name, fields)
        assert rows and all(np.isfinite(r["loss"]) for r in rows), name
        assert all(0 <= r["pseudo_confident"] <= 1 and "pseudo_label" in r and "pseudo_label_weight" in r
                   for r in rows), name
    # Same seed and crops: only the teacher differs (the trained run's weights, not the fresh EMA).
    assert logged["run_teacher"][0]["pseudo_confident"] != logged["ema"][0]["pseudo_confident"]


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _allclose(a, b):
    return all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


def test_each_self_training_round_is_labelled_by_the_student_frozen_when_it_began(tmp_path):
    """semi.rounds=3 over 6 steps (rounds of 2): the steps that begin rounds 2 and 3 freeze the
    student's EMA weights as they are then into the state's round_teacher, which stays put within
    the round; in round 1 (no run teacher) the live EMA labels, later the round's teacher does."""
    config = _semi_config(tmp_path, **{"semi.method": "pseudo_label", "semi.rounds": 3, "semi.confidence": 0.55,
                                       "train.steps": 6})
    mesh = parallel.make_mesh(1)
    validate_training_config(config, mesh)
    _, state, step, _ = build_training(config, mesh)
    assert type(state).__name__ == "RoundsState"
    batch = _batch(config, mesh)
    sharper = lambda s: s.replace(round_teacher=jax.tree.map(lambda x: 3 * x, _copy(s.round_teacher)))  # noqa: E731
    for at in range(6):
        ema_before = _copy(state.variables(use_ema=True))
        teacher_before = _copy(state.round_teacher)
        _, with_other_teacher = step(sharper(_copy(state)), batch)
        state, metrics = step(state, batch)
        confident, other = float(metrics["pseudo_confident"]), float(with_other_teacher["pseudo_confident"])
        if at in (2, 4):  # a round begins: the student as it is becomes the teacher, whatever was there
            assert _allclose(state.round_teacher, ema_before) and not _allclose(state.round_teacher, teacher_before)
            assert confident == other
        else:
            assert _allclose(state.round_teacher, teacher_before)
            if at < 2:  # round 1: the live EMA labels
                assert confident == other
            else:  # the round's frozen teacher labels
                assert confident != other
    assert int(state.step) == 6


def test_self_training_rounds_resume_exactly_and_change_the_checkpoint_layout(tmp_path):
    """The rounds' teacher is checkpointed: a run killed after step 3 (round 2 of 3) resumes to the
    same teacher at step 6; a workdir of the run without rounds is refused, naming the teacher."""
    config = _semi_config(tmp_path, **{"semi.method": "pseudo_label", "semi.rounds": 3, "semi.confidence": 0.55})
    assert_resume_is_exact(config, tmp_path / "run", "round_teacher", "pseudo_confident")
    with pytest.raises(UserError, match="frozen teacher of self-training rounds"):
        train(apply_overrides(config, ["--config.semi.rounds=1"]), tmp_path / "run", progress=False)


def test_pseudo_label_settings_that_cannot_work_are_named(tmp_path):
    config = _semi_config(tmp_path, **{"semi.method": "pseudo_label"})
    for fields, message in (({"train.ema_decay": 0.0}, "semi.method='pseudo_label' needs a teacher"),
                            ({"semi.confidence": 0.5}, "semi.confidence=0.5 must lie in (0.5, 1]"),
                            ({"semi.confidence": 1.2, "semi.method": "fixmatch"}, "semi.confidence=1.2 must lie"),
                            ({"semi.method": "pseudo"}, "semi.method='pseudo' must be one of"),
                            ({"semi.propagate_slices": 1}, "semi.propagate_slices=1 must be >= 0; > 0 needs"),
                            ({"semi.rounds": 2, "semi.method": "fixmatch"}, "semi.rounds=2 must be >= 1; > 1 needs"),
                            ({"semi.rounds": 99, "train.steps": 10}, "semi.rounds=99 must be >= 1; > 1 needs"),
                            ({"semi.teacher": str(tmp_path / "none")}, "semi.teacher=")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
            train(apply_overrides(config, [f"--config.{k}={v}" for k, v in fields.items()]), tmp_path / "x", progress=False)


def test_slice_propagation_trains_in_a_3d_step(tmp_path):
    """A 3D run with sections 2-3 of 6 annotated and semi.propagate_slices=1: the step adds the
    propagated term on sections 1 and 4 (where the EMA teacher is confident) and logs its fraction."""
    config = apply_overrides(base_config(ndim=3, model="unet"), [f"--config.{k}={v}" for k, v in {
        "data.crop_shape": "(6, 16, 16)", "data.batch_size": 2, "model.widths": "(4, 8)", "model.out_channels": 1,
        "semi.batch_size": 2, "semi.weight": 1.0, "semi.method": "pseudo_label", "semi.confidence": 0.55,
        "semi.propagate_slices": 1, "train.ema_decay": 0.9, "semi.unlabelled_images": "('u.zarr',)"}.items()])
    mesh = parallel.make_mesh(1)
    validate_training_config(config, mesh)
    _, state, step, _ = build_training(config, mesh)
    rng = np.random.default_rng(0)
    shape = (2, 6, 16, 16)
    mask = np.zeros(shape, np.float32)
    mask[:, 2:4] = 1
    batch = {"image": rng.normal(size=shape + (1,)).astype(np.float32), "mask": mask,
             "labels": (rng.random(shape) < 0.5).astype(np.int32),
             "unlabelled": rng.normal(size=shape + (1,)).astype(np.float32)}
    _, metrics = step(state, jax.device_put(batch, parallel.data_sharding(mesh)))
    m = jax.device_get(metrics)
    assert 0 < m["propagated_fraction"] <= 2 / 6 and np.isfinite(m["propagated"]) and m["propagated"] > 0
    supervised = m["loss_bce"] + m["loss_dice"]
    assert m["loss"] == pytest.approx(supervised + m["pseudo_label_weight"] * (m["propagated"] + m["pseudo_label"]), rel=1e-5)
