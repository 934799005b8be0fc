"""herd relabeling, ddpg's behaviour coin and the dpok loss on hand-made inputs and the tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd_jax import replay
from herd_jax.algorithms import ddpg, dpok, herd
from herd_jax.algorithms.api import Frozen, Transition


def test_sentences_never_empty_nor_the_prompt():
    assert herd.sentences("A cat. On a mat!  Under the sun;") == ["A cat", "On a mat", "Under the sun"]
    assert herd.sentences("a single sentence.") == []
    assert herd.sentences("a. a.") == ["a"]  # repeated sentences collapse to one goal
    assert all(s for s in herd.sentences(". . x. y"))


def test_build_goals_appends_new_sentence_goals():
    goals, ids = herd.build_goals(["a cat. a dog", "a dog", "a bird"], "sentence")
    assert goals == ["a cat. a dog", "a dog", "a bird", "a cat"]
    assert ids == [[3, 1], [], []]
    goals, ids = herd.build_goals(["a cat. a dog"], "best")
    assert goals == ["a cat. a dog"] and ids == [[]]


def fake_score(images, goal_ids):
    """Reward = goal id / 10 + mean pixel / 1000 (deterministic, depends on the goal)."""
    return np.asarray(goal_ids, np.float32) / 10 + images.reshape(len(images), -1).mean(1) / 1000


def choose_and_score(key, prompt_ids, images, *, strategy, copies, num_prompts, sentence_ids, best_candidates):
    """herd's queries, scored by fake_score as the trainer would (valid rows only), then the copies."""
    width = max([len(i) for i in sentence_ids] + [1])
    queries = herd.choose_goals(
        key, jnp.asarray(prompt_ids, jnp.int32), strategy=strategy, copies=copies, num_prompts=num_prompts,
        sentence_goals=jnp.asarray([i + [0] * (width - len(i)) for i in sentence_ids], jnp.int32),
        sentence_counts=jnp.asarray([len(i) for i in sentence_ids], jnp.int32), best_candidates=best_candidates,
    )
    row, goal, valid = (np.asarray(x) for x in queries)
    answers = np.zeros(len(row), np.float32)
    answers[valid] = fake_score(images[row[valid]], goal[valid])
    goals, rewards, copy_valid = herd.relabeled_copies(queries, jnp.asarray(answers), copies=copies, batch=len(prompt_ids))
    return np.asarray(goals), np.asarray(rewards), np.asarray(copy_valid), int(valid.sum())


@pytest.mark.parametrize("strategy", ["best", "random"])
def test_choose_goals_other_prompt_and_query_count(strategy):
    rng = np.random.default_rng(0)
    prompt_ids = np.asarray([0, 1, 2, 3], np.int32)
    images = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    goals, rewards, valid, queries = choose_and_score(
        jax.random.PRNGKey(0), prompt_ids, images, strategy=strategy, copies=2, num_prompts=5, sentence_ids=[[]] * 5, best_candidates=3
    )
    assert goals.shape == rewards.shape == valid.shape == (8,)
    assert valid.all() and (goals != np.tile(prompt_ids, 2)).all()
    np.testing.assert_allclose(rewards, fake_score(np.tile(images, (2, 1, 1, 1)), goals), rtol=1e-6)
    # A trajectory's copies draw their candidates jointly without replacement from the 4 other
    # prompts: best asks min(copies × 3, 4) = 4 per trajectory, random one per copy.
    assert queries == (4 * 4 if strategy == "best" else 8)
    assert (goals[:4] != goals[4:]).all()  # no goal twice for one trajectory


def test_choose_goals_best_picks_highest_scoring_candidate():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    goals, _, _, _ = choose_and_score(
        jax.random.PRNGKey(1), np.asarray([0, 6]), images, strategy="best", copies=1, num_prompts=7, sentence_ids=[[]] * 7, best_candidates=6
    )
    # All 6 other prompts are candidates; fake_score prefers the largest id.
    assert goals.tolist() == [6, 5]


def test_choose_goals_sentence_masks_single_sentence_prompts():
    images = np.zeros((3, 4, 4, 3), np.uint8)
    goals, rewards, valid, queries = choose_and_score(
        jax.random.PRNGKey(2), np.asarray([0, 1, 0]), images, strategy="sentence", copies=1, num_prompts=2, sentence_ids=[[2, 3], []], best_candidates=1
    )
    assert valid.tolist() == [True, False, True] and queries == 2
    assert set(goals[valid].tolist()) <= {2, 3}


def test_ddpg_coin_follows_epsilon():
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    frac = np.mean([ddpg.sample_from_pretrained(k, 0.2) for k in keys])
    assert 0.13 < frac < 0.27
    assert not any(ddpg.sample_from_pretrained(k, 0.0) for k in keys[:20])


class _FixedPolicy:
    """transition_log_prob returning a mean that is the params themselves (for the dpok loss)."""

    def transition_log_prob(self, params, x_t, x_prev, t, cond, uncond):
        mean = jnp.broadcast_to(params["mu"], x_t.shape)
        std = jnp.full((x_t.shape[0], 1, 1, 1), 0.5)
        log_prob = -jnp.mean((x_prev - mean) ** 2 / (2 * std**2), axis=(1, 2, 3))
        return log_prob, mean, std


def test_dpok_loss_advantage_and_kl():
    loss_fn = dpok.make_loss(_FixedPolicy(), reward_weight=10.0, kl_weight=0.5, clip_range=0.1)
    x = jnp.zeros((2, 1, 2, 2))
    params = {"mu": jnp.zeros((1, 2, 2))}
    # A = r − V with V ≡ 0 (prepare computes it): the rewards 1 and 3.
    tr = Transition(x_t=x, x_prev=x, t=jnp.zeros(2, jnp.int32), old_log_prob=jnp.zeros(2), cond=jnp.zeros((2, 3, 4)),
                    advantages=jnp.asarray([1.0, 3.0]), weights=jnp.ones(2))
    frozen = Frozen(vae=None, goal_embeds=None, uncond=None, base=None, pretrained={"mu": jnp.ones((1, 2, 2))})
    loss, info = loss_fn(params, frozen, tr)
    # ratio 1: policy part = -10 * mean(A) = -20; KL = 1 / (2 * 0.25) = 2 per dim -> +0.5 * 2.
    assert float(loss) == pytest.approx(-20.0 + 1.0, rel=1e-5)
    assert float(info["kl_pretrained"]) == pytest.approx(2.0)
    # The KL gradient pulls mu toward the pretrained mean.
    grad = jax.grad(lambda p: loss_fn(p, frozen, tr)[0])(params)
    assert (np.asarray(grad["mu"]) < 0).all()


def test_dpok_advantages_are_target_minus_value():
    """prepare's per-step advantages: r̂ − V(x_t, c, t) with the value net after this epoch's fit."""
    network = dpok.ValueNetwork(hidden=8)
    params = dpok.init_value(network, jax.random.PRNGKey(0), (1, 2, 2), (3, 4))
    params = jax.tree.map(lambda x: x + 0.1, params)  # a non-zero V
    latents = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 1, 2, 2))
    cond, timesteps = jnp.zeros((4, 3, 4)), jnp.asarray([501, 1])
    v = dpok.values(network, params, latents, cond, timesteps)
    assert v.shape == (4, 2)
    x_t, t = latents[:, 1], jnp.full((4,), 1)
    np.testing.assert_allclose(np.asarray(v[:, 1]), np.asarray(network.apply({"params": params}, x_t, cond, t)), rtol=1e-6)


def test_dpok_value_update_fits_rewards():
    network = dpok.ValueNetwork(hidden=16)
    import optax

    opt = optax.adam(1e-2)
    params = dpok.init_value(network, jax.random.PRNGKey(0), (1, 2, 2), (3, 4))
    state = opt.init(params)
    latents = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 1, 2, 2))
    cond, rewards, timesteps = jnp.zeros((4, 3, 4)), jnp.asarray([0.0, 1.0, 2.0, 3.0]), jnp.asarray([501, 1])
    step = jax.jit(lambda p, s: dpok.value_update(network, opt, p, s, latents, cond, rewards, timesteps))
    params, state, first = step(params, state)
    for _ in range(200):
        params, state, loss = step(params, state)
    assert float(loss) < 0.1 * float(first)


def test_dpok_value_update_ignores_padding_rows():
    """Zero-weight trajectories (padding) leave the fit exactly as if they were absent."""
    import optax

    network, opt = dpok.ValueNetwork(hidden=16), optax.adam(1e-2)
    params = dpok.init_value(network, jax.random.PRNGKey(0), (1, 2, 2), (3, 4))
    latents = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 1, 2, 2))
    cond, rewards, timesteps = jnp.zeros((4, 3, 4)), jnp.asarray([0.0, 1.0, 2.0, 1e3]), jnp.asarray([501, 1])
    padded = dpok.value_update(network, opt, params, opt.init(params), latents, cond, rewards, timesteps, jnp.asarray([1.0, 1.0, 1.0, 0.0]))
    alone = dpok.value_update(network, opt, params, opt.init(params), latents[:3], cond[:3], rewards[:3], timesteps)
    assert float(padded[2]) == pytest.approx(float(alone[2]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(padded[0]), jax.tree.leaves(alone[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_herd_recompute_under_the_same_goal_gives_sampling_log_probs(tiny_sd, tiny_policy):
    """Relabeling to the goal it was sampled for and recomputing must return the sampling log-probs."""
    from herd_jax import config as config_lib
    from herd_jax import stats
    from herd_jax.algorithms.api import Context, Experience, Queries
    from herd_jax.trainer import encode_prompts

    prompts = ("a cat", "a dog")
    embeds, uncond = encode_prompts(tiny_sd, prompts, "")
    ids = jnp.asarray([0, 1, 1, 0])
    traj = jax.jit(tiny_policy.rollout)(tiny_sd.params["unet"], tiny_sd.params["vae"], embeds[ids], uncond, jax.random.PRNGKey(3))
    fresh = Experience(traj.latents, traj.log_probs, ids, embeds[ids], jnp.zeros(4))
    cfg = config_lib.load_config([], ["sample.batch_size=4", "sample.num_batches_per_epoch=1", "herd.copies=1", "herd.capacity=8", "herd.correction='recompute'"])
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    alg = herd.make(Context(cfg, tiny_policy, prompts, 4, item))
    frozen = Frozen(vae=None, goal_embeds=embeds, uncond=uncond, base=None, pretrained=None)

    @jax.jit
    def prepare(goals, key):
        queries = Queries(jnp.arange(4, dtype=jnp.int32), goals, jnp.ones(4, bool))
        return alg.prepare(alg.init(), stats.init(2, 4), fresh, queries, jnp.ones(4), tiny_sd.params["unet"], frozen, jnp.int32(0), key)

    batch, state, _, _ = prepare(ids, jax.random.PRNGKey(0))
    assert int(replay.size(state.buffer)) == 4 and bool(batch.weights.all())
    replayed = jax.tree.map(lambda x: x[4:], batch)  # fresh rows first, then the 4 replayed copies
    # sample() returns the 4 items in random order: match them by their (unique, random) x_T.
    match = lambda latents: np.argsort(np.asarray(latents[:, 0, 0, 0, 0]))
    same = np.asarray(replayed.log_probs)[match(replayed.latents)]
    expected = np.asarray(traj.log_probs)[match(fresh.latents)]
    np.testing.assert_allclose(same, expected, atol=1e-4)
    # Under another goal the recomputed log-probs are those of the copy under c', not the originals.
    other = jnp.asarray([1, 0, 0, 1])
    relabeled, _, _, _ = prepare(other, jax.random.PRNGKey(0))
    relabeled = jax.tree.map(lambda x: x[4:], relabeled)
    cond_goal = np.asarray(jnp.argmin(jnp.abs(relabeled.cond[:, None] - embeds[None]).sum((2, 3)), axis=1))
    assert cond_goal[match(relabeled.latents)].tolist() == np.asarray(other)[match(fresh.latents)].tolist()
    assert np.abs(np.asarray(relabeled.log_probs)[match(relabeled.latents)] - expected).max() > 1e-3
