"""Output-space adversarial domain adaptation: the discriminator, its losses, the train step, resume."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_resume_is_exact, random_semi_batch, tiny_semi_config
from jaxem.commands.demo import write_synthetic_data
from jaxem.config import apply_overrides, load_config
from jaxem.errors import UserError
from jaxem.semi import adversarial
from jaxem.train import parallel
from jaxem.train.state import AdversarialState
from jaxem.train.trainer import build_training, train


def test_discriminator_halves_every_axis_long_enough_in_2d_and_3d():
    disc = adversarial.Discriminator((4, 8, 8))
    for shape, expected in (((2, 64, 48, 3), (2, 8, 6, 1)), ((2, 8, 64, 64, 12), (2, 4, 8, 8, 1))):
        params = disc.init(jax.random.key(0), jnp.zeros(shape))["params"]
        assert disc.apply({"params": params}, jnp.zeros(shape)).shape == expected
    # 3x3 kernels: K*3*3*4 + 4, then 4*9*8 + 8, 8*9*8 + 8, 8*9*1 + 1 parameters (2D, K = 3 channels).
    params = disc.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == (3 * 9 * 4 + 4) + (4 * 9 * 8 + 8) + (8 * 9 * 8 + 8) + (8 * 9 + 1)


def _maps(rng, n, blur):
    """Membrane-like maps (lines every 8 px); `blur` smears them as a shifted domain would."""
    from scipy import ndimage

    maps = np.zeros((n, 32, 32), np.float32)
    for i in range(n):
        off = rng.integers(0, 8, size=2)
        maps[i, off[0]::8, :] = 1.0
        maps[i, :, off[1]::8] = 1.0
        if blur:
            maps[i] = ndimage.gaussian_filter(maps[i], blur)
            maps[i] /= maps[i].max()
    return jnp.asarray(maps[..., None])


def test_discriminator_learns_to_tell_the_domains_apart_and_the_segmenter_loss_fools_it():
    cfg = load_config("demo:tiny").semi
    cfg.unlock()
    cfg.discriminator_widths, cfg.discriminator_lr = (8, 16), 3e-3
    rng = np.random.default_rng(0)
    source, target = _maps(rng, 8, 0), _maps(rng, 8, 2.0)
    disc = adversarial.discriminator(cfg)
    params = disc.init(jax.random.key(0), source)["params"]
    adversary = {"params": params, "opt_state": adversarial.optimizer(cfg).init(params)}
    update = jax.jit(lambda a: adversarial.update_discriminator(a, cfg, source, target))
    first = None
    for _ in range(60):
        adversary, metrics = update(adversary)
        first = first or float(metrics["discriminator_loss"])
    assert float(metrics["discriminator_loss"]) < 0.5 * first and float(metrics["discriminator_accuracy"]) > 0.95

    # The segmenter's loss sends no gradient into the discriminator, only into the predictions,
    # and descending it makes the target maps pass for source ones.
    d_params = jax.grad(adversarial.segmenter_loss, argnums=1)(disc, adversary["params"], target)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(d_params))
    fooled = target
    grad = jax.jit(jax.grad(lambda p: adversarial.segmenter_loss(disc, adversary["params"], p)))
    for _ in range(30):
        fooled = jnp.clip(fooled - 0.5 * grad(fooled), 0.0, 1.0)
    loss_of = lambda maps: float(adversarial.segmenter_loss(disc, adversary["params"], maps))  # noqa: E731
    assert loss_of(fooled) < 0.5 * loss_of(target)


def _adv_config(tmp_path, **fields):
    return tiny_semi_config(tmp_path, **{**{"semi.adversarial_weight": 0.5, "semi.discriminator_widths": "(4, 8)"}, **fields})


_batch = random_semi_batch


def test_step_adds_the_adversarial_term_and_updates_the_discriminator(tmp_path):
    config = _adv_config(tmp_path)
    mesh = parallel.make_mesh(1)
    _, state, step, _ = build_training(config, mesh)
    assert type(state) is AdversarialState  # no DANN field: workdirs from before DANN keep resuming
    before = jax.device_get(state.adversary["params"])
    new_state, metrics = step(state, _batch(config, mesh))
    m = jax.device_get(metrics)
    assert m["adversarial_weight"] == pytest.approx(0.5 * np.exp(-5.0))
    assert m["loss"] == pytest.approx(m["loss_bce"] + m["loss_dice"] + m["adversarial_weight"] * m["adversarial"], rel=1e-6)
    assert 0 < m["discriminator_loss"] and 0 <= m["discriminator_accuracy"] <= 1 and "consistency" not in m
    after = jax.device_get(new_state.adversary["params"])
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))

    # With the mean teacher on as well, both terms enter the loss with their own weights.
    both = _adv_config(tmp_path, **{"semi.weight": 2.0, "train.ema_decay": 0.9})
    _, state, step, _ = build_training(both, mesh)
    m = jax.device_get(step(state, _batch(both, mesh))[1])
    assert m["loss"] == pytest.approx(m["loss_bce"] + m["loss_dice"] + m["adversarial_weight"] * m["adversarial"]
                                      + m["consistency_weight"] * m["consistency"], rel=1e-6)


def test_adversarial_step_is_the_same_on_4_devices_as_on_1(tmp_path):
    config = _adv_config(tmp_path, **{"model.norm": "group"})  # batch norm statistics are per device
    results = []
    for n in (1, 4):
        mesh = parallel.make_mesh(n)
        _, state, step, _ = build_training(config, mesh)
        new_state, metrics = step(state, _batch(config, mesh))
        results.append(jax.device_get((new_state.adversary["params"], metrics["discriminator_loss"], metrics["adversarial"])))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_adversarial_run_resumes_exactly_and_refuses_a_changed_discriminator(tmp_path):
    config = _adv_config(tmp_path)
    assert_resume_is_exact(config, tmp_path / "run", "adversary", "discriminator_accuracy")

    for change in (["--config.semi.adversarial_weight=0", "--config.semi.weight=1", "--config.train.ema_decay=0.9"],
                   ["--config.semi.discriminator_widths=(4, 4)"]):
        with pytest.raises(UserError, match="domain discriminator"):
            train(apply_overrides(config, change + ["--config.train.steps=8"]), tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="semi.discriminator_widths"):
        train(apply_overrides(config, ["--config.semi.discriminator_widths=()"]), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_domain_shift_benchmark_builds_a_noisier_blurrier_target_and_the_arms_it_names(tmp_path):
    from scipy import ndimage

    from benchmarks import domain_shift
    from jaxem.data.volume import open_volume

    config = load_config("demo:tiny")
    source = write_synthetic_data(config, tmp_path / "source")
    target = domain_shift.write_target_domain(config, tmp_path / "target", "tissue_and_acquisition")
    src, tgt = (open_volume(p[0]).read().astype(np.float32) for p in (source["test"], target["test"]))
    # Noise: the high-frequency residual (image minus its 3x3 median) is larger in the target.
    residual = lambda x: np.abs(x - ndimage.median_filter(x, (1, 3, 3))).mean() / x.std()  # noqa: E731
    assert residual(tgt) > 1.3 * residual(src)
    assert open_volume(target["test"][1]).read().max() > 0  # target labels exist (oracle, scoring)

    arms = {arm: domain_shift.arm_config(arm, config, source, target, 0.05) for arm in domain_shift.ARMS}
    assert arms["source_only"].data.train_images == (source["train"][0],) and arms["source_only"].semi.weight == 0
    assert arms["oracle"].data.train_labels == (target["train"][1],)
    assert arms["adversarial"].semi.adversarial_weight == 0.05 and arms["adversarial"].semi.weight == 0
    assert arms["adversarial"].semi.unlabelled_images == (target["train"][0],)
    assert arms["dann"].semi.dann_weight == domain_shift.DANN_WEIGHT > 0 and arms["dann"].semi.adversarial_weight == 0
    assert arms["dann"].semi.unlabelled_images == (target["train"][0],) and arms["dann"].semi.weight == 0
    assert arms["mean_teacher"].semi.weight == 1.0 and arms["mean_teacher"].train.ema_decay == 0.99
    assert arms["both"].semi.weight == 1.0 and arms["both"].semi.adversarial_weight == 0.05
    assert arms["adabn"].model.norm == "batch" and arms["adabn"].semi.adversarial_weight == 0
