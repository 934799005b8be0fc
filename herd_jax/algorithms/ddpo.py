"""DDPO (Black et al. 2023): policy gradient on the denoising MDP.

Advantages are per-prompt normalised rewards (herd_jax.stats), clipped to ±train.adv_clip, the
same on every step of a trajectory. Two estimators (`train.estimator`): `is` (default) — PPO's
clipped importance-sampling ratio against the log-probs recorded at sampling time, with inner
epochs and minibatches per batch; `sf` — the score-function (REINFORCE) estimator −A·log π_θ,
unbiased only on-policy (one update per sampled batch).

References:
  Black, Janner, Du, Kostrikov, Levine. "Training Diffusion Models with Reinforcement
  Learning", 2023. https://arxiv.org/abs/2305.13301
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from herd_jax import stats as stats_lib
from herd_jax.algorithms import api
from herd_jax.algorithms.common import ppo_clip_loss, score_function_loss

ESTIMATORS = ("is", "sf")


def make_loss(policy: Any, *, estimator: str = "is", clip_range: float = 1e-4) -> api.LossFn:
    """The per-transition DDPO loss (advantages come clipped in the batch).

    Args:
      policy: the sampling policy (herd_jax.diffusion.Policy).
      estimator: "is" (clipped ratio) or "sf" (score function).
      clip_range: PPO ε for the ratio.
    Returns:
      loss(params, frozen, transition) -> (loss, info).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")

    def loss(params: Any, frozen: api.Frozen, tr: api.Transition) -> tuple[jax.Array, dict[str, jax.Array]]:
        log_prob, _, _ = policy.transition_log_prob(params, tr.x_t, tr.x_prev, tr.t, tr.cond, frozen.uncond)
        if estimator == "is":
            return ppo_clip_loss(log_prob, tr.old_log_prob, tr.advantages, clip_range, tr.weights)
        return score_function_loss(log_prob, tr.old_log_prob, tr.advantages, tr.weights)

    return loss


def make(ctx: api.Context) -> api.Algorithm:
    """DDPO on fresh samples: no state, per-prompt normalised advantages."""
    train, num_steps = ctx.cfg.train, ctx.policy.num_steps

    def prepare(state, stats, fresh: api.Experience, queries, answers, params, frozen, epoch, key):
        del queries, answers, params, frozen, epoch, key
        stats = stats_lib.update(stats, fresh.goal, fresh.reward)
        valid = jnp.ones(fresh.goal.shape, bool)
        advantages = api.normalised_advantages(stats, fresh.goal, fresh.reward, valid, train=train, num_steps=num_steps)
        return api.fresh_batch(fresh, advantages), state, stats, {}

    return api.Algorithm(
        init=lambda: (),
        loss=make_loss(ctx.policy, estimator=train.estimator, clip_range=train.clip_range),
        prepare=prepare,
        prompts=api.uniform_prompts(len(ctx.prompts)),
    )
