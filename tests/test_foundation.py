"""Foundation weights (SAM, DINOv2, MAE / timm ViTs) in the Flax ViT: tiny reference models built
in PyTorch with random weights, converted, and required to compute the same features.

torch, timm and segment-anything are test-only extras (scripts/_venv.sh installs them for the
test suite: torch's CPU wheel, timm and segment-anything without their dependencies); every test
that needs them skips cleanly without them.
"""

import importlib.abc
import importlib.machinery
import json
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
    torch = pytest.importorskip("torch")
    _install_torchvision_stub()
    return torch


def _timm_vit():
    _torch()
    return pytest.importorskip("timm.models.vision_transformer")


def _sam_encoder():
    _torch()
    return pytest.importorskip("segment_anything.modeling.image_encoder")


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
