"""DDPO (Black et al. 2023): policy gradient on the denoising MDP.

Advantages are per-prompt normalised rewards (herd_jax.stats), clipped to ±adv_clip. Two
estimators: `is` (default) — PPO's clipped importance-sampling ratio against the log-probs
recorded at sampling time, several inner epochs and minibatches per batch; `sf` — the
score-function (REINFORCE) estimator −A·log π_θ.

References:
  Black, Janner, Du, Kostrikov, Levine. "Training Diffusion Models with Reinforcement
  Learning", 2023. https://arxiv.org/abs/2305.13301
"""
from __future__ import annotations

from typing import Any

import jax

from herd_jax.algorithms.common import clip_advantages, ppo_clip_loss, score_function_loss
from herd_jax.diffusion import Policy
from herd_jax.train_step import LossFn, Transition

ESTIMATORS = ("is", "sf")


def make_loss(policy: Policy, *, estimator: str = "is", clip_range: float = 1e-4, adv_clip: float = 5.0) -> LossFn:
    """The per-transition DDPO loss. `aux` must hold {"uncond": f32[1, L, D]}.

    Args:
      policy: the sampling policy (UNet + DDIM settings).
      estimator: "is" (clipped ratio) or "sf" (score function).
      clip_range: PPO ε for the ratio.
      adv_clip: advantages are clipped to ±adv_clip.
    Returns:
      loss_fn(params, aux, transition) -> (loss, info).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")

    def loss_fn(params: Any, aux: Any, tr: Transition) -> tuple[jax.Array, dict[str, jax.Array]]:
        log_prob, _, _ = policy.transition_log_prob(params, tr.x_t, tr.x_prev, tr.t, tr.cond, aux["uncond"])
        advantages = clip_advantages(tr.advantages, adv_clip)
        if estimator == "is":
            return ppo_clip_loss(log_prob, tr.old_log_prob, advantages, clip_range, tr.weights)
        return score_function_loss(log_prob, tr.old_log_prob, advantages, tr.weights)

    return loss_fn
