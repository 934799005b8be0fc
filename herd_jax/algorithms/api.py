"""The algorithm interface: an `Algorithm` of pure functions plus a state pytree, optax style.

Every RL algorithm is a `make(ctx) -> Algorithm` in its own module, registered by name
(herd_jax/algorithms/__init__.py). The trainer owns the side effects (sampling, reward queries,
checkpoints) and threads the algorithm's state, a pytree in `TrainState.algorithm`, through the
pure functions below. One epoch, as the trainer calls them:

    ids       = alg.prompts(key, n)                            prompt (goal) id of each sample
    sampler   = alg.behaviour(key, params, pretrained)         which UNet params sample
    fresh     = rollouts of `sampler` + their rewards          Experience[N]     (the trainer)
    queries   = alg.queries(state, fresh.goal, key)            extra (image, goal) pairs to score
    answers   = the reward of each query                       f32[M]            (the trainer)
    batch, state, stats, info = alg.prepare(state, stats, fresh, answers, params, frozen, key)
    params    = update(params, batch)                          alg.loss inside the shared update
    state     = alg.finish(state, fresh, epoch)

`prepare`, `finish` and `queries` are jitted by the trainer (the state is donated to them), so
they must be pure functions of their arguments with static shapes. An algorithm that needs
nothing leaves the defaults: uniform prompts, on-policy sampling, no queries, nothing after the
update. `update` is for methods whose gradient does not go through the shared per-transition
update (e.g. reward backpropagation through the sampler); None uses herd_jax.train_step.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from herd_jax import stats as stats_lib

Params = Any
State = Any  # an algorithm's state pytree


class Experience(NamedTuple):
    """An epoch's fresh trajectories with their goals and rewards (leading axis: trajectory)."""

    latents: jax.Array  # f32[N, T+1, C, h, w]  x_T (index 0) ... x_0 (index T)
    log_probs: jax.Array  # f32[N, T]  log-prob of each step under the policy that sampled it
    goal: jax.Array  # int32[N]  goal id: index into the run's goals (prompts, then hindsight-only goals)
    cond: jax.Array  # f32[N, L, D]  the goal's text embedding
    reward: jax.Array  # f32[N]


class Batch(NamedTuple):
    """What the policy update trains on (leading axis: trajectory)."""

    latents: jax.Array  # f32[B, T+1, C, h, w]
    log_probs: jax.Array  # f32[B, T]  log π_old per step: the ratio's denominator
    cond: jax.Array  # f32[B, L, D]  goal embedding the step is trained under
    advantages: jax.Array  # f32[B, T]  per step (DDPO: the trajectory's, on every step; DPOK: r̂ − V(x_t))
    weights: jax.Array  # f32[B]  1 for a real trajectory, 0 for padding (an empty replay slot)


class Transition(NamedTuple):
    """One timestep of a minibatch of trajectories: what a loss sees."""

    x_t: jax.Array  # f32[b, C, h, w]
    x_prev: jax.Array  # f32[b, C, h, w]
    t: jax.Array  # int32[b]  timestep of x_t
    old_log_prob: jax.Array  # f32[b]
    cond: jax.Array  # f32[b, L, D]
    advantages: jax.Array  # f32[b]
    weights: jax.Array  # f32[b]  0 rows are padding: no gradient, not in the logged means


class Frozen(NamedTuple):
    """What the policy needs besides its trained params; never updated. Replicated, except the
    UNet copies under `parallel.fsdp`; the VAE and UNet copies in `model_options.frozen_dtype`."""

    vae: Params
    goal_embeds: jax.Array  # f32[G, L, D]  text embedding of every goal id
    uncond: jax.Array  # f32[1, L, D]  the negative prompt's embedding
    base: Params | None  # the pretrained UNet under LoRA adapters (train.trainable=lora)
    pretrained: Params | None  # the frozen pretrained UNet (algorithms with `needs_pretrained`)


class Queries(NamedTuple):
    """Reward queries an algorithm asks for: image of fresh trajectory `row` under goal `goal`."""

    row: jax.Array  # int32[M]
    goal: jax.Array  # int32[M]
    valid: bool | jax.Array  # bool[M]  False rows are not scored (and cost nothing)


# loss(params, frozen, transition) -> (scalar loss, info); `params` are the UNet's. The loss and
# info are (weighted) means over the transition's rows: the update may stack several timesteps of
# the same samples into one transition (train.timestep_batch) and count it as that many timesteps.
LossFn = Callable[[Params, Frozen, Transition], tuple[jax.Array, dict[str, jax.Array]]]


class Context(NamedTuple):
    """What `make` gets: the run's config and the fixed facts of the run."""

    cfg: Any  # herd_jax.config.Config
    policy: Any  # herd_jax.diffusion.Policy
    prompts: tuple[str, ...]  # goal ids 0..P-1 are these (an algorithm may add goals: `extra_goals`)
    samples_per_epoch: int
    item: Experience  # ShapeDtypeStructs of one epoch's Experience (for buffers)


def uniform_prompts(num_prompts: int) -> Callable[[jax.Array, int], jax.Array]:
    """Each sample's prompt drawn uniformly from the prompt set."""
    return lambda key, n: jax.random.randint(key, (n,), 0, num_prompts, jnp.int32)


def on_policy(key: jax.Array, params: Params, pretrained: Params | None) -> tuple[Params, dict[str, Any]]:
    del key, pretrained
    return params, {}


def no_queries(state: State, goal: jax.Array, key: jax.Array) -> Queries:
    del state, key
    empty = jnp.zeros((0,), jnp.int32)
    return Queries(empty, empty, jnp.zeros((0,), bool))


def nothing_after(state: State, fresh: Experience, epoch: jax.Array) -> State:
    del fresh, epoch
    return state


def replicated(state: State, mesh: jax.sharding.Mesh) -> Any:
    from herd_jax import parallel

    return jax.tree.map(lambda _: parallel.replicated(mesh), state)


class Algorithm(NamedTuple):
    """One RL algorithm: pure functions over its state pytree (see the module docstring)."""

    init: Callable[[], State]  # the initial state (jitted with its shardings as out_shardings)
    loss: LossFn
    prepare: Callable[..., tuple[Batch, State, stats_lib.PromptStats, dict[str, jax.Array]]]
    prompts: Callable[[jax.Array, int], jax.Array]  # (key, n) -> int32[n] prompt ids of an epoch's samples
    behaviour: Callable[[jax.Array, Params, Params | None], tuple[Params, dict[str, Any]]] = on_policy
    queries: Callable[[State, jax.Array, jax.Array], Queries] = no_queries
    finish: Callable[[State, Experience, jax.Array], State] = nothing_after
    shardings: Callable[[State, jax.sharding.Mesh], Any] = replicated  # of the state
    needs_pretrained: bool = False  # keep a frozen copy of the pretrained UNet in `Frozen.pretrained`
    extra_goals: tuple[str, ...] = ()  # goals that are not prompts (herd's sentence goals)
    update: Callable[..., Any] | None = None  # replaces the shared per-transition update
    noise_group: int = 1  # consecutive rollout rows sharing one initial latent x_T (diffusion.Policy.noise_group)


def normalised_advantages(
    stats: stats_lib.PromptStats, goal: jax.Array, reward: jax.Array, valid: jax.Array, *, train: Any, num_steps: int
) -> jax.Array:
    """DDPO's advantages as f32[N, T]: per-goal normalised rewards (train.per_prompt_stats,
    stats_min_count), clipped to ±train.adv_clip, the same on every step; 0 on invalid rows."""
    advantages = stats_lib.advantages(stats, goal, reward, min_count=train.stats_min_count, per_prompt=train.per_prompt_stats, valid=valid)
    advantages = jnp.clip(advantages, -train.adv_clip, train.adv_clip) * valid
    return jnp.broadcast_to(advantages[:, None], (goal.shape[0], num_steps))


def fresh_batch(fresh: Experience, advantages: jax.Array) -> Batch:
    """The fresh trajectories as an update batch with the given per-step advantages."""
    return Batch(fresh.latents, fresh.log_probs, fresh.cond, advantages, jnp.ones(fresh.reward.shape, jnp.float32))
