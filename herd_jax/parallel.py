"""Device mesh and shardings: the batch is split over a `data` axis; params are replicated, or
sharded over the same axis (FSDP, `parallel.fsdp`).

FSDP (ZeRO-3 style): every large array of the UNet's params, gradients, optimizer state and
frozen copies is split along one of its axes over the `data` devices, so each device holds 1/n
of them; inside a jitted step the SPMD partitioner all-gathers a weight where it is used and
reduce-scatters its gradient. The rule depends only on an array's shape, so params, gradients
and the AdamW moments of the same param get the same sharding.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis name `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


# Arrays with fewer elements stay replicated under FSDP: biases and norm scales (at most a few
# thousand elements) cost more to gather than they save.
FSDP_MIN_SIZE = 1024


def fsdp_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
    """The largest axis of `shape` that the `data` axis divides, split over it; replicated when
    no axis divides or the array has fewer than `min_size` elements."""
    n = mesh.shape[DATA_AXIS]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    divisible = [i for i, size in enumerate(shape) if size % n == 0]
    if not divisible:
        return replicated(mesh)
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return NamedSharding(mesh, P(*([None] * axis + [DATA_AXIS])))


def param_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
    """Shardings of a params-like pytree (params, gradients, optimizer state, frozen copies):
    `fsdp_sharding` of each leaf's shape, or replicated everywhere without FSDP."""
    if fsdp:
        return jax.tree.map(lambda x: fsdp_sharding(tuple(x.shape), mesh), tree)
    return jax.tree.map(lambda _: replicated(mesh), tree)


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
    """Raises a one-line ValueError when a batch cannot be split evenly over the mesh."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} must be a multiple of the number of devices ({n})")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places host arrays (leading batch axis) on the mesh, split over `data`."""
    return jax.device_put(tree, batch_sharded(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Joins a multi-host run (`jax.distributed`), before anything touches the devices.

    With a coordinator address (flags, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID) the processes rendezvous there; on TPU pods and under SLURM
    `jax.distributed.initialize()` finds them itself (set HERD_JAX_DISTRIBUTED=auto). On CPU the
    cross-process collectives go through gloo. Without any of these it is a single-process run.
    """
    import os

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    auto = os.environ.get("HERD_JAX_DISTRIBUTED") == "auto"
    if not coordinator and not auto:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by CPU devices only
    if auto and not coordinator:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes or None, process_id=None if process_id < 0 else process_id)


def is_main_process() -> bool:
    return jax.process_index() == 0


def gather_to_host(x: jax.Array) -> np.ndarray:
    """All rows of a batch-sharded array as one NumPy array on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_rows(n: int) -> slice:
    """The contiguous rows [start, stop) of an n-row batch that this process scores."""
    count, index = jax.process_count(), jax.process_index()
    if n % count:
        raise ValueError(f"a batch of {n} rows cannot be split evenly over {count} processes")
    per = n // count
    return slice(index * per, (index + 1) * per)


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenates every process's `local` rows (in process order) on every process."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))
