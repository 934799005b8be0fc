"""DDIM step with log-prob: exact density against float64 NumPy, and sampling moments."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd_jax import diffusion


@pytest.fixture(scope="module")
def schedule():
    config = diffusion.SchedulerConfig(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, steps_offset=1,
    )
    return diffusion.make_schedule(config, 10)


def numpy_mean_std(eps, x, t, prev_t, alphas, final_alpha, eta):
    """float64 reference of DDIM eq. 12/16."""
    a_t = alphas[t]
    a_prev = alphas[prev_t] if prev_t >= 0 else final_alpha
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * np.sqrt(var)
    mean = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - std**2) * eps
    return mean, std


def test_schedule_matches_sd_v1(schedule):
    assert schedule.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert schedule.prev_timesteps.tolist()[-1] == -99


@pytest.mark.parametrize("index", [0, 4, 9])
def test_log_prob_matches_float64_gaussian(schedule, index):
    rng = np.random.default_rng(index)
    shape = (3, 4, 8, 8)
    eps, x, x_prev = (rng.standard_normal(shape) for _ in range(3))
    t, prev_t = int(schedule.timesteps[index]), int(schedule.prev_timesteps[index])
    eta = 0.7
    alphas = np.asarray(schedule.alphas_cumprod, np.float64)
    mean, std = numpy_mean_std(eps, x, t, prev_t, alphas, float(schedule.final_alpha_cumprod), eta)
    std = max(std, 1e-6)
    expected = (-((x_prev - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)).mean(axis=(1, 2, 3))

    m, s = diffusion.ddim_mean_std(jnp.asarray(eps, jnp.float32), jnp.asarray(x, jnp.float32), jnp.int32(t), jnp.int32(prev_t), schedule, eta)
    got = diffusion.gaussian_log_prob(jnp.asarray(x_prev, jnp.float32), m, s)
    np.testing.assert_allclose(np.asarray(m), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s).item(), std, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_sampled_step_has_right_mean_and_std(schedule):
    n = 20000
    rng = np.random.default_rng(0)
    eps = jnp.asarray(np.broadcast_to(rng.standard_normal((1, 4, 2, 2)), (n, 4, 2, 2)), jnp.float32)
    x = jnp.asarray(np.broadcast_to(rng.standard_normal((1, 4, 2, 2)), (n, 4, 2, 2)), jnp.float32)
    t, prev_t = schedule.timesteps[3], schedule.prev_timesteps[3]
    mean, std = diffusion.ddim_mean_std(eps, x, t, prev_t, schedule, 1.0)
    samples, log_probs = diffusion.ddim_step(jax.random.PRNGKey(0), eps, x, t, prev_t, schedule, 1.0)
    samples = np.asarray(samples)
    # Standard error of the mean is std/sqrt(n); allow 5 of them.
    np.testing.assert_allclose(samples.mean(0), np.asarray(mean[0]), atol=5 * np.asarray(std).item() / math.sqrt(n))
    np.testing.assert_allclose(samples.std(0), np.asarray(std).item(), rtol=0.03)
    # The average log-density of own samples is the negative entropy per dimension.
    np.testing.assert_allclose(float(log_probs.mean()), -0.5 - math.log(np.asarray(std).item()) - 0.5 * math.log(2 * math.pi), atol=0.01)


def test_std_is_clipped_at_eta_zero(schedule):
    x = jnp.ones((2, 4, 2, 2))
    _, std = diffusion.ddim_mean_std(x, x, schedule.timesteps[0], schedule.prev_timesteps[0], schedule, 0.0)
    assert np.asarray(std).item() == pytest.approx(diffusion.MIN_STD)
