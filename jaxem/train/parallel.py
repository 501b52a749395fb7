"""The device mesh, shardings and multi-host start-up.

One Mesh with a 'data' axis spans every device of every process. Batches are global jax.Arrays
sharded on 'data' (each process holds only its own rows); parameters and optimizer state are
replicated. Under jit, BatchNorm statistics over a 'data'-sharded batch are global, i.e.
synchronized batch norm comes for free; steps that need explicit collectives use shard_map.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxem.errors import UserError

DATA_AXIS = "data"


_distributed_started = False


def initialize_distributed() -> None:
    """Starts multi-host JAX when the environment describes a multi-process job.

    Reads JAXEM_COORDINATOR (host:port), JAXEM_NUM_PROCESSES and JAXEM_PROCESS_ID, or lets JAX
    detect SLURM / Cloud TPU when JAXEM_DISTRIBUTED=auto. Single-process runs do nothing. Must run
    before anything touches a JAX device (so it never asks JAX for devices itself).
    """
    global _distributed_started
    if _distributed_started:
        return
    coordinator = os.environ.get("JAXEM_COORDINATOR")
    if coordinator:
        if os.environ.get("JAXEM_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", os.environ["JAXEM_CPU_COLLECTIVES"])
        jax.distributed.initialize(
            coordinator,
            num_processes=int(os.environ["JAXEM_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXEM_PROCESS_ID"]),
        )
    elif os.environ.get("JAXEM_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    _distributed_started = True


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-axis mesh named 'data' over `num_devices` devices (0 = all devices of all processes)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise UserError(f"config asks for {num_devices} devices but only {len(devices)} exist ({devices[0].platform}).")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise UserError("multi-process runs must use every device (set train.num_devices=0).")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raises UserError unless the global batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if global_batch_size < 1:
        raise UserError(f"data.batch_size={global_batch_size} must be a positive multiple of the {n} devices of the mesh, such as {n}.")
    if global_batch_size % n:
        raise UserError(
            f"data.batch_size={global_batch_size} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n} such as {max(n, (global_batch_size // n) * n)}."
        )


def replicate(tree, mesh: Mesh):
    """Places a pytree of host arrays on every device of the mesh (all processes)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)
