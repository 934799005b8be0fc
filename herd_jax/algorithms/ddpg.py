"""`ddpg`: off-policy DDPO with an ε-greedy behaviour policy (the original HERD code's name).

Despite the name this is NOT actor-critic DDPG. With probability ε an epoch's samples come from
the frozen pretrained UNet, otherwise from the current policy; the update is DDPO's clipped
importance-sampling loss against the log-probs of whichever policy sampled (the behaviour
policy), which those trajectories carry from sampling time. With ε = 0 it is exactly DDPO, which
is why `ddpo` is also its ε = 0 member. The original code crashed at start; this one runs.
"""
from __future__ import annotations

import jax


def sample_from_pretrained(key: jax.Array, epsilon: float) -> bool:
    """The epoch's ε-greedy coin (host bool, drawn from the epoch key so resumes repeat it)."""
    return bool(jax.random.bernoulli(key, epsilon))
