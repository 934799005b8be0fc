"""DPOK (Fan et al. 2023): policy gradient with a value baseline and KL to the pretrained model.

Per transition (x_t → x_{t-1}) of a trajectory for prompt c with final reward r:
  A      = r − V_φ(x_t, c, t)                       (value network trained by MSE to r)
  ρ      = exp(log π_θ(x_{t-1} | x_t, c) − log π_old)
  KL_t   = mean over latent dims of ‖μ_θ − μ_pre‖² / (2σ_t²)
  loss   = −α · A · clamp(ρ, 1 − ε, 1 + ε) + β · KL_t
KL_t is the KL divergence between the two Gaussian steps (same σ_t), averaged over dimensions
like the log-probs; the ε-prediction MSE against the frozen UNet in DPOK's code is the same up
to a per-step scale. Transitions come from a FIFO buffer of recent trajectories, as in DPOK.

The value network is a small MLP on pooled features: the spatial mean and std of x_t per
channel, the mean of the prompt embedding over tokens, and a sinusoidal embedding of t. It is
cheap next to the UNet, which is what DPOK's baseline is for: variance reduction.

References:
  Fan et al. "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models", 2023.
  https://arxiv.org/abs/2305.16381
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from herd_jax.algorithms.common import ratio_info, safe_ratio, weighted_mean
from herd_jax.diffusion import Policy
from herd_jax.train_step import LossFn, Transition


def timestep_embedding(t: jax.Array, dim: int = 32) -> jax.Array:
    half = dim // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ValueNetwork(nn.Module):
    """V(x_t, c, t) -> f32[B]: an MLP on pooled latent, prompt and timestep features."""

    hidden: int = 256

    @nn.compact
    def __call__(self, x_t: jax.Array, cond: jax.Array, t: jax.Array) -> jax.Array:
        axes = tuple(range(2, x_t.ndim))
        features = jnp.concatenate(
            [x_t.mean(axes), x_t.std(axes), cond.mean(axis=1), timestep_embedding(t)], axis=-1
        )
        # Latent statistics reach |x| ~ 20 on a random UNet: normalise the features so the
        # initial V is O(1), and start V at exactly 0 (zero output layer) so the first
        # advantages are the rewards themselves rather than r minus a large random offset.
        features = nn.LayerNorm()(features)
        h = nn.gelu(nn.Dense(self.hidden)(features))
        h = nn.gelu(nn.Dense(self.hidden)(h))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]


def init_value(network: ValueNetwork, key: jax.Array, latent_shape: tuple[int, ...], cond_shape: tuple[int, ...]) -> Any:
    x = jnp.zeros((1, *latent_shape))
    return network.init(key, x, jnp.zeros((1, *cond_shape)), jnp.zeros((1,), jnp.int32))["params"]


def make_loss(policy: Policy, network: ValueNetwork, *, reward_weight: float, kl_weight: float, clip_range: float) -> LossFn:
    """The per-transition DPOK loss. `aux` holds {"uncond", "pretrained", "value"} params/arrays."""

    def loss_fn(params: Any, aux: Any, tr: Transition) -> tuple[jax.Array, dict[str, jax.Array]]:
        log_prob, mean, std = policy.transition_log_prob(params, tr.x_t, tr.x_prev, tr.t, tr.cond, aux["uncond"])
        _, mean_pre, _ = policy.transition_log_prob(aux["pretrained"], tr.x_t, tr.x_prev, tr.t, tr.cond, aux["uncond"])
        value = network.apply({"params": aux["value"]}, tr.x_t, tr.cond, tr.t)
        advantages = jax.lax.stop_gradient(tr.rewards - value)
        log_ratio, ratio = safe_ratio(log_prob, tr.old_log_prob)
        policy_loss = -reward_weight * advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
        axes = tuple(range(1, mean.ndim))
        kl = jnp.mean((mean - jax.lax.stop_gradient(mean_pre)) ** 2 / (2 * std**2), axis=axes)
        info = dict(
            ratio_info(log_ratio, ratio, clip_range, tr.weights),
            kl_pretrained=weighted_mean(jax.lax.stop_gradient(kl), tr.weights),
            advantage=weighted_mean(advantages, tr.weights),
            value_abs_error=weighted_mean(jnp.abs(advantages), tr.weights),
        )
        return weighted_mean(policy_loss + kl_weight * kl, tr.weights), info

    return loss_fn


def value_update(
    network: ValueNetwork,
    optimizer: optax.GradientTransformation,
    value_params: Any,
    opt_state: optax.OptState,
    latents: jax.Array,
    cond: jax.Array,
    rewards: jax.Array,
    timesteps: jax.Array,
    weights: jax.Array | None = None,
) -> tuple[Any, optax.OptState, jax.Array]:
    """One MSE step of V(x_t, c, t) towards r over every transition of trajectories latents [B, T+1, ...].

    `weights` f32[B] (0/1) leaves padding trajectories out of the fit. Returns the new params,
    optimizer state and the MSE before the step.
    """
    batch, steps = latents.shape[0], timesteps.shape[0]
    x_t = latents[:, :-1].reshape(batch * steps, *latents.shape[2:])
    t = jnp.tile(timesteps, batch)
    c = jnp.repeat(cond, steps, axis=0)
    r = jnp.repeat(rewards, steps)
    w = None if weights is None else jnp.repeat(weights, steps)

    def mse(p):
        return weighted_mean((network.apply({"params": p}, x_t, c, t) - r) ** 2, w)

    loss, grads = jax.value_and_grad(mse)(value_params)
    updates, opt_state = optimizer.update(grads, opt_state, value_params)
    return optax.apply_updates(value_params, updates), opt_state, loss
