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
from typing import Any, Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from herd_jax import config as config_lib
from herd_jax import checkpoint, parallel, replay, stats
from herd_jax.algorithms import ddpg, ddpo, dpok, herd
from herd_jax.diffusion import Policy, Trajectory, make_policy
from herd_jax.prompts import load_prompts
from herd_jax.trainable import MODES as TRAINABLE_MODES, Trainable
from herd_jax.train_step import HostLoopUpdate, TrainBatch, make_optimizer, train_on_batch

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; one orbax save of it is a checkpoint."""

    step: jax.Array  # int32[]  epochs completed
    params: Params  # trainable UNet params
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2]  root key; epoch keys are fold_in(rng, step)
    stats: stats.PromptStats  # per-goal reward windows
    reward_queries: jax.Array  # int32[]  reward-model calls so far (fresh + relabeled)
    buffer: replay.ReplayBuffer | None = None  # herd: fresh + hindsight trajectories; dpok: FIFO
    value: dict[str, Any] | None = None  # dpok: {"params", "opt_state"} of the value network


@dataclasses.dataclass
class Setup:
    """What the loop needs besides the state: models, frozen params, compiled functions, edges."""

    cfg: config_lib.Config
    prompts: list[str]  # the prompt set rollouts sample from (goal ids 0..P-1)
    goals: list[str]  # prompts, then hindsight-only goals (herd `sentence`); ids index this list
    sentence_ids: list[list[int]]  # herd `sentence`: each prompt's sentence goal ids
    mesh: jax.sharding.Mesh
    policy: Policy
    trainable: Trainable  # which UNet params train; TrainState.params is its trainable pytree
    frozen: dict[str, Params]  # vae, goal embeddings, negative embedding, UNet base (lora), pretrained UNet (ddpg/dpok)
    rollout: Callable[..., Trajectory]
    steps: dict[str, Callable[..., Any]]  # jitted pure functions, by name
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
        ("dpok.value_steps", cfg.dpok.value_steps),
    ]:
        require(value > 0, f"{key} must be positive, got {value}")
    require(s.eta > 0, f"sample.eta must be > 0 for a stochastic policy, got {s.eta}")
    require(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    require(t.learning_rate > 0, f"train.learning_rate must be positive, got {t.learning_rate}")
    require(t.lora_rank > 0, f"train.lora_rank must be positive, got {t.lora_rank}")
    choice(t.trainable, TRAINABLE_MODES, "train.trainable")
    choice(cfg.precision, PRECISIONS, "precision")
    choice(t.update_loop, UPDATE_LOOPS, "train.update_loop")
    require(cfg.checkpoint.save_every >= 0, f"checkpoint.save_every must be >= 0 (0: no checkpoints), got {cfg.checkpoint.save_every}")
    require(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    choice(cfg.algorithm.name, ALGORITHMS, "algorithm.name")
    choice(cfg.reward.name, reward_names(), "reward.name")
    choice(cfg.logging.log_with, LOGGERS, "logging.log_with")
    choice(t.estimator, ddpo.ESTIMATORS, "train.estimator")
    samples = s.batch_size * s.num_batches_per_epoch
    require(samples % t.batch_size == 0, f"samples per epoch ({samples}) must be a multiple of train.batch_size ({t.batch_size})")
    for key, value in [("sample.batch_size", s.batch_size), ("train.batch_size", t.batch_size)]:
        require(value % num_devices == 0, f"{key}={value} must be a multiple of the number of devices ({num_devices})")
    require(0 <= cfg.ddpg.epsilon <= 1, f"ddpg.epsilon must be in [0, 1], got {cfg.ddpg.epsilon}")
    h = cfg.herd
    choice(h.goal_strategy, herd.STRATEGIES, "herd.goal_strategy")
    choice(h.correction, herd.CORRECTIONS, "herd.correction")
    for key, value in [("herd.copies", h.copies), ("herd.best_candidates", h.best_candidates), ("herd.capacity", h.capacity), ("herd.keep_epochs", h.keep_epochs)]:
        require(value > 0, f"{key} must be positive, got {value}")
    if cfg.algorithm.name == "herd":
        replayed = num_replayed(cfg)
        require(replayed >= 0 and replayed == samples * h.replay_ratio, f"herd.replay_ratio × samples per epoch ({samples}) must be a whole number ≥ 0, got {h.replay_ratio}")
        require((samples + replayed) % t.batch_size == 0, f"fresh + replayed samples ({samples} + {replayed}) must be a multiple of train.batch_size ({t.batch_size})")
        require(h.capacity % num_devices == 0, f"herd.capacity={h.capacity} must be a multiple of the number of devices ({num_devices})")
    if cfg.algorithm.name == "dpok":
        require(cfg.dpok.buffer_transitions >= samples * s.num_steps, f"dpok.buffer_transitions must hold at least one epoch ({samples * s.num_steps} transitions)")


ALGORITHMS = ("herd", "ddpg", "ddpo", "dpok")
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
UPDATE_LOOPS = ("auto", "scan", "host")


def update_loop(choice: str) -> str:
    """`auto`: Python-driven timestep loop on CPU (XLA:CPU runs gradient convolutions inside a
    while loop 4-6x slower), one scanned program on GPU/TPU."""
    if choice == "auto":
        return "host" if jax.default_backend() == "cpu" else "scan"
    return choice


def num_replayed(cfg: config_lib.Config) -> int:
    """herd: replayed samples added to each update batch."""
    return int(round(cfg.sample.batch_size * cfg.sample.num_batches_per_epoch * cfg.herd.replay_ratio))


def dpok_capacity(cfg: config_lib.Config) -> int:
    return cfg.dpok.buffer_transitions // cfg.sample.num_steps


def init_state(
    cfg: config_lib.Config,
    unet_params: Params,
    optimizer: optax.GradientTransformation,
    num_goals: int,
    replay_item: dict[str, jax.ShapeDtypeStruct] | None = None,
    value: dict[str, Any] | None = None,
) -> TrainState:
    buffer = None
    if cfg.algorithm.name in ("herd", "dpok"):
        capacity = cfg.herd.capacity if cfg.algorithm.name == "herd" else dpok_capacity(cfg)
        buffer = replay.init(replay_item, capacity)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=unet_params,
        opt_state=optimizer.init(unet_params),
        rng=jax.random.PRNGKey(cfg.seed),
        stats=stats.init(num_goals, cfg.train.stats_window),
        reward_queries=jnp.zeros((), jnp.int32),
        buffer=buffer,
        value=value,
    )


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Replicated everywhere except the replay buffer, whose capacity axis is split over `data`."""
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    if state.buffer is not None:
        shardings = shardings.replace(buffer=replay.shardings(state.buffer, mesh))
    return shardings


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
    name = cfg.algorithm.name
    goals, sentence_ids = herd.build_goals(prompts, cfg.herd.goal_strategy if name == "herd" else "")
    sd = load_pipeline(cfg.model, compute_dtype=PRECISIONS[cfg.precision])
    policy = make_policy(sd, num_steps=cfg.sample.num_steps, eta=cfg.sample.eta, guidance_scale=cfg.sample.guidance_scale)
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    t = cfg.train
    trainable = Trainable(t.trainable, t.trainable_pattern, t.lora_rank, t.lora_alpha)
    trainable_params = trainable.init(sd.params["unet"], jax.random.PRNGKey(cfg.seed + 2))
    frozen = {"vae": sd.params["vae"], **encode_prompts(sd, goals, cfg.sample.negative_prompt)}
    if t.trainable == "lora":
        frozen["base"] = sd.params["unet"]
    if name in ("ddpg", "dpok"):
        frozen["pretrained"] = sd.params["unet"]
    frozen = parallel.replicate(frozen, mesh)
    if "pretrained" in frozen and t.trainable != "lora":  # its own buffers: the trained copy is donated to each update
        frozen["pretrained"] = jax.tree.map(jnp.copy, frozen["pretrained"])

    optimizer = trainable.optimizer(
        make_optimizer(
            t.learning_rate, b1=t.adam_beta1, b2=t.adam_beta2, eps=t.adam_eps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm
        ),
        trainable_params,
    )
    steps: dict[str, Callable[..., Any]] = {}
    value = None
    if name == "dpok":
        network = dpok.ValueNetwork(cfg.dpok.value_hidden)
        value_optimizer = optax.adam(cfg.dpok.value_learning_rate)
        value_params = dpok.init_value(network, jax.random.PRNGKey(cfg.seed + 1), policy.latent_shape, frozen["prompt_embeds"].shape[1:])
        value = {"params": value_params, "opt_state": value_optimizer.init(value_params)}
        loss_fn = dpok.make_loss(policy, network, reward_weight=cfg.dpok.reward_weight, kl_weight=cfg.dpok.kl_weight, clip_range=cfg.dpok.clip_range)
        steps["value_update"] = jax.jit(functools.partial(dpok.value_update, network, value_optimizer))
    else:
        loss_fn = ddpo.make_loss(policy, estimator=t.estimator, clip_range=t.clip_range, adv_clip=t.adv_clip)
    sizes = dict(
        num_inner_epochs=t.num_inner_epochs,
        minibatch_size=t.batch_size,
        num_train_timesteps=max(1, int(cfg.sample.num_steps * t.timestep_fraction)),
        mesh=mesh,
    )
    if update_loop(t.update_loop) == "host":
        steps["update"] = HostLoopUpdate(trainable.wrap_loss(loss_fn), optimizer, **sizes)
    else:
        steps["update"] = jax.jit(
            functools.partial(train_on_batch, trainable.wrap_loss(loss_fn), optimizer, **sizes),
            in_shardings=(replicated, replicated, replicated, sharded, replicated, replicated),
            out_shardings=replicated,
            donate_argnums=(0, 1),
        )
    steps["update_stats"] = jax.jit(stats.update, out_shardings=replicated)
    steps["advantages"] = jax.jit(
        functools.partial(stats.advantages, min_count=t.stats_min_count, per_prompt=t.per_prompt_stats), out_shardings=sharded
    )

    samples = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
    item = jax.eval_shape(
        lambda: herd.trajectory_item(
            jnp.zeros((samples, cfg.sample.num_steps + 1, *policy.latent_shape)),
            jnp.zeros((samples, cfg.sample.num_steps)),
            jnp.zeros((samples,), jnp.int32),
            frozen["prompt_embeds"][jnp.zeros((samples,), jnp.int32)],
            jnp.zeros((samples,)),
        )
    )
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), item)
    steps["unet_params"] = jax.jit(trainable.unet_params)
    state = init_state(cfg, trainable_params, optimizer, len(goals), item, value)
    state = jax.device_put(state, state_shardings(state, mesh))
    if name == "herd":
        buffer_sharding = replay.shardings(state.buffer, mesh)
        steps["herd_replay"] = jax.jit(
            functools.partial(
                herd.replay_step,
                policy,
                copies=cfg.herd.copies,
                keep_epochs=cfg.herd.keep_epochs,
                num_replay=num_replayed(cfg),
                recompute=cfg.herd.correction == "recompute",
            ),
            out_shardings=(buffer_sharding, replicated, replicated),
        )
    if name in ("herd", "dpok"):
        steps["store_fresh"] = jax.jit(herd.store_fresh, out_shardings=replay.shardings(state.buffer, mesh))
        steps["sample_buffer"] = jax.jit(replay.sample, static_argnums=2)

    run_dir = pathlib.Path(cfg.run_dir)
    setup = Setup(
        cfg=cfg,
        prompts=prompts,
        goals=goals,
        sentence_ids=sentence_ids,
        mesh=mesh,
        policy=policy,
        trainable=trainable,
        frozen=frozen,
        rollout=make_rollout(policy, mesh),
        steps=steps,
        reward=make_reward(cfg.reward),
        logger=make_logger(
            cfg.logging.log_with, run_dir, config=config_lib.to_dict(cfg), run_name=run_dir.name, is_main_process=parallel.is_main_process()
        ),
    )
    return setup, state


def score(setup: Setup, images: np.ndarray, goal_ids: Sequence[int]) -> np.ndarray:
    """Reward of images under goals (one reward query per image); NaN/inf is a one-line error."""
    from herd_jax.rewards import check_finite

    texts = [setup.goals[g] for g in goal_ids]
    return check_finite(setup.reward(np.asarray(images), texts), texts)


def score_split(setup: Setup, images: np.ndarray, goal_ids: Sequence[int]) -> np.ndarray:
    """`score` on every process's share of the rows, gathered: same result on all processes.

    Every process holds all rows (the uint8 images are gathered, cheap next to a rollout); each
    scores only its contiguous share, so the reward model's work is split across hosts.
    """
    goal_ids = np.asarray(goal_ids)
    pad = (-len(goal_ids)) % jax.process_count()
    if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        goal_ids = np.concatenate([goal_ids, np.repeat(goal_ids[-1:], pad)])
    rows = parallel.process_rows(len(goal_ids))
    scores = parallel.gather_rows(score(setup, images[rows], goal_ids[rows]))
    return scores[: len(scores) - pad]


def collect_rollouts(setup: Setup, unet_params: Params, key: jax.Array) -> tuple[Trajectory, np.ndarray, np.ndarray, np.ndarray]:
    """Samples the epoch's batches; scoring batch i (in a worker thread) overlaps sampling batch i+1.

    Each process scores its own rows of each batch; collectives (gathers) stay on this thread.
    Returns:
      (trajectories concatenated over batches, images uint8[N, H, W, 3], prompt ids int32[N],
      rewards f32[N]; all but the trajectories on the host, identical on every process).
    """
    cfg = setup.cfg.sample
    trajectories, images, prompt_ids, futures = [], [], [], []
    rows = parallel.process_rows(cfg.batch_size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(cfg.num_batches_per_epoch):
            prompt_key, sample_key = jax.random.split(jax.random.fold_in(key, i))
            ids = np.asarray(jax.random.randint(prompt_key, (cfg.batch_size,), 0, len(setup.prompts)), np.int32)
            trajectory = setup.rollout(unet_params, setup.frozen, parallel.shard_batch(ids, setup.mesh), sample_key)
            if i > 0:  # gather batch i-1's images while batch i samples
                images.append(parallel.gather_to_host(trajectories[-1].images))
                futures.append(pool.submit(score, setup, images[-1][rows], prompt_ids[-1][rows]))
            trajectories.append(trajectory)
            prompt_ids.append(ids)
        images.append(parallel.gather_to_host(trajectories[-1].images))
        futures.append(pool.submit(score, setup, images[-1][rows], prompt_ids[-1][rows]))
        rewards = np.concatenate([parallel.gather_rows(f.result()) for f in futures]).astype(np.float32)
    trajectories = jax.tree.map(lambda *xs: jnp.concatenate(xs), *trajectories)
    return trajectories, np.concatenate(images), np.concatenate(prompt_ids), rewards


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


def host_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key, for host-side choices that must repeat on resume."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key))


class UpdateBatch(NamedTuple):
    """What the update trains on: replay items (herd.trajectory_item layout) with a validity mask."""

    items: dict[str, jax.Array]  # latents, log_probs, prompt_id, prompt_embeds, reward; leading axis N
    valid: jax.Array  # bool[N]  False rows (an empty replay) get zero advantage
    buffer: replay.ReplayBuffer | None
    stats: stats.PromptStats
    queries: int  # reward queries spent building it (relabeling)
    metrics: dict[str, float]


def herd_batch(setup: Setup, state: TrainState, fresh: dict, prompt_stats: stats.PromptStats, unet_params: Params,
               images: np.ndarray, prompt_ids: np.ndarray, key: jax.Array) -> UpdateBatch:
    """Relabels the fresh trajectories (real reward queries), stores the copies, and appends a replay draw."""
    h, steps = setup.cfg.herd, setup.steps
    goal_key, replay_key = jax.random.split(key)
    goal_ids, goal_rewards, goal_valid, queries = herd.choose_goals(
        host_rng(goal_key), prompt_ids, images,
        strategy=h.goal_strategy, copies=h.copies, num_prompts=len(setup.prompts),
        sentence_ids=setup.sentence_ids, best_candidates=h.best_candidates,
        score=lambda images, goals: score_split(setup, images, goals),
    )
    goal_ids, goal_rewards, goal_valid = jnp.asarray(goal_ids), jnp.asarray(goal_rewards), jnp.asarray(goal_valid)
    buffer, replayed, replayed_valid = steps["herd_replay"](
        state.buffer, unet_params, setup.frozen["uncond"], fresh, goal_ids, setup.frozen["prompt_embeds"][goal_ids],
        goal_rewards, goal_valid, state.step, replay_key,
    )
    prompt_stats = steps["update_stats"](prompt_stats, goal_ids, goal_rewards, goal_valid)
    metrics = {
        "herd/relabeled_reward": float(goal_rewards[goal_valid].mean()) if bool(goal_valid.any()) else float("nan"),
        "herd/replayed_valid": float(np.asarray(replayed_valid).mean()),
    }
    items = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), fresh, replayed)
    valid = jnp.concatenate([jnp.ones(len(prompt_ids), bool), replayed_valid])
    return UpdateBatch(items, valid, buffer, prompt_stats, queries, metrics)


def dpok_batch(setup: Setup, state: TrainState, fresh: dict, prompt_stats: stats.PromptStats, key: jax.Array) -> UpdateBatch:
    """Pushes the fresh trajectories into the FIFO and draws the update batch from it."""
    buffer = setup.steps["store_fresh"](state.buffer, fresh, state.step)
    items, info = setup.steps["sample_buffer"](buffer, key, fresh["reward"].shape[0])
    return UpdateBatch(items, info["valid"], buffer, prompt_stats, 0, {})


def value_targets(setup: Setup, prompt_stats: stats.PromptStats, items: dict[str, jax.Array], valid: jax.Array) -> jax.Array:
    """dpok: what V(x_t, c, t) is fitted to and A = target − V: the per-prompt normalised reward
    (`dpok.normalize_rewards`, so the baseline works on any reward scale) or the raw reward."""
    if setup.cfg.dpok.normalize_rewards:
        return setup.steps["advantages"](prompt_stats, items["prompt_id"], items["reward"], valid=valid)
    return items["reward"]


def update_value(setup: Setup, value: dict[str, Any], batch: UpdateBatch, targets: jax.Array, key: jax.Array) -> tuple[dict[str, Any], float]:
    """dpok: `dpok.value_steps` MSE steps of the value network, the first on the update batch, the
    others on fresh draws from the FIFO. Returns the new value state and the first step's MSE
    (the baseline's error on this epoch's update batch, before fitting to it)."""
    steps, params, opt_state = setup.steps, value["params"], value["opt_state"]
    items, valid, losses = batch.items, batch.valid, []
    for i in range(setup.cfg.dpok.value_steps):
        if i:
            items, info = steps["sample_buffer"](batch.buffer, jax.random.fold_in(key, i), batch.valid.shape[0])
            valid = info["valid"]
            targets = value_targets(setup, batch.stats, items, valid)
        params, opt_state, loss = steps["value_update"](
            params, opt_state, items["latents"], items["prompt_embeds"], targets, setup.policy.schedule.timesteps, valid.astype(jnp.float32)
        )
        losses.append(loss)
    return {"params": params, "opt_state": opt_state}, float(losses[0])


def run_epoch(setup: Setup, state: TrainState) -> tuple[TrainState, dict[str, float], EpochSamples]:
    """One epoch: sample, score, (relabel / replay), normalise, update. Returns the new state and metrics."""
    cfg, name, steps = setup.cfg, setup.cfg.algorithm.name, setup.steps
    key = jax.random.fold_in(state.rng, state.step)
    sample_key, train_key, algo_key, replay_key = jax.random.split(key, 4)
    extra: dict[str, float] = {}

    unet_params = steps["unet_params"](state.params, setup.frozen.get("base"))
    behaviour = unet_params
    if name == "ddpg":
        pretrained = ddpg.sample_from_pretrained(algo_key, cfg.ddpg.epsilon)
        behaviour = setup.frozen["pretrained"] if pretrained else unet_params
        extra["rollout/from_pretrained"] = float(pretrained)
    trajectories, images, prompt_ids, rewards = collect_rollouts(setup, behaviour, sample_key)

    ids = parallel.shard_batch(prompt_ids, setup.mesh)
    rewards_dev = parallel.shard_batch(rewards, setup.mesh)
    fresh = herd.trajectory_item(trajectories.latents, trajectories.log_probs, ids, setup.frozen["prompt_embeds"][ids], rewards_dev)
    prompt_stats = steps["update_stats"](state.stats, ids, rewards_dev)
    if name == "herd":
        batch = herd_batch(setup, state, fresh, prompt_stats, unet_params, images, prompt_ids, jax.random.fold_in(algo_key, 1))
    elif name == "dpok":
        batch = dpok_batch(setup, state, fresh, prompt_stats, replay_key)
    else:
        batch = UpdateBatch(fresh, jnp.ones(len(rewards), bool), state.buffer, prompt_stats, 0, {})
    extra.update(batch.metrics)

    items = jax.device_put(batch.items, parallel.batch_sharded(setup.mesh))
    valid = jax.device_put(batch.valid, parallel.batch_sharded(setup.mesh))
    advantages = steps["advantages"](batch.stats, items["prompt_id"], items["reward"], valid=valid) * valid
    value, aux = state.value, {"uncond": setup.frozen["uncond"], "base": setup.frozen.get("base")}
    rewards_or_targets = items["reward"]
    if name == "dpok":
        rewards_or_targets = value_targets(setup, batch.stats, items, valid)
        value, extra["train/value_loss"] = update_value(setup, value, batch, rewards_or_targets, jax.random.fold_in(replay_key, 1))
        aux.update(pretrained=setup.frozen["pretrained"], value=value["params"])
    train_batch = TrainBatch(
        latents=items["latents"], log_probs=items["log_probs"], cond=items["prompt_embeds"], advantages=advantages, rewards=rewards_or_targets,
        weights=valid.astype(jnp.float32),
    )
    params, opt_state, info = steps["update"](state.params, state.opt_state, aux, train_batch, setup.policy.schedule.timesteps, train_key)
    buffer = steps["store_fresh"](batch.buffer, fresh, state.step) if name == "herd" else batch.buffer
    state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        stats=batch.stats,
        reward_queries=state.reward_queries + len(rewards) + batch.queries,
        buffer=buffer,
        value=value,
    )
    metrics = epoch_metrics(setup.prompts, prompt_ids, rewards, jax.device_get(info))
    metrics.update(extra, **{"reward/queries": float(state.reward_queries)})
    return state, metrics, EpochSamples(images, prompt_ids, rewards)


def train_and_evaluate(
    cfg: config_lib.Config,
    *,
    progress: bool = True,
    resume: checkpoint.Checkpoints | str | None = None,
    overwrite: bool = False,
) -> list[dict[str, float]]:
    """Runs epochs `state.step` .. `cfg.num_epochs - 1` and returns each epoch's metrics.

    `resume`: checkpoints to continue from (`checkpoint.find`'s result or a path for it); see
    herd_jax/checkpoint.py for the resume order. Checkpoints go to `cfg.run_dir/checkpoints`.
    The run holds `cfg.run_dir`'s lock throughout; without `resume` a run directory that already
    has checkpoints is refused unless `overwrite` (herd_jax/rundir.py). SIGTERM or Ctrl-C stop the
    run after the current epoch with a checkpoint (`errors.Stopped`).

    Raises (each a one-line message; herd_jax/errors.py maps them to exit codes):
      DivergedError: a non-finite loss. NonFiniteRewardError, RewardModelError: the reward failed.
      StorageError: the run directory cannot be written. In every case the checkpoints committed
      before the failure are intact.
    """
    from herd_jax import errors, rundir

    with rundir.RunLock(cfg.run_dir), rundir.StopRequest() as stop:
        if resume is None:
            rundir.check_fresh(cfg.run_dir, overwrite=overwrite)
        log = errors.log_to_file(pathlib.Path(cfg.run_dir) / "train.log") if parallel.is_main_process() else None
        try:
            return _train(cfg, progress, resume, stop)
        finally:
            if log is not None:
                errors.stop_logging_to(log)


def _train(cfg: config_lib.Config, progress: bool, resume: Any, stop: Any) -> list[dict[str, float]]:
    from herd_jax import errors

    setup, state = build(cfg)
    history = []
    samples_per_epoch = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
    manager = None
    try:
        if resume is not None:
            state = checkpoint.resume(resume, state, cfg)
        manager = checkpoint.make_manager(cfg)
        checkpoint.write_run_files(cfg, setup.prompts)
        bar = tqdm.trange(int(state.step), cfg.num_epochs, desc="epochs", unit="epoch", disable=not progress or not parallel.is_main_process(), dynamic_ncols=True)
        for epoch in bar:
            start = time.perf_counter()
            state, metrics, samples = run_epoch(setup, state)
            elapsed = time.perf_counter() - start
            metrics.update({"perf/epoch_s": elapsed, "perf/samples_per_s": samples_per_epoch / elapsed, "train/learning_rate": cfg.train.learning_rate})
            if not np.isfinite(metrics["train/loss"]):
                checkpoint.close(manager)  # commit the pending save before saying what is intact
                manager = None
                raise errors.DivergedError(f"non-finite loss at epoch {epoch}; stopping ({_intact(cfg)})")
            save_start = time.perf_counter()
            checkpoint.save(manager, state, cfg, setup.prompts)
            metrics["perf/checkpoint_s"] = time.perf_counter() - save_start  # time the loop waited for the save
            setup.logger.log(metrics, step=epoch)
            if cfg.logging.image_every and epoch % cfg.logging.image_every == 0:
                log_image_grid(setup, samples, epoch)
            history.append(metrics)
            if parallel.is_main_process():
                bar.write(summary_line(epoch, metrics))
            if epoch + 1 < cfg.num_epochs and stop.requested():
                checkpoint.save(manager, state, cfg, setup.prompts, force=True)
                checkpoint.close(manager)
                manager = None
                saved = "checkpoints are off (checkpoint.save_every=0), nothing saved"
                if cfg.checkpoint.save_every:
                    saved = f"{_intact(cfg)}; continue with: python train.py --run_dir {cfg.run_dir} --resume"
                raise errors.Stopped(f"stopped by {stop.signal_name or 'another process'} after epoch {epoch}: {saved}")
    except OSError as error:  # writing the run directory: one line that says what is intact
        if isinstance(error, errors.StorageError):
            raise
        raise errors.StorageError(f"{errors.describe(error)}; {_intact(cfg)}") from error
    finally:
        checkpoint.close(manager)  # waits for an async save to be committed
        setup.logger.close()
        setup.reward.close()
    return history


def _intact(cfg: config_lib.Config) -> str:
    root = pathlib.Path(cfg.run_dir).resolve() / checkpoint.CHECKPOINTS
    steps = checkpoint.committed_steps(root)
    return f"the last checkpoint, {root / str(steps[0])}, is intact" if steps else "no checkpoint was saved"


def log_image_grid(setup: Setup, samples: EpochSamples, epoch: int, max_images: int = 16) -> None:
    n = min(max_images, len(samples.rewards))
    captions = [f"{setup.prompts[i]} | {r:.3f}" for i, r in zip(samples.prompt_ids[:n], samples.rewards[:n])]
    setup.logger.log_images("rollout/images", np.asarray(samples.images[:n]), captions, step=epoch)


def summary_line(epoch: int, m: dict[str, float]) -> str:
    return (
        f"epoch {epoch:4d} | reward {m['reward/mean']:+.4f} ± {m['reward/std']:.4f} | loss {m['train/loss']:+.3e} "
        f"| approx_kl {m['train/approx_kl']:.2e} | clipfrac {m['train/clipfrac']:.3f} | {m['perf/samples_per_s']:.2f} samples/s"
    )
