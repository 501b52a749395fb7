"""Self-supervised pretraining of the demo U-Net's encoder on unlabelled (synthetic) EM.

    jaxem pretrain --workdir runs/pretrain                          # MoCo v2 (default)
    jaxem pretrain --config pretrain:simclr --workdir runs/simclr   # SimCLR
    jaxem pretrain --config pretrain:densecl --workdir runs/densecl # DenseCL (MoCo v2 + dense loss)
    jaxem pretrain --config pretrain:mim --workdir runs/mim         # masked image modelling, whole U-Net
    jaxem pretrain --config pretrain:mae --workdir runs/mae         # MAE of a UNETR's ViT encoder (tiny, patch 16)
    jaxem demo --workdir runs/finetuned --config.train.init_encoder=runs/pretrain

The model section is the demo's U-Net, so the exported encoder fine-tunes in `jaxem demo` (or any
config with the same encoder). With data.train_images empty, `jaxem pretrain` writes a synthetic
volume of `synthetic.shape` into WORKDIR/data; set data.train_images to pretrain on real EM
(labels are never read). Arguments (comma-separated): moco | simclr | densecl | mim | mae (the
model section becomes a UNETR with a tiny ViT, patch 16: fine-tune a UNETR of the same ViT
fields); 3d (an anisotropic 3D U-Net encoder on 8 x 128x128 crops: in-plane levels first, as
for serial-section EM; with mae a ViT of patch (4, 16, 16)); tiny (seconds, for tests). Another model (a U-Net with a ResNet encoder, UNETR) is a copy of this file with that
model section: the encoder is pretrained for exactly the model it will fine-tune.
"""

from jaxem.ssl.contrastive import default_ssl_config
from jaxem.train.defaults import base_config


def get_config(arg: str = ""):
    options = {a for a in arg.split(",") if a}
    methods = {"moco", "simclr", "densecl", "mim", "mae"}
    unknown = options - methods - {"3d", "tiny"}
    if unknown or len(options & methods) > 1:
        raise ValueError(f"unknown or conflicting arguments {sorted(options)}; use one of moco, simclr, densecl, mim, mae; 3d, tiny.")
    ndim = 3 if "3d" in options else 2
    config = base_config(ndim=ndim, model="unet")
    config.seed = 0
    config.synthetic = dict(shape=(32, 256, 256), voxel_size=(40.0, 4.0, 4.0), seed=100)

    config.ssl = default_ssl_config()
    config.ssl.method = next(iter(options & methods), "moco")
    config.ssl.dense_weight = 0.5  # DenseCL's lambda (the paper's default); unused by moco and simclr
    config.ssl.temperature = 0.2
    config.ssl.queue_size = 2048

    config.data.crop_shape = (128, 128)
    config.data.batch_size = 32

    config.model.widths = (16, 32, 64, 128)  # the demo's U-Net (configs/demo.py)
    if ndim == 3:
        config.data.crop_shape = (8, 128, 128)
        config.data.batch_size = 8
        config.ssl.queue_size = 2048
        config.model.kernel_sizes = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
        config.model.pool_factors = ((1, 2, 2), (1, 2, 2), (2, 2, 2))

    # Views differ in intensity and blur as well as geometry, so that matching them needs structure.
    config.augment.contrast = {"p": 0.8, "brightness": 0.4, "contrast": 0.4}
    config.augment.gamma = {"p": 0.5, "max_log_gamma": 0.4}
    config.augment.blur = {"p": 0.5, "max_sigma": 2.0}
    config.augment.noise = {"p": 0.5, "max_std": 0.2}

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 20
    config.train.steps = 300
    config.train.log_every = 10
    config.train.eval_every = 50  # the linear probe (ssl.probe_*; jaxem pretrain fills them on synthetic data)
    config.train.checkpoint_every = 100
    config.train.best_metric = ""

    if config.ssl.method == "mim":
        # One view, the fine-tuning augmentations (intensity changes need not be strong: nothing
        # is matched across views); the reconstruction target is that view.
        config.augment = base_config(ndim=ndim, model="unet").augment
        config.ssl.mask_ratio = 0.6
        config.ssl.mask_patch = (16,)

    if config.ssl.method == "mae":
        # A UNETR whose ViT encoder is pretrained (its decoder is not: MAE has its own light one);
        # one view with the fine-tuning augmentations, as for mim.
        config.model = base_config(ndim=ndim, model="unetr").model
        config.model.size = "tiny"
        config.model.patch_size = (4, 16, 16) if ndim == 3 else (16, 16)
        config.augment = base_config(ndim=ndim, model="unetr").augment
        config.ssl.mask_ratio = 0.75  # the paper's
        config.ssl.decoder_dim, config.ssl.decoder_depth, config.ssl.decoder_heads = 128, 2, 4

    if "tiny" in options:
        config.ssl.mask_patch = (8,)
        config.synthetic.shape = (4, 64, 64)
        config.data.crop_shape = (2, 32, 32) if ndim == 3 else (32, 32)
        config.data.batch_size = 8
        if config.ssl.method != "mae":
            config.model.widths = (4, 8)
        if ndim == 3 and config.ssl.method != "mae":
            config.model.kernel_sizes = ((1, 3, 3), (3, 3, 3))
            config.model.pool_factors = ((1, 2, 2),)
        config.ssl.queue_size = 32
        config.ssl.projection_hidden = 32
        config.ssl.projection_dim = 16
        config.train.steps = 6
        config.train.log_every = 2
        config.train.eval_every = 0  # no probe (tests turn it on)
        config.train.checkpoint_every = 3
        if config.ssl.method == "mae":
            config.model.update(dict(hidden=16, depth=2, heads=2, feature_size=4,
                                     patch_size=(2, 8, 8) if ndim == 3 else (8, 8)))
            config.ssl.decoder_dim, config.ssl.decoder_depth, config.ssl.decoder_heads = 16, 1, 2
    return config
