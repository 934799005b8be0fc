"""`ddpg`: off-policy DDPO with an ε-greedy behaviour policy (the original HERD code's name).

Despite the name this is NOT actor-critic DDPG. With probability ε an epoch's samples come from
the frozen pretrained UNet, otherwise from the current policy. Off-policy correction
(`ddpg.correction`) of those samples:
  ratio      (default; the original's) DDPO's clipped importance-sampling loss against the
             log-probs of whichever policy sampled (the behaviour policy), recorded at sampling
             time. DDPO's log-probs are means over the latent's D dimensions, so on a pretrained
             epoch this ratio is the density ratio π_θ / π_pre to the power 1/D: it corrects
             almost nothing (D = 16,384 for SD at 512 px).
  truncated  herd's truncated per-decision weight (herd_jax/algorithms/herd.py derives it):
             log π_old is recomputed under the current params θ_k (the clip's ratio starts at 1)
             and each step's advantage is multiplied, under a stop-gradient, by
             w_t = min(ρ̄, π_θk(x_{t-1} | x_t, c) / π_b(x_{t-1} | x_t, c)) with the per-step
             log-probs summed over dimensions. On the current policy's own epochs π_b = π_θk and
             every weight is 1: DDPO. It costs one more UNet pass over the batch's steps per
             epoch (the recomputed log-probs). `ddpg/ess` logs the weights' effective sample size.
  weighted   herd's self-normalised trajectory weight: the same recomputed clip reference, and
             each row's advantages multiplied by w_i = ρ_i / mean_j ρ_j over the batch, ρ_i the
             whole trajectory's π_θk(τ | c) / π_b(τ | c) (summed log-probs). 1 on the policy's
             own epochs.
With ε = 0 and `ratio` it is exactly DDPO, which is why `ddpo` is also its ε = 0 member. The
original code crashed at start; this one runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from herd_jax.algorithms import api, ddpo
from herd_jax.algorithms.common import effective_sample_size, self_normalised_weights, truncated_weights
from herd_jax.errors import ConfigError


@dataclasses.dataclass
class DdpgConfig:
    """`ddpg` (the original HERD code's name): off-policy DDPO with an ε-greedy behaviour policy."""

    epsilon: float = 0.2  # probability that an epoch's samples come from the frozen pretrained UNet
    correction: Literal["ratio", "truncated", "weighted"] = "ratio"  # ratio: DDPO's clipped ratio against the behaviour's log-probs (the original's); truncated: × min(rho_bar, π_θ/π_b) per step (summed log-probs); weighted: × the trajectory's π_θ(τ)/π_b(τ), self-normalised over the batch
    rho_bar: float = 1.0  # `truncated`: the weights' upper bound ρ̄

    def validate(self, cfg: Any, num_devices: int) -> None:
        if not 0 <= self.epsilon <= 1:
            raise ConfigError(f"ddpg.epsilon must be in [0, 1], got {self.epsilon}")
        if self.rho_bar <= 0:
            raise ConfigError(f"ddpg.rho_bar must be > 0, got {self.rho_bar}")


def sample_from_pretrained(key: jax.Array, epsilon: float) -> bool:
    """The epoch's ε-greedy coin (host bool, drawn from the epoch key so resumes repeat it)."""
    return bool(jax.random.bernoulli(key, epsilon))


def make(ctx: api.Context) -> api.Algorithm:
    d, policy = ctx.cfg.ddpg, ctx.policy
    base = ddpo.make(ctx)
    num_dims = int(np.prod(policy.latent_shape))

    def behaviour(key, params, pretrained):
        coin = sample_from_pretrained(key, d.epsilon)
        return (pretrained if coin else params), {"rollout/from_pretrained": float(coin)}

    def corrected(state, stats, fresh: api.Experience, queries, answers, params, frozen, epoch, key):
        batch, state, stats, metrics = base.prepare(state, stats, fresh, queries, answers, params, frozen, epoch, key)
        target = policy.trajectory_log_probs(params, fresh.latents, fresh.cond, frozen.uncond)
        if d.correction == "truncated":
            weights = truncated_weights(target, fresh.log_probs, num_dims, d.rho_bar)
        else:
            weights = jnp.broadcast_to(self_normalised_weights(target, fresh.log_probs, num_dims, jnp.ones(target.shape[:1], bool))[:, None], target.shape)
        metrics = dict(metrics)
        metrics["ddpg/ess"] = effective_sample_size(weights, jnp.ones(weights.shape, bool))
        metrics["ddpg/weight_mean"] = jnp.mean(weights)
        return batch._replace(log_probs=target, advantages=batch.advantages * weights), state, stats, metrics  # w ≥ 0 commutes with the clip's max

    algorithm = base._replace(behaviour=behaviour, needs_pretrained=True)
    return algorithm._replace(prepare=corrected) if d.correction in ("truncated", "weighted") else algorithm
