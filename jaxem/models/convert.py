"""Foundation-model checkpoints (SAM, DINOv2, MAE, timm ViTs) -> jaxem ViT variables.

    sd = read_state_dict("sam_vit_b_01ec64.pth")               # {name: np.ndarray}, torch layout
    cfg, variables = convert(sd, "sam", patch=(16, 16), crop=(256, 256))
    write_encoder("encoders/sam_b", cfg, variables)             # what --config.train.init_encoder reads
    variables = load_pretrained("sam_vit_b_01ec64.pth", run_cfg.model)   # on the fly, fit to a run's model

The written directory is the exported-encoder format of `jaxem pretrain`: `variables/` (orbax,
{"params": the ViT's parameters}) and `model.json` ({"model": the 'vit' config they fit, ...}).
Checkpoints are read with torch.load (.pth/.pt/.bin; PyTorch is then needed, jaxem does not
install it) or with the safetensors package's numpy loader (.safetensors; no PyTorch).

What conversion does to the weights:
- RGB -> grey: the patch embedding's input channels are summed into one. A grey image g fed to
  the RGB model as (g, g, g) gives conv(w, (g, g, g)) = sum_c w_c * g = (sum_c w_c) * g, so the
  summed kernel on the grey image computes exactly what the RGB model computes on the grey image
  replicated to 3 channels (a mean would scale every feature by 1/3). Inputs are normalised
  per volume by jaxem, not with the model's ImageNet mean/std per channel.
- Another patch size (`patch`, e.g. DINOv2's 14 -> 16, as UNETR needs powers of two): the
  kernel is resampled FlexiViT-style, by the pseudo-inverse of the bicubic resize (timm's
  `resample_patch_embed`), so patch embeddings of resized patches stay the same.
- 3D (`patch` with 3 entries (pz, py, px)): the 2D kernel is repeated over z and divided by pz
  (I3D inflation): a volume whose pz sections are equal embeds as the 2D model embeds one of them.
  The position table is repeated over z; SAM's windows stay in-plane (1 section), its relative
  position tables get a zero table for z.
- `crop`: the learned position table (and SAM's global relative-position tables) are resized to
  the crop's token grid once, bicubic (antialiased) as timm does at run time (linear for SAM's
  relative positions, as SAM does), so training needs no resizing per step.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxem.errors import UserError
from jaxem.models import vit
from jaxem.models.transfer import MODEL_FILE, VARIABLES_DIR, exported_encoder_dir

FORMATS = ("sam", "dinov2", "mae", "timm")
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
HEADS_BY_HIDDEN = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H (SAM-H: 16 heads of 80)
# Entries of timm-layout checkpoints that are not part of the encoder jaxem builds.
TIMM_IGNORED = ("head.", "head_drop", "fc_norm.", "decoder", "mask_token")


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` names a PyTorch / safetensors checkpoint file (not an exported-encoder directory)."""
    return Path(path).suffix in SUFFIXES


# ---- reading ----

def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{parameter name: float32 numpy array} of a .pth/.pt/.bin (torch.load) or .safetensors file.
    A checkpoint that wraps its state dict ({"model": ...}, {"state_dict": ...}) is unwrapped and a
    DistributedDataParallel 'module.' prefix dropped."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"checkpoint {path} must be a .pth, .pt, .bin or .safetensors file.")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            tensors = load_file(str(path))
        except Exception as e:  # a corrupt or non-safetensors file is user input
            raise UserError(f"checkpoint {path} could not be read as safetensors: {type(e).__name__}: {e}.") from None
    else:
        tensors = _torch_load(path)
    out = {}
    for name, value in tensors.items():
        name = name[len("module."):] if name.startswith("module.") else name
        value = np.asarray(value)
        out[name] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
    return out


def _torch_load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path} needs PyTorch (pip install torch; jaxem does not install it), or give the "
                        f"checkpoint as .safetensors.") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be read by torch.load: {type(e).__name__}: {e}.") from None
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = [obj[k] for k in ("model", "state_dict", "module", "teacher") if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = inner[0]
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict of tensors.")
    return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items() if torch.is_tensor(v)}


# ---- what a checkpoint is ----

def detect_format(sd: dict) -> str | None:
    """'sam', 'dinov2' (timm layout with LayerScale), 'timm' (timm layout: MAE, DeiT, ...) or None."""
    if "neck.0.weight" in sd or any(k.startswith("image_encoder.") for k in sd):
        return "sam"
    if "blocks.0.attn.qkv.weight" in sd:
        return "dinov2" if "blocks.0.ls1.gamma" in sd else "timm"
    return None


def _encoder_keys(sd: dict, fmt: str) -> dict:
    """The image encoder's entries: a whole SAM checkpoint keeps only `image_encoder.*` (renamed)."""
    if fmt == "sam" and any(k.startswith("image_encoder.") for k in sd):
        return {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    return dict(sd)


def _need(sd: dict, key: str, fmt: str, why: str = "") -> np.ndarray:
    if key not in sd:
        guess = detect_format(sd)
        hint = (f"; its keys look like a {guess} checkpoint (--format {guess})" if guess and guess != fmt
                and {guess, fmt} != {"timm", "mae"} else "")
        raise UserError(f"the checkpoint has no key {key} ({why or f'a {fmt} ViT has it'}){hint}.")
    return sd[key]


def describe(sd: dict, fmt: str, heads: int = 0, window_size: Sequence[int] = (),
             global_blocks: Sequence[int] | None = None, need_heads: bool = True) -> ml_collections.ConfigDict:
    """The 2D 'vit' model config of the checkpoint as it is (its patch size, position grid, RGB
    input). `heads` is needed where the checkpoint does not tell it (timm layouts with an unusual
    width; without `need_heads` they are then left 0, for the config to set); SAM's window size and
    global blocks are read from its relative-position tables."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    sd = _encoder_keys(sd, fmt)
    if fmt == "sam":
        _need(sd, "neck.0.weight", fmt, "SAM's neck")  # the signature of SAM's image encoder, checked first
    w = _need(sd, "patch_embed.proj.weight", fmt, "the patch embedding")
    if w.ndim != 4:
        raise UserError(f"checkpoint parameter patch_embed.proj.weight has shape {w.shape}, expected a 2D conv "
                        f"kernel (hidden, channels, patch, patch).")
    hidden, patch = int(w.shape[0]), (int(w.shape[2]), int(w.shape[3]))
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    if not depth:
        _need(sd, "blocks.0.norm1.weight", fmt, "the first transformer block")
    cfg = vit.default_config(2)
    cfg.update(dict(patch_size=patch, hidden=hidden, depth=depth, variant="sam" if fmt == "sam" else "timm",
                    qkv_bias="blocks.0.attn.qkv.bias" in sd))
    mlp = "lin1" if fmt == "sam" else "fc1"
    cfg.mlp_dim = int(_need(sd, f"blocks.0.mlp.{mlp}.weight", fmt).shape[0])
    head_dim = _describe_sam(sd, cfg, window_size, global_blocks) if fmt == "sam" else _describe_timm(sd, cfg, fmt)
    inferred = hidden // head_dim if head_dim else HEADS_BY_HIDDEN.get(hidden, hidden // 64 if hidden % 64 == 0 else 0)
    if heads and head_dim and heads != inferred:
        raise UserError(f"{heads} attention heads do not fit the checkpoint: blocks.0.attn.rel_pos_h has head size "
                        f"{head_dim}, so its width {hidden} makes {inferred} heads.")
    cfg.heads = int(heads or inferred)
    if (need_heads or cfg.heads) and (not cfg.heads or hidden % cfg.heads):
        raise UserError(f"cannot tell the number of attention heads of a ViT of width {hidden}: pass --heads.")
    cfg.size = next((name for name, (h, d, n) in vit.SIZES.items() if (h, d, n) == (hidden, depth, cfg.heads)), "small")
    return cfg


def _describe_timm(sd: dict, cfg: ml_collections.ConfigDict, fmt: str) -> int:
    cfg.class_token = "cls_token" in sd
    reg = sd.get("reg_token", sd.get("register_tokens"))
    cfg.reg_tokens = int(reg.shape[1]) if reg is not None else 0
    has_ls = "blocks.0.ls1.gamma" in sd
    if fmt == "dinov2":
        _need(sd, "blocks.0.ls1.gamma", fmt, "DINOv2 blocks have LayerScale; --format mae or timm for ViTs without")
        _need(sd, "cls_token", fmt, "DINOv2's class token")
    if fmt == "mae":
        _need(sd, "cls_token", fmt, "MAE's class token")
        if has_ls:
            raise UserError("the checkpoint has LayerScale (blocks.0.ls1.gamma), which MAE ViTs have not: use "
                            "--format dinov2 or timm.")
    cfg.layer_scale = 1e-5 if has_ls else 0.0
    prefix = int(cfg.class_token) + cfg.reg_tokens
    if "pos_embed" in sd:
        n = int(sd["pos_embed"].shape[1])
        side = math.isqrt(n - prefix) if n > prefix else 0
        if prefix and side * side == n - prefix:
            cfg.prefix_pos = True
        else:
            side = math.isqrt(n)
            if side * side != n:
                raise UserError(f"checkpoint parameter pos_embed has {n} tokens: not a square grid (plus {prefix} "
                                f"class/register tokens).")
        cfg.pos_embed, cfg.pos_grid = "learned", (side, side)
    else:
        cfg.pos_embed = "none"
    _need(sd, "norm.weight", fmt, "the final norm")
    return 0  # the head size is not in a timm checkpoint


def _describe_sam(sd: dict, cfg: ml_collections.ConfigDict, window_size, global_blocks) -> int:
    """Fills SAM's fields into `cfg`; returns the head size its relative-position tables tell (or 0)."""
    if "pos_embed" in sd:
        g = sd["pos_embed"].shape
        if len(g) != 4:
            raise UserError(f"checkpoint parameter pos_embed has shape {g}, expected SAM's (1, grid, grid, hidden).")
        cfg.pos_embed, cfg.pos_grid = "learned", (int(g[1]), int(g[2]))
    else:
        cfg.pos_embed = "none"
    cfg.rel_pos = "blocks.0.attn.rel_pos_h" in sd
    window, globals_, head_dim = tuple(window_size), global_blocks, 0
    if cfg.rel_pos:
        sizes = [(int(_need(sd, f"blocks.{i}.attn.rel_pos_h", "sam").shape[0]) + 1) // 2 for i in range(cfg.depth)]
        full = cfg.pos_grid[0] if cfg.pos_grid else max(sizes)
        if globals_ is None:
            globals_ = tuple(i for i, s in enumerate(sizes) if s == full)
        if not window:
            local = sorted({s for i, s in enumerate(sizes) if i not in globals_})
            if len(local) > 1:
                raise UserError(f"the checkpoint's windowed blocks have relative-position tables of sizes {local}: "
                                f"one window size expected.")
            window = tuple(local[:1])
        head_dim = int(sd["blocks.0.attn.rel_pos_h"].shape[1])
        if not cfg.pos_grid:  # the global blocks' tables were made for the pretraining grid
            cfg.pos_grid = (full, full)
    cfg.window_size = window
    cfg.global_blocks = tuple(globals_ or ()) if window else ()
    neck = _need(sd, "neck.0.weight", "sam", "SAM's neck")
    cfg.neck_dim = int(neck.shape[0])
    return head_dim


# ---- the target model ----

def target_config(source: ml_collections.ConfigDict, size: str = "", patch: Sequence[int] = (),
                  crop: Sequence[int] = ()) -> ml_collections.ConfigDict:
    """The model config to convert to: `source` (from `describe`) with the --size preset's widths
    (checked against the checkpoint by `convert`), the patch size `patch` (2 entries, or 3 for 3D)
    and the position tables at the token grid of `crop`."""
    cfg = ml_collections.ConfigDict(source.to_dict())
    if size:
        if size not in vit.SIZES:
            raise UserError(f"--size must be one of {', '.join(vit.SIZES)}, got {size!r}.")
        cfg.size = size
        cfg.hidden, cfg.depth, cfg.heads = vit.SIZES[size]
        cfg.mlp_dim = 4 * cfg.hidden
    patch = tuple(int(p) for p in patch) or tuple(source.patch_size)
    if len(patch) == 1:
        patch = patch * 2
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise UserError(f"--patch must be 1, 2 or 3 positive ints (in-plane, or z,y,x for 3D), got {patch}.")
    ndim = len(patch)
    if ndim == 3:
        cfg = _as_3d(cfg)
    cfg.patch_size = patch
    crop = tuple(int(c) for c in crop)
    if crop:
        if len(crop) != ndim:
            raise UserError(f"--crop {crop} has {len(crop)} axes, the patch {patch} has {ndim}.")
        bad = [(c, p) for c, p in zip(crop, patch) if c % p]
        if bad:
            down = tuple(max(c // p, 1) * p for c, p in zip(crop, patch))
            up = tuple(-(-c // p) * p for c, p in zip(crop, patch))
            raise UserError(f"--crop {crop} is not a multiple of the patch size {patch}; nearest valid crops: "
                            f"{down} or {up}.")
        grid = tuple(c // p for c, p in zip(crop, patch))
        if cfg.pos_embed == "learned":
            cfg.pos_grid = grid
        elif cfg.rel_pos and cfg.pos_grid:
            cfg.pos_grid = grid
    return cfg


def _as_3d(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A 2D vit config turned 3D: one z token in the position table, in-plane windows."""
    out = vit.default_config(3)
    out.update({k: v for k, v in cfg.items() if k not in ("ndim", "patch_size")})
    if out.pos_grid:
        out.pos_grid = (1, *out.pos_grid)
    if out.window_size:
        w = tuple(out.window_size)
        out.window_size = (1, *(w * 2 if len(w) == 1 else w))
    return out


def _abstract_params(encoder: vit.ViT) -> dict:
    grid = encoder.pos_grid or (1,) * len(encoder.patch_size)
    x = jax.ShapeDtypeStruct((1, *(g * p for g, p in zip(grid, encoder.patch_size)), 1), jnp.float32)
    return jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x), x)["params"]


def _check_fits(source: vit.ViT, target: vit.ViT, how: str, fmt: str) -> None:
    """UserError naming the first encoder property where the checkpoint and the target differ."""
    checks = [
        ("hidden", "width (output channels of patch_embed.proj.weight)"),
        ("depth", "blocks (blocks.0 ...)"),
        ("mlp_dim", "MLP width (blocks.0.mlp fc1/lin1 outputs)"),
        ("variant", "block layout"),
        ("class_token", "class token (cls_token)"),
        ("reg_tokens", "register tokens (reg_token)"),
        ("prefix_pos", "class-token entries in pos_embed"),
        ("qkv_bias", "qkv bias (blocks.0.attn.qkv.bias)"),
        ("rel_pos", "relative positions (blocks.0.attn.rel_pos_h)"),
        ("global_blocks", "global-attention blocks"),
        ("neck_dim", "neck width (neck.0.weight)"),
    ]
    for field, what in checks:
        have, want = getattr(source, field), getattr(target, field)
        if have != want:
            raise UserError(f"the {fmt} checkpoint's {what} is {have!r} but {how} has {field}={want!r}.")
    for field, what in (("layer_scale", "LayerScale (blocks.0.ls1.gamma)"), ("window_size", "windowed attention")):
        have, want = bool(getattr(source, field)), bool(getattr(target, field))
        if have != want:
            raise UserError(f"the {fmt} checkpoint {'has' if have else 'has no'} {what} but {how} has "
                            f"{field}={getattr(target, field)!r}.")
    if (source.pos_embed == "none") != (target.pos_embed == "none") or target.pos_embed == "sincos":
        raise UserError(f"the {fmt} checkpoint's position embedding is {source.pos_embed!r} but {how} has "
                        f"pos_embed={target.pos_embed!r}.")
    if source.window_size and source.window_size[-2:] != target.window_size[-2:]:
        raise UserError(f"the {fmt} checkpoint's attention windows are {source.window_size} but {how} has "
                        f"window_size={target.window_size}.")


def convert(sd: dict, fmt: str, target: ml_collections.ConfigDict | None = None, *, size: str = "", heads: int = 0,
            patch: Sequence[int] = (), crop: Sequence[int] = (), window_size: Sequence[int] = (),
            global_blocks: Sequence[int] | None = None, how: str = "") -> tuple[ml_collections.ConfigDict, dict]:
    """(model config, {"params": ViT parameters}) from a torch-layout state dict of format `fmt`.

    Without `target` the model is the checkpoint's own (see `target_config` for size, patch and
    crop); with `target` (a 'vit'/'unetr' model config, e.g. a training run's) the weights are
    fitted to its patch size, rank and position grid, and every other property must agree (a
    UserError names the first that does not; `how` says where the target came from)."""
    if target is not None:
        heads = vit.encoder_from_config(target).heads
    source_cfg = describe(sd, fmt, heads=heads, window_size=window_size, global_blocks=global_blocks,
                          need_heads=not size)  # with --size, the preset's heads
    if not source_cfg.heads or source_cfg.hidden % source_cfg.heads:
        source_cfg.heads = 1  # unknown: the target's heads split the weights (heads are not compared)
    sd = _encoder_keys(sd, fmt)
    if target is None:
        target = target_config(source_cfg, size=size, patch=patch, crop=crop)
        how = how or (f"--size {size}" if size else "the conversion")
    source, encoder = vit.encoder_from_config(source_cfg), vit.encoder_from_config(target)
    _check_fits(source, encoder, how or "the model config", fmt)
    expected = _abstract_params(encoder)
    used: set[str] = set()
    rules = _rules(fmt, source, encoder, sd)
    params = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        names = tuple(str(getattr(k, "key", k)) for k in path)
        key, fn = _rule_for(rules, names)
        value = fn(_need(sd, key, fmt) if key else None)
        if key:
            used.add(key)
        if tuple(value.shape) != tuple(leaf.shape):
            raise UserError(f"checkpoint parameter {key} has shape {tuple(np.shape(sd.get(key)))}, which does not fit "
                            f"{'/'.join(names)} {tuple(leaf.shape)} of the model ({how or 'the conversion'}).")
        node = params
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = np.asarray(value, np.float32)
    ignored = TIMM_IGNORED if fmt != "sam" else ()
    extra = sorted(k for k in sd if k not in used and not k.startswith(ignored))
    if extra:
        raise UserError(f"checkpoint key {extra[0]} is not part of a {fmt} ViT as jaxem builds it "
                        f"({len(extra)} such keys; another architecture?).")
    return target, {"params": params}


# ---- parameter rules: jaxem parameter path -> (checkpoint key, numpy transform) ----

def _rules(fmt: str, source: vit.ViT, target: vit.ViT, sd: dict) -> list[tuple[tuple[str, ...], Callable]]:
    ndim = len(target.patch_size)
    mlp = ("lin1", "lin2") if fmt == "sam" else ("fc1", "fc2")
    prefix = int(source.class_token) + source.reg_tokens
    head_dim = target.hidden // target.heads

    def linear(key):
        return key + ".weight", lambda w: w.T

    def same(key, shape=None):
        return key, (lambda w: w.reshape(shape)) if shape else (lambda w: w)

    def patch_kernel(w):  # (D, C, ph, pw) -> (*patch, 1, D)
        w = w.sum(axis=1, keepdims=True) if w.shape[1] > 1 else w
        w = np.transpose(w, (2, 3, 1, 0)).astype(np.float64)
        w = resample_patch_kernel(w, target.patch_size[-2:])
        if ndim == 3:
            pz = target.patch_size[0]
            w = np.repeat(w[None], pz, axis=0) / pz
        return w

    def pos_table(w):  # timm (1, P + N, D) / SAM (1, G, G, D) -> (*pos_grid, D)
        w = w[0, prefix:] if source.prefix_pos else w[0]
        w = w.reshape(*source.pos_grid, -1)
        w = np.asarray(vit.resample_grid(jnp.asarray(w), target.pos_grid[-2:]))
        if ndim == 3:
            w = np.repeat(w[None], target.pos_grid[0], axis=0)
        return w

    def rel_table(size_of_block):
        def fn(w):  # (2 S - 1, hd): resized linearly to the target's table, as SAM does at run time
            n = 2 * size_of_block - 1
            return vit.linear_matrix(w.shape[0], n) @ w if w.shape[0] != n else w
        return fn

    rules = [
        (("patch_embed", "kernel"), ("patch_embed.proj.weight", patch_kernel)),
        (("patch_embed", "bias"), same("patch_embed.proj.bias")),
        (("pos_embed",), ("pos_embed", pos_table)),
        (("pos_embed_prefix",), ("pos_embed", lambda w: w[0, :prefix])),
        (("cls_token",), same("cls_token", (1, -1))),
        # timm names the register tokens reg_token, Meta's DINOv2 code register_tokens
        (("reg_token",), ("reg_token" if "reg_token" in sd else "register_tokens", lambda w: w.reshape(-1, w.shape[-1]))),
        (("final_norm", "scale"), same("norm.weight")),
        (("final_norm", "bias"), same("norm.bias")),
        (("neck", "conv1", "kernel"), ("neck.0.weight", lambda w: _conv_kernel(w, ndim))),
        (("neck", "norm1", "scale"), same("neck.1.weight")),
        (("neck", "norm1", "bias"), same("neck.1.bias")),
        (("neck", "conv2", "kernel"), ("neck.2.weight", lambda w: _conv_kernel(w, ndim))),
        (("neck", "norm2", "scale"), same("neck.3.weight")),
        (("neck", "norm2", "bias"), same("neck.3.bias")),
    ]
    for i in range(target.depth):
        b, k = (f"block{i}",), f"blocks.{i}"
        window = target.window_size if target.window_size and i not in target.global_blocks else ()
        sizes = window or target.pos_grid
        rules += [
            (b + ("norm1", "scale"), same(f"{k}.norm1.weight")),
            (b + ("norm1", "bias"), same(f"{k}.norm1.bias")),
            (b + ("norm2", "scale"), same(f"{k}.norm2.weight")),
            (b + ("norm2", "bias"), same(f"{k}.norm2.bias")),
            (b + ("attn", "qkv", "kernel"), linear(f"{k}.attn.qkv")),
            (b + ("attn", "qkv", "bias"), same(f"{k}.attn.qkv.bias")),
            (b + ("attn", "proj", "kernel"), linear(f"{k}.attn.proj")),
            (b + ("attn", "proj", "bias"), same(f"{k}.attn.proj.bias")),
            (b + ("mlp", "fc1", "kernel"), linear(f"{k}.mlp.{mlp[0]}")),
            (b + ("mlp", "fc1", "bias"), same(f"{k}.mlp.{mlp[0]}.bias")),
            (b + ("mlp", "fc2", "kernel"), linear(f"{k}.mlp.{mlp[1]}")),
            (b + ("mlp", "fc2", "bias"), same(f"{k}.mlp.{mlp[1]}.bias")),
            (b + ("ls1", "gamma"), same(f"{k}.ls1.gamma")),
            (b + ("ls2", "gamma"), same(f"{k}.ls2.gamma")),
        ]
        if sizes:
            rules += [(b + ("attn", "rel_pos_h"), (f"{k}.attn.rel_pos_h", rel_table(sizes[-2]))),
                      (b + ("attn", "rel_pos_w"), (f"{k}.attn.rel_pos_w", rel_table(sizes[-1]))),
                      # a 3D model's z table starts at zero: no relative position in z yet
                      (b + ("attn", "rel_pos_d"), ("", lambda _, n=2 * sizes[0] - 1: np.zeros((n, head_dim))))]
    return rules


def _rule_for(rules, names: tuple[str, ...]):
    for path, rule in rules:
        if path == names:
            return rule
    raise UserError(f"jaxem cannot fill parameter {'/'.join(names)} from a checkpoint (no conversion rule).")


def _conv_kernel(w: np.ndarray, ndim: int) -> np.ndarray:
    """torch (out, in, kh, kw) -> flax (kh, kw, in, out); a leading 1 for 3D (in-plane conv)."""
    w = np.transpose(w, (2, 3, 1, 0))
    return w[None] if ndim == 3 else w


def resample_patch_kernel(kernel: np.ndarray, new: Sequence[int]) -> np.ndarray:
    """A (ph, pw, C, D) patch-embedding kernel for patches of size `new`, FlexiViT-style: the
    pseudo-inverse of the bicubic (antialiased) patch resize, as timm's `resample_patch_embed`, so
    that <resize(patch), new kernel> = <patch, old kernel>."""
    old = kernel.shape[:2]
    new = tuple(int(n) for n in new)
    if tuple(old) == new:
        return kernel
    resize = np.kron(vit.bicubic_matrix(old[0], new[0]), vit.bicubic_matrix(old[1], new[1]))  # (new_n, old_n)
    flat = kernel.reshape(old[0] * old[1], -1)
    return (np.linalg.pinv(resize.T) @ flat).reshape(*new, *kernel.shape[2:])


# ---- entry points ----

def load_pretrained(path: str | Path, model_cfg: ml_collections.ConfigDict, fmt: str = "") -> dict:
    """{"params": ...} of the ViT encoder of `model_cfg` (a 'vit' or 'unetr' config, e.g. a training
    run's) from the checkpoint file `path`, converted on the fly (format detected unless `fmt`)."""
    if model_cfg.name not in ("vit", "unetr"):
        raise UserError(f"a {Path(path).suffix} checkpoint holds a ViT encoder, but model.name is {model_cfg.name!r} "
                        f"(use 'vit' or 'unetr').")
    sd = read_state_dict(path)
    _, variables = convert(sd, fmt or _detected_format(sd, path), target=model_cfg, how="the run's model config")
    return variables


def _detected_format(sd: dict, path: str | Path) -> str:
    """detect_format(sd), or a UserError naming `path` when the keys fit no known layout."""
    fmt = detect_format(sd)
    if fmt is None:
        raise UserError(f"cannot tell what {path} holds (no SAM image encoder or timm ViT keys such as "
                        f"blocks.0.attn.qkv.weight); convert it with `jaxem convert-weights --format ...`.")
    return fmt


def encoder_record(model_cfg: ml_collections.ConfigDict, source: dict) -> dict:
    """model.json's content: the model config the variables fit (as `jaxem pretrain` writes it)."""
    return {"model": model_cfg.to_dict(), "parts": ["encoder"], "step": 0, "source": source}


def write_encoder(out: str | Path, model_cfg: ml_collections.ConfigDict, variables: dict, source: dict | None = None,
                  overwrite: bool = False) -> Path:
    """Writes `out`/variables (orbax, as jaxem.train.checkpoint.save_tree) and `out`/model.json,
    into a temporary folder beside `out` renamed at the end: `out` appears whole or not at all.
    UserError when `out` exists, unless `overwrite`."""
    import orbax.checkpoint as ocp

    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; choose a new output directory or pass --overwrite.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / VARIABLES_DIR, jax.tree.map(jnp.asarray, variables), force=True)
        checkpointer.wait_until_finished()
        record = encoder_record(model_cfg, source or {})
        (tmp / MODEL_FILE).write_text(json.dumps(record, indent=2, default=list) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_encoder_config(path: str | Path) -> ml_collections.ConfigDict:
    """The 'vit' model config of an exported encoder directory (its model.json), or of a checkpoint
    file as it is (`describe`, format detected)."""
    path = Path(path)
    if is_checkpoint(path):
        sd = read_state_dict(path)
        return describe(sd, _detected_format(sd, path), need_heads=False)
    file = exported_encoder_dir(path) / MODEL_FILE
    if not file.is_file():
        raise UserError(f"{path} holds no converted encoder (expected {file}; write one with `jaxem convert-weights`).")
    model = json.loads(file.read_text())["model"]
    return ml_collections.ConfigDict({k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
