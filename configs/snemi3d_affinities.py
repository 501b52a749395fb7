"""SNEMI3D neurons in 3D: an anisotropic 3D U-Net predicts long-range affinities; mutex watershed.

The connectomics recipe (Lee et al. 2017 "Superhuman"; Wolf et al. 2018 mutex watershed): a
residual 3D U-Net whose first levels are in-plane only ((1,3,3) kernels, (1,2,2) pooling: the
sections are 5x thicker than the pixels) predicts, for every voxel, 12 affinities to voxels up to
4 sections and 27 pixels away; `jaxem segment --method mws` turns them into neurons.

Get the data once (official site), then train on slices 0-79 and score on slices 80-99:
    jaxem data download snemi3d
    jaxem train --config snemi3d_affinities --workdir runs/snemi3d
    python benchmarks/snemi3d.py --run runs/snemi3d        # adapted Rand error, VOI, in 3D
Whole volumes: `jaxem predict --run runs/snemi3d --input test.zarr --output aff.zarr`, then
`jaxem segment --input aff.zarr --output seg.zarr --method mws --min-size 100 --block 64,512,512`.

Arguments (comma-separated): cpu (a small net and crop that train on a 2-core CPU in ~20 min);
synthetic (the embedded synthetic neuropil, 40x4x4 nm, instead of SNEMI3D: no download);
tiny (seconds, for tests). E.g. `snemi3d_affinities:cpu,synthetic`.
"""

from jaxem.config import config_args
from jaxem.train.defaults import base_config

# Wolf et al. 2018 (mutex watershed on ISBI/CREMI): nearest neighbours + three longer ranges.
OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1),
           (-2, 0, 0), (0, -3, 0), (0, 0, -3),
           (-3, 0, 0), (0, -9, 0), (0, 0, -9),
           (-4, 0, 0), (0, -27, 0), (0, 0, -27))
ARGS = ("cpu", "synthetic", "tiny")


def get_config(arg: str = ""):
    options = config_args(arg, ARGS, "snemi3d_affinities")
    config = base_config(ndim=3, model="unet")
    config.seed = 0
    config.data.dataset = "synthetic" if "synthetic" in options else "snemi3d"
    config.data.crop_shape = (16, 192, 192)
    config.data.batch_size = 4
    config.data.normalize = "meanstd"

    config.augment.elastic.p = 0.5

    config.target.kind = "affinities"
    config.target.offsets = OFFSETS

    config.model.widths = (28, 36, 48, 64, 80)
    config.model.kernel_sizes = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    config.model.pool_factors = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    config.model.block = "residual"
    config.model.norm = "group"
    config.model.out_channels = len(OFFSETS)
    config.model.dtype = "bfloat16"

    config.loss.terms = {"bce": 1.0, "dice": 1.0}
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 500
    config.optimizer.weight_decay = 1e-4
    config.train.steps = 50000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.ema_decay = 0.999
    config.predict.block_shape = (32, 256, 256)
    config.predict.halo = (4, 32, 32)
    config.predict.batch_size = 2

    if "cpu" in options:  # 2 x 8 x 128^2 crops, a 4-level net with 8-64 channels
        config.data.crop_shape = (8, 128, 128)
        config.data.batch_size = 2
        config.model.widths = (8, 16, 32, 64)
        config.model.kernel_sizes = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
        config.model.pool_factors = ((1, 2, 2), (1, 2, 2), (2, 2, 2))
        config.model.dtype = "float32"  # the CPU has no fast bfloat16
        config.train.steps = 800
        config.optimizer.learning_rate = 3e-3
        config.optimizer.warmup_steps = 50
        config.train.eval_every = 250
        config.train.checkpoint_every = 250
        config.train.ema_decay = 0.0
        config.predict.block_shape = (16, 128, 128)
        config.predict.halo = (2, 16, 16)
    if "tiny" in options:
        config.data.crop_shape = (4, 32, 32)
        config.data.batch_size = 4  # divisible by the tests' 4 fake devices
        config.target.offsets = OFFSETS[:6]
        config.model.out_channels = 6
        config.model.widths = (4, 8)
        config.model.kernel_sizes = ((1, 3, 3), (3, 3, 3))
        config.model.pool_factors = ((1, 2, 2),)
        config.model.dtype = "float32"
        config.train.steps = 4
        config.train.log_every = 2
        config.train.eval_every = 2
        config.train.eval_batches = 1
        config.train.checkpoint_every = 2
        config.train.ema_decay = 0.0
        config.predict.block_shape = (8, 64, 64)
        config.predict.halo = (2, 8, 8)
    return config
