"""DDIM sampling as a stochastic policy: steps with log-probs, guided rollouts, training-time recompute.

Each DDIM step with eta > 0 is a Gaussian policy π_θ(x_{t-1} | x_t, c) whose mean comes from the
(classifier-free guided) noise prediction and whose std is eta·σ_t (DDIM paper eq. 16), clipped at
1e-6. Its log-prob is the Gaussian log-density averaged over latent dimensions, as DDPO does.
The noise schedule and timesteps are diffusers' DDIMScheduler's, computed here from the model's
scheduler_config.json (`SchedulerConfig`, `make_schedule`).

References:
  Black et al. 2023, "Training Diffusion Models with Reinforcement Learning" (DDPO).
  Song et al. 2021, "Denoising Diffusion Implicit Models".
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
MIN_STD = 1e-6
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule of a diffusers scheduler_config.json, as DDIM samples it.

    Defaults are diffusers' DDIMScheduler's except `set_alpha_to_one`: a config without the key
    (e.g. an Euler or LMS scheduler's) gets SD's False, because diffusers' True would replace the
    last step's target alpha (alphas_cumprod[0]) by 1 and so change the last step. `clip_sample`
    is not read: the step never clips x0 (SD sets it False).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    set_alpha_to_one: bool = False
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"


def scheduler_config(config: Mapping[str, Any]) -> SchedulerConfig:
    """SchedulerConfig from any diffusers scheduler config dict; ValueError names what DDIM here cannot honour."""
    c = {f.name: config[f.name] for f in dataclasses.fields(SchedulerConfig) if config.get(f.name) is not None}
    if c.get("trained_betas") is not None:
        c["trained_betas"] = tuple(float(b) for b in c["trained_betas"])
    for key, allowed in (("beta_schedule", BETA_SCHEDULES), ("timestep_spacing", TIMESTEP_SPACINGS),
                         ("prediction_type", PREDICTION_TYPES)):
        if key in c and c[key] not in allowed and not (key == "beta_schedule" and "trained_betas" in c):
            raise ValueError(f"sets {key}={c[key]!r}; supported: {', '.join(allowed)}")
    for key in ("rescale_betas_zero_snr", "thresholding"):
        if config.get(key):
            raise ValueError(f"sets {key}=true; supported: false")
    return SchedulerConfig(**c)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """f32[num_train_timesteps] as diffusers computes it: float32 betas, float32 1 - β, cumulative product.

    (torch accumulates the float32 product in float64 on CPU; so do we. Linear schedules are
    float64 linspaces rounded once; torch's float32 linspace kernel may differ by an ulp.)
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float64)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021's cosine schedule, betas capped at 0.999
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    alphas = np.float32(1.0) - betas.astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def ddim_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """int32[num_steps], descending, by `timestep_spacing` (diffusers' DDIMScheduler.set_timesteps)."""
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}] (the scheduler's num_train_timesteps), got {num_steps}")
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(0, num_steps) * (n // num_steps)).round()[::-1] + config.steps_offset
    else:  # trailing
        timesteps = np.round(np.arange(n, 0, -n / num_steps)) - 1
    return timesteps.astype(np.int32)


@flax.struct.dataclass
class DDIMSchedule:
    """The noise schedule restricted to the sampled timesteps (arrays only, so it is a jit input)."""

    alphas_cumprod: jax.Array  # f32[num_train_timesteps]
    final_alpha_cumprod: jax.Array  # f32[]
    timesteps: jax.Array  # int32[T], descending: t_T ... t_1
    prev_timesteps: jax.Array  # int32[T], t - (num_train_timesteps // T); negative at the last step


def make_schedule(config: SchedulerConfig, num_steps: int) -> DDIMSchedule:
    """The DDIM schedule for `num_steps` sampling steps.

    As diffusers' DDIMScheduler: the previous timestep is t - num_train_timesteps // num_steps
    whatever the spacing, and the step from the first trained timestep targets
    `final_alpha_cumprod` (1 if `set_alpha_to_one`, else alphas_cumprod[0]).
    """
    alphas = alphas_cumprod(config)
    timesteps = ddim_timesteps(config, num_steps)
    return DDIMSchedule(
        alphas_cumprod=jnp.asarray(alphas),
        final_alpha_cumprod=jnp.float32(1.0 if config.set_alpha_to_one else alphas[0]),
        timesteps=jnp.asarray(timesteps),
        prev_timesteps=jnp.asarray(timesteps - config.num_train_timesteps // num_steps),
    )


def ddim_mean_std(
    model_output: jax.Array,
    sample: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    schedule: DDIMSchedule,
    eta: float,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the DDIM transition x_t -> x_{t-1}.

    Args:
      model_output: the (guided) network output, [B, ...]; ε or v by `prediction_type`.
      sample: x_t, [B, ...].
      t, prev_t: int timesteps, scalars or [B].
    Returns:
      (mean [B, ...], std broadcastable to [B, ...]).
    """
    expand = lambda a: jnp.reshape(a, jnp.shape(a) + (1,) * (sample.ndim - jnp.ndim(a)))
    alpha_t = expand(schedule.alphas_cumprod[t])
    alpha_prev = expand(
        jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], schedule.final_alpha_cumprod)
    )
    beta_t = 1.0 - alpha_t
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - jnp.sqrt(beta_t) * eps) / jnp.sqrt(alpha_t)
    elif prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_t) * sample - jnp.sqrt(beta_t) * model_output
        eps = jnp.sqrt(alpha_t) * model_output + jnp.sqrt(beta_t) * sample
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
    variance = ((1.0 - alpha_prev) / beta_t) * (1.0 - alpha_t / alpha_prev)
    std = eta * jnp.sqrt(variance)
    direction = jnp.sqrt(jnp.clip(1.0 - alpha_prev - std**2, 0.0)) * eps
    mean = jnp.sqrt(alpha_prev) * x0 + direction
    return mean, jnp.maximum(std, MIN_STD)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log N(x; mean, std²) averaged over all but the leading (batch) axis, in float32."""
    x, mean, std = (jnp.asarray(a, jnp.float32) for a in (x, mean, std))
    log_prob = -((x - mean) ** 2) / (2 * std**2) - jnp.log(std) - 0.5 * math.log(2 * math.pi)
    return jnp.mean(log_prob, axis=tuple(range(1, x.ndim)))


def ddim_step(
    key: jax.Array,
    model_output: jax.Array,
    sample: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    schedule: DDIMSchedule,
    eta: float,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """Samples x_{t-1} ~ π(· | x_t) and returns (x_{t-1}, log π(x_{t-1} | x_t) f32[B])."""
    mean, std = ddim_mean_std(model_output, sample, t, prev_t, schedule, eta, prediction_type)
    noise = jax.random.normal(key, sample.shape, sample.dtype)
    prev_sample = mean + std * noise
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


class Trajectory(NamedTuple):
    """One rollout batch. Time axis 1 runs from x_T (index 0) to x_0 (index T)."""

    latents: jax.Array  # f32[B, T+1, C, h, w]
    log_probs: jax.Array  # f32[B, T]  log π_old(x_{t-1} | x_t, c)
    images: jax.Array  # uint8[B, H, W, 3]


@dataclasses.dataclass(frozen=True)
class Policy:
    """The UNet + DDIM as a policy: static settings and modules, pure methods over params.

    `compute_dtype` is the dtype of UNet/VAE activations (float32 or bfloat16); log-probs and the
    DDIM arithmetic stay in float32.
    """

    unet: Any
    vae: Any
    scaling_factor: float
    latent_shape: tuple[int, int, int]  # (C, h, w)
    schedule: DDIMSchedule
    eta: float
    guidance_scale: float
    prediction_type: str = "epsilon"
    # Rollouts draw one initial latent x_T per `noise_group` consecutive rows (1: every row its
    # own). Rows sharing x_T differ only by the policy's per-step noise, so a baseline over them
    # (grpo's group mean) removes the reward variance x_T causes, which the policy cannot control.
    noise_group: int = 1
    # The VAE decodes the batch in this many sequential chunks (`lax.map`), chunk i holding rows
    # i, i + n, i + 2n, ...: a sharded batch keeps each row on its device. At 512 px one image's
    # decoder activations are ~0.6 GiB fp32, so decoding 16 at once dominates a rollout's memory.
    # 1 (or a count that does not divide the batch): one call. Same images either way.
    decode_chunks: int = 1

    @property
    def num_steps(self) -> int:
        return int(self.schedule.timesteps.shape[0])

    def model_output(self, unet_params: Params, x: jax.Array, t: jax.Array, cond: jax.Array, uncond: jax.Array) -> jax.Array:
        """Guided network output ε̂ = ε_u + w (ε_c − ε_u); the unconditional pass is skipped at w = 1."""
        t = jnp.broadcast_to(t, (x.shape[0],))
        if self.guidance_scale == 1.0:
            return self.unet.apply({"params": unet_params}, x, t, cond).astype(jnp.float32)
        uncond = jnp.broadcast_to(uncond, cond.shape)
        out = self.unet.apply(
            {"params": unet_params},
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([uncond, cond]),
        ).astype(jnp.float32)  # bf16 compute: the DDIM arithmetic and log-probs stay float32
        out_uncond, out_cond = jnp.split(out, 2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def rollout(self, unet_params: Params, vae_params: Params, cond: jax.Array, uncond: jax.Array, key: jax.Array) -> Trajectory:
        """Samples a batch of trajectories for prompt embeddings `cond` [B, L, D]; `uncond` is [1|B, L, D]."""
        batch = cond.shape[0]
        init_key, step_key = jax.random.split(key)
        if self.noise_group == 1:
            x_T = jax.random.normal(init_key, (batch, *self.latent_shape), jnp.float32)
        else:
            x_T = jnp.repeat(jax.random.normal(init_key, (batch // self.noise_group, *self.latent_shape), jnp.float32), self.noise_group, axis=0)

        def step(x, inputs):
            i, t, prev_t = inputs
            out = self.model_output(unet_params, x, t, cond, uncond)
            x_prev, log_prob = ddim_step(
                jax.random.fold_in(step_key, i), out, x, t, prev_t, self.schedule, self.eta, self.prediction_type
            )
            return x_prev, (x_prev, log_prob)

        steps = (jnp.arange(self.num_steps), self.schedule.timesteps, self.schedule.prev_timesteps)
        x_0, (xs, log_probs) = jax.lax.scan(step, x_T, steps)
        latents = jnp.concatenate([x_T[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
        return Trajectory(latents=latents, log_probs=log_probs.T, images=self.decode(vae_params, x_0))

    def decode(self, vae_params: Params, latents: jax.Array) -> jax.Array:
        """VAE-decodes NCHW latents to uint8[B, H, W, 3] images, in `decode_chunks` sequential chunks."""
        batch, n = latents.shape[0], self.decode_chunks
        if n <= 1 or batch % n:
            return self._decode(vae_params, latents)
        chunks = jnp.moveaxis(latents.reshape(batch // n, n, *latents.shape[1:]), 1, 0)  # [n, B/n, ...]: chunk i = rows i::n
        images = jax.lax.map(lambda z: self._decode(vae_params, z), chunks)
        return jnp.moveaxis(images, 0, 1).reshape(batch, *images.shape[2:])

    def _decode(self, vae_params: Params, latents: jax.Array) -> jax.Array:
        images = self.vae.apply({"params": vae_params}, latents / self.scaling_factor).astype(jnp.float32)
        images = jnp.clip(jnp.transpose(images, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)
        return jnp.round(images * 255).astype(jnp.uint8)

    def transition_log_prob(
        self,
        unet_params: Params,
        x_t: jax.Array,
        x_prev: jax.Array,
        t: jax.Array,
        cond: jax.Array,
        uncond: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """log π_θ(x_prev | x_t, c) for stored transitions: the training-time recompute.

        Args:
          x_t, x_prev: [B, C, h, w]; t: int32[B] (the timestep of x_t).
        Returns:
          (log_prob f32[B], mean [B, C, h, w], std [B, 1, 1, 1]).
        """
        out = self.model_output(unet_params, x_t, t, cond, uncond)
        prev_t = t - (self.schedule.timesteps[0] - self.schedule.prev_timesteps[0])
        mean, std = ddim_mean_std(out, x_t, t, prev_t, self.schedule, self.eta, self.prediction_type)
        std = jnp.broadcast_to(std, (x_t.shape[0],) + (1,) * (x_t.ndim - 1))
        return gaussian_log_prob(x_prev, mean, std), mean, std

    def trajectory_log_probs(self, unet_params: Params, latents: jax.Array, cond: jax.Array, uncond: jax.Array) -> jax.Array:
        """log π_θ of every stored step of trajectories latents [B, T+1, ...] under goals `cond`: f32[B, T]."""

        def step(_, inputs):
            x_t, x_prev, t = inputs
            log_prob, _, _ = self.transition_log_prob(unet_params, x_t, x_prev, jnp.full((x_t.shape[0],), t), cond, uncond)
            return None, log_prob

        steps = (jnp.moveaxis(latents[:, :-1], 1, 0), jnp.moveaxis(latents[:, 1:], 1, 0), self.schedule.timesteps)
        _, log_probs = jax.lax.scan(step, None, steps)
        return log_probs.T


def make_policy(sd: Any, *, num_steps: int, eta: float, guidance_scale: float) -> Policy:
    """Builds the policy for a loaded `herd_jax.models.StableDiffusion`."""
    return Policy(
        unet=sd.unet,
        vae=sd.vae,
        scaling_factor=float(sd.scaling_factor),
        latent_shape=(sd.latent_channels, sd.latent_size, sd.latent_size),
        schedule=make_schedule(sd.scheduler, num_steps),
        eta=float(eta),
        guidance_scale=float(guidance_scale),
        prediction_type=sd.scheduler.prediction_type,
    )
