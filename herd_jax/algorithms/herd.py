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

import dataclasses
import re
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from herd_jax import replay
from herd_jax import stats as stats_lib
from herd_jax.algorithms import api, ddpo
from herd_jax.errors import ConfigError

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


@dataclasses.dataclass
class HerdConfig:
    """`herd`: DDPO updates fed by a replay buffer of fresh trajectories plus hindsight copies."""

    goal_strategy: Literal["sentence", "best", "random"] = "best"  # how a copy's new goal c' is chosen
    copies: int = 1  # hindsight copies per fresh trajectory
    best_candidates: int = 8  # `best`: candidate goals scored per image (reward queries each)
    capacity: int = 256  # buffer size in trajectories
    keep_epochs: int = 1  # iterations the buffer keeps (the original kept 1; its paper's "b2" kept 2)
    replay_ratio: float = 1.0  # replayed samples per fresh sample in each update batch
    correction: Literal["recompute", "behaviour"] = "recompute"  # recompute: log π_old re-evaluated under c' (ratio starts at 1); behaviour: keep log π(·|c)

    def validate(self, cfg: Any, num_devices: int) -> None:
        if self.capacity % num_devices:
            raise ConfigError(f"herd.capacity={self.capacity} must be a multiple of the number of devices ({num_devices})")
        for key in ("copies", "best_candidates", "capacity", "keep_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"herd.{key} must be positive, got {getattr(self, key)}")
        samples = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
        replayed = num_replayed(cfg)
        if replayed < 0 or replayed != samples * self.replay_ratio:
            raise ConfigError(f"herd.replay_ratio × samples per epoch ({samples}) must be a whole number ≥ 0, got {self.replay_ratio}")
        if (samples + replayed) % cfg.train.batch_size:
            raise ConfigError(f"fresh + replayed samples ({samples} + {replayed}) must be a multiple of train.batch_size ({cfg.train.batch_size})")


def num_replayed(cfg: Any) -> int:
    """Replayed samples added to each update batch."""
    return int(round(cfg.sample.batch_size * cfg.sample.num_batches_per_epoch * cfg.herd.replay_ratio))


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
    key: jax.Array,
    goal: jax.Array,
    *,
    strategy: str,
    copies: int,
    num_prompts: int,
    sentence_goals: jax.Array,
    sentence_counts: jax.Array,
    best_candidates: int,
) -> api.Queries:
    """The reward queries for `copies` hindsight copies of each trajectory (pure, jit-able).

    Args:
      goal: int32[B] goal ids the trajectories were sampled for.
      sentence_goals: int32[P, S] each prompt's sentence goal ids (padded); sentence_counts int32[P].
    Returns:
      Queries with K = best_candidates (`best`) or 1 candidates per copy: row k*B*K + i*K + j is
      candidate j of copy k of trajectory i (`row` = i).
    """
    batch = goal.shape[0]
    k = best_candidates if strategy == "best" else 1
    rows = jnp.tile(jnp.repeat(jnp.arange(batch, dtype=jnp.int32), k), copies)
    keys = jax.random.split(key, (copies, batch))
    if strategy == "sentence":
        count = sentence_counts[goal]  # [B]
        draw = lambda key, n: jax.random.randint(key, (), 0, jnp.maximum(n, 1))
        pick = jax.vmap(lambda copy_keys: jax.vmap(draw)(copy_keys, count))(keys)  # [copies, B]
        goals = sentence_goals[goal[None, :], pick]  # [copies, B]
        valid = jnp.broadcast_to(count > 0, (copies, batch))
        return api.Queries(rows, goals.reshape(-1).astype(jnp.int32), valid.reshape(-1))
    if strategy not in ("random", "best"):
        raise ValueError(f"unknown goal strategy {strategy!r}")
    others = max(num_prompts - 1, 1)
    k_eff = min(k, others)
    # Candidates: other prompts, drawn without replacement per copy (offsets 1..P-1 from the goal).
    offsets = jax.vmap(jax.vmap(lambda key: jax.random.permutation(key, others)[:k_eff] + 1))(keys)  # [copies, B, k_eff]
    candidates = (goal[None, :, None] + offsets) % num_prompts
    candidates = jnp.concatenate([candidates, jnp.repeat(candidates[..., -1:], k - k_eff, axis=-1)], axis=-1)  # [copies, B, k]
    valid = jnp.broadcast_to(jnp.arange(k) < k_eff, candidates.shape) & (num_prompts > 1)
    return api.Queries(rows, candidates.reshape(-1).astype(jnp.int32), valid.reshape(-1))


def relabeled_copies(queries: api.Queries, answers: jax.Array, *, copies: int, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each copy's goal and reward from the scored candidates: the best-scoring valid one.

    Returns (goal int32[copies*B], reward f32[copies*B], valid bool[copies*B]); row k*B + i is copy
    k of trajectory i.
    """
    shape = (copies * batch, -1)
    goals, scores, valid = queries.goal.reshape(shape), answers.reshape(shape), jnp.asarray(queries.valid).reshape(shape)
    best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=1)
    pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]
    return pick(goals), pick(scores), valid.any(axis=1)


def make(ctx: api.Context) -> api.Algorithm:
    h, train, policy = ctx.cfg.herd, ctx.cfg.train, ctx.policy
    goals, sentence_ids = build_goals(ctx.prompts, h.goal_strategy)
    width = max([len(ids) for ids in sentence_ids] + [1])
    sentence_goals = jnp.asarray(np.array([ids + [0] * (width - len(ids)) for ids in sentence_ids], np.int32).reshape(len(ctx.prompts), width))
    sentence_counts = jnp.asarray([len(ids) for ids in sentence_ids], jnp.int32)
    n, num_replay, num_steps = ctx.samples_per_epoch, num_replayed(ctx.cfg), policy.num_steps
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), ctx.item)

    def queries(state, goal, key):
        del state
        return choose_goals(
            key, goal, strategy=h.goal_strategy, copies=h.copies, num_prompts=len(ctx.prompts),
            sentence_goals=sentence_goals, sentence_counts=sentence_counts, best_candidates=h.best_candidates,
        )

    def prepare(buffer: replay.ReplayBuffer, stats, fresh: api.Experience, queries, answers, params, frozen, epoch, key):
        stats = stats_lib.update(stats, fresh.goal, fresh.reward)
        copy_goal, copy_reward, copy_valid = relabeled_copies(queries, answers, copies=h.copies, batch=n)
        tiled = jax.tree.map(lambda x: jnp.concatenate([x] * h.copies), fresh)
        copies = tiled._replace(goal=copy_goal, cond=frozen.goal_embeds[copy_goal], reward=copy_reward)
        stats = stats_lib.update(stats, copy_goal, copy_reward, copy_valid)
        buffer = replay.add(buffer, copies, epoch=epoch, original_prompt_id=tiled.goal, relabeled=True, mask=copy_valid)
        buffer = replay.expire(buffer, current_epoch=epoch, keep_epochs=h.keep_epochs)
        items, info = replay.sample(buffer, key, num_replay)
        if h.correction == "recompute":
            items = items._replace(log_probs=policy.trajectory_log_probs(params, items.latents, items.cond, frozen.uncond))
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), fresh, items)
        valid = jnp.concatenate([jnp.ones((n,), bool), info["valid"]])
        advantages = api.normalised_advantages(stats, both.goal, both.reward, valid, train=train, num_steps=num_steps)
        batch = api.Batch(both.latents, both.log_probs, both.cond, advantages, valid.astype(jnp.float32))
        metrics = {
            "herd/relabeled_reward": jnp.sum(copy_reward * copy_valid) / jnp.maximum(jnp.sum(copy_valid), 1),
            "herd/replayed_valid": jnp.mean(info["valid"].astype(jnp.float32)),
        }
        return batch, buffer, stats, metrics

    def finish(buffer, fresh: api.Experience, epoch):
        """The fresh trajectories join the buffer after the update, so a batch never holds one twice."""
        return replay.add(buffer, fresh, epoch=epoch, original_prompt_id=fresh.goal, relabeled=False)

    return api.Algorithm(
        init=lambda: replay.init(item, h.capacity),
        loss=ddpo.make_loss(policy, estimator=train.estimator, clip_range=train.clip_range),
        prepare=prepare,
        prompts=api.uniform_prompts(len(ctx.prompts)),
        queries=queries,
        finish=finish,
        shardings=replay.shardings,
        extra_goals=tuple(goals[len(ctx.prompts):]),
    )
