"""herd's principled corrections and honest statistics (issue 15): truncated per-decision and
self-normalised trajectory weights against a float64 NumPy computation, separate relabeled windows,
every scored pair kept, distinct goals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd_jax import stats
from herd_jax.algorithms import herd
from herd_jax.algorithms.api import Context, Experience, Frozen, Queries
from herd_jax.diffusion import gaussian_log_prob


def _numpy_log_density(x, mean, std):
    """log N(x; mean, std² I) summed over every dimension but the first, in float64."""
    x, mean, std = (np.asarray(a, np.float64) for a in (x, mean, std))
    d = (x - mean) / std
    per_dim = -0.5 * d**2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    return per_dim.reshape(len(x), -1).sum(axis=1)


def _self_normalised(log_rho):
    """ρ_i / mean_j ρ_j from float64 log-ratios (shifted by the largest: ρ itself may overflow)."""
    rho = np.exp(log_rho - log_rho.max())
    return rho / rho.mean()


def test_truncated_weights_equal_float64_density_ratios_and_truncate():
    """Hand-made Gaussian policies: the weights from DDPO's mean-reduced log-probs equal
    min(ρ̄, N(x; μ_target, σ) / N(x; μ_b, σ)) from full float64 densities."""
    rng = np.random.default_rng(0)
    shape = (6, 4, 2, 2)  # D = 16 dimensions per step
    std = np.full((6, 1, 1, 1), 0.3)
    mu_b = rng.normal(size=shape)
    x = mu_b + std * rng.normal(size=shape)  # sampled by the behaviour policy
    mu_t = mu_b + 0.02 * rng.normal(size=shape)  # a nearby target policy
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    lp_b = gaussian_log_prob(f32(x), f32(mu_b), f32(std))[:, None]  # [N, T=1] per-dimension means
    lp_t = gaussian_log_prob(f32(x), f32(mu_t), f32(std))[:, None]
    ratio = np.exp(_numpy_log_density(x, mu_t, std) - _numpy_log_density(x, mu_b, std))
    for rho_bar in (1.0, 2.0, 1e9):
        w = np.asarray(herd.truncated_weights(lp_t, lp_b, num_dims=16, rho_bar=rho_bar))[:, 0]
        np.testing.assert_allclose(w, np.minimum(rho_bar, ratio), rtol=2e-4)
    assert (ratio > 1).any() and (ratio < 1).any()  # both sides of the truncation were exercised
    # Stop-gradient: the weight is a constant of the loss.
    grad = jax.grad(lambda t: herd.truncated_weights(t, lp_b, 16, 1e9).sum())(lp_t)
    assert not np.asarray(grad).any()


def test_self_normalised_weights_equal_float64_trajectory_ratios():
    """Hand-made Gaussian policies over T = 3 steps: w_i = ρ_i / mean_j ρ_j over the valid rows,
    ρ_i the trajectory's density ratio from full float64 densities; invalid rows get 0."""
    rng = np.random.default_rng(1)
    n, steps, shape = 6, 3, (2, 2, 4)  # D = 16 dimensions per step
    std = 0.3
    mu_b = rng.normal(size=(n, steps, *shape))
    x = mu_b + std * rng.normal(size=mu_b.shape)
    mu_t = mu_b + 0.03 * rng.normal(size=mu_b.shape)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    per_step = lambda mu: jnp.stack([gaussian_log_prob(f32(x[:, t]), f32(mu[:, t]), f32(np.full((n, 1, 1, 1), std))) for t in range(steps)], axis=1)
    lp_b, lp_t = per_step(mu_b), per_step(mu_t)  # [N, T] per-dimension means
    mask = np.array([True, True, False, True, True, True])
    log_rho = sum(_numpy_log_density(x[:, t], mu_t[:, t], np.full((n, 1, 1, 1), std)) - _numpy_log_density(x[:, t], mu_b[:, t], np.full((n, 1, 1, 1), std)) for t in range(steps))
    rho = np.exp(log_rho)
    expected = np.where(mask, rho / rho[mask].mean(), 0.0)
    w = np.asarray(herd.self_normalised_weights(lp_t, lp_b, 16, jnp.asarray(mask)))
    np.testing.assert_allclose(w, expected, rtol=2e-3, atol=1e-7)
    assert w[mask].mean() == pytest.approx(1.0, rel=1e-5) and expected.max() > 1.2 and expected[mask].min() < 0.8  # unequal weights
    # Log space: ratios far beyond float32's range still give finite weights (the largest row wins).
    far = np.asarray(herd.self_normalised_weights(lp_t + f32(np.arange(n)[:, None]), lp_b, 16, jnp.asarray(mask)))
    np.testing.assert_allclose(far, np.eye(n)[-1] * mask.sum(), atol=1e-6)
    assert not np.asarray(herd.self_normalised_weights(lp_t, lp_b, 16, jnp.zeros(n, bool))).any()
    grad = jax.grad(lambda t: herd.self_normalised_weights(t, lp_b, 16, jnp.asarray(mask)).sum())(lp_t)
    assert not np.asarray(grad).any()  # stop-gradient


def test_effective_sample_size():
    assert float(herd.effective_sample_size(jnp.ones(8), jnp.ones(8, bool))) == pytest.approx(1.0)
    one_hot = jnp.zeros(8).at[3].set(5.0)
    assert float(herd.effective_sample_size(one_hot, jnp.ones(8, bool))) == pytest.approx(1 / 8)
    assert float(herd.effective_sample_size(jnp.asarray([1.0, 1.0, 9.0]), jnp.asarray([True, True, False]))) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def herd_setup(tiny_sd, tiny_policy):
    from herd_jax import config as config_lib
    from herd_jax.trainer import encode_prompts

    prompts = ("a red cat", "a blue dog", "a green car")
    embeds, uncond = encode_prompts(tiny_sd, prompts, "")
    ids = jnp.asarray([0, 1, 1, 0])
    traj = jax.jit(tiny_policy.rollout)(tiny_sd.params["unet"], tiny_sd.params["vae"], embeds[ids], uncond, jax.random.PRNGKey(3))
    fresh = Experience(traj.latents, traj.log_probs, ids, embeds[ids], jnp.asarray([0.1, 0.7, 0.3, 0.9]))
    frozen = Frozen(vae=None, goal_embeds=embeds, uncond=uncond, base=None, pretrained=None)
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)

    def make(*overrides):
        cfg = config_lib.load_config([], ["sample.batch_size=4", "sample.num_batches_per_epoch=1", "herd.capacity=8", "train.stats_min_count=1", *overrides])
        return herd.make(Context(cfg, tiny_policy, prompts, 4, item))

    return make, fresh, frozen, tiny_sd.params["unet"]


@pytest.fixture(scope="module")
def jitted_prepare(herd_setup):
    """(init, jitted prepare) of herd under these overrides, compiled once per module."""
    make = herd_setup[0]
    cache = {}

    def get(*overrides):
        if overrides not in cache:
            alg = make(*overrides)
            cache[overrides] = (alg.init, jax.jit(alg.prepare))
        return cache[overrides]

    return get


TRUNCATED = ("herd.correction='truncated'", "herd.rho_bar=5.0")  # ρ̄ > 1: a weight above 1 would show


def _replayed_sources(fresh, batch) -> list[int]:
    """The fresh row each replayed row copies (the same latents): its behaviour log-probs are that row's."""
    latents = np.asarray(fresh.latents)
    return [int(np.flatnonzero((latents == np.asarray(row)).all(axis=tuple(range(1, latents.ndim))))[0]) for row in batch.latents[len(latents):]]


def test_truncated_weight_is_one_for_the_same_goal_and_params(herd_setup, jitted_prepare):
    """c′ = c and unchanged params: π_θk(·|c′) = π_b(·|c), every weight 1 (ESS 1)."""
    _, fresh, frozen, params = herd_setup
    init, prepare = jitted_prepare(*TRUNCATED)
    queries = Queries(jnp.arange(4, dtype=jnp.int32), fresh.goal, jnp.ones(4, bool))
    _, _, _, metrics = prepare(init(), stats.init(3, 4), fresh, queries, fresh.reward, params, frozen, jnp.int32(0), jax.random.PRNGKey(0))
    assert float(metrics["herd/ess"]) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["herd/weight_mean"]) == pytest.approx(1.0, abs=1e-3)


def test_truncated_correction_scales_replayed_advantages_by_the_weights(herd_setup, jitted_prepare, tiny_policy):
    """Under another goal the replayed rows' advantages are recompute's times min(ρ̄, ratio) per
    step (ratio from the recorded and recomputed log-probs in float64); fresh rows unchanged."""
    _, fresh, frozen, params = herd_setup
    other = jnp.asarray([2, 2, 0, 1])
    queries = Queries(jnp.arange(4, dtype=jnp.int32), other, jnp.ones(4, bool))
    out = {}
    for correction, overrides in (("recompute", ("herd.correction='recompute'",)), ("truncated", TRUNCATED)):
        init, prepare = jitted_prepare(*overrides)
        out[correction] = prepare(init(), stats.init(3, 4), fresh, queries, jnp.asarray([0.2, 0.4, 0.6, 0.8]), params, frozen, jnp.int32(0), jax.random.PRNGKey(0))
    rec, trunc = out["recompute"][0], out["truncated"][0]
    np.testing.assert_array_equal(np.asarray(rec.advantages[:4]), np.asarray(trunc.advantages[:4]))  # fresh rows: weight 1
    np.testing.assert_array_equal(np.asarray(rec.log_probs), np.asarray(trunc.log_probs))  # same clip reference
    num_dims = int(np.prod(tiny_policy.latent_shape))
    raw = np.exp(num_dims * (np.asarray(trunc.log_probs[4:], np.float64) - np.asarray(fresh.log_probs, np.float64)[_replayed_sources(fresh, trunc)]))
    a, b = np.asarray(rec.advantages[4:], np.float64), np.asarray(trunc.advantages[4:], np.float64)
    np.testing.assert_allclose(b, a * np.minimum(5.0, raw), rtol=2e-3, atol=1e-6)
    assert (raw < 1).any() and float(out["truncated"][3]["herd/ess"]) < 1.0  # another goal: unequal weights


def test_self_normalised_correction_weights_whole_replayed_trajectories(herd_setup, jitted_prepare, tiny_policy):
    """`weighted`: each replayed row's advantages are recompute's times one constant w_i, the
    trajectory's π_θ(τ|c′) / π_b(τ|c) over the replayed rows' mean (a float64 NumPy computation from
    the recorded and recomputed per-step log-probs); fresh rows unchanged; with c′ = c and the
    sampling params every weight is 1."""
    _, fresh, frozen, params = herd_setup
    init, recompute = jitted_prepare("herd.correction='recompute'")
    _, weighted = jitted_prepare("herd.correction='weighted'")
    run = lambda prepare, goals: prepare(init(), stats.init(3, 4), fresh, Queries(jnp.arange(4, dtype=jnp.int32), goals, jnp.ones(4, bool)), jnp.asarray([0.2, 0.4, 0.6, 0.8]), params, frozen, jnp.int32(0), jax.random.PRNGKey(0))
    other = jnp.asarray([2, 2, 0, 1])
    (plain, *_), (batch, _, _, metrics) = run(recompute, other), run(weighted, other)
    np.testing.assert_array_equal(np.asarray(plain.advantages[:4]), np.asarray(batch.advantages[:4]))
    np.testing.assert_array_equal(np.asarray(plain.log_probs), np.asarray(batch.log_probs))  # the clip's reference: recompute's
    source = _replayed_sources(fresh, batch)
    num_dims = int(np.prod(tiny_policy.latent_shape))
    log_rho = num_dims * (np.asarray(batch.log_probs[4:], np.float64) - np.asarray(fresh.log_probs, np.float64)[source]).sum(axis=1)
    expected = _self_normalised(log_rho)
    a, b = np.asarray(plain.advantages[4:], np.float64), np.asarray(batch.advantages[4:], np.float64)
    np.testing.assert_allclose(b, a * expected[:, None], rtol=2e-3, atol=1e-6)
    assert expected.max() > 1.05 and float(metrics["herd/ess"]) < 1.0  # another goal: unequal weights
    assert float(metrics["herd/weight_mean"]) == pytest.approx(1.0, abs=1e-5)
    # c′ = c, the sampling params: ρ = 1 for every row.
    same = run(weighted, fresh.goal)[3]
    assert float(same["herd/ess"]) == pytest.approx(1.0, abs=1e-4) and float(same["herd/weight_max"]) == pytest.approx(1.0, abs=1e-2)


def test_relabeled_rewards_do_not_change_fresh_advantages(herd_setup, jitted_prepare):
    """Relabeled rewards live in their own windows: the fresh rows' advantages ignore them."""
    _, fresh, frozen, params = herd_setup
    init, prepare = jitted_prepare("herd.correction='recompute'")
    queries = Queries(jnp.arange(4, dtype=jnp.int32), jnp.asarray([1, 2, 2, 1]), jnp.ones(4, bool))  # other goals, incl. goal 1 of fresh rows
    runs = [prepare(init(), stats.init(3, 4), fresh, queries, answers, params, frozen, jnp.int32(0), jax.random.PRNGKey(0)) for answers in (jnp.zeros(4), jnp.full(4, 5.0))]
    np.testing.assert_array_equal(np.asarray(runs[0][0].advantages[:4]), np.asarray(runs[1][0].advantages[:4]))
    np.testing.assert_array_equal(np.asarray(runs[0][2].rewards), np.asarray(runs[1][2].rewards))  # on-policy windows unchanged
    assert not np.array_equal(np.asarray(runs[0][1].relabeled.rewards), np.asarray(runs[1][1].relabeled.rewards))


def test_best_records_every_scored_pair_and_counts_k_queries(herd_setup):
    """`best` with K candidates: K reward queries per copy, and all K scored pairs in the relabeled windows."""
    make, fresh, frozen, params = herd_setup
    k = 2
    alg = make("herd.goal_strategy='best'", f"herd.best_candidates={k}")
    queries = jax.jit(alg.queries)(alg.init(), fresh.goal, jax.random.PRNGKey(1))
    assert int(jnp.sum(queries.valid)) == 4 * k  # what the trainer counts as queries (trainer.ask_rewards)
    answers = jnp.arange(4 * k, dtype=jnp.float32) / 10
    _, state, _, _ = jax.jit(alg.prepare)(alg.init(), stats.init(3, 4), fresh, queries, answers, params, frozen, jnp.int32(0), jax.random.PRNGKey(0))
    assert int(state.relabeled.count.sum()) == 4 * k
    rewards, count = np.asarray(state.relabeled.rewards), np.asarray(state.relabeled.count)
    kept = sorted(rewards[np.arange(rewards.shape[1])[None, :] < count[:, None]].round(4).tolist())
    assert kept == sorted(np.asarray(answers).round(4).tolist())  # every paid-for answer, once


def test_achieved_filter_stores_only_copies_that_score_higher_under_the_new_goal(herd_setup):
    """`relabel_filter=achieved`: a copy enters the buffer only if r(x, c′) > r(x, c) (unfiltered,
    all four would); every scored pair still enters the relabeled windows."""
    make, fresh, frozen, params = herd_setup
    alg = make("herd.relabel_filter='achieved'", "herd.correction='behaviour'")  # behaviour: no UNet in prepare, a small compile
    queries = Queries(jnp.arange(4, dtype=jnp.int32), jnp.asarray([2, 2, 0, 1]), jnp.ones(4, bool))
    answers = jnp.asarray([0.5, 0.2, 0.8, 0.4])  # fresh rewards 0.1 0.7 0.3 0.9: rows 0 and 2 score higher
    _, state, _, metrics = jax.jit(alg.prepare)(alg.init(), stats.init(3, 4), fresh, queries, answers, params, frozen, jnp.int32(0), jax.random.PRNGKey(0))
    buffer = state.buffer
    copies = np.asarray(buffer.relabeled) & np.asarray(buffer.valid)
    assert sorted(np.asarray(buffer.items.reward)[copies].tolist()) == pytest.approx([0.5, 0.8])
    assert sorted(np.asarray(buffer.items.goal)[copies].tolist()) == [0, 2]
    assert float(metrics["herd/copies_stored"]) == 0.5
    assert int(state.relabeled.count.sum()) == 4  # the filtered-out pairs were paid for and are kept as statistics


@pytest.mark.parametrize("strategy", ["random", "best", "sentence"])
def test_copies_of_one_trajectory_get_distinct_goals(strategy):
    goal = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3])
    queries = herd.choose_goals(
        jax.random.PRNGKey(0), goal, strategy=strategy, copies=3, num_prompts=5,
        sentence_goals=jnp.asarray([[5, 6, 7], [8, 9, 0], [0, 0, 0], [10, 0, 0], [0, 0, 0]], jnp.int32),
        sentence_counts=jnp.asarray([3, 2, 0, 1, 0], jnp.int32), best_candidates=2 if strategy == "best" else 1,
    )
    row, goals, valid = (np.asarray(x) for x in queries)
    for i in range(8):
        asked = goals[(row == i) & valid].tolist()
        assert len(asked) == len(set(asked)), (strategy, i, asked)
        assert int(goal[i]) not in asked
    if strategy == "sentence":
        assert [int(((row == i) & valid).sum()) for i in range(4)] == [3, 2, 0, 1]


# --- ddpg's pretrained epochs: the same truncated weight -------------------------------------


def test_ddpg_truncated_weights_pretrained_epochs(herd_setup, tiny_policy):
    """Samples of the pretrained UNet trained under other params: advantages are the `ratio`
    variant's times min(ρ̄, π_θ / π_pre) per step (`weighted`: times the trajectory's ratio over
    the batch's mean), the clip's reference is log π_θ; under the sampling params themselves
    every weight is 1."""
    from herd_jax import config as config_lib
    from herd_jax.algorithms import ddpg
    from herd_jax.algorithms.api import Context

    _, fresh, frozen, pretrained = herd_setup
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)

    def prepared(*overrides):
        cfg = config_lib.load_config([], ["algorithm.name='ddpg'", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.stats_min_count=1", *overrides])
        algorithm = ddpg.make(Context(cfg, tiny_policy, ("a red cat", "a blue dog", "a green car"), 4, item))
        prepare = jax.jit(algorithm.prepare)
        return lambda params: prepare(algorithm.init(), stats.init(3, 4), fresh, None, None, params, frozen, jnp.int32(0), jax.random.PRNGKey(0))

    leaves, treedef = jax.tree.flatten(pretrained)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    moved = jax.tree.unflatten(treedef, [x + 1e-3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    ratio, truncated = prepared(), prepared("ddpg.correction='truncated'", "ddpg.rho_bar=1.0")
    plain, _, _, _ = ratio(moved)
    batch, _, _, metrics = truncated(moved)
    target = np.asarray(jax.jit(tiny_policy.trajectory_log_probs)(moved, fresh.latents, fresh.cond, frozen.uncond), np.float64)
    num_dims = int(np.prod(tiny_policy.latent_shape))
    raw = np.exp(num_dims * (target - np.asarray(fresh.log_probs, np.float64)))
    assert (raw < 1).any() and (raw > 1).any()  # both sides of the truncation exercised
    np.testing.assert_allclose(np.asarray(batch.advantages), np.asarray(plain.advantages) * np.minimum(1.0, raw), rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(np.asarray(batch.log_probs), target, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(plain.log_probs), np.asarray(fresh.log_probs))  # `ratio`: the behaviour's
    assert float(metrics["ddpg/ess"]) < 1.0
    # The sampling params themselves (the current policy's epochs): every weight 1, DDPO.
    same, _, _, same_metrics = truncated(pretrained)
    assert float(same_metrics["ddpg/ess"]) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(np.asarray(same.advantages), np.asarray(ratio(pretrained)[0].advantages), rtol=1e-2, atol=1e-6)
    # `weighted`: one weight per trajectory, its full ratio over the batch's mean.
    weighted, _, _, weighted_metrics = prepared("ddpg.correction='weighted'")(moved)
    log_rho = num_dims * (target - np.asarray(fresh.log_probs, np.float64)).sum(axis=1)
    w = _self_normalised(log_rho)
    assert w.max() > 1.05
    np.testing.assert_allclose(np.asarray(weighted.advantages), np.asarray(plain.advantages) * w[:, None], rtol=2e-3, atol=1e-7)
    np.testing.assert_allclose(np.asarray(weighted.log_probs), target, rtol=0, atol=1e-6)
    assert float(weighted_metrics["ddpg/ess"]) < 1.0
