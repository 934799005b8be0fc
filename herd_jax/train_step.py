"""The policy update shared by all algorithms: inner epochs × minibatches × accumulated timesteps.

For one batch of trajectories, each inner epoch shuffles the samples and, per sample, the
timesteps; splits the batch into minibatches; and for each minibatch accumulates the gradient
of the algorithm's per-transition loss over the first `num_train_timesteps` shuffled timesteps
(a `lax.scan`, so memory does not grow with T) before one optax update. Everything is one
jitted function of (params, opt_state, batch, key): one dispatch per sampled batch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from herd_jax.algorithms import api
from herd_jax.algorithms.api import Batch
from herd_jax.parallel import DATA_AXIS

Params = Any


# loss(params, frozen, transition) -> (loss, info); `frozen` (api.Frozen) holds what is not trained.
LossFn = api.LossFn


class UpdateShardings(NamedTuple):
    """Where the update's state lives: pytrees of NamedShardings (herd_jax.parallel.param_shardings)."""

    params: Any  # of the trainable params, and of their gradients
    opt_state: Any
    frozen: Any  # of the api.Frozen argument


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


def _transitions(batch: Batch, timesteps: jax.Array, time_perm: jax.Array, j: jax.Array, count: int = 1) -> api.Transition:
    """The shuffled timesteps j·count … j·count + count − 1 of each sample, stacked along the batch
    axis sample-major (so a batch split over devices stays split the same way): [b·count, ...].
    time_perm is int32[b, T]."""
    idx = jax.lax.dynamic_slice_in_dim(time_perm, j * count, count, axis=1)  # [b, count]
    rows = jnp.arange(idx.shape[0])[:, None]
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    repeat = lambda x: jnp.repeat(x, count, axis=0)
    return api.Transition(
        x_t=flat(batch.latents[rows, idx]),
        x_prev=flat(batch.latents[rows, idx + 1]),
        t=flat(timesteps[idx]),
        old_log_prob=flat(batch.log_probs[rows, idx]),
        cond=repeat(batch.cond),
        advantages=flat(batch.advantages[rows, idx]),
        weights=repeat(batch.weights),
    )


def timestep_chunk(num_train_timesteps: int, timestep_batch: int) -> int:
    """How many timesteps one gradient call stacks: the largest divisor of `num_train_timesteps`
    not above `timestep_batch` (so every call has the same shape)."""
    return max(d for d in range(1, min(num_train_timesteps, timestep_batch) + 1) if num_train_timesteps % d == 0)


def _summed(loss_fn: LossFn, count: int) -> LossFn:
    """`loss_fn` on `count` stacked timesteps, as the sum of their per-timestep losses.

    The loss is a (weighted) mean over the transition's rows, with the same weights at every
    timestep, so count × the mean over stacked rows is the sum of the per-timestep means: the
    accumulated gradient is the same whether timesteps are stacked or not. info["loss"] is the mean.
    """

    def loss(params, frozen, transition):
        value, info = loss_fn(params, frozen, transition)
        return count * value, dict(info, loss=value)

    return loss


def _shuffle(batch: Batch, key: jax.Array, minibatch_size: int) -> tuple[Batch, jax.Array]:
    """One inner epoch's order: samples shuffled and split into minibatches [M, b, ...], and a
    per-sample permutation of the timesteps [M, b, T]."""
    num_samples, num_steps = batch.log_probs.shape
    sample_key, time_key = jax.random.split(key)
    order = jax.random.permutation(sample_key, num_samples)
    time_perm = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(jax.random.split(time_key, num_samples))
    split = lambda x: x[order].reshape(num_samples // minibatch_size, minibatch_size, *x.shape[1:])
    return jax.tree.map(split, batch), split(time_perm)


def train_on_batch(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    opt_state: optax.OptState,
    frozen: api.Frozen,
    batch: Batch,
    timesteps: jax.Array,
    key: jax.Array,
    *,
    num_inner_epochs: int,
    minibatch_size: int,
    num_train_timesteps: int,
    timestep_batch: int = 1,
    mesh: Mesh | None = None,
    grad_shardings: Any = None,
) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """Runs the inner epochs of updates on one batch; returns new params, opt state and mean info.

    Pure and jit-able (all sizes are static). `timesteps` is the sampling schedule, int32[T].
    `grad_shardings` (the params' shardings) pins the accumulated gradient, so under FSDP it
    stays sharded like the params instead of being replicated on every device. Each gradient
    call covers `timestep_chunk(num_train_timesteps, timestep_batch)` timesteps stacked.
    """
    num_samples = batch.log_probs.shape[0]
    chunk = timestep_chunk(num_train_timesteps, timestep_batch)
    summed = _summed(loss_fn, chunk)
    if num_samples % minibatch_size:
        raise ValueError(f"batch of {num_samples} samples is not a multiple of the train batch size {minibatch_size}")

    def constrain(x):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, DATA_AXIS)))

    def pin(grads):
        return grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)

    def in_loop(params, frozen, j):
        # FSDP: a weight's all-gather depends only on the (loop-invariant) sharded params, so XLA
        # hoists every gather out of the timestep loop and keeps the whole gathered UNet resident
        # (3.2 GiB fp32 for SD v1.5, and again for a sharded frozen copy). Threading them through a
        # barrier with the loop index makes them loop-variant: each weight is gathered where a
        # layer uses it, then dropped. (The UNet pins its activations to the batch split, so the
        # partitioner gathers weights rather than replicating activations.)
        if mesh is None or grad_shardings is None:
            return params, frozen
        params, base, pretrained, _ = jax.lax.optimization_barrier((params, frozen.base, frozen.pretrained, j))
        return params, frozen._replace(base=base, pretrained=pretrained)

    def split(transition):
        if mesh is None:
            return transition
        at = NamedSharding(mesh, P(DATA_AXIS))
        n = mesh.shape[DATA_AXIS]
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, at) if x.ndim and x.shape[0] % n == 0 else x, transition)

    def minibatch_update(carry, minibatch_and_perm):
        params, opt_state = carry
        minibatch, time_perm = minibatch_and_perm

        def accumulate(grads, j):
            transition = split(_transitions(minibatch, timesteps, time_perm, j, chunk))
            (_, info), g = jax.value_and_grad(summed, has_aux=True)(*in_loop(params, frozen, j), transition)
            return pin(jax.tree.map(jnp.add, grads, g)), info

        zeros = pin(jax.tree.map(jnp.zeros_like, params))
        grads, infos = jax.lax.scan(accumulate, zeros, jnp.arange(num_train_timesteps // chunk))
        grads = jax.tree.map(lambda g: g / num_train_timesteps, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        info = jax.tree.map(jnp.mean, infos)
        info["grad_norm"] = optax.tree.norm(grads)
        return (params, opt_state), info

    def inner_epoch(carry, key):
        minibatches, time_perms = constrain(_shuffle(batch, key, minibatch_size))
        carry, info = jax.lax.scan(minibatch_update, carry, (minibatches, time_perms))
        return carry, info

    (params, opt_state), infos = jax.lax.scan(
        inner_epoch, (params, opt_state), jax.random.split(key, num_inner_epochs)
    )
    return params, opt_state, jax.tree.map(jnp.mean, infos)


class HostLoopUpdate:
    """`train_on_batch` with its three loops run from Python: one jitted gradient step per timestep.

    Why: on XLA:CPU (jaxlib 0.10.2) the UNet's gradient convolutions inside a while loop (what
    `lax.scan` lowers to) are not rewritten into YNNPACK fusions and run 4-6x slower than the same
    gradient outside a loop (bench/throughput.py). Same keys, permutations and arithmetic as
    `train_on_batch`; results agree up to float summation order. Nothing crosses to the host but
    the dispatches: the accumulated gradient is donated from step to step. `shardings` (with a
    `mesh`) says where params, gradients and optimizer state live; default replicated.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        *,
        num_inner_epochs: int,
        minibatch_size: int,
        num_train_timesteps: int,
        timestep_batch: int = 1,
        mesh: Mesh | None = None,
        shardings: UpdateShardings | None = None,
    ):
        self.num_inner_epochs, self.minibatch_size = num_inner_epochs, minibatch_size
        chunk = timestep_chunk(num_train_timesteps, timestep_batch)
        self.num_calls = num_train_timesteps // chunk  # gradient calls per minibatch
        summed = _summed(loss_fn, chunk)

        def prepare(batch: Batch, key: jax.Array):
            out = jax.vmap(lambda k: _shuffle(batch, k, minibatch_size))(jax.random.split(key, num_inner_epochs))
            if mesh is not None:  # [epoch, minibatch, sample, ...]: samples over `data`
                out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(None, None, DATA_AXIS)))
            return out

        def accumulate(grads, params, frozen, minibatches, time_perms, timesteps, e, m, j):
            minibatch = jax.tree.map(lambda x: x[e, m], minibatches)
            transition = _transitions(minibatch, timesteps, time_perms[e, m], j, chunk)
            (_, info), g = jax.value_and_grad(summed, has_aux=True)(params, frozen, transition)
            return jax.tree.map(jnp.add, grads, g), info

        def apply(params, opt_state, grads):
            grads = jax.tree.map(lambda g: g / num_train_timesteps, grads)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

        replicated = None if mesh is None else NamedSharding(mesh, P())
        params_at, opt_at = (replicated, replicated) if shardings is None else (shardings.params, shardings.opt_state)
        self.jitted = {
            "prepare": jax.jit(prepare),
            "accumulate": jax.jit(accumulate, donate_argnums=0, out_shardings=(params_at, replicated)),
            "apply": jax.jit(apply, donate_argnums=(0, 1), out_shardings=(params_at, opt_at, replicated)),
            "zeros": jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree), out_shardings=params_at),
            "mean": jax.jit(lambda infos: jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *infos)),
        }

    def __call__(self, params, opt_state, frozen: api.Frozen, batch: Batch, timesteps: jax.Array, key: jax.Array):
        f = self.jitted
        if batch.log_probs.shape[0] % self.minibatch_size:
            raise ValueError(f"batch of {batch.log_probs.shape[0]} samples is not a multiple of the train batch size {self.minibatch_size}")
        minibatches, time_perms = f["prepare"](batch, key)
        infos = []
        for e in range(self.num_inner_epochs):
            for m in range(batch.log_probs.shape[0] // self.minibatch_size):
                grads, step_infos = f["zeros"](params), []
                for j in range(self.num_calls):
                    grads, info = f["accumulate"](grads, params, frozen, minibatches, time_perms, timesteps, e, m, j)
                    step_infos.append(info)
                params, opt_state, grad_norm = f["apply"](params, opt_state, grads)
                infos.append(dict(f["mean"](step_infos), grad_norm=grad_norm))
        return params, opt_state, f["mean"](infos)
