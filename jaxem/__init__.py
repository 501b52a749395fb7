"""jaxem: JAX/Flax segmentation of large-scale cellular electron microscopy."""

import os

__version__ = "0.1.0"

# cuDNN convolutions in channels-last (NDHWC) layouts, as flax lays arrays out. XLA otherwise picks
# channels-first for 3D convolutions and transposes around each one: a 3D U-Net training step took
# 16.4 ms with XLA's choice and 12.8 ms with this on an H200 (docs/models.md). Read when JAX starts
# its GPU backend, so it has to be set before the first computation; a flag the user set wins.
if "xla_gpu_force_conv_nhwc" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_force_conv_nhwc=true").strip()
