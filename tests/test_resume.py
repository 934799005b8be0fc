"""Exact resume for every algorithm and training mode: stop at epoch 1, resume, end bit-identical.

Each variant trains epochs 0..1 straight (checkpoints 1 and 2), then resumes a new run directory
from checkpoint 1 and trains epoch 1 again; its checkpoint 2 must equal the straight one byte for
byte: params, optimizer state, RNG key, statistics, buffers, the value net. herd in float32 is
covered by tests/test_checkpoint.py (resume after a SIGKILL mid-save). The straight run's second
epoch must also trace nothing new (tests/tracing.py): every compiled step is reused. The resumed
run reuses the straight run's build (tests/builds.py: its compiled steps and a fresh copy of the
initial state, which the restore overwrites); a fresh process resuming is tested by
tests/test_checkpoint.py's killed `train.py` runs.
"""
from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from herd_jax import checkpoint  # noqa: E402
from herd_jax import config as config_lib  # noqa: E402
from test_checkpoint import TINY, TINY_FILE, assert_trees_identical, raw_state  # noqa: E402
from tracing import count_traces  # noqa: E402

# herd (fp32, full) is the tiny runs' algorithm (test_checkpoint.py). ddpg (ddpo's loss and update
# plus its behaviour branch), LoRA and bf16 share one run, and dpok trains a `filter` subset: each
# build costs the suite about a CPU minute of compiling on 2 cores, and a resume bug in any of them
# fails it. The filter run also checks that an epoch changes only its targets (bit for bit).
VARIANTS = {
    # ε = 0.5 with this seed: epoch 0 samples from the current policy and epoch 1 from the frozen
    # pretrained UNet (asserted below), so the resumed epoch takes the pretrained branch.
    "ddpg-lora-bf16": ["algorithm.name=ddpg", "ddpg.epsilon=0.5", "seed=1", "train.trainable=lora", "precision=bf16", "train.clip_range=1e-3"],
    "dpok-filter": ["algorithm.name=dpok", "train.trainable=filter"],
    "grpo": ["algorithm.name=grpo", "grpo.group_size=2", "grpo.kl_weight=0.1"],
}


def _config(run_dir: pathlib.Path, overrides: list[str]) -> config_lib.Config:
    return config_lib.load_config([TINY_FILE], [*TINY, *overrides, f"run_dir={str(run_dir)!r}", "num_epochs=2", "logging.log_with='none'", "eval.every=0"])


@pytest.mark.usefixtures("reuse_builds")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_is_bit_exact(variant, tmp_path, monkeypatch):
    from herd_jax import trainer
    from herd_jax.trainer import train_and_evaluate

    overrides = VARIANTS[variant]
    straight = tmp_path / "straight"
    traces, run_epoch = [], trainer.run_epoch

    def counting(setup, state):
        with count_traces() as found:
            out = run_epoch(setup, state)
        traces.append(len(found))
        return out

    monkeypatch.setattr(trainer, "run_epoch", counting)
    history = train_and_evaluate(_config(straight, overrides), progress=False)
    monkeypatch.setattr(trainer, "run_epoch", run_epoch)
    assert traces[0] > 5 and traces[1] == 0, f"traces per epoch: {traces} (the second epoch must reuse every compiled step)"
    assert checkpoint.find(straight).steps == (2, 1)
    if variant.startswith("ddpg"):
        assert [m["rollout/from_pretrained"] for m in history] == [0.0, 1.0], "pick another seed: both branches must run"
    resumed = tmp_path / "resumed"
    train_and_evaluate(_config(resumed, overrides), progress=False, resume=str(straight / "checkpoints" / "1"))
    assert checkpoint.find(resumed).steps == (2,)
    final = raw_state(straight / "checkpoints" / "2")
    assert_trees_identical(raw_state(resumed / "checkpoints" / "2"), final)
    start = raw_state(straight / "checkpoints" / "1")
    assert start["params"] is not None
    import jax
    import numpy as np

    moved = [np.asarray(a).tobytes() != np.asarray(b).tobytes() for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(final["params"]))]
    assert any(moved), "epoch 1 did not change the params: the comparison would be trivial"
    if "train.trainable=filter" in overrides:
        assert_only_targets_changed(trainer.make_trainable(_config(straight, overrides)), start["params"], final["params"])


def assert_only_targets_changed(trainable, before, after) -> None:
    """`train.trainable=filter`: the epoch changed some of the targets' params and left every other
    param bit-identical (the optimizer's `set_to_zero` branch: no AdamW step, no weight decay)."""
    import flax.traverse_util
    import numpy as np

    targets = set(trainable.targets(before))
    flat = lambda tree: {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}
    before, after = flat(before), flat(after)
    assert targets and targets < set(before)
    changed = {k for k in before if before[k].tobytes() != after[k].tobytes()}
    assert changed, "nothing trained"
    assert changed <= targets, sorted(changed - targets)
