"""The training loop: sample → reward → prepare (the algorithm) → update, epoch after epoch.

This is the only module with side effects (devices, files, threads, logging). Everything it
calls is a pure function of (state, batch, key) or a small object at the edge (reward,
logger). The algorithm is a plug-in (herd_jax/algorithms/api.py): the loop has no algorithm
branches. One epoch reads top-down as DESIGN.md's data flow:
`collect_rollouts` → `ask_rewards` → `prepare` → `update` → `finish` → log.
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

from herd_jax import algorithms
from herd_jax import config as config_lib
from herd_jax import checkpoint, parallel, stats
from herd_jax.algorithms.api import Algorithm, Context, Experience, Frozen, Queries
from herd_jax.diffusion import Policy, Trajectory, make_policy
from herd_jax.prompts import load_prompts
from herd_jax.trainable import Trainable
from herd_jax.train_step import HostLoopUpdate, UpdateShardings, make_optimizer, train_on_batch

Params = Any
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; one orbax save of it is a checkpoint."""

    step: jax.Array  # int32[]  epochs completed
    params: Params  # trainable UNet params (the LoRA adapters under train.trainable=lora)
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2]  root key; epoch keys are fold_in(rng, step)
    stats: stats.PromptStats  # per-goal reward windows
    reward_queries: jax.Array  # int32[]  reward-model calls so far (fresh + the algorithm's queries)
    algorithm: Any  # the algorithm's state pytree (herd: replay buffer; dpok: FIFO + value net; ddpo: ())


class Steps(NamedTuple):
    """The compiled functions of an epoch."""

    rollout: Callable[..., Trajectory]  # (unet params, frozen, prompt ids int32[b], key) -> Trajectory
    unet_params: Callable[[Params, Params | None], Params]  # trainable pytree (+ LoRA base) -> UNet params
    queries: Callable[..., Queries]
    prepare: Callable[..., Any]
    update: Callable[..., Any]  # (params, opt_state, frozen, batch, timesteps, key) -> (params, opt_state, info)
    finish: Callable[..., Any]


@dataclasses.dataclass
class Setup:
    """What the loop needs besides the state: models, frozen params, compiled functions, edges."""

    cfg: config_lib.Config
    prompts: list[str]  # the prompt set rollouts sample from (goal ids 0..P-1)
    goals: list[str]  # prompts, then the algorithm's extra goals; goal ids index this list
    mesh: jax.sharding.Mesh
    policy: Policy
    trainable: Trainable  # which UNet params train; TrainState.params is its trainable pytree
    algorithm: Algorithm
    frozen: Frozen
    steps: Steps
    reward: Any
    logger: Any
    eval_prompts: tuple[list[str], jax.Array]  # the evaluation's prompts and their embeddings f32[E, L, D]


def update_loop(choice: str) -> str:
    """`auto`: Python-driven timestep loop on CPU (XLA:CPU runs gradient convolutions inside a
    while loop 4-6x slower), one scanned program on GPU/TPU."""
    if choice == "auto":
        return "host" if jax.default_backend() == "cpu" else "scan"
    return choice


def encode_prompts(sd: Any, prompts: Sequence[str], negative_prompt: str) -> tuple[jax.Array, jax.Array]:
    """Text embeddings of the prompts f32[P, L, D] and of the negative prompt f32[1, L, D]."""
    encode = jax.jit(sd.encode_text)
    tokens = jnp.asarray(sd.tokenize(list(prompts) + [negative_prompt]))
    embeds = encode(sd.params["text_encoder"], tokens)
    return embeds[:-1], embeds[-1:]


# Images one device VAE-decodes at once in a rollout (more are decoded in sequential chunks):
# at 512 px each takes ~0.6 GiB of fp32 decoder activations, so a batch of 16 decoded at once
# needs ~10 GiB (memory_plan); 4 keep the decode small next to the UNet and still fill a GPU.
DECODE_BATCH = 4


def decode_chunks(local_batch: int, decode_batch: int = DECODE_BATCH) -> int:
    """The fewest chunks that divide the per-device batch into at most `decode_batch` images each."""
    return min(n for n in range(1, local_batch + 1) if local_batch % n == 0 and local_batch // n <= decode_batch) if local_batch else 1


def make_rollout(
    policy: Policy, mesh: jax.sharding.Mesh, unet_shardings: Any = None, frozen_shardings: Frozen | None = None
) -> Callable[..., Trajectory]:
    """jit(rollout) with the batch (prompt ids in, trajectories out) split over the mesh's `data` axis.

    The returned function takes (unet_params, frozen: Frozen, prompt_ids int32[B], key). The
    params and frozen inputs are where the shardings say (`param_shardings`, `frozen_shardings`;
    default replicated): under FSDP the partitioner gathers each weight where it is used.
    """

    def rollout(unet_params, frozen: Frozen, prompt_ids, key):
        chunks = decode_chunks(prompt_ids.shape[0] // mesh.size)
        decoding = dataclasses.replace(policy, decode_chunks=chunks) if chunks > 1 else policy
        return decoding.rollout(unet_params, frozen.vae, frozen.goal_embeds[prompt_ids], frozen.uncond, key)

    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    unet_at = replicated if unet_shardings is None else unet_shardings
    frozen_at = replicated if frozen_shardings is None else frozen_shardings
    return jax.jit(rollout, in_shardings=(unet_at, frozen_at, sharded, replicated), out_shardings=sharded)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def training_policy(policy: Policy, cfg: config_lib.Config, mesh: jax.sharding.Mesh | None = None) -> Policy:
    """The policy the losses differentiate: the rollout's, its UNet rematerialised per
    `model_options.remat` (same params and outputs; less memory, more FLOPs in the backward pass).
    Under `parallel.fsdp` (with the `mesh`) the UNet also pins its activations to the batch split,
    so the partitioner gathers each sharded weight where it is used."""
    activations = parallel.batch_sharded(mesh) if cfg.parallel.fsdp and mesh is not None else None
    return dataclasses.replace(policy, unet=policy.unet.clone(remat=cfg.model_options.remat, activation_sharding=activations))


def make_algorithm(cfg: config_lib.Config, policy: Policy, prompts: Sequence[str], cond_shape: tuple[int, int]) -> Algorithm:
    """The configured algorithm for `policy` (the training policy) and prompt embeddings of shape [L, D]."""
    samples = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
    item = Experience(
        latents=jax.ShapeDtypeStruct((samples, cfg.sample.num_steps + 1, *policy.latent_shape), jnp.float32),
        log_probs=jax.ShapeDtypeStruct((samples, cfg.sample.num_steps), jnp.float32),
        goal=jax.ShapeDtypeStruct((samples,), jnp.int32),
        cond=jax.ShapeDtypeStruct((samples, *cond_shape), jnp.float32),
        reward=jax.ShapeDtypeStruct((samples,), jnp.float32),
    )
    return algorithms.get(cfg.algorithm.name).make(Context(cfg, policy, tuple(prompts), samples, item))


def make_trainable(cfg: config_lib.Config) -> Trainable:
    t = cfg.train
    return Trainable(t.trainable, t.trainable_pattern, t.lora_rank, t.lora_alpha)


def make_train_optimizer(cfg: config_lib.Config, trainable: Trainable, params: Params) -> optax.GradientTransformation:
    """AdamW behind grad-norm clipping with the `train` settings, on what `trainable` trains."""
    t = cfg.train
    inner = make_optimizer(t.learning_rate, b1=t.adam_beta1, b2=t.adam_beta2, eps=t.adam_eps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)
    return trainable.optimizer(inner, params)


def make_frozen(cfg: config_lib.Config, params: dict[str, Params], goal_embeds: jax.Array, uncond: jax.Array, *, needs_pretrained: bool) -> Frozen:
    """The frozen inputs: the VAE and the UNet copies (LoRA base, pretrained) cast to
    `model_options.frozen_dtype` (one copy when both are needed). Pure: memory_plan runs it under eval_shape."""
    dtype = DTYPES[cfg.model_options.frozen_dtype]
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
    lora = cfg.train.trainable == "lora"
    unet = cast(params["unet"]) if lora or needs_pretrained else None
    return Frozen(
        vae=cast(params["vae"]),
        goal_embeds=goal_embeds,
        uncond=uncond,
        base=unet if lora else None,
        pretrained=unet if needs_pretrained else None,
    )


def frozen_shardings(frozen: Frozen, mesh: jax.sharding.Mesh, fsdp: bool) -> Frozen:
    """Shardings of the frozen inputs: the UNet copies like the params (FSDP or replicated), the rest replicated."""
    return Frozen(
        vae=parallel.param_shardings(frozen.vae, mesh, False),
        goal_embeds=parallel.replicated(mesh),
        uncond=parallel.replicated(mesh),
        base=parallel.param_shardings(frozen.base, mesh, fsdp),
        pretrained=parallel.param_shardings(frozen.pretrained, mesh, fsdp),
    )


def make_update(
    cfg: config_lib.Config,
    algorithm: Algorithm,
    trainable: Trainable,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    shardings: UpdateShardings,
) -> Callable[..., Any]:
    """The policy update the trainer runs: (params, opt_state, frozen, batch, timesteps, key) ->
    (params, opt_state, info). The algorithm's own `update`, else the shared update on
    `trainable.wrap_loss(algorithm.loss)`: `HostLoopUpdate` or one jitted `train_on_batch`
    (`train.update_loop`), with params and optimizer state donated and kept where `shardings` say.
    """
    if algorithm.update is not None:
        return algorithm.update
    t = cfg.train
    sizes = dict(
        num_inner_epochs=t.num_inner_epochs,
        minibatch_size=t.batch_size,
        num_train_timesteps=max(1, int(cfg.sample.num_steps * t.timestep_fraction)),
        timestep_batch=t.timestep_batch,
        mesh=mesh,
    )
    loss = trainable.wrap_loss(algorithm.loss)
    if update_loop(t.update_loop) == "host":
        return HostLoopUpdate(loss, optimizer, **sizes, shardings=shardings)
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(
        functools.partial(train_on_batch, loss, optimizer, **sizes, grad_shardings=shardings.params),
        in_shardings=(shardings.params, shardings.opt_state, shardings.frozen, sharded, replicated, replicated),
        out_shardings=(shardings.params, shardings.opt_state, replicated),
        donate_argnums=(0, 1),
    )


def make_run_logger(cfg: config_lib.Config) -> Any:
    """The run's metrics logger (`logging.log_with`) writing under `run_dir`, named after it; only the main process logs."""
    from herd_jax.metrics import make_logger

    run_dir = pathlib.Path(cfg.run_dir)
    return make_logger(cfg.logging.log_with, run_dir, config=config_lib.to_dict(cfg), run_name=run_dir.name, is_main_process=parallel.is_main_process())


def build(cfg: config_lib.Config, sd: Any = None) -> tuple[Setup, TrainState]:
    """Loads models, builds the algorithm, compiled functions and the initial state. Raises one-line errors.

    `sd`: an already loaded `herd_jax.models.StableDiffusion` instead of `cfg.model` (bench/sd15.py's
    random SD v1.5).
    """
    from herd_jax.models import load_pipeline
    from herd_jax.rewards import make_reward

    mesh = parallel.make_mesh()
    config_lib.validate(cfg, mesh.shape[parallel.DATA_AXIS])
    prompts = load_prompts(cfg.prompts)
    if sd is None:
        sd = load_pipeline(cfg.model, compute_dtype=PRECISIONS[cfg.precision], attention=cfg.model_options.attention)
    policy = make_policy(sd, num_steps=cfg.sample.num_steps, eta=cfg.sample.eta, guidance_scale=cfg.sample.guidance_scale)
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    fsdp = cfg.parallel.fsdp

    prompt_embeds, uncond = encode_prompts(sd, prompts, cfg.sample.negative_prompt)
    algorithm = make_algorithm(cfg, training_policy(policy, cfg, mesh), prompts, prompt_embeds.shape[1:])
    goals = list(prompts) + list(algorithm.extra_goals)
    if algorithm.extra_goals:
        prompt_embeds = jnp.concatenate([prompt_embeds, encode_prompts(sd, algorithm.extra_goals, "")[0]])

    frozen = make_frozen(cfg, sd.params, prompt_embeds, uncond, needs_pretrained=algorithm.needs_pretrained)
    frozen_at = frozen_shardings(frozen, mesh, fsdp)
    frozen = jax.device_put(frozen, frozen_at)
    trainable = make_trainable(cfg)
    trainable_params = trainable.init(sd.params["unet"], jax.random.PRNGKey(cfg.seed + 2))
    optimizer = make_train_optimizer(cfg, trainable, trainable_params)
    state = init_state(cfg, trainable_params, optimizer, algorithm, len(goals), mesh)
    shardings = UpdateShardings(
        params=jax.tree.map(lambda x: x.sharding, state.params), opt_state=jax.tree.map(lambda x: x.sharding, state.opt_state), frozen=frozen_at
    )
    unet_at = parallel.param_shardings(sd.params["unet"], mesh, fsdp)
    algorithm_shardings = algorithm.shardings(state.algorithm, mesh)
    steps = Steps(
        rollout=make_rollout(dataclasses.replace(policy, noise_group=algorithm.noise_group), mesh, unet_at, frozen_at),
        unet_params=jax.jit(trainable.unet_params, out_shardings=unet_at),
        queries=jax.jit(algorithm.queries),
        prepare=jax.jit(
            algorithm.prepare,
            out_shardings=(sharded, algorithm_shardings, replicated, replicated),
            donate_argnums=(0,),
        ),
        update=make_update(cfg, algorithm, trainable, optimizer, mesh, shardings),
        finish=jax.jit(algorithm.finish, out_shardings=algorithm_shardings, donate_argnums=(0,)),
    )
    e = cfg.eval
    eval_prompts = load_prompts(e.prompts)[: e.num_prompts] if e.prompts else prompts[: e.num_prompts]
    setup = Setup(
        cfg=cfg,
        prompts=prompts,
        goals=goals,
        mesh=mesh,
        policy=policy,
        trainable=trainable,
        algorithm=algorithm,
        frozen=frozen,
        steps=steps,
        reward=make_reward(cfg.reward),
        logger=make_run_logger(cfg),
        eval_prompts=(eval_prompts, encode_prompts(sd, eval_prompts, cfg.sample.negative_prompt)[0]),
    )
    return setup, state


def state_shardings(abstract: TrainState, algorithm: Algorithm, mesh: jax.sharding.Mesh, fsdp: bool) -> TrainState:
    """Where each part of the state lives: params and optimizer state replicated or FSDP-sharded
    (`parallel.fsdp`), the algorithm's state as it says, the rest replicated."""
    return jax.tree.map(lambda _: parallel.replicated(mesh), abstract).replace(
        params=parallel.param_shardings(abstract.params, mesh, fsdp),
        opt_state=parallel.param_shardings(abstract.opt_state, mesh, fsdp),
        algorithm=algorithm.shardings(abstract.algorithm, mesh),
    )


def init_state(cfg: config_lib.Config, params: Params, optimizer: optax.GradientTransformation, algorithm: Algorithm,
               num_goals: int, mesh: jax.sharding.Mesh) -> TrainState:
    """The initial TrainState, built as big_vision does: eval_shape → shardings → jit(out_shardings)."""

    def make(params: Params) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.PRNGKey(cfg.seed),
            stats=stats.init(num_goals, cfg.train.stats_window),
            reward_queries=jnp.zeros((), jnp.int32),
            algorithm=algorithm.init(),
        )

    abstract = jax.eval_shape(make, params)
    shardings = state_shardings(abstract, algorithm, mesh, cfg.parallel.fsdp)
    return jax.jit(make, out_shardings=shardings)(jax.device_put(params, shardings.params))


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


def collect_rollouts(setup: Setup, unet_params: Params, prompt_ids: np.ndarray, key: jax.Array) -> tuple[Trajectory, np.ndarray, np.ndarray]:
    """Samples the epoch's batches; scoring batch i (in a worker thread) overlaps sampling batch i+1.

    `prompt_ids` int32[N] (host) are the epoch's prompts, `sample.batch_size` per batch. Each
    process scores its own rows of each batch; collectives (gathers) stay on this thread.
    Returns:
      (trajectories concatenated over batches, images uint8[N, H, W, 3], rewards f32[N]; the
      last two on the host, identical on every process).
    """
    size = setup.cfg.sample.batch_size
    trajectories, images, futures = [], [], []
    rows = parallel.process_rows(size)

    def score_batch(i: int) -> None:  # gathers batch i's images; its scoring goes to the worker
        images.append(parallel.gather_to_host(trajectories[i].images))
        futures.append(pool.submit(score, setup, images[i][rows], prompt_ids[i * size : (i + 1) * size][rows]))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(len(prompt_ids) // size):
            ids = parallel.shard_batch(prompt_ids[i * size : (i + 1) * size], setup.mesh)
            trajectories.append(setup.steps.rollout(unet_params, setup.frozen, ids, jax.random.fold_in(key, i)))
            if i > 0:  # batch i-1's images while batch i samples
                score_batch(i - 1)
        score_batch(len(trajectories) - 1)
        rewards = np.concatenate([parallel.gather_rows(f.result()) for f in futures]).astype(np.float32)
    trajectories = jax.tree.map(lambda *xs: jnp.concatenate(xs), *trajectories)
    return trajectories, np.concatenate(images), rewards


def ask_rewards(setup: Setup, images: np.ndarray, queries: Queries) -> tuple[jax.Array, int]:
    """The algorithm's extra reward queries scored (valid rows only): (answers f32[M], queries made)."""
    row, goal, valid = (np.asarray(x) for x in jax.device_get(queries))
    answers = np.zeros(row.shape, np.float32)
    asked = np.flatnonzero(valid)
    if asked.size:
        answers[asked] = score_split(setup, images[row[asked]], goal[asked])
    return jnp.asarray(answers), int(asked.size)


def epoch_metrics(prompts: list[str], prompt_ids: np.ndarray, rewards: np.ndarray, info: dict[str, Any]) -> dict[str, float]:
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std())}
    metrics.update({k if "/" in k else f"train/{k}": float(v) for k, v in info.items()})
    for pid in np.unique(prompt_ids):
        metrics[f"reward/prompt/{prompts[pid]}"] = float(rewards[prompt_ids == pid].mean())
    return metrics


class EpochSamples(NamedTuple):
    """What an epoch sampled, on the host, for logging image grids."""

    images: np.ndarray  # uint8[N, H, W, 3]
    prompt_ids: np.ndarray  # int32[N]
    rewards: np.ndarray  # f32[N]


def run_epoch(setup: Setup, state: TrainState) -> tuple[TrainState, dict[str, float], EpochSamples]:
    """One epoch: sample, score, prepare (the algorithm), update, finish. Returns the new state and metrics.

    The host↔device boundary: prompt ids come to the host once (they name the texts the reward
    scores), images and rewards once per sampling batch (`collect_rollouts`), the algorithm's
    queries and their answers once, and the epoch's metrics once at the end.
    """
    alg, steps, frozen = setup.algorithm, setup.steps, setup.frozen
    key = jax.random.fold_in(state.rng, state.step)
    prompt_key, behaviour_key, sample_key, query_key, prepare_key, train_key = jax.random.split(key, 6)

    unet_params = steps.unet_params(state.params, frozen.base)
    sampler, behaviour_metrics = alg.behaviour(behaviour_key, unet_params, frozen.pretrained)
    prompt_ids = np.asarray(alg.prompts(prompt_key, setup.cfg.sample.batch_size * setup.cfg.sample.num_batches_per_epoch), np.int32)
    trajectories, images, rewards = collect_rollouts(setup, sampler, prompt_ids, sample_key)

    goal = parallel.shard_batch(prompt_ids, setup.mesh)
    fresh = Experience(trajectories.latents, trajectories.log_probs, goal, frozen.goal_embeds[goal], parallel.shard_batch(rewards, setup.mesh))
    queries = steps.queries(state.algorithm, goal, query_key)
    answers, asked = ask_rewards(setup, images, queries)
    batch, algorithm_state, prompt_stats, prepare_info = steps.prepare(
        state.algorithm, state.stats, fresh, queries, answers, unet_params, frozen, state.step, prepare_key
    )
    params, opt_state, update_info = steps.update(state.params, state.opt_state, frozen, batch, setup.policy.schedule.timesteps, train_key)
    state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        stats=prompt_stats,
        reward_queries=state.reward_queries + len(rewards) + asked,
        algorithm=steps.finish(algorithm_state, fresh, state.step),
    )
    metrics = epoch_metrics(setup.prompts, prompt_ids, rewards, jax.device_get({**update_info, **prepare_info}))
    metrics.update(behaviour_metrics, **{"reward/queries": float(state.reward_queries)})
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
    from herd_jax import errors, report

    started = time.perf_counter()
    setup, state = build(cfg)
    run_dir, main_process = pathlib.Path(cfg.run_dir), parallel.is_main_process()
    say = print if progress and main_process else (lambda *a, **k: None)
    history, manager = [], None
    curve = report.RewardCurve(run_dir / "reward.png")
    try:
        if resume is not None:
            state = checkpoint.resume(resume, state, cfg)
        start_epoch = int(state.step)
        say(report.header(cfg, num_params=sum(x.size for x in jax.tree.leaves(state.params)), devices=jax.devices(), run_dir=run_dir), flush=True)
        manager = checkpoint.make_manager(cfg)
        checkpoint.write_run_files(cfg, setup.prompts)
        evaluator = Evaluator(setup) if cfg.eval.every else None
        if evaluator is not None:
            evaluator.run(state, curve, start_epoch)
        bar = tqdm.trange(start_epoch, cfg.num_epochs, desc="epochs", unit="epoch", disable=not progress or not main_process, dynamic_ncols=True)
        for epoch in bar:
            state, metrics, samples = timed_epoch(setup, state)
            if not np.isfinite(metrics["train/loss"]):
                checkpoint.close(manager)  # commit the pending save before saying what is intact
                manager = None
                raise errors.DivergedError(f"non-finite loss at epoch {epoch}; stopping ({_intact(cfg)})")
            save_start = time.perf_counter()
            checkpoint.save(manager, state, cfg, setup.prompts)
            metrics["perf/checkpoint_s"] = time.perf_counter() - save_start  # time the loop waited for the save
            setup.logger.log(metrics, step=epoch)
            history.append(metrics)
            # Off the hot path: after the epoch's log call.
            if cfg.logging.image_every and epoch % cfg.logging.image_every == 0:
                log_image_grid(setup, samples, epoch)
            curve.add_epoch(epoch, metrics)
            if evaluator is not None and (epoch + 1 == cfg.num_epochs or (epoch + 1) % cfg.eval.every == 0):
                evaluator.run(state, curve, epoch + 1)
            if main_process:
                curve.write()
                bar.write(summary_line(epoch, metrics))
            if epoch + 1 < cfg.num_epochs and stop.requested():
                checkpoint.save(manager, state, cfg, setup.prompts, force=True)
                checkpoint.close(manager)
                manager = None
                saved = "checkpoints are off (checkpoint.save_every=0), nothing saved"
                if cfg.checkpoint.save_every:
                    saved = f"{_intact(cfg)}; continue with: python train.py --run_dir {cfg.run_dir} --resume"
                raise errors.Stopped(f"stopped by {stop.signal_name or 'another process'} after epoch {epoch}: {saved}")
        checkpoint.close(manager)
        manager = None
        last = checkpoint.committed_steps(run_dir.resolve() / checkpoint.CHECKPOINTS)
        say(report.closing(history, curve, run_dir=run_dir, last_checkpoint=run_dir / checkpoint.CHECKPOINTS / str(last[0]) if last else None,
                           wall_s=time.perf_counter() - started, start_epoch=start_epoch), flush=True)
    except OSError as error:  # writing the run directory: one line that says what is intact
        if isinstance(error, errors.StorageError):
            raise
        raise errors.StorageError(f"{errors.describe(error)}; {_intact(cfg)}") from error
    finally:
        checkpoint.close(manager)  # waits for an async save to be committed
        setup.logger.close()
        setup.reward.close()
    return history


def timed_epoch(setup: Setup, state: TrainState) -> tuple[TrainState, dict[str, float], EpochSamples]:
    """`run_epoch` plus its perf/ metrics."""
    start = time.perf_counter()
    state, metrics, samples = run_epoch(setup, state)
    elapsed = time.perf_counter() - start
    samples_per_epoch = setup.cfg.sample.batch_size * setup.cfg.sample.num_batches_per_epoch
    metrics.update({"perf/epoch_s": elapsed, "perf/samples_per_s": samples_per_epoch / elapsed, "train/learning_rate": setup.cfg.train.learning_rate})
    return state, metrics, samples


class Evaluator:
    """Fixed prompts × fixed seeds rendered with the current policy (each seed the same noise every
    time, so evaluations differ only by the policy), scored, logged as eval/, drawn as a grid."""

    def __init__(self, setup: Setup):
        from herd_jax.evaluate import make_render

        self.setup = setup
        self.prompts, embeds = setup.eval_prompts
        self.frozen = {"vae": setup.frozen.vae, "prompt_embeds": embeds, "uncond": setup.frozen.uncond}
        self.seeds = list(range(setup.cfg.eval.seeds))
        self.render = make_render(setup.policy)

    def run(self, state: TrainState, curve: Any, epochs_done: int) -> None:
        from herd_jax import report
        from herd_jax.evaluate import Model, evaluate_model

        setup = self.setup
        params = setup.steps.unet_params(state.params, setup.frozen.base)
        result = evaluate_model(Model("eval", params, epochs_done, None), self.render, setup.reward, self.frozen, self.prompts, self.seeds, setup.cfg.sample.batch_size)
        mean = float(result.scores.mean())
        metrics = {"eval/reward": mean, **{f"eval/prompt/{p}": float(row.mean()) for p, row in zip(self.prompts, result.scores)}}
        setup.logger.log(metrics, step=epochs_done)
        captions = [f"{p} | {r:.3f}" for p, row in zip(self.prompts, result.scores) for r in row]
        setup.logger.log_images("eval/images", result.images.reshape(-1, *result.images.shape[2:]), captions, step=epochs_done)
        curve.add_eval(epochs_done, float(jax.device_get(state.reward_queries)), mean)
        if parallel.is_main_process():
            path = report.grid_path(pathlib.Path(setup.cfg.run_dir), epochs_done)
            report.sample_grid(result.images, self.prompts, result.scores, path, f"after {epochs_done} epochs: eval reward {mean:.4f}")


def _intact(cfg: config_lib.Config) -> str:
    root = pathlib.Path(cfg.run_dir).resolve() / checkpoint.CHECKPOINTS
    steps = checkpoint.committed_steps(root)
    return f"the last checkpoint, {root / str(steps[0])}, is intact" if steps else "no checkpoint was saved"


def log_image_grid(setup: Setup, samples: EpochSamples, epoch: int, max_images: int = 16) -> None:
    n = min(max_images, len(samples.rewards))
    captions = [f"{setup.prompts[i]} | {r:.3f}" for i, r in zip(samples.prompt_ids[:n], samples.rewards[:n])]
    setup.logger.log_images("rollout/images", np.asarray(samples.images[:n]), captions, step=epoch)


def summary_line(epoch: int, m: dict[str, float]) -> str:
    """One line per epoch; the ratio diagnostics only where the algorithm's loss logs them."""
    ratio = "".join(f" | {name} {m[f'train/{name}']:{fmt}}" for name, fmt in (("approx_kl", ".2e"), ("clipfrac", ".3f")) if f"train/{name}" in m)
    return (
        f"epoch {epoch:4d} | reward {m['reward/mean']:+.4f} ± {m['reward/std']:.4f} | loss {m['train/loss']:+.3e}"
        f"{ratio} | {m['perf/samples_per_s']:.2f} samples/s"
    )
