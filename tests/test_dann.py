"""Feature-level domain adaptation (DANN): gradient reversal, the lambda schedule, the train step,
accumulation, resume and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_resume_is_exact, random_semi_batch, tiny_semi_config
from jaxem.config import apply_overrides
from jaxem.errors import UserError
from jaxem.semi import dann
from jaxem.train import parallel
from jaxem.train.state import DannState
from jaxem.train.trainer import build_training, train


def test_gradient_reversal_is_the_identity_forward_and_minus_lambda_times_the_gradient_backward():
    x = jnp.array([1.0, -2.0, 3.0])
    f = lambda v, lam: jnp.sum(jnp.sin(dann.reverse_gradient(v, lam)))  # noqa: E731
    np.testing.assert_array_equal(dann.reverse_gradient(x, 0.7), x)
    grad_x, grad_lam = jax.grad(f, argnums=(0, 1))(x, jnp.float32(0.7))
    np.testing.assert_allclose(grad_x, -0.7 * np.cos(np.asarray(x)), rtol=1e-6)
    assert float(grad_lam) == 0.0


def test_lambda_follows_ganin_and_lempitsky():
    expected = lambda p: 2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0  # noqa: E731
    for step, p in ((0, 0.0), (50, 0.5), (100, 1.0), (200, 1.0)):
        assert float(dann.grl_lambda(step, 100)) == pytest.approx(expected(p), abs=1e-6)
    assert float(dann.grl_lambda(0, 100)) == 0.0 and float(dann.grl_lambda(50, 100)) == pytest.approx(0.98661, abs=1e-5)


def test_domain_loss_trains_the_classifier_down_and_the_features_up():
    """One gradient of the domain loss: its part in the classifier's params is the plain BCE
    gradient; its part in the features is -lambda times the plain one."""
    clf = dann.DomainClassifier((8,))
    rng = np.random.default_rng(0)
    source, target = (jnp.asarray(rng.normal(m, 1.0, (4, 6, 6, 5)), jnp.float32) for m in (0.0, 1.0))
    params = clf.init(jax.random.key(0), source)["params"]
    loss = lambda p, s, t, lam: dann.domain_loss(p, clf, s, t, lam)[0]  # noqa: E731
    reversed_ = jax.grad(loss, argnums=(0, 1, 2))(params, source, target, jnp.float32(0.5))
    plain = jax.grad(loss, argnums=(0, 1, 2))(params, source, target, jnp.float32(-1.0))  # -(-1) = identity
    for a, b in zip(jax.tree.leaves(reversed_[0]), jax.tree.leaves(plain[0])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for a, b in zip(reversed_[1:], plain[1:]):
        np.testing.assert_allclose(a, -0.5 * b, rtol=1e-5, atol=1e-8)
        assert float(jnp.abs(b).max()) > 0


def _dann_config(tmp_path, **fields):
    return tiny_semi_config(tmp_path, **{"semi.dann_weight": 0.5, "semi.dann_widths": "(8,)", **fields})


def test_step_adds_the_domain_term_trains_the_classifier_and_reverses_the_encoder_gradient(tmp_path):
    config = _dann_config(tmp_path, **{"model.norm": "group"})
    mesh = parallel.make_mesh(1)
    _, state, step, _ = build_training(config, mesh)
    assert isinstance(state, DannState) and state.adversary == {}
    batch = random_semi_batch(config, mesh)
    state = state.replace(step=jnp.asarray(config.train.steps // 2, jnp.int32))  # lambda ~ 0.987
    params, classifier = jax.device_get((state.params, state.domain_classifier["params"]))  # the step donates state
    new_state, metrics = step(state, batch)
    m = jax.device_get(metrics)
    assert m["dann_lambda"] == pytest.approx(float(dann.grl_lambda(config.train.steps // 2, config.train.steps)))
    assert m["dann_weight"] == 0.5 and 0 <= m["domain_accuracy"] <= 1 and np.isfinite(m["dann"])
    assert m["loss"] == pytest.approx(m["loss_bce"] + m["loss_dice"] + 0.5 * m["dann"], rel=1e-6)
    after = jax.device_get(new_state.domain_classifier["params"])
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(classifier), jax.tree.leaves(after)))

    # The encoder's gradient of the domain term is -lambda times the gradient that would lower it.
    model = build_training(config, mesh)[0]
    clf, lam = dann.classifier(config.semi), jnp.float32(m["dann_lambda"])

    def domain_term(params, scale):
        features = []
        for image in (batch["image"], batch["unlabelled"]):
            _, captured = model.apply({"params": params}, image, train=True, mutable=["intermediates"],
                                      capture_intermediates=dann.captures_encoder)
            features.append(dann.deepest_features(captured))
        return dann.domain_loss(classifier, clf, *features, scale)[0]

    reversed_, lowering = (jax.grad(domain_term)(params, s)["encoder"] for s in (lam, jnp.float32(-1.0)))
    for a, b in zip(jax.tree.leaves(reversed_), jax.tree.leaves(lowering)):
        np.testing.assert_allclose(a, -float(lam) * b, rtol=1e-4, atol=1e-8)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(lowering)) > 0


def test_a_few_dann_steps_train_with_finite_losses_and_resume_exactly(tmp_path):
    config = _dann_config(tmp_path, **{"semi.weight": 1.0, "train.ema_decay": 0.9})  # with the mean teacher too
    assert_resume_is_exact(config, tmp_path / "run", "domain_classifier", "domain_accuracy")
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["dann"]) and "dann_lambda" in r for r in train_rows)

    for change in (["--config.semi.dann_weight=0"], ["--config.semi.dann_widths=(4,)"]):
        with pytest.raises(UserError, match="DANN domain classifier"):
            train(apply_overrides(config, change + ["--config.train.steps=8"]), tmp_path / "run", progress=False)


@pytest.mark.parametrize("fields, field", [({"semi.dann_weight": -0.1}, "semi.dann_weight"),
                                           ({"semi.dann_widths": "()"}, "semi.dann_widths"),
                                           ({"semi.dann_lr": 0.0}, "semi.dann_lr")])
def test_bad_dann_settings_are_named(tmp_path, fields, field):
    config = _dann_config(tmp_path, **fields)
    with pytest.raises(UserError, match=field):
        train(config, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
