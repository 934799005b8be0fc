"""Loss pieces shared by the policy-gradient algorithms: advantage and ratio clipping, and the
importance weights of off-policy rows (herd's replay, ddpg's pretrained epochs): truncated
per-step, or self-normalised per trajectory.

Each loss is a pure function of per-sample arrays returning `(loss, info)`, where info holds
`approx_kl` (½·E[(log π − log π_old)²], as DDPO logs it) and `clipfrac`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


# exp(±MAX_LOG_RATIO) bounds every ratio: an overflowing ratio (inf) times a zero advantage, or
# times the zero gradient of a clip, is NaN, and one NaN transition poisons the whole update.
# Replayed or behaviour-policy transitions (herd, ddpg, dpok's FIFO) reach |log ρ| > 88 when a
# step's σ is small; beyond the bound a transition gets no gradient.
MAX_LOG_RATIO = 20.0
# Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"): for A < 0
# the PPO loss −A·ρ grows without bound in ρ; capping it at −DUAL_CLIP·A stops one far
# off-policy transition from dominating an update.
DUAL_CLIP = 3.0


def safe_ratio(log_prob: jax.Array, old_log_prob: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log ρ, ρ) with ρ = exp(log π_θ − log π_old), the exponent clipped to ±MAX_LOG_RATIO."""
    log_ratio = log_prob - jax.lax.stop_gradient(old_log_prob)
    return log_ratio, jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))


def weighted_mean(x: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean of x over the rows with weight > 0 (weights 0/1); 0 when there are none.

    Padding rows (an empty replay slot) must not dilute the loss or the logged approx_kl,
    clipfrac and ratio, which would otherwise read as if the padding were on-policy samples.
    """
    if weights is None:
        return jnp.mean(x)
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def clip_advantages(advantages: jax.Array, limit: float) -> jax.Array:
    """Clips advantages to ±limit (DDPO's adv_clip_max)."""
    return jnp.clip(advantages, -limit, limit)


def ppo_clip_loss(
    log_prob: jax.Array,
    old_log_prob: jax.Array,
    advantages: jax.Array,
    clip_range: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped importance-sampling surrogate, as a loss to minimise.

    loss = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))] with ρ = exp(log π_θ − log π_old), and for
    A < 0 at most −DUAL_CLIP·A (dual clip), so off-policy transitions cannot blow up the loss.

    Args:
      log_prob: log π_θ(a|s), f32[B] (differentiated).
      old_log_prob: log-prob under the behaviour policy, f32[B] (constant).
      advantages: f32[B], already clipped.
      clip_range: ε.
      weights: f32[B] 0/1 row mask (padding rows count in no mean), or None for all rows.
    Returns:
      (scalar loss, info with approx_kl, clipfrac, ratio).
    """
    log_ratio, ratio = safe_ratio(log_prob, old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = jnp.maximum(unclipped, clipped)
    per_sample = jnp.where(advantages < 0, jnp.minimum(per_sample, -DUAL_CLIP * advantages), per_sample)
    loss = weighted_mean(per_sample, weights)
    return loss, ratio_info(log_ratio, ratio, clip_range, weights)


def ratio_info(log_ratio: jax.Array, ratio: jax.Array, clip_range: float, weights: jax.Array | None) -> dict[str, jax.Array]:
    """approx_kl (½·E[log ρ²], as DDPO logs it), clipfrac and mean ratio over the weighted rows."""
    log_ratio, ratio = jax.lax.stop_gradient(log_ratio), jax.lax.stop_gradient(ratio)
    return {
        "approx_kl": 0.5 * weighted_mean(log_ratio**2, weights),
        "clipfrac": weighted_mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32), weights),
        "ratio": weighted_mean(ratio, weights),
    }


def score_function_loss(
    log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE: loss = E[−A·log π_θ] (DDPO_SF). Valid on-policy only (one update per batch)."""
    log_ratio, ratio = safe_ratio(log_prob, old_log_prob)
    # No clip: with an infinite clip range ratio_info's clipfrac is 0.
    return weighted_mean(-advantages * log_prob, weights), ratio_info(log_ratio, ratio, jnp.inf, weights)


def truncated_weights(target_log_probs: jax.Array, behaviour_log_probs: jax.Array, num_dims: int, rho_bar: float) -> jax.Array:
    """min(ρ̄, π_target / π_b) per step from DDPO's per-dimension *mean* log-probs [N, T]: the
    densities' log-ratio is num_dims × the difference of the means. Constant (stop-gradient)."""
    log_ratio = num_dims * (jax.lax.stop_gradient(target_log_probs) - jax.lax.stop_gradient(behaviour_log_probs))
    return jnp.exp(jnp.minimum(log_ratio, jnp.log(rho_bar)))


def self_normalised_weights(target_log_probs: jax.Array, behaviour_log_probs: jax.Array, num_dims: int, mask: jax.Array) -> jax.Array:
    """Weighted (self-normalised) importance weights of whole trajectories, f32[N]: with
    log ρ_i = Σ_t num_dims · (target − behaviour)[i, t] (DDPO's per-dimension *mean* log-probs
    [N, T] turned back into the densities' log-ratio of every step, summed over the trajectory),
    w_i = ρ_i / mean_j ρ_j over the rows where mask is True, so the valid weights average 1; 0
    elsewhere (all 0 when no row is valid). Computed in log space (a softmax): ρ_i itself may
    overflow. Constant (stop-gradient)."""
    log_ratio = num_dims * jnp.sum(jax.lax.stop_gradient(target_log_probs) - jax.lax.stop_gradient(behaviour_log_probs), axis=1)
    count = jnp.sum(mask)
    shifted = jnp.where(mask, log_ratio - jnp.max(jnp.where(mask, log_ratio, -jnp.inf)), -jnp.inf)
    unnormalised = jnp.where(mask, jnp.exp(shifted), 0.0)
    return jnp.where(count > 0, count * unnormalised / jnp.maximum(jnp.sum(unnormalised), 1e-30), 0.0)


def effective_sample_size(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """(Σw)² / (n Σw²) over the entries where mask is True, in (0, 1]; 1 when there are none."""
    w = weights * mask
    n = jnp.maximum(jnp.sum(mask), 1)
    return jnp.where(jnp.sum(mask) > 0, jnp.sum(w) ** 2 / jnp.maximum(n * jnp.sum(w**2), 1e-30), 1.0)
