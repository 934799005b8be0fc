"""HERD: DDPO updates fed by a replay buffer with hindsight relabeling of prompts.

A trajectory sampled for prompt c that produced image x₀ is stored again under another goal c′
with reward r(x₀, c′) re-scored by the reward model (a real reward query, counted as one). The
update batch is the fresh trajectories plus `replay_ratio`× as many drawn from the buffer (which
holds the hindsight copies and the fresh trajectories of the last `keep_epochs` epochs).

Goal strategies for c′:
  sentence  one sentence of a multi-sentence prompt (the original's); never empty, never c itself;
            a prompt with a single sentence gets no copy.
  best      the candidate goal with the highest reward on x₀, among `best_candidates` goals drawn
            from the prompt set (each candidate scored: `best_candidates` queries per copy).
  random    a uniformly random other goal from the prompt set.

Off-policy correction:
  recompute  (default) before each update the replayed trajectories' log π_old(x_{t-1} | x_t, c′)
             is re-evaluated under the current params and their (possibly new) goal, so every
             clipped ratio starts at 1 — for this epoch's copies that is exactly "recompute at
             relabel time"; for items kept from older epochs it also refreshes the stale policy.
  behaviour  keep the log-probs recorded at sampling time under c, as the original did.

What the original HERD code got wrong, and we fix: per-prompt advantage normalisation and
relabeling could not be combined (here the stat tracker is keyed by goal id over prompts and
hindsight goals, and relabeled rewards enter it like any other), and relabeled rewards were not
counted as reward queries.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from herd_jax import replay
from herd_jax.diffusion import Policy

STRATEGIES = ("sentence", "best", "random")
CORRECTIONS = ("recompute", "behaviour")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def sentences(prompt: str) -> list[str]:
    """The sentences of a prompt (split after . ! ? ;), stripped, non-empty, each different from it."""
    parts = [p.strip().rstrip(".!?;").strip() for p in _SENTENCE_END.split(prompt.strip())]
    whole = prompt.strip().rstrip(".!?;").strip()
    return [p for p in dict.fromkeys(parts) if p and p != whole]


def build_goals(prompts: Sequence[str], strategy: str) -> tuple[list[str], list[list[int]]]:
    """The run's goal list (the prompts, then any new sentence goals) and each prompt's sentence goal ids."""
    goals = list(prompts)
    index = {g: i for i, g in enumerate(goals)}
    sentence_ids: list[list[int]] = []
    for prompt in prompts:
        ids = []
        if strategy == "sentence":
            for s in sentences(prompt):
                if s not in index:
                    index[s] = len(goals)
                    goals.append(s)
                ids.append(index[s])
        sentence_ids.append(ids)
    return goals, sentence_ids


def choose_goals(
    rng: np.random.Generator,
    prompt_ids: np.ndarray,
    images: np.ndarray,
    *,
    strategy: str,
    copies: int,
    num_prompts: int,
    sentence_ids: list[list[int]],
    best_candidates: int,
    score: Callable[[np.ndarray, list[int]], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Picks hindsight goals for `copies` copies of each trajectory and scores them.

    Args:
      rng: host RNG (seeded from the epoch key, so resumes repeat the same choices).
      prompt_ids: int32[B] goal ids the trajectories were sampled for.
      images: uint8[B, H, W, 3] their final images.
      score: score(images[K], goal_ids[K]) -> f32[K], one reward query per image.
    Returns:
      (goal ids int32[B*copies], rewards f32[B*copies], valid bool[B*copies], reward queries made).
      Copy k of trajectory i is row k*B + i.
    """
    batch = len(prompt_ids)
    goals = np.zeros((copies, batch), np.int32)
    valid = np.ones((copies, batch), bool)
    rewards = np.zeros((copies, batch), np.float32)
    if strategy == "sentence":
        for k in range(copies):
            for i, pid in enumerate(prompt_ids):
                options = sentence_ids[pid]
                valid[k, i] = bool(options)
                goals[k, i] = rng.choice(options) if options else pid
    elif strategy in ("random", "best"):
        if num_prompts < 2:
            valid[:] = False
            goals[:] = prompt_ids
        else:
            n = 1 if strategy == "random" else best_candidates
            # Candidates: other prompts, drawn without replacement per copy.
            offsets = np.stack([rng.permutation(num_prompts - 1)[: min(n, num_prompts - 1)] + 1 for _ in range(copies * batch)])
            candidates = (np.tile(prompt_ids, copies)[:, None] + offsets) % num_prompts  # [copies*B, n]
            if strategy == "random":
                goals = candidates[:, 0].reshape(copies, batch)
            else:
                flat_images = np.repeat(np.tile(images, (copies, 1, 1, 1)), candidates.shape[1], axis=0)
                scores = score(flat_images, candidates.reshape(-1).tolist()).reshape(candidates.shape)
                best = np.argmax(scores, axis=1)
                goals = np.take_along_axis(candidates, best[:, None], axis=1)[:, 0].reshape(copies, batch)
                rewards = np.take_along_axis(scores, best[:, None], axis=1)[:, 0].reshape(copies, batch)
                return goals.reshape(-1), rewards.reshape(-1).astype(np.float32), valid.reshape(-1), scores.size
    else:
        raise ValueError(f"unknown goal strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    flat_goals, flat_valid = goals.reshape(-1), valid.reshape(-1)
    queries = 0
    if flat_valid.any():
        rows = np.flatnonzero(flat_valid)
        tiled = np.tile(images, (copies, 1, 1, 1))
        scored = score(tiled[rows], flat_goals[rows].tolist())
        rewards = rewards.reshape(-1)
        rewards[rows] = scored
        queries = len(rows)
    return flat_goals, rewards.reshape(-1).astype(np.float32), flat_valid, queries


def trajectory_item(latents: jax.Array, log_probs: jax.Array, prompt_ids: jax.Array, embeds: jax.Array, rewards: jax.Array) -> dict[str, jax.Array]:
    """The replay item layout: one trajectory with its goal."""
    return {"latents": latents, "log_probs": log_probs, "prompt_id": prompt_ids, "prompt_embeds": embeds, "reward": rewards}


def replay_step(
    policy: Policy,
    buffer: replay.ReplayBuffer,
    params: Any,
    uncond: jax.Array,
    fresh: dict[str, jax.Array],
    copy_goals: jax.Array,
    copy_embeds: jax.Array,
    copy_rewards: jax.Array,
    copy_valid: jax.Array,
    epoch: jax.Array,
    key: jax.Array,
    *,
    copies: int,
    keep_epochs: int,
    num_replay: int,
    recompute: bool,
) -> tuple[replay.ReplayBuffer, dict[str, jax.Array], jax.Array]:
    """Stores this epoch's hindsight copies, expires old items, and draws the replay part of the batch.

    Returns:
      (buffer, replayed items [num_replay], replayed-valid bool[num_replay]). The fresh trajectories
      are added after the update (`store_fresh`), so a batch never holds a fresh item twice.
    """
    tiled = jax.tree.map(lambda x: jnp.concatenate([x] * copies), fresh)
    relabeled = replay.relabel(tiled, prompt_id=copy_goals, prompt_embeds=copy_embeds, reward=copy_rewards)
    buffer = replay.add(buffer, relabeled, epoch=epoch, original_prompt_id=tiled["prompt_id"], relabeled=True, mask=copy_valid)
    buffer = replay.expire(buffer, current_epoch=epoch, keep_epochs=keep_epochs)
    items, info = replay.sample(buffer, key, num_replay)
    if recompute:
        items = dict(items, log_probs=policy.trajectory_log_probs(params, items["latents"], items["prompt_embeds"], uncond))
    return buffer, items, info["valid"]


def store_fresh(buffer: replay.ReplayBuffer, fresh: dict[str, jax.Array], epoch: jax.Array) -> replay.ReplayBuffer:
    return replay.add(buffer, fresh, epoch=epoch, original_prompt_id=fresh["prompt_id"], relabeled=False)
