"""Rollouts on the tiny model: shapes, recomputed log-probs, and sharding invariance."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from rollout_script import rollout_arrays  # noqa: E402


@pytest.fixture(scope="module")
def trajectory(tiny_sd, tiny_policy):
    return rollout_arrays(tiny_sd, tiny_policy)


def test_trajectory_shapes(trajectory, tiny_sd):
    assert trajectory["latents"].shape == (8, 5, 4, tiny_sd.latent_size, tiny_sd.latent_size)
    assert trajectory["log_probs"].shape == (8, 4)
    assert trajectory["images"].shape == (8, tiny_sd.resolution, tiny_sd.resolution, 3)
    assert trajectory["images"].dtype == np.uint8
    assert np.isfinite(trajectory["log_probs"]).all()


def test_recomputed_log_probs_match_sampling(trajectory, tiny_sd, tiny_policy):
    """Under unchanged params the training-time recompute gives the sampling log-probs (ratio 1)."""
    from herd_jax.trainer import encode_prompts
    from rollout_script import PROMPTS

    prompt_embeds, uncond = encode_prompts(tiny_sd, PROMPTS, "")
    cond = prompt_embeds[jnp.asarray([0, 1, 2, 3, 3, 2, 1, 0])]
    latents = jnp.asarray(trajectory["latents"])
    recompute = jax.jit(tiny_policy.transition_log_prob)
    for i, t in enumerate(np.asarray(tiny_policy.schedule.timesteps)):
        log_prob, _, _ = recompute(tiny_sd.params["unet"], latents[:, i], latents[:, i + 1], jnp.full((8,), t), cond, uncond)
        np.testing.assert_allclose(np.asarray(log_prob), trajectory["log_probs"][:, i], atol=1e-4)


def test_sharded_rollout_equals_single_device(trajectory, tmp_path):
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4")
    out = tmp_path / "sharded.npz"
    subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "rollout_script.py"), str(out)], env=env, check=True, timeout=600)
    sharded = np.load(out)
    assert int(sharded["num_devices"]) == 4
    np.testing.assert_allclose(sharded["latents"], trajectory["latents"], atol=1e-4)
    np.testing.assert_allclose(sharded["log_probs"], trajectory["log_probs"], atol=1e-4)
    assert np.abs(sharded["images"].astype(int) - trajectory["images"].astype(int)).max() <= 1


def test_chunked_vae_decode_gives_the_same_images(tiny_sd, tiny_policy):
    import dataclasses

    from herd_jax import trainer

    # Fewest chunks with at most DECODE_BATCH images per device each; 1 where the batch is small.
    assert [trainer.decode_chunks(b, 4) for b in (0, 1, 4, 6, 8, 16, 7)] == [1, 1, 1, 2, 2, 4, 7]
    latents = jax.random.normal(jax.random.PRNGKey(1), (8, *tiny_policy.latent_shape))
    whole = jax.jit(tiny_policy.decode)(tiny_sd.params["vae"], latents)
    chunked = jax.jit(dataclasses.replace(tiny_policy, decode_chunks=4).decode)(tiny_sd.params["vae"], latents)
    assert chunked.shape == whole.shape and np.array_equal(np.asarray(chunked), np.asarray(whole))
