"""jaxem: JAX/Flax segmentation of large-scale cellular electron microscopy.

Importing jaxem leaves the environment alone: the XLA flags the CLI runs with are set by
`jaxem.xla.set_default_flags()` (called by `jaxem` commands before JAX starts).
"""

__version__ = "0.1.0"
