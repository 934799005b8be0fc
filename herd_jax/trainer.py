"""The training loop: sample → reward → advantages → update, epoch after epoch.

This is the only module with side effects (devices, files, threads, logging). Everything it
calls is a pure function of (state, batch, key) or a small object at the edge (reward,
logger). One epoch reads top-down as DESIGN.md's data flow:
`collect_rollouts` → `compute_advantages` → `train_on_batch` → log.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from herd_jax import config as config_lib
from herd_jax import parallel, stats
from herd_jax.algorithms import ddpo
from herd_jax.diffusion import Policy, Trajectory, make_policy
from herd_jax.prompts import load_prompts
from herd_jax.train_step import TrainBatch, make_optimizer, train_on_batch

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; one orbax save of it is a checkpoint."""

    step: jax.Array  # int32[]  epochs completed
    params: Params  # trainable UNet params
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2]  root key; epoch keys are fold_in(rng, step)
    stats: stats.PromptStats


@dataclasses.dataclass
class Setup:
    """What the loop needs besides the state: models, frozen params, compiled functions, edges."""

    cfg: config_lib.Config
    prompts: list[str]
    mesh: jax.sharding.Mesh
    policy: Policy
    frozen: dict[str, Params]  # vae params, prompt embeddings, negative embedding
    rollout: Callable[..., Trajectory]
    advantages: Callable[..., tuple[stats.PromptStats, jax.Array]]
    update: Callable[..., tuple[Params, optax.OptState, dict[str, jax.Array]]]
    reward: Any
    logger: Any


def validate(cfg: config_lib.Config, num_devices: int) -> None:
    """Checks values the dataclass types cannot; raises a one-line ConfigError."""
    from herd_jax.metrics import LOGGERS
    from herd_jax.rewards import reward_names

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise config_lib.ConfigError(message)

    def choice(value: str, choices: Any, key: str) -> None:
        require(value in choices, f"{key}={value!r} is not one of: {', '.join(choices)}")

    s, t = cfg.sample, cfg.train
    for key, value in [
        ("num_epochs", cfg.num_epochs),
        ("sample.num_steps", s.num_steps),
        ("sample.batch_size", s.batch_size),
        ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
        ("train.batch_size", t.batch_size),
        ("train.num_inner_epochs", t.num_inner_epochs),
        ("train.stats_window", t.stats_window),
    ]:
        require(value > 0, f"{key} must be positive, got {value}")
    require(s.eta > 0, f"sample.eta must be > 0 for a stochastic policy, got {s.eta}")
    require(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    require(t.learning_rate > 0, f"train.learning_rate must be positive, got {t.learning_rate}")
    choice(cfg.algorithm.name, ALGORITHMS, "algorithm.name")
    choice(cfg.reward.name, reward_names(), "reward.name")
    choice(cfg.logging.log_with, LOGGERS, "logging.log_with")
    choice(t.estimator, ddpo.ESTIMATORS, "train.estimator")
    samples = s.batch_size * s.num_batches_per_epoch
    require(samples % t.batch_size == 0, f"samples per epoch ({samples}) must be a multiple of train.batch_size ({t.batch_size})")
    for key, value in [("sample.batch_size", s.batch_size), ("train.batch_size", t.batch_size)]:
        require(value % num_devices == 0, f"{key}={value} must be a multiple of the number of devices ({num_devices})")


ALGORITHMS = ("ddpo",)


def init_state(cfg: config_lib.Config, unet_params: Params, optimizer: optax.GradientTransformation, num_prompts: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=unet_params,
        opt_state=optimizer.init(unet_params),
        rng=jax.random.PRNGKey(cfg.seed),
        stats=stats.init(num_prompts, cfg.train.stats_window),
    )


def encode_prompts(sd: Any, prompts: list[str], negative_prompt: str) -> dict[str, jax.Array]:
    """Text embeddings of the prompt set [P, L, D] and of the negative prompt [1, L, D]."""
    encode = jax.jit(sd.encode_text)
    return {
        "prompt_embeds": encode(sd.params["text_encoder"], jnp.asarray(sd.tokenize(prompts))),
        "uncond": encode(sd.params["text_encoder"], jnp.asarray(sd.tokenize([negative_prompt]))),
    }


def make_rollout(policy: Policy, mesh: jax.sharding.Mesh) -> Callable[..., Trajectory]:
    """jit(rollout) with the batch (prompt ids in, trajectories out) split over the mesh's `data` axis.

    The returned function takes (unet_params, frozen, prompt_ids int32[B], key); `frozen` holds
    "vae", "prompt_embeds" and "uncond" (see `encode_prompts`), replicated.
    """

    def rollout(unet_params, frozen, prompt_ids, key):
        cond = frozen["prompt_embeds"][prompt_ids]
        return policy.rollout(unet_params, frozen["vae"], cond, frozen["uncond"], key)

    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(rollout, in_shardings=(replicated, replicated, sharded, replicated), out_shardings=sharded)


def build(cfg: config_lib.Config) -> tuple[Setup, TrainState]:
    """Loads models, builds compiled functions and the initial state. Raises one-line errors."""
    from herd_jax.metrics import make_logger
    from herd_jax.models import load_pipeline
    from herd_jax.rewards import make_reward

    mesh = parallel.make_mesh()
    validate(cfg, mesh.shape[parallel.DATA_AXIS])
    prompts = load_prompts(cfg.prompts)
    sd = load_pipeline(cfg.model)
    policy = make_policy(sd, num_steps=cfg.sample.num_steps, eta=cfg.sample.eta, guidance_scale=cfg.sample.guidance_scale)
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    frozen = parallel.replicate({"vae": sd.params["vae"], **encode_prompts(sd, prompts, cfg.sample.negative_prompt)}, mesh)

    t = cfg.train
    optimizer = make_optimizer(
        t.learning_rate, b1=t.adam_beta1, b2=t.adam_beta2, eps=t.adam_eps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm
    )
    loss_fn = ddpo.make_loss(policy, estimator=t.estimator, clip_range=t.clip_range, adv_clip=t.adv_clip)
    update = functools.partial(
        train_on_batch,
        loss_fn,
        optimizer,
        num_inner_epochs=t.num_inner_epochs,
        minibatch_size=t.batch_size,
        num_train_timesteps=max(1, int(cfg.sample.num_steps * t.timestep_fraction)),
        mesh=mesh,
    )

    def advantages(prompt_stats, prompt_ids, rewards):
        prompt_stats = stats.update(prompt_stats, prompt_ids, rewards)
        adv = stats.advantages(prompt_stats, prompt_ids, rewards, min_count=t.stats_min_count, per_prompt=t.per_prompt_stats)
        return prompt_stats, adv

    state = parallel.replicate(init_state(cfg, sd.params["unet"], optimizer, len(prompts)), mesh)
    run_dir = pathlib.Path(cfg.run_dir)
    setup = Setup(
        cfg=cfg,
        prompts=prompts,
        mesh=mesh,
        policy=policy,
        frozen=frozen,
        rollout=make_rollout(policy, mesh),
        advantages=jax.jit(advantages, out_shardings=(replicated, sharded)),
        update=jax.jit(
            update,
            in_shardings=(replicated, replicated, replicated, sharded, replicated, replicated),
            out_shardings=replicated,
            donate_argnums=(0, 1),
        ),
        reward=make_reward(cfg.reward),
        logger=make_logger(cfg.logging.log_with, run_dir, config=config_lib.to_dict(cfg), run_name=run_dir.name),
    )
    return setup, state


def collect_rollouts(setup: Setup, params: Params, key: jax.Array) -> tuple[Trajectory, jax.Array, np.ndarray]:
    """Samples the epoch's batches; scoring batch i (in a worker thread) overlaps sampling batch i+1.

    Returns:
      (trajectories concatenated over batches, prompt ids int32[N], rewards f32[N] on the host).
    """
    from herd_jax.rewards import check_finite

    cfg = setup.cfg.sample
    trajectories, prompt_ids, futures = [], [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(cfg.num_batches_per_epoch):
            prompt_key, sample_key = jax.random.split(jax.random.fold_in(key, i))
            ids = np.asarray(jax.random.randint(prompt_key, (cfg.batch_size,), 0, len(setup.prompts)), np.int32)
            trajectory = setup.rollout(params, setup.frozen, parallel.shard_batch(ids, setup.mesh), sample_key)
            texts = [setup.prompts[j] for j in ids]
            futures.append(pool.submit(lambda images, texts: check_finite(setup.reward(np.asarray(images), texts), texts), trajectory.images, texts))
            trajectories.append(trajectory)
            prompt_ids.append(ids)
        rewards = np.concatenate([f.result() for f in futures]).astype(np.float32)
    trajectories = jax.tree.map(lambda *xs: jnp.concatenate(xs), *trajectories)
    return trajectories, np.concatenate(prompt_ids), rewards


def epoch_metrics(prompts: list[str], prompt_ids: np.ndarray, rewards: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std())}
    metrics.update({f"train/{k}": float(v) for k, v in info.items()})
    for pid in np.unique(prompt_ids):
        metrics[f"reward/prompt/{prompts[pid]}"] = float(rewards[prompt_ids == pid].mean())
    return metrics


class EpochSamples(NamedTuple):
    """What an epoch sampled, on the host, for logging image grids."""

    images: np.ndarray  # uint8[N, H, W, 3]
    prompt_ids: np.ndarray  # int32[N]
    rewards: np.ndarray  # f32[N]


def run_epoch(setup: Setup, state: TrainState) -> tuple[TrainState, dict[str, float], EpochSamples]:
    """One epoch: sample, score, normalise, update. Returns the new state and its metrics."""
    key = jax.random.fold_in(state.rng, state.step)
    sample_key, train_key = jax.random.split(key)
    trajectories, prompt_ids, rewards = collect_rollouts(setup, state.params, sample_key)
    ids = parallel.shard_batch(prompt_ids, setup.mesh)
    rewards_dev = parallel.shard_batch(rewards, setup.mesh)
    prompt_stats, adv = setup.advantages(state.stats, ids, rewards_dev)
    batch = TrainBatch(
        latents=trajectories.latents,
        log_probs=trajectories.log_probs,
        cond=setup.frozen["prompt_embeds"][ids],
        advantages=adv,
        rewards=rewards_dev,
    )
    params, opt_state, info = setup.update(
        state.params, state.opt_state, {"uncond": setup.frozen["uncond"]}, batch, setup.policy.schedule.timesteps, train_key
    )
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=prompt_stats)
    samples = EpochSamples(trajectories.images, prompt_ids, rewards)
    return state, epoch_metrics(setup.prompts, prompt_ids, rewards, jax.device_get(info)), samples


def train_and_evaluate(cfg: config_lib.Config, *, progress: bool = True) -> list[dict[str, float]]:
    """Runs `cfg.num_epochs` epochs and returns each epoch's metrics."""
    setup, state = build(cfg)
    history = []
    samples_per_epoch = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
    bar = tqdm.trange(int(state.step), cfg.num_epochs, desc="epochs", unit="epoch", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in bar:
            start = time.perf_counter()
            state, metrics, samples = run_epoch(setup, state)
            elapsed = time.perf_counter() - start
            metrics.update({"perf/epoch_s": elapsed, "perf/samples_per_s": samples_per_epoch / elapsed, "train/learning_rate": cfg.train.learning_rate})
            if not np.isfinite(metrics["train/loss"]):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}; stopping")
            setup.logger.log(metrics, step=epoch)
            if cfg.logging.image_every and epoch % cfg.logging.image_every == 0:
                log_image_grid(setup, samples, epoch)
            history.append(metrics)
            bar.write(summary_line(epoch, metrics))
    finally:
        setup.logger.close()
        setup.reward.close()
    return history


def log_image_grid(setup: Setup, samples: EpochSamples, epoch: int, max_images: int = 16) -> None:
    n = min(max_images, len(samples.rewards))
    captions = [f"{setup.prompts[i]} | {r:.3f}" for i, r in zip(samples.prompt_ids[:n], samples.rewards[:n])]
    setup.logger.log_images("rollout/images", np.asarray(samples.images[:n]), captions, step=epoch)


def summary_line(epoch: int, m: dict[str, float]) -> str:
    return (
        f"epoch {epoch:4d} | reward {m['reward/mean']:+.4f} ± {m['reward/std']:.4f} | loss {m['train/loss']:+.3e} "
        f"| approx_kl {m['train/approx_kl']:.2e} | clipfrac {m['train/clipfrac']:.3f} | {m['perf/samples_per_s']:.2f} samples/s"
    )
