"""Lucchi (EPFL hippocampus CA1, FIB-SEM 5x5x5 nm) mitochondria: a 3D U-Net on isotropic crops.

The recipe published 3D U-Nets use on this benchmark: an isotropic 3D U-Net (3x3x3 kernels, 2x2x2
pooling at every level), a foreground (mitochondrion) target, BCE + Dice, flips / in-plane
rotations / 3D elastic and intensity augmentation, the probabilities thresholded at 0.5 and scored
by foreground Jaccard (IoU) over the whole test volume (benchmarks/lucchi.py).

Get the data once (EPFL; or a local copy):
    jaxem data download lucchi [--url-base file:///path/to/copy/]
Train on training.tif slices 0-132, validating on 133-164 (jaxem/data/datasets.py):
    jaxem train --config lucchi_mito --workdir runs/lucchi
Train and score on testing.tif (foreground Jaccard/Dice, mitochondria AP/PQ, Otsu baseline):
    python benchmarks/lucchi.py --run runs/lucchi --config lucchi_mito

Arguments, comma-separated: cpu (a size that trains on a 2-core CPU in ~10-15 min); synthetic (the
generated stand-in dataset synthetic_mito instead of lucchi); tiny (seconds, for tests). E.g.
`lucchi_mito:cpu,synthetic`.
"""

from jaxem.config import config_args
from jaxem.train.defaults import base_config

ARGS = ("cpu", "synthetic", "tiny")


def get_config(arg: str = ""):
    options = config_args(arg, ARGS, "lucchi_mito")
    config = base_config(ndim=3, model="unet")
    config.seed = 0
    config.data.dataset = "synthetic_mito" if "synthetic" in options else "lucchi"
    # Lucchi's validation split is 32 slices thick; crops keep 5 nm voxels in every axis.
    config.data.crop_shape = (32, 128, 128)
    config.data.batch_size = 4
    config.data.normalize = "meanstd"
    # Most random crops hold no mitochondrion (a few % of the voxels are); redraw those, a little
    # like nnU-Net's foreground oversampling.
    config.data.foreground_min_fraction = 0.01
    config.data.max_retries = 50

    config.augment.isotropic = True  # 3D elastic displacement; FIB-SEM has no section defects
    config.augment.transpose.p = 0.0  # needs cubic crops
    config.augment.elastic.p = 0.3
    for defect in ("missing_section", "blurred_section", "misalign"):
        config.augment[defect].p = 0.0

    config.target.kind = "foreground"
    config.model.widths = (32, 64, 128, 256)
    config.model.block = "residual"
    config.model.norm = "group"  # small 3D batches
    config.model.out_channels = 1

    config.loss.terms = {"bce": 1.0, "dice": 1.0}
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 200
    config.train.steps = 20000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.best_metric = ""  # score the last checkpoint, as the papers do
    config.predict.block_shape = (64, 256, 256)
    config.predict.halo = (16, 32, 32)
    config.predict.batch_size = 1

    if "cpu" in options:
        cpu_size(config)
    if "tiny" in options:
        tiny_size(config)
    return config


def cpu_size(config) -> None:
    """A narrow 3-level U-Net on 32x64x64 crops: ~10-15 min of training on a 2-core CPU."""
    config.data.crop_shape = (32, 64, 64)
    config.data.batch_size = 2
    config.model.widths = (8, 16, 32)
    config.model.block = "plain"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.train.steps = 600
    config.train.log_every = 20
    config.train.eval_every = 200
    config.train.eval_batches = 2
    config.train.checkpoint_every = 200
    config.predict.block_shape = (64, 128, 128)
    config.predict.halo = (8, 16, 16)


def tiny_size(config) -> None:
    """Seconds: a 2-level U-Net, a few steps on 8x32x32 crops."""
    config.data.crop_shape = (8, 32, 32)
    config.data.batch_size = 4
    config.model.widths = (4, 8)
    config.model.block = "plain"
    config.augment.elastic.p = 0.0
    config.data.foreground_min_fraction = 0.0  # tiny test volumes may hold a single mitochondrion
    config.optimizer.warmup_steps = 1
    config.train.steps = 4
    config.train.log_every = 2
    config.train.eval_every = 0  # one compile less
    config.train.checkpoint_every = 4
    config.train.async_checkpoints = False
    config.predict.block_shape = (16, 64, 64)
    config.predict.halo = (4, 8, 8)
    config.predict.batch_size = 2
