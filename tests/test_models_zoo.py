"""ResNet, ViT, UNETR, U-Net with ResNet encoder: shapes, hand-derived parameter counts,
gradients, bfloat16 vs float32, remat, encoder transfer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem import models
from jaxem.errors import UserError

# XLA's CPU backend spends ~10 s optimising even a tiny U-Net; tests only need correct numbers.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

TINY = {
    "unet": dict(widths=(4, 8, 8)),
    "resnet": dict(widths=(4, 8), blocks=(1, 1)),
    "vit": dict(hidden=16, depth=2, heads=2, patch_size=(4, 4)),
    "unetr": dict(hidden=16, depth=2, heads=2, patch_size=(4, 4), feature_size=4),
}
SHAPES = {2: (16, 24), 3: (4, 16, 16)}  # 3D shapes are anisotropic: few z slices


def tiny_cfg(name, ndim, **overrides):
    cfg = models.default_config(name, ndim)
    cfg.update(TINY[name])
    if ndim == 3 and name in ("vit", "unetr"):
        cfg.patch_size = (2, 4, 4)
    if ndim == 3 and name in ("unet", "resnet"):
        n = len(cfg.widths)
        cfg.pool_factors = ((1, 2, 2),) * (n - 1)
        cfg.kernel_sizes = ((1, 3, 3),) * (n - 1) + (3,)
    cfg.update(overrides)
    return cfg


def run(cfg, batch=2, channels=1, seed=1):
    model = models.build(cfg)
    x = jax.random.normal(jax.random.key(seed), (batch, *SHAPES[cfg.ndim], channels))
    variables = jit(model.init)(jax.random.key(0), x)
    return model, variables, x


def outputs(cfg, batch=2, method=None):
    """Init and apply in one compiled function (one compile per test instead of two)."""
    model = models.build(cfg)
    x = jax.random.normal(jax.random.key(1), (batch, *SHAPES[cfg.ndim], 1))
    return jit(lambda x: model.apply(model.init(jax.random.key(0), x), x, method=method))(x)


def leaves(out):
    return jax.tree.leaves(out)


def n_params(variables):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))


def abstract_variables(cfg, channels=1):
    x = jax.ShapeDtypeStruct((1, *SHAPES[cfg.ndim], channels), jnp.float32)
    return jax.eval_shape(lambda x: models.build(cfg).init(jax.random.key(0), x), x)


@pytest.mark.parametrize("name,ndim,out_channels", [("unetr", 2, 3), ("unetr", 3, 1), ("resnet", 2, 0),
                                                    ("resnet", 3, 0), ("vit", 2, 5), ("vit", 3, 5)])
def test_output_shapes(name, ndim, out_channels):
    out, aux = outputs(tiny_cfg(name, ndim, out_channels=out_channels))  # every model: (output, aux)
    assert aux == {}
    if name == "unetr":
        assert out.shape == (2, *SHAPES[ndim], out_channels)
    else:
        width = {"resnet": 8, "vit": 5}[name]
        assert out.shape == (2, width)
    assert out.dtype == jnp.float32


def test_resnet_features_per_level_anisotropic():
    feats = outputs(tiny_cfg("resnet", 3, depth=50), method="features")
    assert [f.shape for f in feats] == [(2, 4, 16, 16, 16), (2, 4, 8, 8, 32)]  # bottleneck: 4 x width


def test_vit_features_are_token_grids():
    feats = outputs(tiny_cfg("vit", 3), method="features")
    assert [f.shape for f in feats] == [(2, 2, 4, 4, 16)] * 2


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_unet_with_resnet_encoder_shapes(depth):
    cfg = tiny_cfg("unet", 3, encoder="resnet", resnet_depth=depth, resnet_blocks=(1, 1, 1), out_channels=2)
    assert outputs(cfg)[0].shape == (2, *SHAPES[3], 2)


def resnet_count(c, widths, kv, bottleneck, norm=2):
    """Stem + one block per level, ResNet v1 with bias-free convs and norm scale/bias."""
    conv = lambda cin, cout, k=kv: k * cin * cout + norm * cout  # noqa: E731
    a, b = widths
    total = conv(c, a)
    if not bottleneck:
        total += 2 * conv(a, a)                             # level 0: no projection
        total += conv(a, b) + conv(b, b) + conv(a, b, 1)    # level 1: strided, 1x1 projection
        return total
    total += conv(a, a, 1) + conv(a, a) + conv(a, 4 * a, 1) + conv(a, 4 * a, 1)
    total += conv(4 * a, b, 1) + conv(b, b) + conv(b, 4 * b, 1) + conv(4 * a, 4 * b, 1)
    return total


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_param_count(ndim, depth):
    cfg = tiny_cfg("resnet", ndim, depth=depth, kernel_sizes=(3,), pool_factors=(2,), out_channels=7)
    bottleneck = depth == 50
    feat = 8 * (4 if bottleneck else 1)
    expected = resnet_count(2, (4, 8), 3 ** ndim, bottleneck) + feat * 7 + 7
    assert n_params(abstract_variables(cfg, channels=2)) == expected


@pytest.mark.parametrize("ndim", [2, 3])
def test_vit_param_count(ndim):
    cfg = tiny_cfg("vit", ndim, out_channels=3)
    patch = int(np.prod(cfg.patch_size))
    d, depth, m, c = 16, 2, 64, 2
    embed = patch * c * d + d
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)  # 2 LNs, q/k/v/out, MLP
    expected = embed + depth * block + 2 * d + (d * 3 + 3)          # final LN, head
    assert n_params(abstract_variables(cfg, channels=c)) == expected


@pytest.mark.parametrize("ndim", [2, 3])
def test_unetr_param_count(ndim):
    """Counted by hand for hidden 16, depth 2, patch 4 (2D) or 2x4x4 (3D), feature size 4:
    two decoder levels below the token grid; instance norm = scale + bias per channel."""
    cfg = tiny_cfg("unetr", ndim, out_channels=3)
    c, d, m, f, k = 2, 16, 64, 4, 3 ** ndim
    up = (2 ** ndim, 4)  # transposed-conv taps: finest step 2 per axis, coarse step 2 in y, x only (3D z patch is 2)
    vit_part = int(np.prod(cfg.patch_size)) * c * d + d + 2 * (4 * d + 4 * (d * d + d) + 2 * d * m + m + d) + 2 * d
    conv_norm = lambda cin, cout, taps=k: taps * cin * cout + 2 * cout  # noqa: E731 (no conv bias)
    res_block = lambda cin, cout: conv_norm(cin, cout) + conv_norm(cout, cout) + conv_norm(cin, cout, 1)  # noqa: E731
    tconv = lambda cin, cout, taps: taps * cin * cout + cout  # noqa: E731
    skip0 = res_block(c, f)                                        # conv block on the input
    skip1 = tconv(d, 2 * f, up[1]) + conv_norm(2 * f, 2 * f)       # states[0] up one step
    dec1 = tconv(d, 2 * f, up[1]) + res_block(4 * f, 2 * f)        # final state up, concat skip1
    dec0 = tconv(2 * f, f, up[0]) + res_block(2 * f, f)            # up to full size, concat skip0
    head = f * 3 + 3
    assert n_params(abstract_variables(cfg, channels=c)) == vit_part + skip0 + skip1 + dec1 + dec0 + head


def nonzero_grad_check(cfg):
    model, variables, x = run(cfg)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return sum(jnp.mean(jnp.sin(3 * o + 0.1)) for o in leaves(out))

    grads = jit(jax.grad(loss))(variables["params"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    return [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]


@pytest.mark.parametrize("name,ndim,overrides", [
    ("resnet", 2, dict(depth=50, norm="batch")), ("resnet", 3, dict()),
    ("vit", 3, dict()), ("unetr", 2, dict()),
    pytest.param("unet", 3, dict(encoder="resnet", resnet_blocks=(1, 1, 1), bottleneck="aspp",
                                 deep_supervision=True), marks=pytest.mark.slow)])
def test_gradients_reach_every_parameter(name, ndim, overrides):
    assert nonzero_grad_check(tiny_cfg(name, ndim, **overrides)) == []


@pytest.mark.parametrize("name,ndim", [pytest.param("unet", 3, marks=pytest.mark.slow), ("vit", 2),
                                       ("unet", 2), pytest.param("unetr", 2, marks=pytest.mark.slow)])
def test_bfloat16_close_to_float32(name, ndim):
    cfg32 = tiny_cfg(name, ndim, out_channels=2)
    cfg16 = tiny_cfg(name, ndim, out_channels=2, dtype="bfloat16")
    model32, variables, x = run(cfg32)
    out32 = jit(model32.apply)(variables, x)[0]
    out16 = jit(models.build(cfg16).apply)(variables, x)[0]
    assert out16.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract_variables(cfg16)))
    scale = float(jnp.max(jnp.abs(out32)))
    err = float(jnp.max(jnp.abs(out16 - out32)))
    assert err < 0.05 * scale, (err, scale)
    assert err > 0  # bfloat16 compute really happened


@pytest.mark.parametrize("name,ndim,overrides", [pytest.param("unet", 3, dict(block="residual"), marks=pytest.mark.slow),
                                                 ("vit", 2, dict()),
                                                 ("resnet", 2, dict(norm="batch"))])
def test_remat_same_outputs_and_gradients(name, ndim, overrides):
    results = []
    for remat in (False, True):
        cfg = tiny_cfg(name, ndim, remat=remat, **overrides)
        model, variables, x = run(cfg)

        def loss(params):
            (out, _), _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.sin(out)), out

        results.append(jit(jax.value_and_grad(loss, has_aux=True))(variables["params"]))
    (l0, o0), g0 = results[0]
    (l1, o1), g1 = results[1]
    assert jax.tree.structure(g0) == jax.tree.structure(g1)  # same param tree with remat
    np.testing.assert_allclose(o0, o1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", [pytest.param("batch", marks=pytest.mark.slow), "group"])
def test_transfer_resnet_encoder_into_unet(norm):
    common = dict(norm=norm, widths=(4, 8, 8), blocks=(1, 1, 1))
    enc_cfg = tiny_cfg("resnet", 2, **common)
    _, enc_vars, x = run(enc_cfg, seed=3)
    seg_cfg = tiny_cfg("unet", 2, norm=norm, widths=(4, 8, 8), encoder="resnet", resnet_blocks=(1, 1, 1))
    seg_model, seg_vars, _ = run(seg_cfg)
    new = models.transfer_encoder_params(seg_vars, enc_vars)
    for collection in enc_vars:
        same = jax.tree.map(np.array_equal, new[collection]["encoder"], enc_vars[collection]["encoder"])
        assert all(jax.tree.leaves(same))
    # the decoder is untouched and the result runs
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, new["params"]["head"], seg_vars["params"]["head"])))
    seg_model.apply(new, x)


def test_transfer_vit_into_unetr():
    _, enc_vars, _ = run(tiny_cfg("vit", 2))
    _, seg_vars, _ = run(tiny_cfg("unetr", 2))
    new = models.transfer_encoder_params(seg_vars, enc_vars)
    np.testing.assert_array_equal(new["params"]["encoder"]["patch_embed"]["kernel"],
                                  enc_vars["params"]["encoder"]["patch_embed"]["kernel"])


def test_transfer_mismatch_is_clear_error():
    _, enc_vars, _ = run(tiny_cfg("resnet", 2, widths=(4, 16)))
    _, seg_vars, _ = run(tiny_cfg("unet", 2, widths=(4, 8), encoder="resnet", resnet_blocks=(1, 1)))
    with pytest.raises(UserError, match=r"params/encoder/level1_block0/.* has shape .*expects"):
        models.transfer_encoder_params(seg_vars, enc_vars)
