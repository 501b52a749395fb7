"""`jaxem convert-weights --format sam|dinov2|mae|timm IN OUT [--patch P] [--crop C] ...`: a
foundation model's image encoder (a PyTorch .pth/.pt/.bin or .safetensors checkpoint) as jaxem ViT
variables in OUT, the exported-encoder directory that `--config.train.init_encoder=OUT` reads.

    jaxem convert-weights --format sam sam_vit_b_01ec64.pth encoders/sam_b --crop 256,256
    jaxem convert-weights --format dinov2 model.safetensors encoders/dinov2_s --patch 16 --crop 224,224
    jaxem convert-weights --format mae model.safetensors encoders/mae_b3d --patch 4,16,16 --crop 16,128,128

OUT holds variables/ (orbax) and model.json (the 'vit' model config the weights fit). Nothing is
written when the checkpoint does not fit; an existing OUT is replaced only with --overwrite.
See docs/foundation.md.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from jaxem.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="checkpoint: .pth/.pt/.bin (needs PyTorch) or .safetensors")
    parser.add_argument("output", metavar="OUT", help="directory to write (variables/ + model.json)")
    parser.add_argument("--format", default="", help="sam, dinov2, mae or timm (default: told from the checkpoint's keys)")
    parser.add_argument("--size", default="", help="check the checkpoint is this ViT size: tiny, small, base, large, huge")
    parser.add_argument("--heads", default="0", help="attention heads, where the width does not tell them")
    parser.add_argument("--patch", default="", help="patch size to convert to: P (in-plane) or Z,Y,X for a 3D model "
                                                    "(the 2D kernel is resampled in-plane and inflated over z)")
    parser.add_argument("--crop", default="", help="training crop (Y,X or Z,Y,X): position tables are resized to its token grid")
    parser.add_argument("--window-size", default="", help="SAM: attention window when the checkpoint has no relative positions")
    parser.add_argument("--global-blocks", default="", help="SAM: global-attention blocks, e.g. 2,5,8,11 (default: from the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    """'16', '4,16,16' or '(4, 16, 16)' -> a tuple of ints; UserError naming the flag otherwise."""
    if not text.strip():
        return ()
    try:
        value = ast.literal_eval(text if text.strip().startswith("(") else f"({text},)")
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError
    except (ValueError, SyntaxError):
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}.") from None
    return value


def run(args, overrides) -> int:
    # deferred: keeps CLI start-up light (the converters use jax; volumes read zarr)
    from jaxem.data.guard import refuse_overlap
    from jaxem.models import convert

    if overrides:
        raise UserError(f"jaxem convert-weights does not take {' '.join(overrides)} (see jaxem convert-weights --help).")
    fmt = args.format
    if fmt and fmt not in convert.FORMATS:
        raise UserError(f"--format must be one of {', '.join(convert.FORMATS)}, got {fmt!r}.")
    heads = _ints(args.heads, "--heads")
    if len(heads) != 1 or heads[0] < 0:
        raise UserError(f"--heads expects one non-negative integer, got {args.heads!r}.")
    patch, crop = _ints(args.patch, "--patch"), _ints(args.crop, "--crop")
    window = _ints(args.window_size, "--window-size")
    global_blocks = _ints(args.global_blocks, "--global-blocks") if args.global_blocks.strip() else None
    out = Path(args.output)
    refuse_overlap("OUT", out, {"IN": args.input})
    if out.exists() and not args.overwrite:  # before reading a large checkpoint
        raise UserError(f"{out} exists; choose a new output directory or pass --overwrite.")
    sd = convert.read_state_dict(args.input)
    if not fmt:
        fmt = convert.detect_format(sd)
        if fmt is None:
            raise UserError(f"cannot tell what {args.input} holds; pass --format ({', '.join(convert.FORMATS)}).")
    cfg, variables = convert.convert(sd, fmt, size=args.size, heads=heads[0], patch=patch, crop=crop,
                                     window_size=window, global_blocks=global_blocks)
    source = {"format": fmt, "checkpoint": str(Path(args.input).resolve()), "crop": list(crop)}
    convert.write_encoder(out, cfg, variables, source, overwrite=args.overwrite)
    fields = {k: cfg[k] for k in ("ndim", "variant", "hidden", "depth", "heads", "patch_size", "pos_grid")}
    print(json.dumps({"output": str(out), "format": fmt, **fields}, default=list))
    print(f"fine-tune: jaxem train --config finetune_foundation:{out} --workdir runs/finetune "
          f"(or any 'vit'/'unetr' config with these model fields and --config.train.init_encoder={out})")
    return 0
