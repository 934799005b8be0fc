"""The paths an epoch takes that the default CPU settings would skip.

- `train.update_loop=scan` (one jitted program: the GPU/TPU default) and `host` (the CPU default)
  give the same params after an epoch that has several sampling batches, two minibatches, two
  inner epochs and half the timesteps trained.
- A multi-batch epoch (scoring of batch i overlaps sampling of batch i+1): every reward belongs
  to its own image, prompt and trajectory.
- Inner epochs reuse the batch under updated params (ratio ≠ 1 from the second on); the score
  function estimator lowers its own surrogate loss on the batch it trained on.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from herd_jax import config as config_lib
from herd_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = ["configs/tiny.toml", "tests/fast.toml"]
MULTI = [
    'algorithm.name="ddpo"', 'logging.log_with="none"', "checkpoint.save_every=0",
    "sample.num_batches_per_epoch=2",  # 8 samples: two sampling batches, two minibatches of 4
    "train.num_inner_epochs=2", "train.timestep_fraction=0.5",
    # Adam divides by sqrt(v) + eps: with the default eps 1e-8 a param whose gradient is ~1e-7
    # takes a near-full ±lr step whose sign float noise decides, so two summation orders can
    # differ by 2·lr there. eps 1e-4 keeps updates of such params proportional to the gradient.
    "train.adam_eps=1e-4",
]


SCAN_VS_HOST_TOL = 5e-6  # max |Δparam| after the epoch (measurements in the test)


def build(tmp_path: pathlib.Path, *overrides: str):
    cfg = config_lib.load_config([str(REPO / f) for f in SHAPES], [f"run_dir={str(tmp_path)!r}", *MULTI, *overrides])
    return trainer.build(cfg)


class MeanPixel:
    """A reward that is a known function of (image, prompt): mean pixel / 255 + the prompt's index."""

    name = "mean_pixel"

    def __init__(self, prompts: list[str]):
        self.index = {p: i for i, p in enumerate(prompts)}

    def __call__(self, images, prompts):
        return expected_reward(images, [self.index[p] for p in prompts])

    def close(self):
        pass


def expected_reward(images: np.ndarray, prompt_ids) -> np.ndarray:
    return (np.asarray(images, np.float64).reshape(len(images), -1).mean(1) / 255.0 + np.asarray(prompt_ids)).astype(np.float32)


def compiled_at_o1(jitted):
    """`jitted`, compiled on its first call with LLVM at -O1, then that executable: the suite
    compiles at -O0 (tests/conftest.py), under which the scanned update executes ~20x slower (an
    epoch here: 30 vs 1.6 CPU-s, 2026-12-07). The same program; its results differ from -O0's by
    float rounding only."""
    compiled = []

    def call(*args):
        if not compiled:
            compiled.append(jitted.lower(*args).compile({"xla_backend_optimization_level": 1}))
        return compiled[0](*args)

    return call


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    setup, state = build(tmp_path_factory.mktemp("host"), 'train.update_loop="host"')
    yield setup, state
    setup.logger.close()


def test_multi_batch_epoch_rewards_belong_to_their_trajectories(host):
    setup, state = host
    reward, setup.reward = setup.reward, MeanPixel(setup.goals)
    try:
        n = setup.cfg.sample.batch_size * setup.cfg.sample.num_batches_per_epoch
        prompt_ids = np.arange(n, dtype=np.int32) % len(setup.prompts)
        trajectories, images, rewards = trainer.collect_rollouts(setup, state.params, prompt_ids, jax.random.PRNGKey(3))
    finally:
        setup.reward = reward
    assert images.shape[0] == trajectories.latents.shape[0] == len(prompt_ids) == len(rewards) == n
    np.testing.assert_allclose(rewards, expected_reward(images, prompt_ids), rtol=0, atol=1e-6)
    # Each image is its own trajectory's final latent decoded (a row shift between batches would
    # pair an image with another trajectory: pixels differ by tens of levels then).
    decoded = np.asarray(jax.jit(setup.policy.decode)(setup.frozen.vae, trajectories.latents[:, -1]))
    assert np.abs(decoded.astype(int) - images.astype(int)).max() <= 1
    # The batches are different samples with their own prompt draws.
    half = n // 2
    assert not np.array_equal(images[:half], images[half:])
    assert np.abs(np.asarray(trajectories.latents[:half, 0]) - np.asarray(trajectories.latents[half:, 0])).max() > 0.1


def test_scan_and_host_updates_give_the_same_params(host, tmp_path):
    host_setup, initial = host
    scan_setup, scan_initial = build(tmp_path, 'train.update_loop="scan"')
    assert not hasattr(scan_setup.steps.update, "jitted")  # the one-program update really runs
    scan_setup.steps = scan_setup.steps._replace(update=compiled_at_o1(scan_setup.steps.update))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    a, metrics_host, _ = trainer.run_epoch(host_setup, copy(initial))
    b, metrics_scan, _ = trainer.run_epoch(scan_setup, copy(scan_initial))
    np.testing.assert_array_equal(metrics_host["reward/mean"], metrics_scan["reward/mean"])  # same samples
    moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(initial.params)))
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    # Same keys, permutations and arithmetic; only float summation order differs (XLA fuses the
    # loops differently, and here compiles them at other LLVM levels). Measured 2026-12-07: max
    # |scan - host| 1.5e-7 with both at -O0, 7.9e-7 with the scan at -O1, 5.5e-7 with YNNPACK
    # fusions off (XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=: other convolution code);
    # params moved 1.1e-3. An update that skipped a minibatch, an inner epoch or trained other
    # timesteps would differ by about as much as the params moved.
    print(f"scan vs host: params moved {moved:.3g}, max |scan - host| {diff:.3g}")
    assert moved > 100 * SCAN_VS_HOST_TOL
    assert diff < SCAN_VS_HOST_TOL
    for key in ("train/loss", "train/approx_kl", "train/clipfrac"):
        np.testing.assert_allclose(metrics_scan[key], metrics_host[key], rtol=1e-4, atol=1e-7, err_msg=key)


def test_inner_epochs_train_under_updated_params(host, tmp_path):
    """With one inner epoch and one minibatch every ratio is exactly 1 (params unchanged while the
    gradient accumulates); a second inner epoch sees the updated params, so approx_kl > 0."""
    setup, initial = host
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    _, two, _ = trainer.run_epoch(setup, copy(initial))
    single, single_initial = build(tmp_path, "train.num_inner_epochs=1", "train.batch_size=8")
    _, one, _ = trainer.run_epoch(single, copy(single_initial))
    print(f"approx_kl: 1 inner epoch {one['train/approx_kl']:.3g}, 2 inner epochs {two['train/approx_kl']:.3g}")
    assert one["train/approx_kl"] < 1e-9 and one["train/clipfrac"] == 0.0
    assert two["train/approx_kl"] > 1e3 * max(one["train/approx_kl"], 1e-12)


def test_score_function_update_lowers_its_surrogate_on_the_batch(tiny_sd, tiny_policy):
    """One sf update (all timesteps, one minibatch) is a descent step on E[−A·log π] of that batch."""
    from herd_jax.algorithms import ddpo
    from herd_jax.algorithms.api import Batch, Frozen, Transition
    from herd_jax.train_step import HostLoopUpdate, make_optimizer
    from herd_jax.trainer import encode_prompts

    embeds, uncond = encode_prompts(tiny_sd, ["a red ball", "a blue car"], "")
    ids = jnp.asarray([0, 1, 0, 1])
    cond = embeds[ids]
    params = tiny_sd.params["unet"]
    traj = jax.jit(tiny_policy.rollout)(params, tiny_sd.params["vae"], cond, uncond, jax.random.PRNGKey(0))
    advantages = jnp.asarray([1.5, -1.0, 0.5, -1.0])
    per_step = jnp.broadcast_to(advantages[:, None], traj.log_probs.shape)
    batch = Batch(traj.latents, traj.log_probs, cond, per_step, jnp.ones(4))
    loss_fn = ddpo.make_loss(tiny_policy, estimator="sf")
    aux = Frozen(vae=None, goal_embeds=embeds, uncond=uncond, base=None, pretrained=None)

    @jax.jit
    def surrogate(p):
        def step(i):
            tr = Transition(
                x_t=traj.latents[:, i], x_prev=traj.latents[:, i + 1], t=jnp.full((4,), tiny_policy.schedule.timesteps[i]),
                old_log_prob=traj.log_probs[:, i], cond=cond, advantages=advantages, weights=jnp.ones(4),
            )
            return loss_fn(p, aux, tr)[0]
        return jnp.mean(jax.lax.map(step, jnp.arange(tiny_policy.num_steps)))  # one UNet in the program, not one per step

    optimizer = make_optimizer(1e-4)
    update = HostLoopUpdate(loss_fn, optimizer, num_inner_epochs=1, minibatch_size=4, num_train_timesteps=tiny_policy.num_steps)
    # The update donates its params: hand it a copy, never the shared tiny model's arrays.
    new_params, _, info = update(jax.tree.map(jnp.copy, params), optimizer.init(params), aux, batch, tiny_policy.schedule.timesteps, jax.random.PRNGKey(1))
    before, after = float(surrogate(params)), float(surrogate(new_params))
    print(f"sf surrogate: before {before:.6f}, after {after:.6f}, logged loss {float(info['loss']):.6f}")
    # The update saw this batch's loss (another summation order: float noise of a small mean of ±terms).
    np.testing.assert_allclose(float(info["loss"]), before, rtol=1e-3, atol=1e-6)
    assert after < before - 1e-4 * abs(before)


def test_training_policy_takes_the_configured_remat(tiny_policy):
    """model_options.remat reaches the UNet the losses differentiate (`trainer.training_policy`),
    attention and everything else unchanged; that remat leaves outputs and gradients as they are is
    test_models.test_attention_and_remat_choices_match_plain (blocks and dots)."""
    from herd_jax.trainer import training_policy

    for remat in ("none", "blocks", "dots"):
        policy = training_policy(tiny_policy, config_lib.load_config([], [f'model_options.remat="{remat}"']))
        assert policy.unet.remat == remat and policy.unet.attention == tiny_policy.unet.attention
        assert policy.unet.clone(remat=tiny_policy.unet.remat) == tiny_policy.unet and policy.schedule is tiny_policy.schedule
