"""`ddpg`: off-policy DDPO with an ε-greedy behaviour policy (the original HERD code's name).

Despite the name this is NOT actor-critic DDPG. With probability ε an epoch's samples come from
the frozen pretrained UNet, otherwise from the current policy; the update is DDPO's clipped
importance-sampling loss against the log-probs of whichever policy sampled (the behaviour
policy), which those trajectories carry from sampling time. With ε = 0 it is exactly DDPO, which
is why `ddpo` is also its ε = 0 member. The original code crashed at start; this one runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from herd_jax.algorithms import api, ddpo
from herd_jax.errors import ConfigError


@dataclasses.dataclass
class DdpgConfig:
    """`ddpg` (the original HERD code's name): off-policy DDPO with an ε-greedy behaviour policy."""

    epsilon: float = 0.2  # probability that an epoch's samples come from the frozen pretrained UNet

    def validate(self, cfg: Any, num_devices: int) -> None:
        if not 0 <= self.epsilon <= 1:
            raise ConfigError(f"ddpg.epsilon must be in [0, 1], got {self.epsilon}")


def sample_from_pretrained(key: jax.Array, epsilon: float) -> bool:
    """The epoch's ε-greedy coin (host bool, drawn from the epoch key so resumes repeat it)."""
    return bool(jax.random.bernoulli(key, epsilon))


def make(ctx: api.Context) -> api.Algorithm:
    epsilon = ctx.cfg.ddpg.epsilon

    def behaviour(key, params, pretrained):
        coin = sample_from_pretrained(key, epsilon)
        return (pretrained if coin else params), {"rollout/from_pretrained": float(coin)}

    return ddpo.make(ctx)._replace(behaviour=behaviour, needs_pretrained=True)
