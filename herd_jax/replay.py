"""Functional replay buffer: a fixed-capacity ring of pytrees, jit-able and shardable.

`herd` keeps fresh trajectories plus hindsight copies (the same trajectory stored again under
another goal, its reward re-scored) and mixes them into DDPO minibatches; `dpok` keeps a FIFO
of transitions. Both use this module. The buffer is a plain pytree (`ReplayBuffer`) updated by
pure functions, so it lives inside the train state, is donated and sharded like the rest of it,
and is saved by the same orbax checkpoint.

An item is any pytree of arrays (the trainer stores `algorithms.api.Experience` rows); a batch of
items has a leading batch axis on every leaf. The buffer never looks inside an item.

Usage (all of it runs under `jax.jit`; capacity and `n` are shapes, so they are static, e.g.
`jax.jit(replay.sample, static_argnums=2)`):

    buf = replay.init(example_item, capacity=256)          # example_item has no batch axis
    buf = replay.add(buf, traj, epoch=e, original_prompt_id=traj.goal, relabeled=False)
    buf = replay.add(buf, copies, epoch=e, original_prompt_id=traj.goal, relabeled=True, mask=has_goal)
    buf = replay.expire(buf, current_epoch=e, keep_epochs=2)
    items, info = replay.sample(buf, key, 8)

Sharding: put the capacity axis of every `[capacity, ...]` leaf over the mesh axis "data"
(`shardings` builds that) and `next_index` replicated, so each device stores capacity/devices
items. `add` is then a scatter and `sample` a gather over that axis: between devices XLA moves
only the items written or read (plus the bool[capacity] `valid` mask), never the stored items,
and nothing goes through the host. Both automatic and explicit (`AxisType.Explicit`) meshes
work; sampled items come out replicated, to be resharded over "data" by the consumer (e.g.
`jax.lax.with_sharding_constraint` or the loss step's `in_shardings`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Pytree = Any


class ReplayBuffer(NamedTuple):
    """State of the ring. Slots are written in ring order; `valid` says which hold live items.

    Attributes:
      items: the stored items; each leaf `[capacity, *item_shape]`, the example item's dtype.
      epoch: int32[capacity], iteration the item was collected in (-1 for never-written slots).
      original_prompt_id: int32[capacity], goal id the trajectory was sampled for (-1 if empty).
        For a hindsight copy this differs from the item's own (relabeled) prompt id.
      relabeled: bool[capacity], True for hindsight copies.
      valid: bool[capacity], the slot holds a live (written and not expired) item.
      next_index: int32[], slot the next added item goes to (the oldest slot once full).
    """

    items: Pytree
    epoch: jax.Array
    original_prompt_id: jax.Array
    relabeled: jax.Array
    valid: jax.Array
    next_index: jax.Array

    @property
    def capacity(self) -> int:
        """Number of slots (static)."""
        return self.valid.shape[0]


def init(example_item: Pytree, capacity: int) -> ReplayBuffer:
    """Returns an empty buffer holding up to `capacity` items shaped like `example_item`.

    Args:
      example_item: one item, WITHOUT the batch axis; leaves may be arrays or
        `jax.ShapeDtypeStruct`s (only shapes and dtypes are read). To build a sharded buffer
        directly on the mesh: `jax.jit(functools.partial(init, example, capacity),
        out_shardings=shardings(abstract_buf, mesh))()`.
      capacity: number of slots (static).

    Returns:
      A `ReplayBuffer` with every slot invalid and `next_index` 0.
    """
    if capacity < 1:
        raise ValueError(f"replay capacity must be >= 1, got {capacity}")

    def zeros(x):
        shape, dtype = _shape_dtype(x)
        return jnp.zeros((capacity, *shape), dtype)

    return ReplayBuffer(
        items=jax.tree.map(zeros, example_item),
        epoch=jnp.full((capacity,), -1, jnp.int32),
        original_prompt_id=jnp.full((capacity,), -1, jnp.int32),
        relabeled=jnp.zeros((capacity,), bool),
        valid=jnp.zeros((capacity,), bool),
        next_index=jnp.zeros((), jnp.int32),
    )


def add(
    buf: ReplayBuffer,
    items: Pytree,
    *,
    epoch: jax.Array | int,
    original_prompt_id: jax.Array | int,
    relabeled: jax.Array | bool,
    mask: jax.Array | None = None,
) -> ReplayBuffer:
    """Writes a batch of items at the ring position, overwriting the oldest slots.

    Kept items (those with `mask` True) are written in batch order to consecutive ring slots
    starting at `next_index`. If more than `capacity` are kept, only the last `capacity` of them
    are stored, so the buffer always holds the newest items. Items masked out are not written and
    take no slot, which lets a fixed-shape batch carry a variable number of items (e.g. hindsight
    copies only for trajectories that have another goal).

    Args:
      buf: the buffer.
      items: pytree with the buffer's item structure; each leaf `[B, *item_shape]`, same dtype.
      epoch: int32 scalar or `[B]`, iteration the items were collected in (used by `expire`).
      original_prompt_id: int32 scalar or `[B]`, goal id each trajectory was sampled for.
      relabeled: bool scalar or `[B]`, whether the items are hindsight copies.
      mask: optional bool `[B]`; False entries are skipped.

    Returns:
      The updated buffer.
    """
    batch = _check_batch(buf.items, items, "add")
    capacity = buf.capacity
    epoch = _per_item(epoch, jnp.int32, batch, "epoch")
    original_prompt_id = _per_item(original_prompt_id, jnp.int32, batch, "original_prompt_id")
    relabeled = _per_item(relabeled, bool, batch, "relabeled")
    mask = jnp.ones((batch,), bool) if mask is None else _per_item(mask, bool, batch, "mask")

    slots, count = _ring_slots(buf.next_index, mask, capacity)

    def write(dst, src):
        return jnp.asarray(dst).at[slots].set(src, mode="drop", out_sharding=_sharding(dst))

    return ReplayBuffer(
        items=jax.tree.map(write, buf.items, items),
        epoch=write(buf.epoch, epoch),
        original_prompt_id=write(buf.original_prompt_id, original_prompt_id),
        relabeled=write(buf.relabeled, relabeled),
        valid=write(buf.valid, jnp.ones((batch,), bool)),
        next_index=(buf.next_index + count) % capacity,
    )


def expire(
    buf: ReplayBuffer, *, current_epoch: jax.Array | int, keep_epochs: jax.Array | int
) -> ReplayBuffer:
    """Invalidates items collected `keep_epochs` or more iterations before `current_epoch`.

    An item stays valid iff `current_epoch - epoch < keep_epochs`: `keep_epochs=1` keeps only
    items of `current_epoch` (the original HERD), 2 also keeps the previous iteration's (its
    paper's "b2"), 0 empties the buffer. Slots are not moved; when items are added in epoch order
    the expired ones are the oldest, i.e. the ones the ring overwrites next.

    Args:
      buf: the buffer.
      current_epoch: int32 scalar, the current iteration.
      keep_epochs: int32 scalar, how many iterations (counting the current one) to keep.

    Returns:
      The buffer with `valid` cleared for the too-old items; everything else unchanged.
    """
    age = jnp.asarray(current_epoch, jnp.int32) - buf.epoch
    return buf._replace(valid=buf.valid & (age < jnp.asarray(keep_epochs, jnp.int32)))


def size(buf: ReplayBuffer) -> jax.Array:
    """Returns the number of valid items, int32[] (at most `capacity`)."""
    return jnp.sum(buf.valid, dtype=jnp.int32)


def sample(buf: ReplayBuffer, key: jax.Array, n: int) -> tuple[Pytree, dict[str, jax.Array]]:
    """Draws `n` valid items uniformly at random, without replacement where possible.

    If the buffer holds at least `n` valid items, the result is a uniformly random subset of
    them in random order. If it holds fewer (but some), every valid item is taken once in random
    order and the list is repeated cyclically to length `n`, so each valid item appears
    `floor(n/size)` or `ceil(n/size)` times. If it is empty, the returned items are arbitrary
    (zeros from `init`) and `info["valid"]` is all False: mask them out.

    Args:
      buf: the buffer.
      key: PRNG key.
      n: number of items to return (static).

    Returns:
      `(items, info)`: items with each leaf `[n, *item_shape]`; info holds, all `[n]`, `index`
      (int32 slot), `valid` (bool, False only for an empty buffer), `epoch`,
      `original_prompt_id` and `relabeled` of the sampled slots.
    """
    capacity = buf.capacity
    k = min(n, capacity)
    # A random permutation's ranks are distinct integers: top-k over them (invalid slots -1)
    # gives the valid slots first in a uniformly random order, with no ties.
    rank = jax.random.permutation(key, capacity).astype(jnp.int32)
    valid = _take(buf.valid, jnp.arange(capacity))  # replicated: top_k runs along this axis
    _, order = jax.lax.top_k(jnp.where(valid, rank, -1), k)
    count = jnp.minimum(jnp.sum(valid, dtype=jnp.int32), k)
    index = order[jnp.arange(n) % jnp.maximum(count, 1)].astype(jnp.int32)
    items = jax.tree.map(lambda x: _take(x, index), buf.items)
    info = {
        "index": index,
        "valid": valid[index],
        "epoch": _take(buf.epoch, index),
        "original_prompt_id": _take(buf.original_prompt_id, index),
        "relabeled": _take(buf.relabeled, index),
    }
    return items, info


def shardings(buf_abstract: ReplayBuffer, mesh: Mesh, axis: str = "data") -> ReplayBuffer:
    """Shardings for a buffer: capacity axis over `axis`, `next_index` replicated.

    Args:
      buf_abstract: a buffer or its abstract shape (`jax.eval_shape(init, example, capacity)`).
      mesh: the device mesh.
      axis: mesh axis the capacity is split over.

    Returns:
      A `ReplayBuffer`-shaped pytree of `NamedSharding`s, for `jax.jit(out_shardings=...)`,
      `jax.device_put` or an orbax restore target.
    """
    capacity = buf_abstract.valid.shape[0]
    devices = mesh.shape[axis]
    if capacity % devices:
        raise ValueError(
            f"replay capacity {capacity} must be a multiple of the {devices} devices on mesh "
            f"axis {axis!r}"
        )
    split, replicated = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())
    return jax.tree.map(lambda x: split if len(x.shape) else replicated, buf_abstract)


def _ring_slots(
    next_index: jax.Array, mask: jax.Array, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """Ring slots for a batch: int32[B] slots (`capacity` = not written) and the kept count.

    Kept items take consecutive slots from `next_index` in batch order. Only the newest
    `capacity` kept items get a slot, so written slots are distinct: a scatter with duplicate
    indices has no defined winner on GPU/TPU.
    """
    rank = jnp.cumsum(mask, dtype=jnp.int32) - 1  # position among the kept items
    count = jnp.sum(mask, dtype=jnp.int32)
    keep = mask & (rank >= count - capacity)
    return jnp.where(keep, (next_index + rank) % capacity, capacity), count


def _sharding(x: Any) -> Any:
    """The sharding in `x`'s type: the mesh axes it is split over under explicit sharding."""
    return jax.typeof(jnp.asarray(x)).sharding


def _take(x: Any, index: jax.Array) -> jax.Array:
    """`x[index]` along the leading axis, result replicated (the caller may reshard it).

    Under explicit sharding a gather from a sharded axis needs its output sharding spelled out;
    under automatic sharding (and on one device) this is a plain gather.
    """
    return jnp.asarray(x).at[index].get(out_sharding=NamedSharding(_sharding(x).mesh, P()))


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), x.dtype
    x = np.asarray(x)
    return x.shape, x.dtype


def _check_batch(stored: Pytree, batch: Pytree, where: str) -> int:
    """Checks that `batch` is a batch of items shaped like the buffer's; returns its size."""
    stored_def, batch_def = jax.tree.structure(stored), jax.tree.structure(batch)
    if stored_def != batch_def:
        raise ValueError(
            f"{where}: item structure {batch_def} differs from the buffer's {stored_def}"
        )
    sizes = set()
    leaves = zip(jax.tree_util.tree_leaves_with_path(stored), jax.tree.leaves(batch))
    for (path, s), b in leaves:
        shape, dtype = _shape_dtype(b)
        if shape[1:] != s.shape[1:] or dtype != s.dtype or not shape:
            raise ValueError(
                f"{where}: item leaf {jax.tree_util.keystr(path)} is "
                f"{dtype}{list(shape)}, expected "
                f"{s.dtype}[B, {', '.join(map(str, s.shape[1:]))}]"
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(f"{where}: item leaves have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def _per_item(value: Any, dtype: Any, batch: int, name: str) -> jax.Array:
    value = jnp.asarray(value, dtype)
    if value.shape not in ((), (batch,)):
        raise ValueError(f"add: {name} must be a scalar or [{batch}], got shape {value.shape}")
    return jnp.broadcast_to(value, (batch,))
