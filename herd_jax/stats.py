"""Per-prompt reward statistics as a pure pytree, and DDPO's advantage normalisation.

DDPO normalises rewards per prompt over a rolling window of that prompt's past rewards,
falling back to the batch mean/std until a prompt has `min_count` samples. Prompts are
integer ids into the run's goal list (the prompt set plus, for herd, hindsight goals), so
the tracker is a fixed-shape array pytree: jit-able, shardable and saved in the TrainState.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

STD_EPS = 1e-6


class PromptStats(NamedTuple):
    """Rolling window of rewards per prompt id."""

    rewards: jax.Array  # f32[num_prompts, window]   ring buffer per prompt
    count: jax.Array  # int32[num_prompts]          rewards ever added per prompt


def init(num_prompts: int, window: int) -> PromptStats:
    return PromptStats(
        rewards=jnp.zeros((num_prompts, window), jnp.float32),
        count=jnp.zeros((num_prompts,), jnp.int32),
    )


def write_positions(stats: PromptStats, prompt_ids: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row int32[B], slot int32[B]) each entry is written to; row = num_prompts (out of bounds,
    dropped) for entries not written: invalid ones, and all but the last `window` entries of a
    prompt that appears more often than that in the batch. Written (row, slot) pairs are
    distinct, so the scatter has no colliding writes (whose order XLA leaves undefined on GPU/TPU)."""
    same = (prompt_ids[:, None] == prompt_ids[None, :]) & valid[None, :]
    rank = jnp.sum(jnp.tril(same, k=-1), axis=1)  # earlier valid entries of the same prompt in this batch
    total = jnp.sum(same, axis=1)  # valid entries of the same prompt in this batch
    window = stats.rewards.shape[1]
    slot = (stats.count[prompt_ids] + rank) % window
    written = valid & (rank >= total - window)
    return jnp.where(written, prompt_ids, stats.rewards.shape[0]), slot


def update(stats: PromptStats, prompt_ids: jax.Array, rewards: jax.Array, valid: jax.Array | None = None) -> PromptStats:
    """Appends `rewards` [B] to the windows of `prompt_ids` [B]; entries with valid=False are
    skipped; of more than `window` entries of one prompt only the last `window` are kept."""
    valid = jnp.ones(prompt_ids.shape, bool) if valid is None else valid
    row, slot = write_positions(stats, prompt_ids, valid)
    new_rewards = stats.rewards.at[row, slot].set(rewards.astype(jnp.float32), mode="drop")
    new_count = stats.count.at[jnp.where(valid, prompt_ids, stats.rewards.shape[0])].add(1, mode="drop")
    return PromptStats(new_rewards, new_count)


def advantages(
    stats: PromptStats,
    prompt_ids: jax.Array,
    rewards: jax.Array,
    *,
    min_count: int,
    per_prompt: bool = True,
    valid: jax.Array | None = None,
) -> jax.Array:
    """(r − mean) / (std + 1e-6), per prompt once it has `min_count` rewards, else over the batch.

    Call with the stats *after* `update` with the same batch, as DDPO does.
    """
    valid = jnp.ones(prompt_ids.shape, bool) if valid is None else valid
    weight = valid.astype(jnp.float32)
    n = jnp.maximum(weight.sum(), 1.0)
    batch_mean = jnp.sum(rewards * weight) / n
    batch_std = jnp.sqrt(jnp.sum(weight * (rewards - batch_mean) ** 2) / n)
    if not per_prompt:
        return (rewards - batch_mean) / (batch_std + STD_EPS)
    window = stats.rewards.shape[1]
    filled = jnp.minimum(stats.count, window)  # [P]
    mask = jnp.arange(window)[None, :] < filled[:, None]  # [P, W]
    k = jnp.maximum(filled, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, stats.rewards, 0.0), axis=1) / k
    std = jnp.sqrt(jnp.sum(jnp.where(mask, (stats.rewards - mean[:, None]) ** 2, 0.0), axis=1) / k)
    enough = stats.count[prompt_ids] >= min_count
    mean = jnp.where(enough, mean[prompt_ids], batch_mean)
    std = jnp.where(enough, std[prompt_ids], batch_std)
    return (rewards - mean) / (std + STD_EPS)
