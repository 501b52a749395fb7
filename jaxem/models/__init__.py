"""jaxem.models: the one registry of model names.

    cfg = default_config('unet', 2); cfg.out_channels = 2
    model = build(cfg)
    variables = model.init(jax.random.key(0), x, train=False)      # x (B, *S, C_in) float32
    logits, aux = model.apply(variables, x, train=False)           # (B, *S, out_channels) float32, {}
    (logits, aux), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])

Every model returns `(output, aux)`: the logits (or pooled features of an encoder model) and a
dict of auxiliary outputs, `{}` unless the U-Net has deep supervision (aux["deep_supervision"]:
the coarser levels' logits, fine to coarse).

Models: 'unet' (2D/3D, conv or ResNet encoder), 'resnet' (encoder; pooled features), 'vit'
(encoder; pooled features), 'unetr' (ViT encoder + conv decoder). Every model that has an encoder
holds it as the submodule 'encoder', so `transfer_encoder_params` can copy pretrained weights.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import flax.linen as nn
import ml_collections

from jaxem.errors import UserError
from jaxem.models import layers
from jaxem.models.transfer import transfer_encoder

# name -> module defining default_config(ndim), from_config(cfg, conv_form) and input_divisor(cfg).
MODELS = {
    "unet": "jaxem.models.unet",
    "resnet": "jaxem.models.resnet",
    "vit": "jaxem.models.vit",
    "unetr": "jaxem.models.unetr",
}


def _module(name: str):
    if name not in MODELS:
        raise UserError(f"model.name {name!r} is unknown (choose from {', '.join(MODELS)}).")
    return importlib.import_module(MODELS[name])


def default_config(name: str, ndim: int = 2) -> ml_collections.ConfigDict:
    """Every field of model `name` at spatial rank `ndim` (2 or 3), with defaults."""
    if ndim not in (2, 3):
        raise UserError(f"model.ndim must be 2 or 3, got {ndim!r}.")
    return _module(name).default_config(ndim)


def build(cfg: ml_collections.ConfigDict, conv_form: str | None = None) -> nn.Module:
    """The flax.linen Module that `cfg` (a model config section) describes. Its 3D convolutions take
    `conv_form` ('xla' or 'slices', layers.CONV_FORMS; None: `layers.default_conv_form()`, 'slices'
    on the CPU), a field of the modules fixed here, not read when the model is traced."""
    form = layers.check_conv_form(conv_form or layers.default_conv_form())
    return _module(cfg.name).from_config(cfg, form)


def input_divisor(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Per spatial axis, the number every input size must be a multiple of."""
    return tuple(_module(cfg.name).input_divisor(cfg))


def valid_shape(cfg: ml_collections.ConfigDict, shape: Sequence[int], round: str = "down") -> tuple[int, ...]:
    """The nearest spatial shape the model takes, rounding each axis 'down' or 'up' (never below
    one divisor)."""
    if round not in ("down", "up"):
        raise ValueError(f"round must be 'down' or 'up', got {round!r}")
    divisor = input_divisor(cfg)
    _check_rank(cfg, shape)
    out = []
    for size, d in zip(shape, divisor):
        n = size // d if round == "down" else -(-size // d)
        out.append(max(n, 1) * d)
    return tuple(out)


def check_input_shape(cfg: ml_collections.ConfigDict, shape: Sequence[int]) -> None:
    """Raises UserError naming the nearest valid sizes when the spatial `shape` does not fit."""
    _check_rank(cfg, shape)
    shape = tuple(int(s) for s in shape)
    if valid_shape(cfg, shape, "down") == shape:
        return
    down, up = valid_shape(cfg, shape, "down"), valid_shape(cfg, shape, "up")
    options = f"{down} or {up}" if down != up else f"{up}"
    raise UserError(f"crop {shape} {_module(cfg.name).divisor_reason(cfg)}; nearest valid sizes: {options}.")


def _check_rank(cfg: ml_collections.ConfigDict, shape: Sequence[int]) -> None:
    if len(shape) != cfg.ndim:
        raise UserError(f"crop {tuple(shape)} has {len(shape)} axes but model.ndim is {cfg.ndim}.")


def transfer_encoder_params(seg_variables: dict, encoder_variables: dict, encoder_only: bool = False) -> dict:
    """Copies a pretrained encoder into a segmentation model's 'encoder' subtree (and, when the
    variables hold more parts of a network than its encoder, as `ssl.method=mim` exports, each part
    into the same-named part: decoder levels included, output heads never).

    `encoder_variables` are the variables of an encoder model ('resnet', 'vit': they hold the
    weights under 'encoder') or of the encoder alone. Every collection (params, batch_stats) present
    in both is copied; every leaf must exist in the target with the same shape, otherwise a
    UserError names the first mismatching path. `encoder_only`: the encoder alone, whatever else
    the variables hold (the decoder keeps its random init). Returns new variables; inputs are unchanged.
    """
    return transfer_encoder(seg_variables, encoder_variables, encoder_only)
