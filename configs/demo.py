"""The demo: a small 2D U-Net learns membranes on synthetic EM, on a 2-core CPU in minutes.

    jaxem demo                                  # generates data, trains, predicts, evaluates
    jaxem demo --config.train.steps=50          # any field can be overridden

`jaxem demo` fills in data.train_images etc. with the synthetic volumes it writes, and so does
`jaxem train --config configs/demo.py --workdir DIR` (in DIR/data) when no volumes are named.
"""

from jaxem.train.defaults import base_config


def get_config(arg: str = ""):
    config = base_config(ndim=2, model="unet")
    config.seed = 0
    config.demo = dict(
        voxel_size=(40.0, 4.0, 4.0),  # nm, z-y-x: anisotropic serial-section EM
        train_shape=(16, 256, 256),
        val_shape=(4, 256, 256),
        test_shape=(6, 256, 256),
    )

    config.data.crop_shape = (128, 128)
    config.data.batch_size = 8
    config.data.num_workers = 0

    config.target.kind = "boundary"
    config.target.width = (1,)

    config.model.widths = (16, 32, 64, 128)
    config.model.out_channels = 1

    config.loss.terms = {"bce": 1.0, "dice": 1.0}
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20

    config.train.steps = 300
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 2
    config.train.checkpoint_every = 100

    config.predict.block_shape = (256, 256)
    config.predict.halo = (32, 32)

    if arg == "tiny":  # for tests: seconds, not minutes
        config.demo.train_shape = (4, 64, 64)
        config.demo.val_shape = (2, 64, 64)
        config.demo.test_shape = (2, 64, 64)
        config.data.crop_shape = (32, 32)
        config.data.batch_size = 4
        config.model.widths = (4, 8)
        config.train.steps = 6
        config.train.log_every = 2
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.predict.block_shape = (32, 32)
        config.predict.halo = (8, 8)
    return config
