"""DDPO losses and the per-prompt stat tracker on hand-made inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd_jax import stats
from herd_jax.algorithms.common import clip_advantages, ppo_clip_loss, score_function_loss

EPS = 0.1


def loss_and_grad(log_prob, old, adv):
    f = lambda lp: ppo_clip_loss(lp, jnp.asarray(old), jnp.asarray(adv), EPS)
    (loss, info), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(log_prob, jnp.float32))
    return float(loss), info, np.asarray(grad)


def test_ratio_one_gives_minus_mean_advantage():
    loss, info, _ = loss_and_grad([0.0, 0.0], [0.0, 0.0], [1.0, 3.0])
    assert loss == pytest.approx(-2.0)
    assert float(info["clipfrac"]) == 0.0 and float(info["approx_kl"]) == 0.0


@pytest.mark.parametrize(
    "log_ratio, adv, clipped",
    [
        (0.5, 1.0, True),  # ratio above 1+ε with A>0: clipped, no gradient
        (-0.5, -1.0, True),  # ratio below 1−ε with A<0: clipped, no gradient
        (0.5, -1.0, False),  # ratio above 1+ε with A<0: the unclipped (worse) term, gradient flows
        (-0.5, 1.0, False),  # ratio below 1−ε with A>0: unclipped, gradient flows
        (0.05, 1.0, False),  # inside the trust region
    ],
)
def test_clipping_and_advantage_sign(log_ratio, adv, clipped):
    loss, info, grad = loss_and_grad([log_ratio], [0.0], [adv])
    ratio = np.exp(log_ratio)
    expected = max(-adv * ratio, -adv * np.clip(ratio, 1 - EPS, 1 + EPS))
    assert loss == pytest.approx(expected, rel=1e-6)
    if clipped:
        assert grad[0] == 0.0
    else:
        # d/dlogπ of −A·ρ is −A·ρ: the gradient pushes log π up when A > 0.
        assert grad[0] == pytest.approx(-adv * ratio, rel=1e-5)
        assert np.sign(grad[0]) == -np.sign(adv)
    assert float(info["clipfrac"]) == float(abs(ratio - 1) > EPS)


def test_score_function_loss_gradient_is_minus_advantage():
    adv = jnp.asarray([2.0, -1.0])
    (loss, _), grad = jax.value_and_grad(lambda lp: score_function_loss(lp, jnp.zeros(2), adv), has_aux=True)(jnp.asarray([-1.0, -2.0]))
    assert float(loss) == pytest.approx(-(2.0 * -1.0 + -1.0 * -2.0) / 2)
    np.testing.assert_allclose(np.asarray(grad), -np.asarray(adv) / 2)


def test_padding_rows_count_in_no_mean():
    """A zero-weight row (an empty replay slot) changes neither the loss nor the logged metrics,
    however far off-policy it looks, and gets no gradient."""
    log_prob, old, adv = jnp.asarray([0.05, -0.02, 9.0]), jnp.zeros(3), jnp.asarray([1.0, -2.0, 0.0])
    weights = jnp.asarray([1.0, 1.0, 0.0])
    for fn in (lambda lp, o, a, w: ppo_clip_loss(lp, o, a, EPS, w), score_function_loss):
        (loss, info), grad = jax.value_and_grad(fn, has_aux=True)(log_prob, old, adv, weights)
        (loss_valid, info_valid), grad_valid = jax.value_and_grad(fn, has_aux=True)(log_prob[:2], old[:2], adv[:2], None)
        assert float(loss) == pytest.approx(float(loss_valid), rel=1e-6)
        for key in ("approx_kl", "clipfrac", "ratio"):
            assert float(info[key]) == pytest.approx(float(info_valid[key]), rel=1e-6), key
        assert float(info["approx_kl"]) < 0.01  # the padding row's log-ratio 9 would give > 13
        np.testing.assert_allclose(np.asarray(grad[:2]), np.asarray(grad_valid), rtol=1e-6)
        assert float(grad[2]) == 0.0


def test_advantage_clip():
    np.testing.assert_array_equal(np.asarray(clip_advantages(jnp.asarray([-9.0, 0.5, 9.0]), 5.0)), [-5.0, 0.5, 5.0])


def test_stat_tracker_per_prompt_and_global_fallback():
    s = stats.init(num_prompts=3, window=4)
    ids = jnp.asarray([0, 0, 1, 2])
    rewards = jnp.asarray([1.0, 3.0, 10.0, 20.0])
    s = stats.update(s, ids, rewards)
    np.testing.assert_array_equal(np.asarray(s.count), [2, 1, 1])
    # min_count 2: prompt 0 uses its own stats (mean 2, std 1); prompts 1, 2 fall back to the batch.
    adv = np.asarray(stats.advantages(s, ids, rewards, min_count=2))
    np.testing.assert_allclose(adv[:2], [-1.0, 1.0], rtol=1e-5)
    batch = np.asarray(rewards)
    np.testing.assert_allclose(adv[2:], (batch[2:] - batch.mean()) / (batch.std() + 1e-6), rtol=1e-5)


def test_stat_tracker_window_keeps_newest():
    s = stats.init(num_prompts=1, window=3)
    for r in [1.0, 2.0, 3.0, 4.0, 5.0]:
        s = stats.update(s, jnp.asarray([0]), jnp.asarray([r]))
    assert int(s.count[0]) == 5
    assert sorted(np.asarray(s.rewards[0]).tolist()) == [3.0, 4.0, 5.0]
    # Same prompt several times in one batch lands in distinct slots.
    s = stats.update(s, jnp.asarray([0, 0, 0]), jnp.asarray([7.0, 8.0, 9.0]))
    assert sorted(np.asarray(s.rewards[0]).tolist()) == [7.0, 8.0, 9.0]


def test_stat_tracker_skips_invalid_entries():
    s = stats.init(num_prompts=2, window=4)
    s = stats.update(s, jnp.asarray([0, 1]), jnp.asarray([1.0, jnp.nan]), valid=jnp.asarray([True, False]))
    np.testing.assert_array_equal(np.asarray(s.count), [1, 0])
    assert np.isfinite(np.asarray(s.rewards)).all()


def test_stat_tracker_batch_larger_than_window_keeps_exactly_the_last_window():
    """More entries of one prompt than the window in one batch: the last `window` of them are kept,
    with no two writes to one slot (whose order XLA leaves undefined on GPU/TPU), and the ring goes on."""
    s = stats.init(num_prompts=2, window=3)
    s = stats.update(s, jnp.asarray([0]), jnp.asarray([0.5]))
    ids = jnp.asarray([0, 1, 0, 0, 0, 0, 1])
    rewards = jnp.asarray([1.0, 10.0, 2.0, 3.0, 4.0, 5.0, 11.0])
    valid = jnp.asarray([True, True, True, True, True, False, True])  # 5.0 is skipped
    row, slot = (np.asarray(x) for x in stats.write_positions(s, ids, valid))
    written = [(r, k) for r, k in zip(row, slot) if r < 2]
    assert len(written) == len(set(written)) == 5  # 2.0, 3.0, 4.0 and 10.0, 11.0; no slot twice
    s = stats.update(s, ids, rewards, valid=valid)
    np.testing.assert_array_equal(np.asarray(s.count), [5, 2])
    assert sorted(np.asarray(s.rewards[0]).tolist()) == [2.0, 3.0, 4.0]
    assert sorted(np.asarray(s.rewards[1]).tolist()) == [0.0, 10.0, 11.0]  # (0.0: the unfilled slot)
    s = stats.update(s, jnp.asarray([0]), jnp.asarray([6.0]))  # overwrites the oldest kept (2.0)
    assert sorted(np.asarray(s.rewards[0]).tolist()) == [3.0, 4.0, 6.0]
