"""XLA flags jaxem runs with, set by `jaxem` commands (cli.main) and by scripts that ask for them.

Importing jaxem changes nothing in the environment; call `set_default_flags()` before JAX's first
computation (flags are read when JAX starts a backend) to get what the CLI runs with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import MutableMapping

# cuDNN convolutions in channels-last (NDHWC) layouts, as flax lays arrays out. XLA otherwise picks
# channels-first for 3D convolutions and transposes around each one: a 3D U-Net training step took
# 16.4 ms with XLA's choice and 12.8 ms with this on an H200 (docs/models.md).
DEFAULT_FLAGS = {"xla_gpu_force_conv_nhwc": "true"}


def set_default_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds each of DEFAULT_FLAGS to environ['XLA_FLAGS'] unless that flag is already there (a flag
    the user set wins); returns the resulting XLA_FLAGS."""
    flags = environ.get("XLA_FLAGS", "")
    for name, value in DEFAULT_FLAGS.items():
        if name not in flags:
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
    return flags


def use_compilation_cache(directory: str | Path, environ: MutableMapping[str, str] = os.environ) -> str:
    """Keeps the compiled XLA programs that took >= 1 s to compile (jax_persistent_cache_min_compile_time_secs)
    in `directory`, so that compiling the same program again, in this process or a later one (the
    next seed or arm of a benchmark, a resumed run), loads it instead. JAX_COMPILATION_CACHE_DIR,
    when set, wins. Call before JAX's first compilation: JAX fixes its cache then. Returns the
    directory used."""
    import jax  # here, not at the top: the CLI imports this module and must not pay for JAX before a command

    chosen = environ.get("JAX_COMPILATION_CACHE_DIR") or str(directory)
    jax.config.update("jax_compilation_cache_dir", chosen)
    return chosen
