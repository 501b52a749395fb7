"""Test setup: 4 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

# XLA's CPU backend spends most of a small test's time optimising the compiled code; level 0 still
# computes the same numbers, about twice as fast end to end. Subprocesses use device_flags(n).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def device_flags(n: int) -> str:
    """XLA_FLAGS for a test process with `n` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}"


os.environ.setdefault("XLA_FLAGS", device_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """The folder of small real EM datasets beside the repo; skips the test when absent."""
    for candidate in (Path(os.environ.get("JAXEM_SHARED_DATA", "")), SHARED_DATA):
        if str(candidate) and candidate.is_dir() and (candidate / "isbi2012").is_dir():
            return candidate
    pytest.skip("../shared/data is not present")


def grid_boundaries(shape, step):
    """A boundary map with membranes (1.0) every `step` voxels along each axis, cells 0.0."""
    prob = np.zeros(shape, np.float32)
    for axis in range(len(shape)):
        index = [slice(None)] * len(shape)
        index[axis] = slice(0, shape[axis], step)
        prob[tuple(index)] = 1.0
    return prob
