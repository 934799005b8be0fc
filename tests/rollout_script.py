"""Runs the sharded rollout on however many devices the process has; saves the trajectory.

Used by test_rollout.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""
import sys

import jax
import numpy as np

from herd_jax import parallel
from herd_jax.diffusion import make_policy
from herd_jax.models import load_pipeline
from herd_jax.algorithms.api import Frozen
from herd_jax.trainer import encode_prompts, make_rollout

PROMPTS = ["a cat", "a dog", "a red fox", "a tiny bird"]


def rollout_arrays(sd, policy) -> dict[str, np.ndarray]:
    mesh = parallel.make_mesh()
    embeds, uncond = encode_prompts(sd, PROMPTS, "")
    frozen = parallel.replicate(Frozen(vae=sd.params["vae"], goal_embeds=embeds, uncond=uncond, base=None, pretrained=None), mesh)
    rollout = make_rollout(policy, mesh)
    ids = parallel.shard_batch(np.asarray([0, 1, 2, 3, 3, 2, 1, 0], np.int32), mesh)
    traj = rollout(parallel.replicate(sd.params["unet"], mesh), frozen, ids, jax.random.PRNGKey(7))
    assert len(traj.latents.sharding.device_set) == len(jax.devices())
    return {k: np.asarray(v) for k, v in traj._asdict().items()}


if __name__ == "__main__":
    sd = load_pipeline("tiny")
    np.savez(sys.argv[1], num_devices=len(jax.devices()), **rollout_arrays(sd, make_policy(sd, num_steps=4, eta=1.0, guidance_scale=5.0)))
