"""Foundation weights (SAM, DINOv2, MAE / timm ViTs) in the Flax ViT: tiny reference models built
in PyTorch with random weights, converted, and required to compute the same features.

torch, timm and segment-anything are test-only extras (scripts/_venv.sh installs them for the
test suite: torch's CPU wheel, timm and segment-anything without their dependencies); every test
that needs them skips cleanly without them.
"""

import importlib.abc
import importlib.machinery
import json
import re
import sys
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem import models
from jaxem.errors import UserError
from jaxem.models import convert, vit

TOL = 1e-4  # float32, max abs difference


def _install_torchvision_stub():
    """timm (timm.layers imports torchvision.ops.misc.FrozenBatchNorm2d) and segment_anything (its
    package __init__ imports the automatic mask generator, which imports torchvision.ops) need
    torchvision at import time, though the ViT and SAM image encoder never call it. PyPI's
    torchvision does not import beside the CPU torch wheel the test suite installs, so when
    torchvision is missing (or broken) every `torchvision.*` import gets an empty stand-in module
    whose attributes are placeholder classes; instantiating one raises. A working torchvision is
    left alone."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    def placeholder(name):
        def fail(*args, **kwargs):
            raise ImportError(f"torchvision.{name} is a test stub (torchvision is not installed)")
        return _StubMeta(name, (), {"__init__": fail})

    class _StubMeta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return placeholder(name)

    class _StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = placeholder(name)
            setattr(self, name, value)
            return value

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = _StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def _torch():
    torch = pytest.importorskip("torch", exc_type=ImportError)
    _install_torchvision_stub()
    return torch


def _timm_vit():
    _torch()
    return pytest.importorskip("timm.models.vision_transformer", exc_type=ImportError)


def _sam_encoder():
    _torch()
    return pytest.importorskip("segment_anything.modeling.image_encoder", exc_type=ImportError)


def _randomize(module, seed=0):
    """Every parameter random (LayerScale near 1, relative-position tables non-zero), so each
    part of the network shows in the features."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and ("norm" in name or name.startswith("neck.1") or name.startswith("neck.3")):
                p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def _save(module, path):
    """The state dict as .pth (torch.save) or .safetensors (the safetensors package's numpy writer)."""
    torch = _torch()
    sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file({k: v.numpy() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _grey(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _torch_input(image):
    """(B, H, W) grey -> torch (B, 3, H, W), the grey image replicated to RGB."""
    torch = _torch()
    return torch.from_numpy(np.repeat(image[:, None], 3, axis=1))


def _flax_states(cfg, variables, image):
    encoder = vit.encoder_from_config(cfg)
    x = jnp.asarray(image)[..., None]
    return [np.asarray(s) for s in jax.jit(lambda v, x: encoder.apply(v, x))(variables, x)]


def _timm_states(model, image, prefix):
    """(per-block patch tokens, final normed patch tokens) of a timm ViT, as token grids."""
    torch = _torch()
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    with torch.no_grad():
        final = model.forward_features(_torch_input(image))
    for h in hooks:
        h.remove()
    b, h, w = image.shape
    p = model.patch_embed.patch_size
    grid = (h // p[0], w // p[1])
    to_grid = lambda t: t[:, prefix:].numpy().reshape(b, *grid, -1)  # noqa: E731
    return [to_grid(o) for o in outs], to_grid(final)


TIMM_CASES = {
    # DINOv2: class token, LayerScale, learned table with a class entry, qkv bias
    "dinov2": dict(fmt="dinov2", kw=dict(init_values=1e-5)),
    # MAE: class token, no LayerScale
    "mae": dict(fmt="mae", kw=dict()),
    # DINOv2 with registers: register tokens, table without class entries (no_embed_class)
    "dinov2_reg": dict(fmt="timm", kw=dict(init_values=1e-5, reg_tokens=2, no_embed_class=True)),
}


def _timm_model(case, seed=0):
    vt = _timm_vit()
    model = vt.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                                 dynamic_img_size=True, **TIMM_CASES[case]["kw"])
    return _randomize(model, seed)


@pytest.mark.parametrize("case,suffix", [("dinov2", ".pth"), ("dinov2", ".safetensors"), ("mae", ".safetensors"),
                                         ("dinov2_reg", ".pth")])
def test_timm_vit_features_equal_torch(tmp_path, case, suffix):
    model = _timm_model(case)
    path = _save(model, tmp_path / f"ckpt{suffix}")
    cfg, variables = convert.convert(convert.read_state_dict(path), TIMM_CASES[case]["fmt"], heads=2)
    assert cfg.variant == "timm" and cfg.class_token and cfg.pos_grid == (8, 8)
    prefix = model.num_prefix_tokens
    # the pretraining grid, then a wider and a smaller one (the table resampled as timm does)
    for shape in [(2, 32, 32), (1, 32, 48), (1, 24, 20)]:
        image = _grey(shape)
        blocks, final = _timm_states(model, image, prefix)
        ours = _flax_states(cfg, variables, image)
        assert len(ours) == 3
        np.testing.assert_allclose(ours[1], blocks[1], atol=TOL, rtol=0)
        np.testing.assert_allclose(ours[-1], final, atol=TOL, rtol=0)


SAM_KW = dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0, out_chans=16,
              qkv_bias=True, use_rel_pos=True, window_size=3, global_attn_indexes=(1,))


def _sam_model(seed=0, **kw):
    """SAM's image encoder at toy size: 8x8 token grid, 3x3 windows (padded to 9x9), block 1 global,
    relative positions, neck to 16 channels; LayerNorm eps 1e-6 as build_sam uses."""
    torch = _torch()
    ie = _sam_encoder()
    return _randomize(ie.ImageEncoderViT(**{**SAM_KW, **kw}, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)), seed)


def _sam_states(model, image):
    torch = _torch()
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.numpy())) for b in model.blocks]
    with torch.no_grad():
        neck = model(_torch_input(image)).permute(0, 2, 3, 1).numpy()
    for h in hooks:
        h.remove()
    return outs, neck


@pytest.mark.parametrize("suffix,whole", [(".pth", True), (".safetensors", False)])
def test_sam_image_encoder_features_equal_torch(tmp_path, suffix, whole):
    """Windowed + global attention with decomposed relative positions, absolute table, neck; as a
    whole SAM checkpoint (image_encoder.* beside other parts) or the encoder's state dict alone."""
    model = _sam_model()
    path = _save(model, tmp_path / f"enc{suffix}")
    sd = convert.read_state_dict(path)
    if whole:  # what sam_vit_b_01ec64.pth looks like: the encoder under image_encoder., other parts beside
        sd = {**{f"image_encoder.{k}": v for k, v in sd.items()}, "mask_decoder.iou_token.weight": np.zeros((1, 16))}
    cfg, variables = convert.convert(sd, "sam")
    assert (cfg.variant, cfg.window_size, cfg.global_blocks, cfg.rel_pos, cfg.neck_dim, cfg.heads) == \
        ("sam", (3,), (1,), True, 16, 2)
    image = _grey((2, 64, 64))
    blocks, neck = _sam_states(model, image)
    ours = _flax_states(cfg, variables, image)
    np.testing.assert_allclose(ours[0], blocks[0], atol=TOL, rtol=0)   # windowed block
    np.testing.assert_allclose(ours[1], blocks[1], atol=TOL, rtol=0)   # global block
    np.testing.assert_allclose(ours[-1], neck, atol=TOL, rtol=0)


def test_sam_relative_positions_resized_on_another_grid(tmp_path):
    """Without the absolute table SAM runs on any grid, resizing the global block's relative-position
    tables linearly: a 6x6 grid on tables made for 8x8 gives the same features here as in torch."""
    model = _sam_model(use_abs_pos=False)
    cfg, variables = convert.convert(convert.read_state_dict(_save(model, tmp_path / "e.pth")), "sam")
    assert cfg.pos_embed == "none" and cfg.pos_grid == (8, 8)
    image = _grey((1, 48, 48), seed=3)
    blocks, neck = _sam_states(model, image)
    ours = _flax_states(cfg, variables, image)
    np.testing.assert_allclose(ours[1], blocks[1], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[-1], neck, atol=TOL, rtol=0)


# ---- resampling as torch does it ----

@pytest.mark.parametrize("old,new", [((8, 8), (8, 12)), ((8, 8), (5, 3)), ((6, 9), (16, 4))])
def test_position_table_resampling_equals_torch_bicubic_antialiased(old, new):
    """timm resizes position tables with F.interpolate(bicubic, antialias=True): up and down."""
    torch = _torch()
    table = _grey((*old, 5))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=new, mode="bicubic",
                                             antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(vit.resample_grid(jnp.asarray(table), new)), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("old,new", [(15, 11), (5, 27), (7, 7)])
def test_relative_table_resizing_equals_torch_linear(old, new):
    torch = _torch()
    table = _grey((old, 3))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(table.T)[None], size=new, mode="linear")[0].T.numpy()
    np.testing.assert_allclose(vit.linear_matrix(old, new) @ table, theirs, atol=1e-5, rtol=0)  # torch: float32 index math


def test_patch_kernel_resampling_equals_timm():
    """DINOv2's 14 px patches -> 16 px (UNETR needs powers of two): timm's resample_patch_embed."""
    torch = _torch()
    _timm_vit()
    from timm.layers import resample_patch_embed
    kernel = _grey((6, 1, 14, 14))  # (D, C, kh, kw)
    theirs = resample_patch_embed(torch.from_numpy(kernel), [16, 16]).numpy()
    ours = convert.resample_patch_kernel(np.transpose(kernel, (2, 3, 1, 0)), (16, 16))
    np.testing.assert_allclose(np.transpose(ours, (3, 2, 0, 1)), theirs, atol=1e-5, rtol=0)


# ---- 3D inflation, UNETR ----

@pytest.mark.parametrize("kind", ["dinov2", "sam"])
def test_inflated_3d_encoder_on_equal_sections_equals_2d(tmp_path, kind):
    """I3D inflation: a volume of pz equal sections (one z token) gives the 2D model's features."""
    if kind == "sam":
        sd = convert.read_state_dict(_save(_sam_model(), tmp_path / "e.pth"))
        kw, shape = dict(), (1, 64, 64)
    else:
        sd = convert.read_state_dict(_save(_timm_model("dinov2"), tmp_path / "e.pth"))
        kw, shape = dict(heads=2), (1, 32, 32)
    cfg2, v2 = convert.convert(sd, kind, **kw)
    cfg3, v3 = convert.convert(sd, kind, patch=(2, *cfg2.patch_size), crop=(2, *shape[1:]), **kw)
    assert cfg3.ndim == 3 and cfg3.patch_size == (2, *cfg2.patch_size)
    image = _grey(shape)
    flat = _flax_states(cfg2, v2, image)
    volume = _flax_states(cfg3, v3, np.repeat(image[:, None], 2, axis=1))
    for a, b in zip(flat, volume):
        np.testing.assert_allclose(b[:, 0], a, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["dinov2", "sam"])
def test_unetr_runs_on_converted_encoder(tmp_path, kind):
    """UNETR takes the intermediate token grids (class token dropped; SAM's neck on the last)."""
    if kind == "sam":
        sd, kw = convert.read_state_dict(_save(_sam_model(), tmp_path / "e.pth")), {}
    else:
        sd, kw = convert.read_state_dict(_save(_timm_model("dinov2"), tmp_path / "e.pth")), dict(heads=2)
    enc_cfg, enc_vars = convert.convert(sd, kind, crop=(32, 32), **kw)
    cfg = models.default_config("unetr", 2)
    cfg.update({k: v for k, v in enc_cfg.items() if k not in ("name", "out_channels")})
    cfg.feature_size, cfg.out_channels = 4, 2
    model = models.build(cfg)
    x = jnp.asarray(_grey((1, 32, 32)))[..., None]
    seg = models.transfer_encoder_params(jax.jit(model.init)(jax.random.key(0), x), enc_vars)
    out, _ = jax.jit(model.apply)(seg, x)
    assert out.shape == (1, 32, 32, 2) and np.isfinite(np.asarray(out)).all()


# ---- the command line, fine-tuning, bad input ----

def _cli(*argv):
    from jaxem.cli import main
    return main(["convert-weights", *map(str, argv)])


@pytest.fixture
def dinov2_checkpoint(tmp_path):
    model = _timm_model("dinov2")
    return _save(model, tmp_path / "dinov2.safetensors"), model


def test_convert_weights_cli_then_finetune_config_builds(tmp_path, dinov2_checkpoint, capsys):
    """`jaxem convert-weights` writes OUT; `--config finetune_foundation:OUT` (a UNETR with the
    encoder fields of OUT/model.json and train.init_encoder=OUT) builds with the converted weights."""
    from jaxem.config import apply_overrides, load_config
    from jaxem.train.checkpoint import load_encoder
    from jaxem.train import parallel
    from jaxem.train.trainer import build_training

    path, _ = dinov2_checkpoint
    out = tmp_path / "enc"
    assert _cli("--format", "dinov2", path, out, "--heads", "2", "--crop", "32,32") == 0
    record = json.loads((out / "model.json").read_text())
    assert record["model"]["variant"] == "timm" and record["model"]["pos_grid"] == [8, 8]
    assert "finetune_foundation" in capsys.readouterr().out
    converted = load_encoder(out)["params"]
    config = load_config(f"finetune_foundation:{out}")
    assert config.data.crop_shape == (32, 32) and config.model.name == "unetr"
    config = apply_overrides(config, ["--config.model.feature_size=4", "--config.data.batch_size=1"])
    _, state, _, _ = build_training(config, parallel.make_mesh(1))
    same = jax.tree.map(np.array_equal, state.params["encoder"], converted)
    assert all(jax.tree.leaves(same))


def test_init_encoder_takes_a_checkpoint_file_directly(tmp_path, dinov2_checkpoint):
    """train.init_encoder=FILE.safetensors converts on the fly to fit the run's model (here its
    patch 4 -> 4 and a 4x4 table resampled from 8x8), the same weights `convert` gives."""
    from jaxem.config import apply_overrides, load_config
    from jaxem.train import parallel
    from jaxem.train.trainer import build_training

    path, _ = dinov2_checkpoint
    config = apply_overrides(load_config(f"finetune_foundation:{path}"),
                             ["--config.model.heads=2", "--config.model.feature_size=4", "--config.data.crop_shape=(16,16)",
                              "--config.model.pos_grid=(4,4)"])
    _, state, _, _ = build_training(config, parallel.make_mesh(1))
    _, expected = convert.convert(convert.read_state_dict(path), "dinov2", heads=2, crop=(16, 16))
    for a, b in zip(jax.tree.leaves(state.params["encoder"]), jax.tree.leaves(expected["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    wrong = apply_overrides(config, ["--config.model.layer_scale=0.0"])
    with pytest.raises(UserError, match=r"dinov2 checkpoint has LayerScale .* but the run's model config has layer_scale=0.0"):
        convert.load_pretrained(path, wrong.model)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(tmp_path, dinov2_checkpoint, capsys):
    path, model = dinov2_checkpoint
    out = tmp_path / "out"
    cases = [
        # wrong size: the checkpoint is 32 wide, ViT-B is 768
        (("--format", "dinov2", path, out, "--size", "base"), r"width \(output channels of patch_embed.proj.weight\) is 32 but --size base has hidden=768"),
        # unknown format
        (("--format", "clip", path, out), r"--format must be one of sam, dinov2, mae, timm, got 'clip'"),
        # a patch size that does not divide the crop
        (("--format", "dinov2", path, out, "--heads", "2", "--patch", "8", "--crop", "36,36"),
         r"--crop \(36, 36\) is not a multiple of the patch size \(8, 8\)"),
        # the wrong architecture: a DINOv2 checkpoint read as SAM
        (("--format", "sam", path, out), r"no key neck.0.weight .*look like a dinov2 checkpoint"),
        # not a checkpoint
        (("--format", "dinov2", tmp_path / "missing.pth", out), r"missing.pth does not exist"),
    ]
    sd = convert.read_state_dict(path)
    del sd["blocks.1.attn.proj.bias"]
    from safetensors.numpy import save_file
    save_file(sd, str(tmp_path / "missing_key.safetensors"))
    cases.append((("--format", "dinov2", tmp_path / "missing_key.safetensors", out, "--heads", "2"),
                  r"no key blocks.1.attn.proj.bias"))
    for argv, message in cases:
        assert _cli(*argv) == 2, argv
        err = _one_line_error(capsys)
        assert err.startswith("jaxem convert-weights: error: ") and re.search(message, err), err
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_is_refused_unless_overwrite(tmp_path, dinov2_checkpoint, capsys):
    path, _ = dinov2_checkpoint
    out = tmp_path / "enc"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli("--format", "dinov2", path, out, "--heads", "2") == 2
    assert "exists" in _one_line_error(capsys) and (out / "keep.txt").exists()
    assert _cli("--format", "dinov2", path, out, "--heads", "2", "--overwrite") == 0
    assert (out / "model.json").is_file() and not (out / "keep.txt").exists()


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "x.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(UserError, match=r"x.pth needs PyTorch .*or give the checkpoint as .safetensors"):
        convert.read_state_dict(tmp_path / "x.pth")


def test_default_vit_keeps_its_parameters():
    """The default ('jaxem') ViT has no foundation parameters and rejects their block options."""
    cfg = models.default_config("vit", 2)
    cfg.update(dict(hidden=16, depth=1, heads=2, patch_size=(4, 4)))
    params = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))["params"]
    assert set(params["encoder"]) == {"patch_embed", "block0", "final_norm"}
    assert set(params["encoder"]["block0"]) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                                                "Dense_0", "Dense_1"}
    cfg.layer_scale = 1e-5
    with pytest.raises(UserError, match=r"model.layer_scale=1e-05 needs model.variant='timm' or 'sam'"):
        models.build(cfg)


@pytest.mark.parametrize("variant", ["timm", "sam"])
def test_foundation_variants_from_scratch_train_in_any_dtype(variant):
    """Without any checkpoint (and without torch): every parameter of the timm / sam variants gets a
    gradient through UNETR, remat gives the same output, bfloat16 stays close to float32."""
    fields = dict(hidden=16, depth=2, heads=2, patch_size=(4, 4), feature_size=4, out_channels=1, variant=variant,
                  pos_embed="learned", pos_grid=(3, 3))
    if variant == "timm":
        fields.update(class_token=True, reg_tokens=1, prefix_pos=True, layer_scale=0.1)
    else:
        fields.update(window_size=(2,), global_blocks=(1,), rel_pos=True, neck_dim=8)
    cfg = models.default_config("unetr", 2)
    cfg.update(fields)
    x = jnp.asarray(_grey((1, 16, 16)))[..., None]  # a 4x4 grid on a 3x3 table: resampled
    model = models.build(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    if variant == "sam":  # SAM's relative-position tables start at zero, which hides their gradient path
        variables = jax.tree_util.tree_map_with_path(
            lambda p, v: v + 0.1 if "rel_pos" in jax.tree_util.keystr(p) else v, variables)
    grads = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x)[0] ** 2)))(variables)
    flat = jax.tree_util.tree_flatten_with_path(grads["params"]["encoder"])[0]
    assert all(float(jnp.abs(g).max()) > 0 for _, g in flat), [jax.tree_util.keystr(p) for p, g in flat if not g.any()]
    out = jax.jit(model.apply)(variables, x)[0]
    cfg.remat = True
    np.testing.assert_allclose(jax.jit(models.build(cfg).apply)(variables, x)[0], out, atol=1e-5, rtol=0)
    cfg.remat, cfg.dtype = False, "bfloat16"
    low = jax.jit(models.build(cfg).apply)(variables, x)[0]
    assert low.dtype == jnp.float32 and float(jnp.abs(low - out).max()) < 0.05 * float(jnp.abs(out).max()) + 0.05
