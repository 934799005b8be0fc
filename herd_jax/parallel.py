"""Device mesh and shardings: the batch is split over a `data` axis, params are replicated."""
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
