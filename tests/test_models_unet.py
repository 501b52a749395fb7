"""U-Net: shapes in 2D/3D (anisotropic too), hand-derived parameter counts, gradients, errors."""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem import models
from jaxem.errors import UserError

# XLA's CPU backend spends ~10 s optimising even a tiny U-Net; tests only need correct numbers.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def small_cfg(ndim, **overrides):
    cfg = models.default_config("unet", ndim)
    cfg.widths = (4, 8, 16)
    cfg.update(overrides)
    return cfg


def init_only(cfg, shape, channels=1):
    model = models.build(cfg)
    x = jax.random.normal(jax.random.key(1), (2, *shape, channels))
    return model, jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False), x


def init_apply(cfg, shape, channels=1, train=False):
    model = models.build(cfg)
    x = jax.random.normal(jax.random.key(1), (2, *shape, channels))
    variables = jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
    if train:
        out, _ = jit(model.apply, static_argnames=("train", "mutable"))(
            variables, x, train=True, mutable=("batch_stats",))
    else:
        out = jit(model.apply, static_argnames="train")(variables, x, train=False)
    return model, variables, x, out


def abstract_variables(cfg, shape, channels=1):
    """Variable shapes without computing anything (for parameter counts)."""
    x = jax.ShapeDtypeStruct((1, *shape, channels), jnp.float32)
    return jax.eval_shape(lambda x: models.build(cfg).init(jax.random.key(0), x, train=False), x)


def n_params(variables):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("ndim,shape,norm", [(2, (32, 24), n) for n in ("batch", "group", "instance", "layer", "none")]
                         + [(3, (8, 16, 12), "batch")])
def test_output_shape_every_norm(ndim, shape, norm):
    cfg = small_cfg(ndim, norm=norm, out_channels=3)
    model = models.build(cfg)
    x = jax.random.normal(jax.random.key(1), (2, *shape, 1))
    (out, aux), _ = jit(lambda x: model.apply(model.init(jax.random.key(0), x, train=False), x, train=True,
                                                  mutable=["batch_stats"]))(x)
    assert aux == {}
    assert out.shape == (2, *shape, 3) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_anisotropic_hybrid_3d_with_deep_supervision_and_aspp():
    cfg = small_cfg(3, widths=(4, 8, 16, 16), kernel_sizes=((1, 3, 3), (1, 3, 3), 3, 3),
                    pool_factors=((1, 2, 2), (1, 2, 2), 2), deep_supervision=True,
                    bottleneck="aspp", block="residual", out_channels=3)
    _, variables, _, (logits, aux) = init_apply(cfg, (4, 32, 32))
    aux = aux["deep_supervision"]
    assert logits.shape == (2, 4, 32, 32, 3)
    assert [a.shape for a in aux] == [(2, 4, 16, 16, 3), (2, 4, 8, 8, 3)]
    kernel = variables["params"]["encoder"]["level0"]["ConvNormAct_0"]["Conv_0"]["kernel"]
    assert kernel.shape == (1, 3, 3, 1, 4)


def unet_param_count(c_in, widths, k, pool, out, ndim, norm_params=2):
    """Plain U-Net, two bias-free convs + norm (scale, bias) per block, transposed-conv up-sampling."""
    kv, pv = k ** ndim, pool ** ndim
    conv = lambda cin, cout: kv * cin * cout + norm_params * cout  # noqa: E731
    total, cin = 0, c_in
    for w in widths:  # encoder
        total += conv(cin, w) + conv(w, w)
        cin = w
    for fine, coarse in zip(widths[:-1], widths[1:]):  # decoder
        total += pv * coarse * fine + fine          # transposed conv with bias
        total += conv(2 * fine, fine) + conv(fine, fine)
    return total + widths[0] * out + out            # 1x1 head with bias


@pytest.mark.parametrize("ndim,k", [(2, 3), (3, 3), (2, 5)])
def test_param_count_matches_formula(ndim, k):
    cfg = small_cfg(ndim, kernel_sizes=(k,), out_channels=2)
    shape = (8,) * ndim
    variables = abstract_variables(cfg, shape, channels=3)
    assert n_params(variables) == unet_param_count(3, (4, 8, 16), k, 2, 2, ndim)


def test_param_count_no_norm_has_conv_biases():
    cfg = small_cfg(2, norm="none", out_channels=1)
    variables = abstract_variables(cfg, (8, 8))
    # without norm each conv has a bias (1 per output channel) instead of scale+bias (2)
    assert n_params(variables) == unet_param_count(1, (4, 8, 16), 3, 2, 1, 2, norm_params=1)


@pytest.mark.parametrize("overrides", [dict(norm="batch", block="residual"),
                                       dict(bottleneck="dilated", deep_supervision=True)])
def test_gradients_reach_every_parameter(overrides):
    cfg = small_cfg(2, **overrides)
    model, variables, x = init_only(cfg, (16, 16))

    def loss(params):
        (out, aux), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        out = out + sum(jnp.mean(a) for a in aux.get("deep_supervision", []))
        return jnp.mean(jnp.sin(3 * out) * x)

    grads = jit(jax.grad(loss))(variables["params"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
    assert not zero, f"parameters with zero gradient: {zero}"


def test_batch_stats_update_in_training():
    cfg = small_cfg(2, norm="batch")
    model, variables, x = init_only(cfg, (16, 16))
    _, updates = jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_check_input_shape_names_nearest_sizes():
    cfg = models.default_config("unet", 2)
    with pytest.raises(UserError, match=r"crop \(100, 100\) cannot pass 3 poolings by \(2, 2\); "
                                        r"nearest valid sizes: \(96, 96\) or \(104, 104\)\."):
        models.check_input_shape(cfg, (100, 100))
    models.check_input_shape(cfg, (96, 64))
    aniso = small_cfg(3, pool_factors=((1, 2, 2), 2))
    assert models.valid_shape(aniso, (7, 30, 30), "down") == (6, 28, 28)
    assert models.valid_shape(aniso, (7, 30, 30), "up") == (8, 32, 32)
    with pytest.raises(UserError, match="2 axes but model.ndim is 3"):
        models.check_input_shape(aniso, (32, 32))


@pytest.mark.parametrize("field,value,message", [
    ("norm", "weird", "model.norm"), ("kernel_sizes", (3, 3), "kernel_sizes has 2 entries"),
    ("pool_factors", ((2, 2, 2),), "3 axes, expected 2"), ("block", "dense", "model.block"),
    ("dtype", "float16", "model.dtype")])
def test_bad_config_is_user_error(field, value, message):
    cfg = small_cfg(2)
    cfg[field] = value
    with pytest.raises(UserError, match=message):
        models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown"):
        models.default_config("segformer", 2)
