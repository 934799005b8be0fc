"""bf16 compute (float32 master params, float32 DDIM arithmetic and log-probs) against float32.

The bf16 rollout's own log-probs say nothing about its precision: the log-prob of a sampled step
is a function of its noise alone (−z²/2 − log σ − log √2π, averaged), the same in both runs. So
the log-prob check recomputes, under the bf16 policy, the log-probs of the float32 trajectory's
transitions — what training does with stored trajectories — and compares them with float32's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def models(tiny_sd):
    from herd_jax.diffusion import make_policy
    from herd_jax.models import load_pipeline
    from herd_jax.trainer import encode_prompts

    bf16 = load_pipeline("tiny", compute_dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16.params["unet"])[0].dtype == jnp.float32  # master params stay float32
    prompt_embeds, uncond = encode_prompts(tiny_sd, ["a cat", "a dog"], "")
    cond = prompt_embeds[jnp.asarray([0, 1, 0, 1])]
    return {
        name: (sd, make_policy(sd, num_steps=4, eta=1.0, guidance_scale=5.0), cond, uncond)
        for name, sd in [("fp32", tiny_sd), ("bf16", bf16)]
    }


@pytest.fixture(scope="module")
def rollouts(models):
    return {
        name: jax.jit(policy.rollout)(sd.params["unet"], sd.params["vae"], cond, uncond, jax.random.PRNGKey(0))
        for name, (sd, policy, cond, uncond) in models.items()
    }


def test_bf16_rollout_matches_fp32(rollouts):
    fp32, bf16 = rollouts["fp32"], rollouts["bf16"]
    assert bf16.log_probs.dtype == jnp.float32 and bf16.latents.dtype == jnp.float32
    latent_err = float(jnp.max(jnp.abs(bf16.latents - fp32.latents)))
    latent_mean_err = float(jnp.mean(jnp.abs(bf16.latents - fp32.latents)) / jnp.mean(jnp.abs(fp32.latents)))
    pixel_err = np.abs(np.asarray(bf16.images, int) - np.asarray(fp32.images, int))
    print(f"bf16 vs fp32: max |Δlatent| {latent_err:.3g}, relative mean |Δlatent| {latent_mean_err:.3g}, mean |Δpixel| {pixel_err.mean():.3g}")
    # Stated tolerance: same noise, 4 steps, guidance 5 (which amplifies the UNet's bf16 error);
    # bf16 has ~3 significant digits. Measured on the tiny model: relative mean 1.5-1.7%, max 0.37.
    assert latent_mean_err < 0.03
    assert latent_err < 0.5
    assert pixel_err.mean() < 2.0
    # And the two really differ (the bf16 path is not silently float32).
    assert latent_err > 1e-6


def test_bf16_log_probs_of_fp32_transitions_match_fp32(models, rollouts):
    fp32 = rollouts["fp32"]
    sd, policy, cond, uncond = models["bf16"]
    bf16_log_probs = np.asarray(jax.jit(policy.trajectory_log_probs)(sd.params["unet"], fp32.latents, cond, uncond))
    err = np.abs(bf16_log_probs - np.asarray(fp32.log_probs))  # fp32's recorded log-probs == its recompute (test_rollout.py)
    print(f"bf16 vs fp32 log-probs of the same transitions: max |Δ| per step {err.max(axis=0)}, mean {err.mean():.3g}")
    # Stated tolerance: max 0.25, mean 0.02, last step 0.01. Measured: max per step 4.9e-3,
    # 3.6e-3, 5.7e-2, 7.6e-4 (the third step, t=251 → 1, has the largest std-relative error of
    # its mean), mean 6.2e-3. For scale: the same transitions under float32 with the two prompts
    # swapped differ by max 5.5e-2, mean 2.0e-2. Sensitivity, measured by breaking the code: the
    # DDIM step in the compute dtype (bf16) gives last step 8.9e-2, mean 3.0e-2; the Gaussian
    # log-density in bf16 gives last step 0.23, mean 6.2e-2.
    assert err.max() < 0.25
    assert err.mean() < 0.02
    assert err[:, -1].max() < 0.01
    assert err.max() > 1e-4  # the recompute really ran in bf16 (the sampled log-probs agree to 5e-7)


def test_model_options_choices_are_the_models():
    """The config's choices for model_options are exactly what the models (and memory_plan's CLI) accept."""
    import typing

    from herd_jax import config as config_lib
    from herd_jax import memory_plan, trainer
    from herd_jax.models import ATTENTION, REMAT

    hints = typing.get_type_hints(config_lib.ModelOptions)
    assert typing.get_args(hints["attention"]) == ATTENTION == memory_plan.ATTENTION
    assert typing.get_args(hints["remat"]) == REMAT == memory_plan.REMAT
    assert typing.get_args(hints["frozen_dtype"]) == tuple(trainer.DTYPES) == memory_plan.FROZEN_DTYPES


def test_bf16_frozen_copies_keep_lora_rollouts_close(tiny_sd, tiny_policy):
    """model_options.frozen_dtype=bfloat16: the VAE and the LoRA base are stored in bf16 (half the
    memory), the adapted kernels merge in float32, and rollouts with the same noise stay close."""
    from herd_jax import config as config_lib
    from herd_jax import trainer
    from herd_jax.trainer import encode_prompts

    embeds, uncond = encode_prompts(tiny_sd, ["a cat", "a dog"], "")
    cond = embeds[jnp.asarray([0, 1, 0, 1])]
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config_lib.load_config(["configs/tiny.toml"], [f'model_options.frozen_dtype="{dtype}"', 'train.trainable="lora"'])
        frozen = trainer.make_frozen(cfg, tiny_sd.params, embeds, uncond, needs_pretrained=True)
        trainable = trainer.make_trainable(cfg)
        adapters = trainable.init(tiny_sd.params["unet"], jax.random.PRNGKey(0))
        adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # a trained adapter: B != 0
        unet = trainable.unet_params(adapters, frozen.base)
        leaves = jax.tree.leaves((frozen.vae, frozen.base))
        assert all(x.dtype == jnp.dtype(dtype) for x in leaves) and frozen.pretrained is frozen.base  # one copy
        merged = {x.dtype for p, x in jax.tree_util.tree_flatten_with_path(unet)[0] if "to_q" in jax.tree_util.keystr(p)}
        assert merged == {jnp.dtype(jnp.float32)}  # the adapters' updates are not rounded to bf16
        out[dtype] = jax.jit(tiny_policy.rollout)(unet, frozen.vae, cond, uncond, jax.random.PRNGKey(0))
    f32, bf16 = out["float32"], out["bfloat16"]
    latent_mean_err = float(jnp.mean(jnp.abs(bf16.latents - f32.latents)) / jnp.mean(jnp.abs(f32.latents)))
    logp_err = float(jnp.max(jnp.abs(bf16.log_probs - f32.log_probs)))
    pixel_err = np.abs(np.asarray(bf16.images, int) - np.asarray(f32.images, int))
    print(f"bf16 frozen vs fp32: relative mean |Δlatent| {latent_mean_err:.3g}, max |Δlog-prob| {logp_err:.3g}, mean |Δpixel| {pixel_err.mean():.3g}")
    # Stated tolerance: weights rounded to bf16 (relative 2^-9), activations float32; 4 steps, guidance 5.
    assert 1e-7 < latent_mean_err < 0.01
    assert logp_err < 1e-3
    assert pixel_err.mean() < 1.0
