"""jaxem: JAX/Flax segmentation of large-scale cellular electron microscopy."""

__version__ = "0.1.0"
