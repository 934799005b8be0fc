"""`grpo`: group-relative policy optimisation for diffusion (Flow-GRPO, DanceGRPO style).

Each sampling batch holds P prompts × G samples (`grpo.group_size`, consecutive rows). A sample's
advantage is its reward normalised within its own group,
  A_i = (r_i − mean_group) / (std_group + 1e-6),  clipped to ±train.adv_clip,
with no history window: the group is the baseline. A group whose G rewards are equal gives zero
advantage (nothing to prefer). The update is DDPO's clipped-ratio loss (train.clip_range), plus
`grpo.kl_weight` × the per-step KL to the frozen pretrained policy (the Gaussian KL of DPOK;
default 0, as DanceGRPO).

With `grpo.shared_noise` (default, as DanceGRPO) a group's samples also share their initial latent
x_T, so they differ only by the per-step noise the policy injects: the group mean is then a
baseline for the state x_T, and the reward variance x_T causes (on the tiny model 75-85% of the
colour reward's, tests/test_demo.py) leaves the advantages. Still unbiased: x_T is the initial
state of the MDP, not an action, and a state-dependent baseline does not bias the policy gradient.

References:
  Liu et al. "Flow-GRPO: Training Flow Matching Models via Online RL", 2025. https://arxiv.org/abs/2505.05470
  Xue et al. "DanceGRPO: Unleashing GRPO on Visual Generation", 2025. https://arxiv.org/abs/2505.07818
  Shao et al. "DeepSeekMath" (GRPO), 2024. https://arxiv.org/abs/2402.03300
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from herd_jax import stats as stats_lib
from herd_jax.algorithms import api
from herd_jax.algorithms.common import ppo_clip_loss, weighted_mean
from herd_jax.algorithms.dpok import kl_to
from herd_jax.errors import ConfigError

STD_EPS = 1e-6


@dataclasses.dataclass
class GrpoConfig:
    """`grpo`: advantages normalised within groups of samples of the same prompt (Flow-GRPO, DanceGRPO)."""

    group_size: int = 4  # G samples per prompt in each sampling batch
    kl_weight: float = 0.0  # weight of the per-step KL to the frozen pretrained policy (0: none, no frozen copy)
    shared_noise: bool = True  # a group's samples start from one initial latent x_T (DanceGRPO): its baseline then removes the reward variance x_T causes

    def validate(self, cfg: Any, num_devices: int) -> None:
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be at least 2 (a group of one has no baseline), got {self.group_size}")
        if cfg.sample.batch_size % self.group_size:
            raise ConfigError(f"sample.batch_size={cfg.sample.batch_size} must be a multiple of grpo.group_size={self.group_size} (groups stay inside a sampling batch)")
        if self.kl_weight < 0:
            raise ConfigError(f"grpo.kl_weight must be >= 0, got {self.kl_weight}")


def grouped_prompts(num_prompts: int, group_size: int):
    """(key, n) -> int32[n]: n / G prompts drawn uniformly, each repeated G times in a row."""

    def prompts(key: jax.Array, n: int) -> jax.Array:
        return jnp.repeat(jax.random.randint(key, (n // group_size,), 0, num_prompts, jnp.int32), group_size)

    return prompts


def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """(r − group mean) / (group std + 1e-6) over consecutive groups of `group_size`: f32[N]."""
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, keepdims=True)
    return ((groups - mean) / (std + STD_EPS)).reshape(-1)


def make(ctx: api.Context) -> api.Algorithm:
    g, train, policy = ctx.cfg.grpo, ctx.cfg.train, ctx.policy

    def loss(params, frozen: api.Frozen, tr: api.Transition):
        log_prob, mean, std = policy.transition_log_prob(params, tr.x_t, tr.x_prev, tr.t, tr.cond, frozen.uncond)
        value, info = ppo_clip_loss(log_prob, tr.old_log_prob, tr.advantages, train.clip_range, tr.weights)
        if not g.kl_weight:
            return value, info
        _, mean_pre, _ = policy.transition_log_prob(frozen.pretrained, tr.x_t, tr.x_prev, tr.t, tr.cond, frozen.uncond)
        kl = kl_to(mean, jax.lax.stop_gradient(mean_pre), std)
        info = dict(info, kl_pretrained=weighted_mean(jax.lax.stop_gradient(kl), tr.weights))
        return value + g.kl_weight * weighted_mean(kl, tr.weights), info

    def prepare(state, stats, fresh: api.Experience, queries, answers, params, frozen, epoch, key):
        del queries, answers, params, frozen, epoch, key
        stats = stats_lib.update(stats, fresh.goal, fresh.reward)  # for the logged per-prompt curves only
        advantages = jnp.clip(group_advantages(fresh.reward, g.group_size), -train.adv_clip, train.adv_clip)
        batch = api.fresh_batch(fresh, jnp.broadcast_to(advantages[:, None], fresh.log_probs.shape))
        return batch, state, stats, {}

    return api.Algorithm(
        init=lambda: (),
        loss=loss,
        prepare=prepare,
        prompts=grouped_prompts(len(ctx.prompts), g.group_size),
        needs_pretrained=g.kl_weight > 0,
        noise_group=g.group_size if g.shared_noise else 1,
    )
