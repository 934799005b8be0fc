"""The policy update shared by all algorithms: inner epochs × minibatches × accumulated timesteps.

For one batch of trajectories, each inner epoch shuffles the samples and, per sample, the
timesteps; splits the batch into minibatches; and for each minibatch accumulates the gradient
of the algorithm's per-transition loss over the first `num_train_timesteps` shuffled timesteps
(a `lax.scan`, so memory does not grow with T) before one optax update. Everything is one
jitted function of (params, opt_state, batch, key): one dispatch per sampled batch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from herd_jax.parallel import DATA_AXIS

Params = Any


class TrainBatch(NamedTuple):
    """Trajectories prepared for training (leading axis: sample)."""

    latents: jax.Array  # f32[B, T+1, C, h, w]
    log_probs: jax.Array  # f32[B, T]   behaviour-policy log-probs
    cond: jax.Array  # f32[B, L, D] prompt embeddings
    advantages: jax.Array  # f32[B]
    rewards: jax.Array  # f32[B]      raw rewards (for value baselines)


class Transition(NamedTuple):
    """One timestep of a minibatch of trajectories."""

    x_t: jax.Array  # f32[b, C, h, w]
    x_prev: jax.Array  # f32[b, C, h, w]
    t: jax.Array  # int32[b]
    step_index: jax.Array  # int32[b]  index into the sampling schedule (0 = first step)
    old_log_prob: jax.Array  # f32[b]
    cond: jax.Array  # f32[b, L, D]
    advantages: jax.Array  # f32[b]
    rewards: jax.Array  # f32[b]


# loss_fn(params, aux, transition) -> (loss, info); `aux` holds non-trained inputs (e.g. frozen params).
LossFn = Callable[[Params, Any, Transition], tuple[jax.Array, dict[str, jax.Array]]]


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    max_grad_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping, as DDPO trains."""
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def _transitions(batch: TrainBatch, timesteps: jax.Array, time_perm: jax.Array, j: jax.Array) -> Transition:
    """The j-th shuffled timestep of each sample; time_perm is int32[b, T]."""
    idx = time_perm[:, j]
    rows = jnp.arange(idx.shape[0])
    return Transition(
        x_t=batch.latents[rows, idx],
        x_prev=batch.latents[rows, idx + 1],
        t=timesteps[idx],
        step_index=idx,
        old_log_prob=batch.log_probs[rows, idx],
        cond=batch.cond,
        advantages=batch.advantages,
        rewards=batch.rewards,
    )


def train_on_batch(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    opt_state: optax.OptState,
    aux: Any,
    batch: TrainBatch,
    timesteps: jax.Array,
    key: jax.Array,
    *,
    num_inner_epochs: int,
    minibatch_size: int,
    num_train_timesteps: int,
    mesh: Mesh | None = None,
) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """Runs the inner epochs of updates on one batch; returns new params, opt state and mean info.

    Pure and jit-able (all sizes are static). `timesteps` is the sampling schedule, int32[T].
    """
    num_samples, num_steps = batch.log_probs.shape
    if num_samples % minibatch_size:
        raise ValueError(f"batch of {num_samples} samples is not a multiple of the train batch size {minibatch_size}")
    num_minibatches = num_samples // minibatch_size

    def constrain(x):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, DATA_AXIS)))

    def minibatch_update(carry, minibatch_and_perm):
        params, opt_state = carry
        minibatch, time_perm = minibatch_and_perm

        def accumulate(grads, j):
            transition = _transitions(minibatch, timesteps, time_perm, j)
            (loss, info), g = jax.value_and_grad(loss_fn, has_aux=True)(params, aux, transition)
            info = dict(info, loss=loss)
            return jax.tree.map(jnp.add, grads, g), info

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, infos = jax.lax.scan(accumulate, zeros, jnp.arange(num_train_timesteps))
        grads = jax.tree.map(lambda g: g / num_train_timesteps, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        info = jax.tree.map(jnp.mean, infos)
        info["grad_norm"] = optax.tree.norm(grads)
        return (params, opt_state), info

    def inner_epoch(carry, key):
        sample_key, time_key = jax.random.split(key)
        order = jax.random.permutation(sample_key, num_samples)
        time_perm = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(jax.random.split(time_key, num_samples))
        split = lambda x: constrain(x[order].reshape(num_minibatches, minibatch_size, *x.shape[1:]))
        minibatches = jax.tree.map(split, batch)
        carry, info = jax.lax.scan(minibatch_update, carry, (minibatches, split(time_perm)))
        return carry, info

    (params, opt_state), infos = jax.lax.scan(
        inner_epoch, (params, opt_state), jax.random.split(key, num_inner_epochs)
    )
    return params, opt_state, jax.tree.map(jnp.mean, infos)
