"""The base experiment config every file in configs/ starts from.

Each section comes from the module that owns it, so a new field appears in every config at
once and the command line can override it (`--config.train.steps=100`).
"""

from __future__ import annotations

import ml_collections

from jaxem import models
from jaxem.data import augment, datasets, pipeline, targets
from jaxem.semi.unlabelled import default_semi_config
from jaxem.train.state import default_optimizer_config


def default_train_config() -> ml_collections.ConfigDict:
    """Loop settings: length, logging/eval/checkpoint intervals, EMA, devices."""
    return ml_collections.ConfigDict(dict(
        steps=1000,
        log_every=20,
        eval_every=200,
        eval_batches=4,
        eval_instances=True,  # also VRand/VInfo/VOI per val crop: watershed cells (boundary), mws (affinities)
        checkpoint_every=200,
        keep_checkpoints=3,
        best_metric="val_loss",  # a key of the validation metrics, prefixed with val_; "" = keep/use the latest
        best_mode="min",
        async_checkpoints=True,
        ema_decay=0.0,  # 0 = off; e.g. 0.999
        accumulate_steps=1,  # micro-batches per optimizer step
        num_devices=0,  # 0 = all devices of all processes
        init_encoder="",  # a `jaxem pretrain` workdir (or its encoder/): start the encoder from it
        init_decoder=True,  # ...and the decoder where it pretrained a whole network (mim); False: random decoder
        # Fine-tuning controls (jaxem.train.state.encoder_controls; with optimizer.encoder_lr_scale):
        llrd=1.0,  # layer-wise lr decay in (0, 1]: encoder layer i of L learns at lr x llrd^(L - i); 1 = off
        freeze_encoder_steps=0,  # no encoder updates (nor batch-norm statistics) for this many steps; -1 = whole run
        freeze_encoder_batch_stats=True,  # False: a frozen encoder's batch-norm running statistics keep tracking the data (AdaBN)
    ))


def default_loss_config() -> ml_collections.ConfigDict:
    """Weighted loss terms (see jaxem.train.losses.LOSSES) and the BCE positive weight."""
    return ml_collections.ConfigDict(dict(terms={"bce": 1.0, "dice": 1.0}, pos_weight=1.0))


def default_predict_config() -> ml_collections.ConfigDict:
    """Blockwise inference: block and halo in voxels (z, y, x or y, x), blocks per device batch."""
    return ml_collections.ConfigDict(dict(
        block_shape=(256, 256),
        halo=(32, 32),
        batch_size=4,  # tiles per device per forward pass
        blend="gaussian",  # or "linear", "center" (exact crop-centre tiling)
        chunk_shape=(),  # output chunk; () = block - 2 * halo
        block_gib=0.0,  # GiB of one block's window on the device (infer.device.block_bytes); 0 = auto:
                        # 1 GiB on a CPU, 1/8 of an accelerator's memory up to 16 GiB (infer.device.auto_block_bytes)
    ))


def with_dataset_volumes(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills data.{train,val}_{images,labels} from the registry when data.dataset names a dataset."""
    name = config.data.get("dataset", "")
    if not name:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    for split in ("train", "val"):
        images, labels = datasets.split_paths(name, split)
        config.data[f"{split}_images"], config.data[f"{split}_labels"] = images, labels
    config.lock()
    return config


def base_config(ndim: int = 2, model: str = "unet") -> ml_collections.ConfigDict:
    """A complete config: every section with defaults; experiment files override fields."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = pipeline.default_data_config()
    config.data.dataset = ""  # a registry name (jaxem data list): fills train/val volumes when set
    config.augment = augment.default_augment_config(ndim)
    config.target = targets.default_target_config(ndim)
    config.model = models.default_config(model, ndim)
    config.loss = default_loss_config()
    config.optimizer = default_optimizer_config()
    config.train = default_train_config()
    config.predict = default_predict_config()
    config.semi = default_semi_config()  # mean teacher / adversarial adaptation on unlabelled volumes; off at weight 0
    return config
