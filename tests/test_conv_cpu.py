"""The CPU fast paths for 3D convolutions (jaxem.models.layers) equal XLA's own convolutions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem.models import layers

DN = ("NDHWC", "DHWIO", "NDHWC")


@pytest.mark.parametrize("kernel,strides,dilation,padding,groups", [
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), "SAME", 1),
    ((1, 3, 3), (1, 1, 1), (1, 1, 1), "SAME", 1),
    ((3, 1, 1), (1, 1, 1), (1, 1, 1), "SAME", 1),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), "SAME", 1),
    ((3, 3, 3), (1, 2, 2), (1, 1, 1), "SAME", 2),
    ((3, 3, 3), (1, 1, 1), (2, 3, 3), "SAME", 1),
    ((2, 4, 4), (2, 4, 4), (1, 1, 1), "VALID", 1),  # ViT patch embedding
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), [(1, 2), (0, 1), (2, 0)], 1),
])
def test_3d_conv_as_2d_slices_equals_xla_conv(kernel, strides, dilation, padding, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 12, 10, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 4 // groups, 6)), jnp.float32)

    def ours(x, w):  # called as flax's nn.Conv calls it, with channels-last dimension numbers
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, DN)
        return layers.conv_general_dilated(x, w, strides, padding, None, dilation, dn, groups, slices=True)

    def xla(x, w):
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, DN)
        return jax.lax.conv_general_dilated(x, w, strides, padding, None, dilation, dn, groups)

    np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    half = ours(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), xla(x, w), rtol=0.05, atol=0.2)


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 2)])
def test_upconv_equals_flax_conv_transpose(factors):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *(5,) * len(factors), 3)), jnp.float32)
    ours, flax_ = layers.UpConv(4, factors), nn.ConvTranspose(4, factors, strides=factors)
    params = ours.init(jax.random.key(0), x)
    reference = flax_.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference)  # checkpoints interchange
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    y = ours.apply(params, x)
    assert y.shape == (2, *(5 * f for f in factors), 4)
    np.testing.assert_allclose(y, flax_.apply(params, x), rtol=1e-5, atol=1e-5)


def test_conv_form_is_a_module_field_and_flop_counts_use_xla_convs():
    """The conv form is fixed when the model is built (CPU default: 'slices'), not read while tracing;
    FLOP counts come from the model's own 3D convs, not the 2D-slice form (whose z padding taps
    XLA would count); both forms compute the same logits."""
    from jaxem import models
    from jaxem.models import flops

    cfg = models.default_config("unet", 3)
    cfg.update(widths=(4, 8), norm="none")
    counted = flops.model_cost(cfg, (8, 16, 16))["flops"]
    built = {form: models.build(cfg, conv_form=form) for form in ("xla", "slices")}
    assert models.build(cfg).conv_form == "slices" == built["slices"].encoder.conv_form  # on this CPU
    x = jax.random.normal(jax.random.key(0), (1, 8, 16, 16, 1))
    variables = built["xla"].init(jax.random.key(0), x)
    count = {form: flops.xla_flops(lambda v, x, m=m: m.apply(v, x), variables, x) for form, m in built.items()}
    assert count["xla"] == counted != count["slices"]
    np.testing.assert_allclose(built["slices"].apply(variables, x)[0], built["xla"].apply(variables, x)[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="conv_form"):
        models.build(cfg, conv_form="cudnn")


@pytest.mark.parametrize("shape,factors", [((2, 4, 8, 8, 3), (1, 2, 2)), ((1, 6, 8, 10, 2), (2, 2, 2)),
                                           ((2, 8, 12, 3), (2, 3)), ((1, 5, 9, 9, 2), (2, 2, 2))])
def test_max_pool_matches_reduce_window(shape, factors):
    """The reshape + max pooling equals flax's reduce_window pooling, values and gradients
    (random inputs have no ties), including sizes that do not divide (floored)."""
    x = jax.random.normal(jax.random.key(1), shape)
    ref = nn.max_pool(x, factors, strides=factors)
    np.testing.assert_array_equal(layers.max_pool(x, factors), ref)
    weights = jax.random.normal(jax.random.key(2), ref.shape)
    grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, factors) * weights))(x)
    grad_ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, factors, strides=factors) * weights))(x)
    np.testing.assert_allclose(grad, grad_ref, rtol=0, atol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_pointwise_conv_as_matmul_equals_flax_conv(ndim):
    """1x1 convolutions (heads, projections) run as a matmul: same values and gradients as nn.Conv."""
    x = jax.random.normal(jax.random.key(3), (2, *(6,) * ndim, 5))
    ours, flax_ = layers.Conv(3, (1,) * ndim), nn.Conv(3, (1,) * ndim)
    params = flax_.init(jax.random.key(4), x)
    np.testing.assert_allclose(ours.apply(params, x), flax_.apply(params, x), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params) for m in (ours, flax_)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)


def test_max_pool_gradient_of_tied_windows_goes_to_one_element():
    """ReLU zeros tie whole windows: each window passes its gradient to exactly one element."""
    x = jnp.maximum(jax.random.normal(jax.random.key(5), (1, 4, 8, 8, 2)), 0.0).at[:, :2].set(0.0)
    g = jax.grad(lambda x: jnp.sum(layers.max_pool(x, (2, 2, 2)) * 3.0))(x)
    assert np.isfinite(g).all()
    per_window = np.asarray(g).reshape(1, 2, 2, 4, 2, 4, 2, 2)
    np.testing.assert_array_equal(per_window.sum(axis=(2, 4, 6)), 3.0)
    np.testing.assert_array_equal((per_window != 0).sum(axis=(2, 4, 6)), 1)


def test_max_pool_propagates_nan_like_reduce_window():
    """A NaN anywhere in a window makes that window's max NaN, as jnp.max and reduce_window do."""
    x = jax.random.normal(jax.random.key(6), (1, 4, 4, 1)).at[0, 1, 1, 0].set(jnp.nan).at[0, 2, 3, 0].set(jnp.nan)
    ours, ref = layers.max_pool(x, (2, 2)), nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    assert np.isnan(ours).sum() == 2
    np.testing.assert_array_equal(ours[~np.isnan(ours)], ref[~np.isnan(ref)])


def test_import_leaves_xla_flags_and_the_cli_adds_the_cudnn_layout_flag_unless_the_user_did():
    import os
    import subprocess
    import sys

    from jaxem import xla

    code = "import os, jaxem, jaxem.cli, jaxem.models, jaxem.train; print(os.environ.get('XLA_FLAGS', 'unset'))"
    for before in ("", "--xla_cpu_use_onednn=true"):
        env = {**os.environ, "XLA_FLAGS": before}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == (before or "")
    for before, after in [("", "--xla_gpu_force_conv_nhwc=true"),
                          ("--xla_cpu_use_onednn=true", "--xla_cpu_use_onednn=true --xla_gpu_force_conv_nhwc=true"),
                          ("--xla_gpu_force_conv_nhwc=false", "--xla_gpu_force_conv_nhwc=false")]:
        env = {"XLA_FLAGS": before}
        assert xla.set_default_flags(env) == after and env["XLA_FLAGS"] == after
    # `jaxem <command>` sets them before the command module imports JAX
    code = ("import os, sys, jaxem.cli; from unittest import mock\n"
            "with mock.patch('importlib.import_module', side_effect=lambda name: sys.exit(os.environ['XLA_FLAGS'])):\n"
            "    jaxem.cli.main(['predict'])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True)
    assert out.stderr.strip() == "--xla_gpu_force_conv_nhwc=true"


def test_the_cli_module_imports_without_jax():
    """`jaxem --help` and the refusals before a command run should not wait for JAX to import."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, jaxem.cli; print('jax' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_compilation_cache_keeps_a_program_for_the_next_process_unless_the_user_chose_a_directory(tmp_path):
    """xla.use_compilation_cache: a program compiled in one process is written to the directory and
    loaded by the next (no new entry); JAX_COMPILATION_CACHE_DIR, when set, is used instead."""
    import os
    import subprocess
    import sys

    code = ("import sys, jax, jax.numpy as jnp\n"
            "from jaxem.xla import use_compilation_cache\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "hits = []\n"
            "jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if e.endswith('cache_hits') else 0)\n"
            "print(use_compilation_cache(sys.argv[1]))\n"
            "jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n"
            "print(len(hits))\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    ours = tmp_path / "ours"
    entries = []
    for loaded in (False, True):  # cache hits: none in the first process, every program in the second
        out = subprocess.run([sys.executable, "-c", code, str(ours)], env=env, capture_output=True, text=True, check=True)
        directory, hits = out.stdout.split()
        assert directory == str(ours) and (int(hits) > 0) == loaded
        entries.append(sorted(p.name for p in ours.iterdir()))
    assert entries[0] and entries[1] == entries[0]
    theirs = tmp_path / "theirs"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "unused")], capture_output=True, text=True,
                         check=True, env={**env, "JAX_COMPILATION_CACHE_DIR": str(theirs)})
    assert out.stdout.split() == [str(theirs), "0"] and any(theirs.iterdir()) and not (tmp_path / "unused").exists()


def _reference_ops(monkeypatch):
    """Swap every fast form in layers for the flax/lax op it replaces."""
    monkeypatch.setattr(layers, "conv_general_dilated", lambda *a, slices=False, **k: jax.lax.conv_general_dilated(*a, **k))
    monkeypatch.setattr(layers, "max_pool", lambda x, f: nn.max_pool(x, f, strides=f) if any(v > 1 for v in f) else x)
    monkeypatch.setattr(layers, "_paint_blocks", lambda x, k: jax.lax.conv_transpose(x, k, k.shape[:-2], "SAME"))


@pytest.mark.parametrize("ndim,overrides", [
    (2, dict(widths=(8, 16, 32), norm="batch", block="plain")),  # the ISBI 2012 CPU recipe's shape
    (3, dict(widths=(4, 8, 16), norm="group", block="residual", kernel_sizes=((1, 3, 3), 3, 3),
             pool_factors=((1, 2, 2), 2))),
])
def test_unet_training_gradients_equal_with_reference_ops(ndim, overrides, monkeypatch):
    """A whole U-Net's training loss and gradients with the fast forms (matmul up-sampling and 1x1
    convs, reshape max pooling, 2D-slice 3D convs) equal those with flax's own layers: the forms
    change the speed of training, not what it computes."""
    from jaxem import models
    from jaxem.train.losses import binary_cross_entropy

    cfg = models.default_config("unet", ndim)
    cfg.update(**overrides)
    model = models.build(cfg)
    shape = (2, 8, 16, 16, 1) if ndim == 3 else (4, 32, 32, 1)
    x = jax.random.normal(jax.random.key(6), shape)
    target = (jax.random.uniform(jax.random.key(7), shape) > 0.7).astype(jnp.float32)
    variables = model.init(jax.random.key(8), x, train=False)

    def loss_and_grads():
        def loss(params):
            out = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])[0][0]
            return binary_cross_entropy(out, target)
        return jax.jit(jax.value_and_grad(loss))(variables["params"])  # traced anew: a new `loss` each call

    fast = loss_and_grads()
    _reference_ops(monkeypatch)
    reference = loss_and_grads()
    np.testing.assert_allclose(fast[0], reference[0], rtol=1e-5)
    assert jax.tree.structure(fast[1]) == jax.tree.structure(reference[1])
    # Per leaf, relative to its own size; leaves whose gradient nearly cancels (a residual
    # projection under GroupNorm: 1e-5) are held to 1e-6 of the largest gradient instead.
    largest = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(reference[1]))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fast[1]), jax.tree.leaves(reference[1])):
        scale = max(float(jnp.abs(b).max()), 1e-2 * largest)
        assert float(jnp.abs(a - b).max()) / scale < 1e-4, jax.tree_util.keystr(path)
