"""Property tests for herd_jax.replay, against a plain-Python model of the ring.

Every function is jitted once per shape in a module fixture; hypothesis varies only values.
Each test item carries a unique `uid` and every other leaf is a function of it, so a slot's
contents identify exactly which added item it holds.
"""
import collections
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from herd_jax import replay

CAP = 8  # buffer capacity
B = 3  # usual add batch size
BIG = 11  # an add batch larger than the capacity
N = 6  # sample size (< CAP)
SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

EXAMPLE = {
    "uid": jax.ShapeDtypeStruct((), jnp.int32),
    "latents": jax.ShapeDtypeStruct((2, 3), jnp.float32),
    "timesteps": jax.ShapeDtypeStruct((3,), jnp.int32),
    "prompt_id": jax.ShapeDtypeStruct((), jnp.int32),
    "prompt_embeds": jax.ShapeDtypeStruct((4, 5), jnp.float32),
    "reward": jax.ShapeDtypeStruct((), jnp.float32),
    "log_probs": jax.ShapeDtypeStruct((3,), jnp.float32),
}


def make_items(uids) -> dict:
    """A batch of items whose every leaf is a deterministic function of its uid."""
    u = np.asarray(uids, np.int32)
    f = u.astype(np.float32)
    return {
        "uid": u,
        "latents": f[:, None, None] + np.arange(6, dtype=np.float32).reshape(2, 3) / 10,
        "timesteps": (u[:, None] * 7 + np.arange(3)).astype(np.int32),
        "prompt_id": u % 5,
        "prompt_embeds": np.sin(f[:, None, None] + np.arange(20, dtype=np.float32).reshape(4, 5)),
        "reward": f * 0.5,
        "log_probs": -f[:, None] - np.arange(3, dtype=np.float32),
    }


def take(items: dict, i) -> dict:
    return jax.tree.map(lambda x: np.asarray(x)[i], items)


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def fns():
    """The replay functions, jitted once (shapes are fixed, values vary)."""
    return types.SimpleNamespace(
        init=jax.jit(lambda: replay.init(EXAMPLE, CAP)),
        add=jax.jit(replay.add),
        expire=jax.jit(replay.expire),
        sample=jax.jit(replay.sample, static_argnums=2),
    )


class RingModel:
    """Reference: the buffer as a Python list of (uid, epoch, original id, relabeled)."""

    def __init__(self):
        self.kept = []  # everything ever written, in write order

    def add(self, uids, epochs, orig, relab, mask):
        for row in zip(uids, epochs, orig, relab, mask):
            if row[4]:
                self.kept.append(row[:4])

    def slots(self):
        """slot -> record for the newest CAP writes (the k-th write goes to slot k % CAP)."""
        total = len(self.kept)
        return {k % CAP: self.kept[k] for k in range(max(0, total - CAP), total)}


def fill(fns, adds, next_uid=0):
    """Applies a list of (batch_size, mask, epochs) adds to a fresh buffer and the model."""
    buf, model = fns.init(), RingModel()
    for batch, mask, epochs in adds:
        uids = np.arange(next_uid, next_uid + batch, dtype=np.int32)
        next_uid += batch
        orig = (uids * 3 % 7).astype(np.int32)
        relab = uids % 2 == 1
        buf = fns.add(buf, make_items(uids), epoch=np.asarray(epochs, np.int32),
                      original_prompt_id=orig, relabeled=relab, mask=np.asarray(mask))
        model.add(uids, epochs, orig, relab, mask)
    return buf, model


@st.composite
def add_sequences(draw, max_adds=7, max_epoch=6):
    adds = []
    for _ in range(draw(st.integers(0, max_adds))):
        batch = draw(st.sampled_from([B, BIG]))
        mask = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
        epochs = draw(st.lists(st.integers(0, max_epoch), min_size=batch, max_size=batch))
        adds.append((batch, mask, epochs))
    return adds


def check_against_model(buf, model):
    total = len(model.kept)
    slots = model.slots()
    assert int(replay.size(buf)) == min(total, CAP)
    assert int(buf.next_index) == total % CAP
    np.testing.assert_array_equal(np.asarray(buf.valid), [s in slots for s in range(CAP)])
    for s, (uid, epoch, orig, relab) in slots.items():
        assert_trees_equal(take(buf.items, s), take(make_items([uid]), 0))
        assert (int(buf.epoch[s]), int(buf.original_prompt_id[s]), bool(buf.relabeled[s])) == (
            epoch, orig, relab)


@SETTINGS
@given(adds=add_sequences())
def test_add_keeps_newest_capacity_items_in_ring_order(fns, adds):
    buf, model = fill(fns, adds)
    check_against_model(buf, model)


@SETTINGS
@given(next_index=st.integers(0, CAP - 1), mask=st.lists(st.booleans(), min_size=BIG, max_size=BIG))
def test_add_writes_each_slot_at_most_once(next_index, mask):
    """Duplicate scatter indices have no defined winner on GPU, so add must never produce them."""
    slots, count = replay._ring_slots(jnp.int32(next_index), jnp.asarray(mask), CAP)
    written = np.asarray(slots)[np.asarray(slots) < CAP]
    assert int(count) == sum(mask) and len(written) == min(sum(mask), CAP)
    assert len(set(written.tolist())) == len(written)


def test_add_without_mask_and_scalar_metadata(fns):
    buf = fns.init()
    buf = replay.add(buf, make_items(range(BIG)), epoch=4, original_prompt_id=2, relabeled=True)
    model = RingModel()
    model.add(range(BIG), [4] * BIG, [2] * BIG, [True] * BIG, [True] * BIG)
    check_against_model(buf, model)


def test_add_rejects_mismatched_items(fns):
    buf = fns.init()
    bad = make_items([0, 1])
    bad["latents"] = bad["latents"][:, :1]
    with pytest.raises(ValueError, match="latents"):
        replay.add(buf, bad, epoch=0, original_prompt_id=0, relabeled=False)
    with pytest.raises(ValueError, match="structure"):
        replay.add(buf, {"uid": np.zeros(2, np.int32)}, epoch=0, original_prompt_id=0,
                   relabeled=False)
    with pytest.raises(ValueError, match="epoch"):
        replay.add(buf, make_items([0, 1]), epoch=np.zeros(3, np.int32), original_prompt_id=0,
                   relabeled=False)


@SETTINGS
@given(adds=add_sequences(), current=st.integers(0, 8), keep=st.integers(0, 4))
def test_expire_removes_exactly_the_too_old(fns, adds, current, keep):
    buf, _ = fill(fns, adds)
    out = fns.expire(buf, current_epoch=np.int32(current), keep_epochs=np.int32(keep))
    epoch, valid = np.asarray(buf.epoch), np.asarray(buf.valid)
    np.testing.assert_array_equal(np.asarray(out.valid), valid & (current - epoch < keep))
    assert_trees_equal(out._replace(valid=buf.valid), buf)  # nothing else changes


@pytest.fixture(scope="module")
def full_buffer(fns):
    """A buffer with all CAP slots written (uid == slot)."""
    return fns.add(fns.init(), make_items(range(CAP)), epoch=np.arange(CAP, dtype=np.int32),
                   original_prompt_id=np.arange(CAP, dtype=np.int32) % 3,
                   relabeled=np.arange(CAP) % 2 == 0)


@SETTINGS
@given(valid=st.lists(st.booleans(), min_size=CAP, max_size=CAP), seed=st.integers(0, 2**31 - 1))
def test_sample_returns_only_valid_items(fns, full_buffer, valid, seed):
    buf = full_buffer._replace(valid=np.asarray(valid))
    items, info = fns.sample(buf, jax.random.key(seed), N)
    index, n_valid = np.asarray(info["index"]), sum(valid)
    chex.assert_shape(items["latents"], (N, 2, 3))
    if n_valid == 0:
        assert not np.asarray(info["valid"]).any()
        return
    assert np.asarray(info["valid"]).all() and np.asarray(valid)[index].all()
    assert_trees_equal(items, take(buf.items, index))
    for name in ("epoch", "original_prompt_id", "relabeled"):
        np.testing.assert_array_equal(info[name], np.asarray(getattr(buf, name))[index])
    counts = collections.Counter(index.tolist())
    if n_valid >= N:
        assert len(counts) == N  # without replacement
    else:  # every valid item once, then cycling: counts differ by at most one
        assert len(counts) == n_valid and max(counts.values()) - min(counts.values()) <= 1


def test_sample_is_uniform(full_buffer):
    """Over many keys, every valid slot and every pair of valid slots is equally likely."""
    valid = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    buf = full_buffer._replace(valid=jnp.asarray(valid))
    keys = jax.random.split(jax.random.key(0), 6000)
    draw = jax.jit(jax.vmap(lambda k: replay.sample(buf, k, 2)[1]["index"]))
    index = np.asarray(draw(keys))
    assert valid[index].all() and (index[:, 0] != index[:, 1]).all()
    slot_freq = np.bincount(index.ravel(), minlength=CAP)[valid] / index.size
    np.testing.assert_allclose(slot_freq, 0.25, atol=0.02)
    pairs = collections.Counter(map(tuple, np.sort(index, axis=1).tolist()))
    assert len(pairs) == 6
    np.testing.assert_allclose(np.array(list(pairs.values())) / len(keys), 1 / 6, atol=0.02)
    firsts = np.bincount(index[:, 0], minlength=CAP)[valid] / len(keys)  # order is random too
    np.testing.assert_allclose(firsts, 0.25, atol=0.025)


def test_hindsight_step_runs_under_one_jit_trace(fns):
    """The herd pattern (add fresh, add relabeled copies, expire, sample) compiles once."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(buf, traj, new_goal, new_reward, epoch, key):
        buf = replay.add(buf, traj, epoch=epoch, original_prompt_id=traj["prompt_id"],
                         relabeled=False)
        copies = {**traj, "prompt_id": new_goal, "prompt_embeds": traj["prompt_embeds"] * 0,
                  "reward": jnp.broadcast_to(new_reward, traj["reward"].shape)}
        buf = replay.add(buf, copies, epoch=epoch, original_prompt_id=traj["prompt_id"],
                         relabeled=True, mask=new_goal != traj["prompt_id"])
        buf = replay.expire(buf, current_epoch=epoch, keep_epochs=2)
        return buf, replay.sample(buf, key, N)

    buf = fns.init()
    for epoch in range(4):
        uids = np.arange(B) + B * epoch
        traj = make_items(uids)
        goal = (traj["prompt_id"] + np.array([0, 1, 2])) % 5  # first row: same goal, skipped
        buf, (batch, info) = step(buf, traj, goal, np.float32(epoch), np.int32(epoch),
                                  jax.random.key(epoch))
        assert int(replay.size(buf)) == min(CAP, (2 * B - 1) * min(epoch + 1, 2))
        assert np.asarray(buf.epoch)[np.asarray(buf.valid)].min() >= epoch - 1
        copies = np.asarray(buf.relabeled) & np.asarray(buf.valid)
        goal, orig = np.asarray(buf.items["prompt_id"]), np.asarray(buf.original_prompt_id)
        assert copies.any() and (goal[copies] != orig[copies]).all()  # new goal, original kept
        assert np.asarray(info["valid"]).all() and np.asarray(buf.valid)[np.asarray(info["index"])].all()


def test_orbax_round_trip_is_bit_exact(fns, tmp_path):
    buf, _ = fill(fns, [(B, [1, 0, 1], [0, 1, 2]), (BIG, [1] * BIG, list(range(BIG)))])
    buf = fns.expire(buf, current_epoch=np.int32(9), keep_epochs=np.int32(5))
    buf = buf._replace(items={**buf.items, "reward": buf.items["reward"].at[0].set(jnp.nan)})
    path = tmp_path / "replay"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, buf)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, jax.eval_shape(lambda: buf))
    assert isinstance(restored, replay.ReplayBuffer)
    chex.assert_trees_all_equal_structs(restored, buf)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(buf)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


SHARDED_SCRIPT = """
import functools, jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from herd_jax import replay
assert jax.device_count() == 4
example = {"x": jax.ShapeDtypeStruct((3,), jnp.float32),
           "prompt_id": jax.ShapeDtypeStruct((), jnp.int32)}
make = functools.partial(replay.init, example, 8)
items = {"x": np.arange(12, dtype=np.float32).reshape(4, 3),
         "prompt_id": np.arange(4, dtype=np.int32)}
def body(b, it, k):
    b = replay.add(b, it, epoch=1, original_prompt_id=it["prompt_id"], relabeled=False)
    return b, replay.sample(b, k, 4)
key = jax.random.key(0)
ref_step = jax.jit(body)  # one device, no shardings
ref_buf = ref_step(make(), items, key)[0]
ref_buf, ref_out = ref_step(ref_buf, items, key)
for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    sh = replay.shardings(jax.eval_shape(make), mesh)
    buf = jax.jit(make, out_shardings=sh)()
    step = jax.jit(body, out_shardings=(sh, None), donate_argnums=0)
    sharded_items = jax.device_put(items, NamedSharding(mesh, P("data")))
    buf = step(buf, sharded_items, key)[0]
    buf, out = step(buf, sharded_items, key)
    assert buf.items["x"].sharding.spec[0] == "data" and buf.valid.sharding.spec == P("data")
    for a, b in zip(jax.tree.leaves((buf, out)), jax.tree.leaves((ref_buf, ref_out))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    try:
        replay.shardings(jax.eval_shape(functools.partial(replay.init, example, 6)), mesh)
        raise SystemExit("non-divisible capacity accepted")
    except ValueError:
        pass
print("SHARDED-OK")
"""


def test_sharded_buffer_matches_unsharded():
    """On 4 forced CPU devices (own process), a capacity-sharded buffer gives the same results."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED_SCRIPT)], env=env,
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
