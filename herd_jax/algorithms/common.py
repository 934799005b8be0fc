"""Loss pieces shared by the policy-gradient algorithms: advantage and ratio clipping.

Each loss is a pure function of per-sample arrays returning `(loss, info)`, where info holds
`approx_kl` (½·E[(log π − log π_old)²], as DDPO logs it) and `clipfrac`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def clip_advantages(advantages: jax.Array, limit: float) -> jax.Array:
    """Clips advantages to ±limit (DDPO's adv_clip_max)."""
    return jnp.clip(advantages, -limit, limit)


def ppo_clip_loss(
    log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, clip_range: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped importance-sampling surrogate, as a loss to minimise.

    loss = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))] with ρ = exp(log π_θ − log π_old).

    Args:
      log_prob: log π_θ(a|s), f32[B] (differentiated).
      old_log_prob: log-prob under the behaviour policy, f32[B] (constant).
      advantages: f32[B], already clipped.
      clip_range: ε.
    Returns:
      (scalar loss, info with approx_kl, clipfrac, ratio).
    """
    log_ratio = log_prob - jax.lax.stop_gradient(old_log_prob)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = jnp.mean(jnp.maximum(unclipped, clipped))
    info = {
        "approx_kl": 0.5 * jnp.mean(jax.lax.stop_gradient(log_ratio) ** 2),
        "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
        "ratio": jnp.mean(jax.lax.stop_gradient(ratio)),
    }
    return loss, info


def score_function_loss(
    log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE: loss = E[−A·log π_θ] (DDPO_SF). Valid on-policy only (one update per batch)."""
    log_ratio = jax.lax.stop_gradient(log_prob - old_log_prob)
    info = {
        "approx_kl": 0.5 * jnp.mean(log_ratio**2),
        "clipfrac": jnp.zeros((), jnp.float32),
        "ratio": jnp.mean(jnp.exp(log_ratio)),
    }
    return jnp.mean(-advantages * log_prob), info
