"""Fine-tune a foundation encoder (SAM, DINOv2, MAE, a timm ViT) in a UNETR (docs/foundation.md).

    jaxem convert-weights --format sam sam_vit_b_01ec64.pth encoders/sam_b --crop 256,256
    jaxem train --config finetune_foundation:encoders/sam_b --workdir runs/sam_b_isbi
    jaxem train --config finetune_foundation:sam_vit_b_01ec64.pth --workdir runs/x   # converted at the start

ARG: a `jaxem convert-weights` output directory, or a checkpoint file (.pth/.pt/.bin/.safetensors)
that `train.init_encoder` converts when training starts (a patch size that is not a power of two,
as DINOv2's 14, is then resampled to 16, as UNETR needs). The model section takes every encoder
field from the converted model.json (or the checkpoint); the data are ISBI 2012 in 2D
(`jaxem data download isbi2012`), to be named with --config.data.* for 3D encoders.
"""

from jaxem.errors import UserError
from jaxem.models import convert
from jaxem.train.defaults import base_config

DECODER_FIELDS = ("name", "out_channels")  # the UNETR's own, not the encoder's


def get_config(arg: str = ""):
    if not arg:
        raise UserError("configs/finetune_foundation.py needs the encoder: --config finetune_foundation:DIR_OR_CHECKPOINT.")
    encoder = convert.read_encoder_config(arg)
    ndim = encoder.ndim
    config = base_config(ndim=ndim, model="unetr")
    for key, value in encoder.items():
        if key in config.model and key not in DECODER_FIELDS:
            config.model[key] = value
    patch = tuple(config.model.patch_size)
    if convert.is_checkpoint(arg) and any(p & (p - 1) for p in patch):
        config.model.patch_size = tuple(16 if p & (p - 1) else p for p in patch)
    patch = tuple(config.model.patch_size)
    if convert.is_checkpoint(arg) or not config.model.pos_grid:
        crop = (256, 256) if ndim == 2 else (16, 128, 128)
        crop = tuple(max(c // p, 1) * p for c, p in zip(crop, patch))
        if config.model.pos_embed == "learned" or config.model.pos_grid:
            config.model.pos_grid = tuple(c // p for c, p in zip(crop, patch))
    else:
        crop = tuple(g * p for g, p in zip(config.model.pos_grid, patch))
    config.train.init_encoder = arg
    config.data.crop_shape = crop
    config.data.batch_size = 4
    config.data.normalize = "meanstd"
    if ndim == 2:
        config.data.dataset = "isbi2012"
    config.target.kind = "boundary"
    config.target.width = (1,)
    config.model.out_channels = 1
    config.loss.terms = {"bce": 1.0, "dice": 1.0}
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.05
    config.train.steps = 3000
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    return config
