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

Off-policy correction (`herd.correction`) of the replayed rows (copies and stale fresh items):
  recompute  (default) log π_old(x_{t-1} | x_t, c′) is re-evaluated under the current params θ_k
             and the row's (possibly new) goal, so every clipped ratio starts at 1. A HEURISTIC:
             the data came from π_b(· | x_t, c), so this sets the weight π_θk(·|c′) / π_b(·|c) to 1
             — advantage-weighted imitation of off-goal data, not a corrected policy gradient.
  behaviour  keep the log-probs recorded at sampling time under c (the original's). DDPO's
             log-probs are means over the latent's D dimensions (D = 16,384 for SD at 512 px), so
             this ratio is the true density ratio to the power 1/D: it corrects almost nothing.
  truncated  a truncated per-decision importance weight on top of `recompute`'s clip (V-trace's
             policy-gradient weight, Espeholt et al. 2018; Retrace's truncation, Munos et al. 2016;
             the weight hindsight policy gradients need, Rauber et al. 2019):
                 w_t = min(ρ̄, π_θk(x_{t-1} | x_t, c′) / π_b(x_{t-1} | x_t, c)),
             the densities' full ratio: log w_t = D · (mean log π_θk(c′) − mean log π_b(c)), the
             per-step log-probs *summed* over dimensions. It multiplies the row's advantage at
             step t under a stop-gradient, so the update's gradient on that step is
             w_t · ∇ clip-surrogate(π_θ / π_θk): for fresh rows (w = 1) DDPO's, for replayed rows
             the behaviour-to-target correction of the action at step t. Like V-trace's, it does not
             correct the distribution of the states x_t (reached under c): the truncation trades
             that bias and ρ̄'s for bounded variance. `herd/ess` logs the weights' effective
             sample size (Σw)² / (n Σw²) over the replayed rows' steps (1: uniform weights; near
             1/n: a few steps carry the update — typical of D-dimensional density ratios).
  weighted   self-normalised importance weights of whole trajectories on top of `recompute`'s clip
             (weighted importance sampling; the "weighted" hindsight policy gradient estimators of
             Rauber et al. 2019). The reward comes once, at the end of the trajectory, so the
             per-decision weight of every step's term A·∇log π(x_{t-1} | x_t, c′) is the ratio of
             all the trajectory's steps, ρ = Π_t π_θk(x_{t-1} | x_t, c′) / π_b(x_{t-1} | x_t, c)
             (summed log-probs again); unlike `truncated` it also corrects for the states x_t
             having been reached under c. ρ's variance grows with D and T, so it is normalised
             over the update batch's valid replayed rows: w_i = ρ_i / mean_j ρ_j (mean 1, at
             most the number of rows; biased, consistent, bounded). The same constant w_i
             multiplies the row's advantage at every step; fresh rows keep weight 1. `herd/ess`
             logs the weights' effective sample size over the replayed rows, `herd/weight_max`
             the largest weight.

Statistics: on-policy rewards (fresh trajectories) and relabeled rewards keep separate per-goal
windows, so relabeled rewards never shift a fresh row's baseline; a replayed relabeled row is
normalised by the relabeled window of its goal. Every scored (image, goal) pair enters the
relabeled windows, `best`'s K candidates included (K reward queries, K entries). A trajectory's
copies get distinct goals.

Relabel filter (`herd.relabel_filter`): `none` stores every copy; `achieved` stores a copy only
when its image scores higher under c′ than under the goal it was sampled for, r(x₀, c′) > r(x₀, c)
— HER's relabeling to the goal the outcome achieved (Andrychowicz et al. 2017), for a dense
goal reward. The filtered-out pairs were paid for and still enter the relabeled windows.

What the original HERD code got wrong, and we fix: per-prompt advantage normalisation and
relabeling could not be combined (here the stat trackers are keyed by goal id over prompts and
hindsight goals), and relabeled rewards were not counted as reward queries.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from herd_jax import replay
from herd_jax import stats as stats_lib
from herd_jax.algorithms import api, ddpo
from herd_jax.algorithms.common import effective_sample_size, self_normalised_weights, truncated_weights
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
    correction: Literal["recompute", "behaviour", "truncated", "weighted"] = "recompute"  # recompute: log π_old re-evaluated under c' (ratio starts at 1; a heuristic); behaviour: keep log π(·|c); truncated: recompute's clip × min(rho_bar, π_θ(·|c') / π_b(·|c)) per step (summed log-probs); weighted: recompute's clip × the trajectory's π_θ(τ|c') / π_b(τ|c), self-normalised over the replayed rows
    rho_bar: float = 1.0  # `truncated`: the weights' upper bound ρ̄
    relabel_filter: Literal["none", "achieved"] = "none"  # achieved: store a copy only if its image scores higher under c' than under its own goal c

    def validate(self, cfg: Any, num_devices: int) -> None:
        if self.capacity % num_devices:
            raise ConfigError(f"herd.capacity={self.capacity} must be a multiple of the number of devices ({num_devices})")
        if self.rho_bar <= 0:
            raise ConfigError(f"herd.rho_bar must be > 0, got {self.rho_bar}")
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
    traj_keys = jax.random.split(key, batch)  # one draw per trajectory covers all its copies: no goal twice
    if strategy == "sentence":
        count = sentence_counts[goal]  # [B]
        width = sentence_goals.shape[1]
        # A random order of each prompt's sentences (padding last); copy k takes the k-th.
        order = jax.vmap(lambda key, n: jnp.argsort(jnp.where(jnp.arange(width) < n, jax.random.uniform(key, (width,)), 2.0)))(traj_keys, count)
        pick = jnp.concatenate([order, jnp.zeros((batch, max(copies - width, 0)), order.dtype)], axis=1)[:, :copies].T  # [copies, B]
        goals = sentence_goals[goal[None, :], pick]  # [copies, B]
        valid = jnp.arange(copies)[:, None] < count[None, :]
        return api.Queries(rows, goals.reshape(-1).astype(jnp.int32), valid.reshape(-1))
    if strategy not in ("random", "best"):
        raise ValueError(f"unknown goal strategy {strategy!r}")
    others = max(num_prompts - 1, 1)
    # Candidates: other prompts (offsets 1..P-1 from the goal), drawn without replacement over all
    # of a trajectory's copies, so copies never share a candidate; slots beyond P-1 are not asked.
    width = copies * k
    offsets = jax.vmap(lambda key: jax.random.permutation(key, others))(traj_keys)  # [B, P-1]
    offsets = jnp.concatenate([offsets, jnp.repeat(offsets[:, -1:], max(width - others, 0), axis=1)], axis=1)[:, :width] + 1
    candidates = jnp.moveaxis(((goal[:, None] + offsets) % num_prompts).reshape(batch, copies, k), 1, 0)  # [copies, B, k]
    valid = jnp.broadcast_to((jnp.arange(width) < others).reshape(copies, 1, k), candidates.shape) & (num_prompts > 1)
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


class HerdState(NamedTuple):
    """herd's state in the TrainState: the replay buffer and the relabeled rewards' own windows."""

    buffer: replay.ReplayBuffer
    relabeled: stats_lib.PromptStats  # per goal: every scored (image, goal′) pair's reward


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

    num_dims = int(np.prod(policy.latent_shape))

    def prepare(state: HerdState, stats, fresh: api.Experience, queries: api.Queries, answers, params, frozen, epoch, key):
        stats = stats_lib.update(stats, fresh.goal, fresh.reward)  # on-policy rewards only
        relabeled = stats_lib.update(state.relabeled, queries.goal, answers, jnp.asarray(queries.valid))  # every scored pair
        copy_goal, copy_reward, copy_valid = relabeled_copies(queries, answers, copies=h.copies, batch=n)
        tiled = jax.tree.map(lambda x: jnp.concatenate([x] * h.copies), fresh)
        if h.relabel_filter == "achieved":
            copy_valid = copy_valid & (copy_reward > tiled.reward)
        copies = tiled._replace(goal=copy_goal, cond=frozen.goal_embeds[copy_goal], reward=copy_reward)
        buffer = replay.add(state.buffer, copies, epoch=epoch, original_prompt_id=tiled.goal, relabeled=True, mask=copy_valid)
        buffer = replay.expire(buffer, current_epoch=epoch, keep_epochs=h.keep_epochs)
        items, info = replay.sample(buffer, key, num_replay)
        metrics = {}
        if h.correction in ("recompute", "truncated", "weighted"):
            target = policy.trajectory_log_probs(params, items.latents, items.cond, frozen.uncond)
            if h.correction == "truncated":
                weights = truncated_weights(target, items.log_probs, num_dims, h.rho_bar)  # [M, T]
            elif h.correction == "weighted":
                weights = jnp.broadcast_to(self_normalised_weights(target, items.log_probs, num_dims, info["valid"])[:, None], target.shape)
            items = items._replace(log_probs=target)
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), fresh, items)
        valid = jnp.concatenate([jnp.ones((n,), bool), info["valid"]])
        from_relabel = jnp.concatenate([jnp.zeros((n,), bool), info["relabeled"]])
        on_policy = api.normalised_advantages(stats, both.goal, both.reward, valid & ~from_relabel, train=train, num_steps=num_steps)
        off_goal = api.normalised_advantages(relabeled, both.goal, both.reward, valid & from_relabel, train=train, num_steps=num_steps)
        advantages = jnp.where(from_relabel[:, None], off_goal, on_policy)
        if h.correction in ("truncated", "weighted"):
            advantages = advantages.at[n:].multiply(weights)  # w ≥ 0 commutes with the clip's max
            replayed = jnp.broadcast_to(info["valid"][:, None], weights.shape)
            metrics["herd/ess"] = effective_sample_size(weights, replayed)
            metrics["herd/weight_mean"] = jnp.sum(weights * replayed) / jnp.maximum(jnp.sum(replayed), 1)
            metrics["herd/weight_max"] = jnp.max(weights * replayed)
        batch = api.Batch(both.latents, both.log_probs, both.cond, advantages, valid.astype(jnp.float32))
        metrics.update({
            "herd/relabeled_reward": jnp.sum(copy_reward * copy_valid) / jnp.maximum(jnp.sum(copy_valid), 1),
            "herd/copies_stored": jnp.sum(copy_valid) / (h.copies * n),
            "herd/replayed_valid": jnp.mean(info["valid"].astype(jnp.float32)),
        })
        return batch, HerdState(buffer, relabeled), stats, metrics

    def finish(state: HerdState, fresh: api.Experience, epoch):
        """The fresh trajectories join the buffer after the update, so a batch never holds one twice."""
        return state._replace(buffer=replay.add(state.buffer, fresh, epoch=epoch, original_prompt_id=fresh.goal, relabeled=False))

    return api.Algorithm(
        init=lambda: HerdState(replay.init(item, h.capacity), stats_lib.init(len(goals), train.stats_window)),
        loss=ddpo.make_loss(policy, estimator=train.estimator, clip_range=train.clip_range),
        prepare=prepare,
        prompts=api.uniform_prompts(len(ctx.prompts)),
        queries=queries,
        finish=finish,
        shardings=lambda state, mesh: HerdState(replay.shardings(state.buffer, mesh), api.replicated(state.relabeled, mesh)),
        extra_goals=tuple(goals[len(ctx.prompts):]),
    )
