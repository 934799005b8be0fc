"""herd_jax.models: the tiny model build, the loader (safetensors / .bin / msgpack), parity with PyTorch, errors.

Parity tolerances (float32, measured on this CPU): UNet <= 2e-6, VAE decode <= 4e-6, text
encoder <= 2e-6 max abs difference; asserted at 1e-4 as the issue asks.
"""

import hashlib
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from torch_threads import torch_one_thread

from herd_jax.models import (
    ModelNotFoundError,
    StableDiffusion,
    build_tiny_model,
    load_pipeline,
    tiny_model_path,
    write_bin_copy,
)
from herd_jax.models import weights

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
# sha256 over (path, float32 bytes) of the tiny model's params as diffusers 0.39 / transformers
# 4.57's Flax converters loaded them (tiny model v2, before our own modules and mapping): the
# learning benchmarks are tuned on exactly these weights. The VAE's covers decoder + post_quant_conv.
V2_PARAM_DIGESTS = {
    "unet": "6fe4b86dc2ddd7f6627192a8bd7b845bb4c35274fda27a86f9660da79c07a173",
    "vae": "de4efefd3640a79ff5ccf00c36cfd1de0a4db2c950caf29db742734a04092422",
    "text_encoder": "f62c5f86bdae6832fed3647c101b82d0cfb69ff2225414882768c02ac60f38f7",
}
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def tiny_path() -> pathlib.Path:
    return tiny_model_path()


@pytest.fixture(scope="session")
def sd(tiny_path, tiny_sd) -> StableDiffusion:
    """conftest's session-wide `load_pipeline("tiny")`."""
    return tiny_sd


@pytest.fixture(scope="session")
def torch_pipeline(tiny_path):
    """The same directory loaded by diffusers' own PyTorch pipeline: the reference for parity."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        tiny_path, safety_checker=None, feature_extractor=None, low_cpu_mem_usage=False
    )


@pytest.fixture(scope="session")
def encode(sd):
    """One jitted text encoder shared by the tests (compiles dominate test time)."""
    return jax.jit(sd.encode_text)


def _trees_equal(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _digest(tree) -> str:
    flat, h = flatten_dict(tree), hashlib.sha256()
    for key in sorted(flat):
        h.update("/".join(key).encode())
        h.update(np.ascontiguousarray(np.asarray(flat[key], np.float32)).tobytes())
    return h.hexdigest()


def _unet_inputs(batch=2, channels=4, size=8, context_dim=32, seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
    timesteps = np.array([17, 901][:batch], dtype=np.int32)
    return sample, timesteps, rng.standard_normal((batch, 77, context_dim), dtype=np.float32)


def _torch_unet(unet, sample, timesteps, context):
    import torch

    with torch_one_thread():
        return unet(torch.from_numpy(sample), torch.from_numpy(timesteps).long(), torch.from_numpy(context)).sample.numpy()


# --- the tiny model ---------------------------------------------------------------------


def test_tiny_model_layout_and_size(tiny_path, sd):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_path / sub).is_dir()
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    n_unet = sum(x.size for x in jax.tree.leaves(sd.params["unet"]))
    print(f"tiny UNet parameters: {n_unet:,}")
    assert 500_000 <= n_unet <= 2_000_000
    assert (sd.latent_channels, sd.vae_scale_factor, sd.latent_size, sd.resolution) == (4, 4, 8, 32)
    assert sd.max_length == 77 and sd.scaling_factor == pytest.approx(0.18215)
    assert sd.path == str(tiny_path)
    s = sd.scheduler
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.set_alpha_to_one, s.steps_offset) == ("scaled_linear", 0.00085, 0.012, False, 1)
    assert json.loads((tiny_path / "scheduler/scheduler_config.json").read_text())["clip_sample"] is False


def test_loaded_params_are_tiny_model_v2s(sd):
    """Bit-identical to what the former (diffusers/transformers Flax) loader gave for tiny model v2."""
    assert {name: _digest(tree) for name, tree in sd.params.items()} == V2_PARAM_DIGESTS


def test_build_is_deterministic(tiny_path, tmp_path):
    build_tiny_model(tmp_path / "same", seed=0)
    build_tiny_model(tmp_path / "other", seed=1)
    for file in WEIGHT_FILES:
        reference = (tiny_path / file).read_bytes()
        assert (tmp_path / "same" / file).read_bytes() == reference, file
        assert (tmp_path / "other" / file).read_bytes() != reference, file


def test_diffusers_pytorch_pipeline_loads_tiny(torch_pipeline):
    assert type(torch_pipeline.scheduler).__name__ == "DDIMScheduler"
    assert torch_pipeline.text_encoder.config.vocab_size == len(torch_pipeline.tokenizer)


# --- the name mapping -------------------------------------------------------------------


def test_mapping_examples(sd, tiny_path):
    """Hand-written PyTorch name and layout for one parameter of each kind."""
    from safetensors.numpy import load_file

    unet = load_file(tiny_path / "unet/diffusion_pytorch_model.safetensors")
    vae = load_file(tiny_path / "vae/diffusion_pytorch_model.safetensors")
    text = load_file(tiny_path / "text_encoder/model.safetensors")
    hwio = lambda w: np.transpose(w, (2, 3, 1, 0))
    attn = "down_blocks.0.attentions.0.transformer_blocks.0"
    cases = [
        (sd.params["unet"]["conv_in"]["kernel"], hwio(unet["conv_in.weight"])),
        (sd.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_out_0"]["kernel"],
         unet[f"{attn}.attn1.to_out.0.weight"].T),
        (sd.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"],
         unet[f"{attn}.ff.net.0.proj.weight"].T),
        (sd.params["unet"]["up_blocks_1"]["attentions_1"]["proj_in"]["kernel"], hwio(unet["up_blocks.1.attentions.1.proj_in.weight"])),
        (sd.params["unet"]["time_embedding"]["linear_1"]["kernel"], unet["time_embedding.linear_1.weight"].T),
        (sd.params["unet"]["mid_block"]["resnets_1"]["norm2"]["scale"], unet["mid_block.resnets.1.norm2.weight"]),
        (sd.params["unet"]["up_blocks_0"]["upsamplers_0"]["conv"]["bias"], unet["up_blocks.0.upsamplers.0.conv.bias"]),
        (sd.params["vae"]["decoder"]["mid_block"]["attentions_0"]["query"]["kernel"], vae["decoder.mid_block.attentions.0.to_q.weight"].T),
        (sd.params["vae"]["decoder"]["mid_block"]["attentions_0"]["proj_attn"]["bias"], vae["decoder.mid_block.attentions.0.to_out.0.bias"]),
        (sd.params["vae"]["post_quant_conv"]["kernel"], hwio(vae["post_quant_conv.weight"])),
        (sd.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"],
         text["embeddings.token_embedding.weight"]),  # transformers 5 saves CLIPTextModel without "text_model."
        (sd.params["text_encoder"]["text_model"]["encoder"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"],
         text["encoder.layers.1.self_attn.q_proj.weight"].T),
    ]
    for ours, theirs in cases:
        np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_export_mapping_inverts_the_loader(sd, tiny_path):
    """Our UNet params mapped back give the published file's exact names, shapes and values."""
    from safetensors.numpy import load_file

    published = load_file(tiny_path / "unet/diffusion_pytorch_model.safetensors")
    exported = weights.torch_state_dict(jax.device_get(sd.params["unet"]), "unet")
    assert sorted(exported) == sorted(published)
    for key, value in published.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


# --- formats ----------------------------------------------------------------------------


def test_bin_weights_load_like_safetensors(sd, tiny_path, tmp_path):
    bin_dir = write_bin_copy(tiny_path, tmp_path / "bin")
    assert not list(bin_dir.rglob("*.safetensors"))
    assert (bin_dir / "unet/diffusion_pytorch_model.bin").is_file()
    assert (bin_dir / "text_encoder/pytorch_model.bin").is_file()
    start = time.perf_counter()
    from_bin = load_pipeline(bin_dir)
    print(f"load_pipeline(tiny .bin copy): {time.perf_counter() - start:.2f}s")
    assert _trees_equal(from_bin.params, sd.params)


def test_flax_msgpack_weights_load(sd, tiny_path, tmp_path):
    from flax.serialization import to_bytes

    flax_dir = tmp_path / "flax"
    shutil.copytree(tiny_path, flax_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (flax_dir / "unet/diffusion_flax_model.msgpack").write_bytes(to_bytes(sd.params["unet"]))
    # As diffusers' Flax AutoencoderKL saved it: the encoder too (skipped: we only decode).
    encoder = {"encoder": {"conv_in": {"bias": np.zeros(3, np.float32)}}, "quant_conv": {"bias": np.zeros(8, np.float32)}}
    (flax_dir / "vae/diffusion_flax_model.msgpack").write_bytes(to_bytes({**sd.params["vae"], **encoder}))
    (flax_dir / "text_encoder/flax_model.msgpack").write_bytes(to_bytes(sd.params["text_encoder"]))
    assert _trees_equal(load_pipeline(flax_dir).params, sd.params)


def test_bfloat16_params(tiny_path):
    model = load_pipeline(tiny_path, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.unet.dtype == jnp.float32


# --- parity with PyTorch ----------------------------------------------------------------


@pytest.fixture(scope="session")
def unet_fn():
    """jit((module, params, sample, t, context) -> output), the module static: one compile per variant."""
    return jax.jit(lambda unet, p, x, t, c: unet.apply({"params": p}, x, t, c), static_argnums=0)


def test_unet_matches_pytorch(sd, torch_pipeline, unet_fn):
    sample, timesteps, context = _unet_inputs()
    expected = _torch_unet(torch_pipeline.unet, sample, timesteps, context)
    got = np.asarray(unet_fn(sd.unet, sd.params["unet"], sample, timesteps, context))
    assert got.shape == expected.shape
    print(f"tiny UNet vs PyTorch: max |diff| {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert np.abs(expected).mean() > 1e-2  # a non-trivial output, so the comparison means something


def test_text_encoder_matches_pytorch(sd, encode, torch_pipeline):
    import torch

    ids = sd.tokenize(["a red apple on the green table", "blue"])
    with torch_one_thread():
        expected = torch_pipeline.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    got = encode(sd.params["text_encoder"], ids)
    print(f"tiny text encoder vs PyTorch: max |diff| {np.abs(np.asarray(got) - expected).max():.2e}")
    np.testing.assert_allclose(np.asarray(got), expected, atol=TOLERANCE, rtol=0)


def test_vae_decode_matches_pytorch(sd, torch_pipeline):
    import torch

    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8), dtype=np.float32)
    with torch_one_thread():
        expected = torch_pipeline.vae.decode(torch.from_numpy(latents)).sample.numpy()
    decode = jax.jit(lambda p, z: sd.vae.apply({"params": p}, z))  # NCHW in and out
    got = np.asarray(decode(sd.params["vae"], latents))
    assert got.shape == (2, 3, 32, 32)
    print(f"tiny VAE decode vs PyTorch: max |diff| {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_tokenize_and_encode_shapes(sd, encode):
    ids = sd.tokenize(["a red apple", "the green thing " * 40])
    ids = np.concatenate([ids, sd.tokenize([""])])
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    bos, eos = sd.tokenizer.bos_token_id, sd.tokenizer.eos_token_id
    assert (ids[:, 0] == bos).all()
    assert ids[1, -1] == eos  # truncated prompts still end with the end token
    assert (ids[2, 1:] == sd.tokenizer.pad_token_id).all()
    assert len(set(map(tuple, ids))) == 3
    hidden = encode(sd.params["text_encoder"], ids[:2])  # the batch shape test_text_encoder_... compiled
    assert hidden.shape == (2, 77, 32) and hidden.dtype == jnp.float32
    with pytest.raises(TypeError):
        sd.tokenize("a single string")


def test_tokenizer_ids_are_tiny_model_v2s(sd):
    """transformers 5's CLIP tokenizer gives the ids transformers 4.57's slow one gave on tiny model v2."""
    ids = sd.tokenize(["a red apple on the green table", "blue", "", "The Green thing " * 40,
                       "a photo of a cat, 4k!! ünïcode  spaces", "red car. green ball. the end"])
    # Recorded with transformers 4.57.6:
    assert ids[0, :10].tolist() == [531, 320, 522, 64, 79, 79, 75, 324, 520, 513]
    assert ids[4, :14].tolist() == [531, 320, 79, 71, 78, 83, 334, 523, 320, 66, 64, 339, 267, 275]
    assert (int(ids[:, :12].sum()), int(ids.sum())) == (26334, 211320)


# --- attention and remat ----------------------------------------------------------------


def test_chunked_attention_matches_xla():
    """Several query and key chunks (lengths not multiples of the chunk sizes), causal or not, and gradients."""
    from herd_jax.models.layers import chunked_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 8)), jnp.float32) for n in (37, 29, 29))
    def out_and_grads(attend):  # the output and d sum(sin(output)) / d (q, k, v)
        def f(*args):
            out, vjp = jax.vjp(attend, *args)
            return out, vjp(jnp.cos(out))
        return jax.jit(f)

    for causal, kv in ((False, (k, v)), (True, (q, q))):
        plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
        chunked = lambda q, k, v: chunked_attention(q, k, v, is_causal=causal, query_chunk_size=8, key_chunk_size=6)
        for got, want in zip(jax.tree.leaves(out_and_grads(chunked)(q, *kv)), jax.tree.leaves(out_and_grads(plain)(q, *kv))):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="session")
def unet_value_and_grad():
    """jit(module, params, inputs) -> (d sum(output·w) / d params, output), the module static."""

    def f(unet, params, sample, t, context):
        out = unet.apply({"params": params}, sample, t, context)
        weight = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jax.grad(lambda p: jnp.sum(unet.apply({"params": p}, sample, t, context) * weight))(params), out

    return jax.jit(f, static_argnums=0)


def test_chunked_attention_in_the_unet_matches_plain(sd):
    """The UNet's output with chunked attention within 1e-5 of xla attention (float32). Its gradients
    are checked at the layer (test_chunked_attention_matches_xla): the UNet's chunked gradient
    compiles for a minute on 2 cores (5 with remat) and adds nothing the layer check misses."""
    inputs = _unet_inputs()
    forward = lambda unet: jax.jit(lambda p, *x: unet.apply({"params": p}, *x))(sd.params["unet"], *inputs)
    chunked, plain = sd.unet.clone(attention="chunked", remat="none"), sd.unet.clone(attention="xla", remat="none")
    loops = lambda unet: str(jax.make_jaxpr(lambda p, *x: unet.apply({"params": p}, *x))(sd.params["unet"], *inputs)).count("scan[")
    assert loops(chunked) > loops(plain) == 0  # really chunked (key chunks scanned)
    np.testing.assert_allclose(forward(chunked), forward(plain), atol=1e-5, rtol=0)


# (the training policy's remat wiring: test_update_paths.)
@pytest.mark.parametrize("attention, remat", [("xla", "blocks"), ("xla", "dots")])
def test_attention_and_remat_choices_match_plain(sd, unet_value_and_grad, attention, remat):
    """Outputs within 1e-5 and gradients within 1e-4 of the largest gradient entry (float32)."""
    inputs = _unet_inputs()
    grads, out = unet_value_and_grad(sd.unet.clone(attention="xla", remat="none"), sd.params["unet"], *inputs)
    grads_v, out_v = unet_value_and_grad(sd.unet.clone(attention=attention, remat=remat), sd.params["unet"], *inputs)
    np.testing.assert_allclose(out_v, out, atol=1e-5, rtol=0)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for path, g in flatten_dict(grads).items():
        np.testing.assert_allclose(flatten_dict(grads_v)[path], g, atol=1e-4 * scale, rtol=0, err_msg="/".join(path))


def test_cudnn_attention(sd):
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a GPU (JAX backend here: %s)" % jax.default_backend())
    from herd_jax.models.layers import dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 4, 64)), jnp.bfloat16) for _ in range(3))
    got = dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32)
    want = dot_product_attention(q, k, v, implementation="xla").astype(jnp.float32)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)


# --- another SD shape, written by diffusers ---------------------------------------------


@pytest.fixture(scope="session")
def variant(tiny_path, tmp_path_factory):
    """(directory, PyTorch pipeline) of an SD in the hub layout with other widths and options than the tiny one.

    Per-block heads, linear projections, 2 layers and 2 transformer layers per block, 3 levels,
    only-cross-attention in one block, GELU, 8 groups, other time embedding, padding-0
    downsampling, 5x5 conv_in, a 2-level VAE with 8 groups, a GELU text encoder of width 24, the
    tiny model's BPE tokenizer, a v-prediction cosine schedule with trailing timesteps.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_path / "tokenizer")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32, 48), layers_per_block=2, transformer_layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, only_cross_attention=(False, True, False),
        upcast_attention=True, cross_attention_dim=24, norm_num_groups=8, norm_eps=1e-6, act_fn="gelu",
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_block_scale_factor=1.5,
        center_input_sample=True, time_embedding_dim=40, conv_in_kernel=5, conv_out_kernel=1,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=8,
                        latent_channels=4, sample_size=16, scaling_factor=0.13)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                              timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False).to(torch.float32)
    path = tmp_path_factory.mktemp("variant") / "sd"
    pipeline.save_pretrained(path, safe_serialization=True)
    return path, pipeline


@pytest.fixture(scope="session")
def variant_sd(variant) -> StableDiffusion:
    return load_pipeline(variant[0])


def test_variant_matches_pytorch(variant, variant_sd, unet_fn):
    import torch

    _, pipeline = variant
    sd = variant_sd
    assert sd.unet.config.num_heads == (2, 4, 4) and sd.scheduler.prediction_type == "v_prediction"
    sample, timesteps, context = _unet_inputs(context_dim=24, seed=2)
    expected = _torch_unet(pipeline.unet, sample, timesteps, context)
    got = np.asarray(unet_fn(sd.unet, sd.params["unet"], sample, timesteps, context))
    print(f"variant UNet vs PyTorch: max |diff| {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert np.abs(expected).mean() > 1e-2
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    ids = sd.tokenize(["a red apple", "the green table and the blue ball"])
    with torch_one_thread():
        expected_images = pipeline.vae.decode(torch.from_numpy(latents)).sample.numpy()
        expected_text = pipeline.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    images = np.asarray(jax.jit(lambda p, z: sd.vae.apply({"params": p}, z))(sd.params["vae"], latents))
    assert images.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(images, expected_images, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(sd.encode_text)(sd.params["text_encoder"], ids)), expected_text,
                               atol=TOLERANCE, rtol=0)


def test_variant_bin_loads_like_safetensors(variant, variant_sd, tmp_path):
    assert _trees_equal(load_pipeline(write_bin_copy(variant[0], tmp_path / "bin")).params, variant_sd.params)


def test_variant_rollout(variant_sd):
    from herd_jax.diffusion import make_policy

    sd = variant_sd
    policy = make_policy(sd, num_steps=2, eta=1.0, guidance_scale=3.0)
    assert policy.schedule.timesteps.tolist() == [999, 499]  # trailing spacing
    embeds = jax.jit(sd.encode_text)(sd.params["text_encoder"], sd.tokenize(["a red ball", "a blue car", ""]))
    trajectory = jax.jit(policy.rollout)(sd.params["unet"], sd.params["vae"], embeds[:2], embeds[2:], jax.random.key(0))
    assert trajectory.latents.shape == (2, 3, 4, 8, 8) and trajectory.log_probs.shape == (2, 2)
    assert trajectory.images.shape == (2, 16, 16, 3) and trajectory.images.dtype == jnp.uint8
    assert np.isfinite(np.asarray(trajectory.latents)).all() and np.isfinite(np.asarray(trajectory.log_probs)).all()


# --- parameter counts of the real models (abstract shapes only) -------------------------


def test_parameter_counts_match_pytorch_sd15_and_vit_l14():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from herd_jax import memory_plan
    from herd_jax.models import CLIPVisionModel, clip_vision_config

    vit_l14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=224, patch_size=14, projection_dim=768)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    model = memory_plan.abstract_model(memory_plan.sd15_configs(), jnp.float32)
    ours = {name: count(tree) for name, tree in model.params.items()}
    ours["vision"] = count(jax.eval_shape(CLIPVisionModel(clip_vision_config(vit_l14)).init_params, jax.random.key(0)))
    numel = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())
    with torch.device("meta"):
        vae = AutoencoderKL(**memory_plan.SD15_VAE)
        theirs = {
            "unet": numel(UNet2DConditionModel(**memory_plan.SD15_UNET)),
            "vae": numel(vae.decoder, vae.post_quant_conv),
            "text_encoder": numel(CLIPTextModel(CLIPTextConfig(**memory_plan.SD15_TEXT))),
            "vision": numel(CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_l14))),
        }
    print(f"parameters: {ours}")
    assert ours == theirs
    assert ours["unet"] == 859_520_964  # SD v1.5's published count


# --- errors -----------------------------------------------------------------------------


def _assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(tmp_path / "does-not-exist")
    _assert_one_line(error, "does-not-exist", "--model tiny")


def test_garbage_string():
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline("this is :: not a model")
    _assert_one_line(error, "not a model", "--model tiny")


def test_unknown_hub_id_offline():
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline("nobody-herd-jax/no-such-model")
    _assert_one_line(error, "nobody-herd-jax/no-such-model", "--model tiny")


def test_unknown_attention_or_remat(tiny_path):
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        load_pipeline(tiny_path, attention="flash")
    with pytest.raises(ValueError, match="unknown remat 'all'"):
        load_pipeline(tiny_path, remat="all")


def test_hub_id_downloads_configs_and_one_weight_file_per_component(tiny_path, monkeypatch):
    import huggingface_hub

    listing = [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_flax_model.msgpack", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack",
        "tokenizer/vocab.json", "scheduler/scheduler_config.json", "safety_checker/model.safetensors",
    ]
    calls = []

    def snapshot_download(repo_id, allow_patterns, **kwargs):
        calls.append((repo_id, allow_patterns, kwargs))
        return str(tiny_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = load_pipeline("owner/sd-v1")
    assert model.path == str(tiny_path)
    [(repo_id, patterns, kwargs)] = calls
    assert repo_id == "owner/sd-v1" and not kwargs.get("local_files_only")
    weights_wanted = sorted(p for p in patterns if "*" not in p and p != "model_index.json")
    assert weights_wanted == [
        "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_missing_subfolder(tiny_path, tmp_path):
    broken = shutil.copytree(tiny_path, tmp_path / "no-vae", ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "vae/", "--model tiny")


def test_missing_and_unreadable_weights(tiny_path, tmp_path):
    broken = shutil.copytree(tiny_path, tmp_path / "broken")
    (broken / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "diffusion_pytorch_model.safetensors")
    (broken / "unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "no weights", "unet")


def _edit_json(file: pathlib.Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize(
    "rel, changes, needles",
    [
        ("unet/config.json", {"class_embed_type": "timestep"}, ("unet/config.json", "class_embed_type")),
        ("unet/config.json", {"up_block_types": ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]}, ("unet/config.json", "up_block_types")),
        ("unet/config.json", {"transformer_layers_per_block": [1, 2]}, ("unet/config.json", "transformer_layers_per_block")),
        ("vae/config.json", {"shift_factor": 0.1}, ("vae/config.json", "shift_factor")),
        ("text_encoder/config.json", {"hidden_act": "relu"}, ("text_encoder/config.json", "hidden_act")),
        ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, ("scheduler_config.json", "prediction_type")),
        ("unet/config.json", {"cross_attention_dim": 64}, ("unet/config.json", "cross_attention_dim")),
    ],
)
def test_config_the_modules_cannot_honour(tiny_path, tmp_path, rel, changes, needles):
    broken = shutil.copytree(tiny_path, tmp_path / "broken", ignore=shutil.ignore_patterns("*.safetensors"))
    _edit_json(broken / rel, **changes)
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, *needles)


@pytest.fixture
def broken_unet(tiny_path, tmp_path):
    """A copy of the tiny model whose UNet tensors the test edits: (dir, state dict, writer)."""
    from safetensors.numpy import load_file, save_file

    broken = shutil.copytree(tiny_path, tmp_path / "tensors")
    file = broken / "unet/diffusion_pytorch_model.safetensors"
    return broken, load_file(file), lambda state: save_file(state, file)


def test_missing_tensor(broken_unet):
    broken, state, write = broken_unet
    write({k: v for k, v in state.items() if k != "mid_block.resnets.1.conv2.weight"})
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "unet/diffusion_pytorch_model.safetensors", "does not fit unet/config.json",
                     "no tensor mid_block.resnets.1.conv2.weight")


def test_extra_tensor(broken_unet):
    broken, state, write = broken_unet
    write({**state, "class_embedding.linear_1.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "unet/diffusion_pytorch_model.safetensors", "unexpected tensor class_embedding.linear_1.weight")


def test_mis_shaped_tensor(broken_unet):
    broken, state, write = broken_unet
    write({**state, "conv_in.weight": np.zeros((32, 4, 5, 5), np.float32)})
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "tensor conv_in.weight has shape (32, 4, 5, 5), the config implies (32, 4, 3, 3)")


def test_weights_that_do_not_fit_the_config_are_an_error_line_from_train(tiny_path, tmp_path, capsys):
    """The CLI: `error: <file> does not fit unet/config.json: ...`, exit code 2, no traceback."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import train

    broken = shutil.copytree(tiny_path, tmp_path / "wider")
    _edit_json(broken / "unet/config.json", block_out_channels=[64, 64])
    code = train.main(["--model", str(broken), "--run_dir", str(tmp_path / "run"), "--log_with", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "unet/diffusion_pytorch_model.safetensors does not fit unet/config.json" in err, err
