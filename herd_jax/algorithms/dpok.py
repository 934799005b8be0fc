"""DPOK (Fan et al. 2023): policy gradient with a value baseline and KL to the pretrained model.

Per transition (x_t → x_{t-1}) of a trajectory for prompt c with final reward r:
  A      = r̂ − V_φ(x_t, c, t)                      (value network trained by MSE to r̂)
  ρ      = exp(log π_θ(x_{t-1} | x_t, c) − log π_old)
  KL_t   = mean over latent dims of ‖μ_θ − μ_pre‖² / (2σ_t²)
  loss   = −α · A · clamp(ρ, 1 − ε, 1 + ε) + β · KL_t
KL_t is the KL divergence between the two Gaussian steps (same σ_t), averaged over dimensions
like the log-probs; the ε-prediction MSE against the frozen UNet in DPOK's code is the same up
to a per-step scale. Trajectories come from a FIFO buffer of the last `dpok.buffer_epochs`
epochs, as in DPOK. r̂ is the per-prompt normalised reward (`dpok.normalize_rewards`, so the
baseline works on any reward scale) or the raw reward, as DPOK's code.

The value network is a small MLP on pooled features: the spatial mean and std of x_t per
channel, the mean of the prompt embedding over tokens, and a sinusoidal embedding of t. It is
cheap next to the UNet, which is what DPOK's baseline is for: variance reduction.

References:
  Fan et al. "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models", 2023.
  https://arxiv.org/abs/2305.16381
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from herd_jax import replay
from herd_jax import stats as stats_lib
from herd_jax.algorithms import api
from herd_jax.algorithms.common import ratio_info, safe_ratio, weighted_mean
from herd_jax.errors import ConfigError


@dataclasses.dataclass
class DpokConfig:
    """`dpok`: KL-regularised policy gradient with a value baseline (Fan et al. 2023)."""

    reward_weight: float = 10.0  # α
    kl_weight: float = 0.01  # β
    buffer_epochs: int = 2  # the FIFO keeps the trajectories of this many epochs (DPOK: 1000 transitions)
    value_learning_rate: float = 1e-4
    value_hidden: int = 256
    value_steps: int = 1  # MSE steps of V per epoch, each on a fresh draw from the FIFO
    normalize_rewards: bool = True  # fit V to the per-prompt normalised reward (A = r̂ − V is O(1) on any reward scale); false: raw r, as DPOK

    def validate(self, cfg: Any, num_devices: int) -> None:
        for key in ("buffer_epochs", "value_steps", "value_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"dpok.{key} must be positive, got {getattr(self, key)}")
        if self.value_learning_rate <= 0:
            raise ConfigError(f"dpok.value_learning_rate must be positive, got {self.value_learning_rate}")


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


def make_loss(policy: Any, *, reward_weight: float, kl_weight: float, clip_range: float) -> api.LossFn:
    """The per-transition DPOK loss; the transition's advantage is r̂ − V(x_t) (from `prepare`)."""

    def loss(params: Any, frozen: api.Frozen, tr: api.Transition) -> tuple[jax.Array, dict[str, jax.Array]]:
        log_prob, mean, std = policy.transition_log_prob(params, tr.x_t, tr.x_prev, tr.t, tr.cond, frozen.uncond)
        _, mean_pre, _ = policy.transition_log_prob(frozen.pretrained, tr.x_t, tr.x_prev, tr.t, tr.cond, frozen.uncond)
        log_ratio, ratio = safe_ratio(log_prob, tr.old_log_prob)
        policy_loss = -reward_weight * tr.advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
        kl = kl_to(mean, jax.lax.stop_gradient(mean_pre), std)
        info = dict(
            ratio_info(log_ratio, ratio, clip_range, tr.weights),
            kl_pretrained=weighted_mean(jax.lax.stop_gradient(kl), tr.weights),
            advantage=weighted_mean(tr.advantages, tr.weights),
            value_abs_error=weighted_mean(jnp.abs(tr.advantages), tr.weights),
        )
        return weighted_mean(policy_loss + kl_weight * kl, tr.weights), info

    return loss


def kl_to(mean: jax.Array, mean_pre: jax.Array, std: jax.Array) -> jax.Array:
    """KL between two Gaussian steps of the same std, averaged over latent dims: f32[b]."""
    return jnp.mean((mean - mean_pre) ** 2 / (2 * std**2), axis=tuple(range(1, mean.ndim)))


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
    w = None if weights is None else jnp.repeat(weights, timesteps.shape[0])

    def mse(p):
        return weighted_mean((values(network, p, latents, cond, timesteps).reshape(-1) - jnp.repeat(rewards, timesteps.shape[0])) ** 2, w)

    loss, grads = jax.value_and_grad(mse)(value_params)
    updates, opt_state = optimizer.update(grads, opt_state, value_params)
    return optax.apply_updates(value_params, updates), opt_state, loss


def values(network: ValueNetwork, params: Any, latents: jax.Array, cond: jax.Array, timesteps: jax.Array) -> jax.Array:
    """V(x_t, c, t) of every step of trajectories latents [B, T+1, ...]: f32[B, T]."""
    batch, steps = latents.shape[0], timesteps.shape[0]
    x_t = latents[:, :-1].reshape(batch * steps, *latents.shape[2:])
    v = network.apply({"params": params}, x_t, jnp.repeat(cond, steps, axis=0), jnp.tile(timesteps, batch))
    return v.reshape(batch, steps)


class DpokState(NamedTuple):
    buffer: replay.ReplayBuffer  # FIFO of the last `buffer_epochs` epochs' trajectories (items: Experience)
    value: Any  # value network params
    value_opt: optax.OptState


def make(ctx: api.Context) -> api.Algorithm:
    c, train, policy = ctx.cfg.dpok, ctx.cfg.train, ctx.policy
    network = ValueNetwork(c.value_hidden)
    optimizer = optax.adam(c.value_learning_rate)
    n, timesteps = ctx.samples_per_epoch, policy.schedule.timesteps
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), ctx.item)

    def init() -> DpokState:
        value = init_value(network, jax.random.PRNGKey(ctx.cfg.seed + 1), policy.latent_shape, item.cond.shape)
        return DpokState(replay.init(item, n * c.buffer_epochs), value, optimizer.init(value))

    def targets(stats, items: api.Experience, valid):
        """What V is fitted to, and A = target − V: the per-prompt normalised or the raw reward."""
        if c.normalize_rewards:
            return stats_lib.advantages(stats, items.goal, items.reward, min_count=train.stats_min_count, per_prompt=train.per_prompt_stats, valid=valid)
        return items.reward

    def prepare(state: DpokState, stats, fresh, queries, answers, params, frozen, epoch, key):
        del queries, answers, params, frozen
        buffer = replay.add(state.buffer, fresh, epoch=epoch, original_prompt_id=fresh.goal, relabeled=False)
        stats = stats_lib.update(stats, fresh.goal, fresh.reward)
        value, value_opt = state.value, state.value_opt
        batch_key, *fit_keys = jax.random.split(key, c.value_steps + 1)
        items, info = replay.sample(buffer, batch_key, n)
        valid = info["valid"]
        for i, fit_key in enumerate(fit_keys):  # the first fit on the update batch, then fresh FIFO draws
            fit_items, fit_valid = (items, valid) if i == 0 else _draw(buffer, fit_key, n)
            value, value_opt, loss = value_update(
                network, optimizer, value, value_opt, fit_items.latents, fit_items.cond, targets(stats, fit_items, fit_valid), timesteps,
                fit_valid.astype(jnp.float32),
            )
            first_loss = loss if i == 0 else first_loss
        advantages = (targets(stats, items, valid)[:, None] - values(network, value, items.latents, items.cond, timesteps)) * valid[:, None]
        batch = api.Batch(items.latents, items.log_probs, items.cond, advantages, valid.astype(jnp.float32))
        # The value loss logged is the baseline's error on this epoch's batch before fitting to it.
        return batch, DpokState(buffer, value, value_opt), stats, {"train/value_loss": first_loss}

    return api.Algorithm(
        init=init,
        loss=make_loss(policy, reward_weight=c.reward_weight, kl_weight=c.kl_weight, clip_range=train.clip_range),
        prepare=prepare,
        prompts=api.uniform_prompts(len(ctx.prompts)),
        shardings=lambda state, mesh: DpokState(replay.shardings(state.buffer, mesh), *api.replicated((state.value, state.value_opt), mesh)),
        needs_pretrained=True,
    )


def _draw(buffer: replay.ReplayBuffer, key: jax.Array, n: int) -> tuple[api.Experience, jax.Array]:
    items, info = replay.sample(buffer, key, n)
    return items, info["valid"]
