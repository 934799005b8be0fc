"""The algorithm interface is closed: an algorithm defined here, in a few lines, trains through
`train_and_evaluate` without touching herd_jax; grpo's group statistics on hand-made rewards."""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from herd_jax import algorithms  # noqa: E402
from herd_jax import config as config_lib  # noqa: E402
from herd_jax.algorithms import api, grpo  # noqa: E402
from herd_jax.algorithms.common import weighted_mean  # noqa: E402


def reinforce(ctx: api.Context) -> api.Algorithm:
    """Plain REINFORCE on fresh samples: A = r − mean(r), loss = −A·log π (no state, no ratio)."""

    def loss(params, frozen, tr):
        log_prob, _, _ = ctx.policy.transition_log_prob(params, tr.x_t, tr.x_prev, tr.t, tr.cond, frozen.uncond)
        return weighted_mean(-tr.advantages * log_prob, tr.weights), {"mean_log_prob": jnp.mean(log_prob)}

    def prepare(state, stats, fresh, queries, answers, params, frozen, epoch, key):
        advantages = fresh.reward - fresh.reward.mean()
        return api.fresh_batch(fresh, jnp.broadcast_to(advantages[:, None], fresh.log_probs.shape)), state, stats, {}

    return api.Algorithm(init=lambda: (), loss=loss, prepare=prepare, prompts=api.uniform_prompts(len(ctx.prompts)))


def test_an_algorithm_defined_outside_herd_jax_trains(tmp_path):
    from herd_jax import checkpoint
    from herd_jax.trainer import train_and_evaluate

    algorithms.register("reinforce", reinforce)
    try:
        cfg = config_lib.load_config(
            [str(REPO / "configs" / "tiny.toml"), str(REPO / "tests" / "fast.toml")],
            [f"run_dir={str(tmp_path)!r}", "algorithm.name='reinforce'", "num_epochs=2", "logging.log_with='none'", "checkpoint.save_every=1"],
        )
        history = train_and_evaluate(cfg, progress=False)
    finally:
        del algorithms.REGISTRY["reinforce"]
    assert len(history) == 2
    assert all(np.isfinite(m["train/loss"]) and "train/mean_log_prob" in m for m in history)
    saved = checkpoint.find(tmp_path).steps
    assert saved == (2, 1)
    first, last = (checkpoint.load_params(tmp_path / "checkpoints" / str(s)) for s in (1, 2))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last))), "the params did not move"


def test_unknown_algorithm_is_one_line():
    cfg = config_lib.load_config([], ["algorithm.name='nope'"])
    with pytest.raises(config_lib.ConfigError, match="algorithm.name='nope' is not one of: herd, ddpg, ddpo, dpok, grpo"):
        config_lib.validate(cfg, 1)


def test_group_advantages_on_hand_made_rewards():
    rewards = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 10.0, 0.0, 10.0])
    got = np.asarray(grpo.group_advantages(rewards, 4))
    expected = []
    for group in np.asarray(rewards, np.float64).reshape(3, 4):
        expected += list((group - group.mean()) / (group.std() + 1e-6))  # population std, as the code's docstring says
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[4:8], 0.0)  # a group of identical rewards: nothing to prefer
    np.testing.assert_allclose(got[8:], [-1, 1, -1, 1], atol=1e-6)
    # Each group is its own baseline: shifting one group's rewards changes nothing.
    shifted = rewards.at[:4].add(100.0)
    np.testing.assert_allclose(np.asarray(grpo.group_advantages(shifted, 4)), got, atol=1e-5)


def test_grpo_prompts_come_in_groups():
    ids = np.asarray(grpo.grouped_prompts(num_prompts=50, group_size=4)(jax.random.PRNGKey(0), 16))
    assert ids.shape == (16,)
    groups = ids.reshape(4, 4)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) > 1


def test_grpo_group_size_must_divide_the_sampling_batch():
    cfg = config_lib.load_config([], ["algorithm.name='grpo'", "grpo.group_size=3", "sample.batch_size=8"])
    with pytest.raises(config_lib.ConfigError, match="multiple of grpo.group_size=3"):
        config_lib.validate(cfg, 1)


@pytest.mark.parametrize("shapes", ["tiny", "sd15"])
@pytest.mark.parametrize("algorithm", algorithms.names())
def test_every_algorithm_starts_with_its_defaults(algorithm, shapes):
    """Each algorithm's defaults pass validation on the tiny demo and on SD v1.5 shapes (the
    built-in defaults: 50 steps, 8 x 4 samples, train batch 4)."""
    files = [str(REPO / "configs" / "tiny.toml")] if shapes == "tiny" else []
    config_lib.validate(config_lib.load_config(files, [f"algorithm.name={algorithm!r}"]), 1)
