"""ISBI 2012 neuron membranes: a 2D U-Net on the 20 labelled ssTEM slices (50x4x4 nm).

Get the data once (official site; or a local copy such as ../shared/data/isbi2012):
    jaxem data download isbi2012 --url-base file://$PWD/../shared/data/isbi2012/
Train (slices 0-15), validating on slices 16-19 (see jaxem/data/datasets.py):
    jaxem train --config isbi2012_unet --workdir runs/isbi2012
    jaxem train --config isbi2012_unet:cpu --workdir runs/isbi2012_cpu    # smaller, for a CPU
Score on the held-out slices 16-19 (VRand/VInfo as in the challenge, per slice):
    python benchmarks/isbi2012.py --run runs/isbi2012
"""

from jaxem.train.defaults import base_config


def get_config(arg: str = ""):
    config = base_config(ndim=2, model="unet")
    config.seed = 0
    config.data.dataset = "isbi2012"
    config.data.crop_shape = (256, 256)
    config.data.batch_size = 8
    config.data.normalize = "meanstd"

    config.augment.elastic.p = 0.5  # ssTEM sections deform; elastic augmentation matters here
    config.target.kind = "boundary"
    config.target.width = (1,)

    config.model.widths = (32, 64, 128, 256, 512)
    config.model.block = "residual"
    config.model.norm = "batch"
    config.model.out_channels = 1

    config.loss.terms = {"bce": 1.0, "dice": 1.0}
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.weight_decay = 1e-4
    config.train.steps = 6000
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.ema_decay = 0.999
    # The validation slices (16-19) are the ones the recipe scores: select no checkpoint on them,
    # score the last one.
    config.train.best_metric = ""
    config.predict.block_shape = (512, 512)
    config.predict.halo = (32, 32)

    if arg == "cpu":  # fits a 2-core CPU in about half an hour
        config.model.widths = (16, 32, 64, 128)
        config.model.block = "plain"
        config.data.crop_shape = (192, 192)
        config.train.steps = 1200
        config.optimizer.learning_rate = 3e-3
        config.optimizer.warmup_steps = 50
        config.train.eval_every = 200
        config.train.checkpoint_every = 200
        config.train.ema_decay = 0.0
    return config
