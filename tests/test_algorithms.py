"""herd relabeling, ddpg's behaviour coin and the dpok loss on hand-made inputs and the tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd_jax import replay
from herd_jax.algorithms import ddpg, dpok, herd
from herd_jax.train_step import Transition


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


@pytest.mark.parametrize("strategy", ["best", "random"])
def test_choose_goals_other_prompt_and_query_count(strategy):
    rng = np.random.default_rng(0)
    prompt_ids = np.asarray([0, 1, 2, 3], np.int32)
    images = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    goals, rewards, valid, queries = herd.choose_goals(
        rng, prompt_ids, images, strategy=strategy, copies=2, num_prompts=5, sentence_ids=[[]] * 5, best_candidates=3, score=fake_score
    )
    assert goals.shape == rewards.shape == valid.shape == (8,)
    assert valid.all() and (goals != np.tile(prompt_ids, 2)).all()
    np.testing.assert_allclose(rewards, fake_score(np.tile(images, (2, 1, 1, 1)), goals), rtol=1e-6)
    assert queries == (8 * 3 if strategy == "best" else 8)


def test_choose_goals_best_picks_highest_scoring_candidate():
    rng = np.random.default_rng(1)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    goals, _, _, _ = herd.choose_goals(
        rng, np.asarray([0, 6]), images, strategy="best", copies=1, num_prompts=7, sentence_ids=[[]] * 7, best_candidates=6, score=fake_score
    )
    # All 6 other prompts are candidates; fake_score prefers the largest id.
    assert goals.tolist() == [6, 5]


def test_choose_goals_sentence_masks_single_sentence_prompts():
    rng = np.random.default_rng(2)
    images = np.zeros((3, 4, 4, 3), np.uint8)
    goals, rewards, valid, queries = herd.choose_goals(
        rng, np.asarray([0, 1, 0]), images, strategy="sentence", copies=1, num_prompts=2, sentence_ids=[[2, 3], []], best_candidates=1, score=fake_score
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


def test_dpok_loss_value_baseline_and_kl():
    network = dpok.ValueNetwork(hidden=8)
    value_params = dpok.init_value(network, jax.random.PRNGKey(0), (1, 2, 2), (3, 4))
    value_params = jax.tree.map(jnp.zeros_like, value_params)  # V ≡ 0
    loss_fn = dpok.make_loss(_FixedPolicy(), network, reward_weight=10.0, kl_weight=0.5, clip_range=0.1)
    x = jnp.zeros((2, 1, 2, 2))
    params = {"mu": jnp.zeros((1, 2, 2))}
    tr = Transition(x, x, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), jnp.zeros(2), jnp.zeros((2, 3, 4)), jnp.zeros(2), jnp.asarray([1.0, 3.0]), jnp.ones(2))
    aux = {"uncond": None, "pretrained": {"mu": jnp.ones((1, 2, 2))}, "value": value_params}
    loss, info = loss_fn(params, aux, tr)
    # ratio 1, A = r - 0: policy part = -10 * mean(r) = -20; KL = 1 / (2 * 0.25) = 2 per dim -> +0.5 * 2.
    assert float(loss) == pytest.approx(-20.0 + 1.0, rel=1e-5)
    assert float(info["kl_pretrained"]) == pytest.approx(2.0)
    # The KL gradient pulls mu toward the pretrained mean.
    grad = jax.grad(lambda p: loss_fn(p, aux, tr)[0])(params)
    assert (np.asarray(grad["mu"]) < 0).all()


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
    from herd_jax.trainer import encode_prompts

    embeds = encode_prompts(tiny_sd, ["a cat", "a dog"], "")
    ids = jnp.asarray([0, 1, 1, 0])
    cond = embeds["prompt_embeds"][ids]
    traj = jax.jit(tiny_policy.rollout)(tiny_sd.params["unet"], tiny_sd.params["vae"], cond, embeds["uncond"], jax.random.PRNGKey(3))
    fresh = herd.trajectory_item(traj.latents, traj.log_probs, ids, cond, jnp.zeros(4))
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), fresh)
    buffer = replay.init(item, 8)
    step = jax.jit(lambda buf, goals, goal_embeds, key: herd.replay_step(
        tiny_policy, buf, tiny_sd.params["unet"], embeds["uncond"], fresh, goals, goal_embeds, jnp.ones(4), jnp.ones(4, bool),
        jnp.int32(0), key, copies=1, keep_epochs=1, num_replay=4, recompute=True))
    buffer, replayed, valid = step(buffer, ids, cond, jax.random.PRNGKey(0))
    assert bool(valid.all())
    # sample() returns the 4 items in random order: match them by their (unique, random) x_T.
    match = lambda items: np.argsort(np.asarray(items["latents"][:, 0, 0, 0, 0]))
    same = np.asarray(replayed["log_probs"])[match(replayed)]
    expected = np.asarray(traj.log_probs)[match(fresh)]
    np.testing.assert_allclose(same, expected, atol=1e-4)
    # Under another goal the recomputed log-probs are those of the copy under c', not the originals.
    other = jnp.asarray([1, 0, 0, 1])
    _, relabeled, _ = step(replay.init(item, 8), other, embeds["prompt_embeds"][other], jax.random.PRNGKey(0))
    assert np.asarray(relabeled["prompt_id"])[match(relabeled)].tolist() == np.asarray(other)[match(fresh)].tolist()
    assert np.abs(np.asarray(relabeled["log_probs"])[match(relabeled)] - expected).max() > 1e-3
