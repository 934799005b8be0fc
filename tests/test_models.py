"""herd_jax.models: the tiny model build, the loader (safetensors / .bin / msgpack), parity with PyTorch, errors."""

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torch_threads import torch_one_thread

from herd_jax.models import (
    ModelNotFoundError,
    StableDiffusion,
    build_tiny_model,
    load_pipeline,
    tiny_model_path,
    write_bin_copy,
)

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


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
    config = sd.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.set_alpha_to_one, config.steps_offset, config.clip_sample) == (False, 1, False)


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
    (flax_dir / "vae/diffusion_flax_model.msgpack").write_bytes(to_bytes(sd.params["vae"]))
    (flax_dir / "text_encoder/flax_model.msgpack").write_bytes(to_bytes(sd.params["text_encoder"]))
    assert _trees_equal(load_pipeline(flax_dir).params, sd.params)


def test_bfloat16_params(tiny_path):
    model = load_pipeline(tiny_path, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.unet.dtype == jnp.float32


def test_unet_matches_pytorch(sd, torch_pipeline):
    import torch

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    timesteps = np.array([17, 901], dtype=np.int32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    with torch_one_thread():
        expected = torch_pipeline.unet(
            torch.from_numpy(sample), torch.from_numpy(timesteps).long(), torch.from_numpy(context)
        ).sample.numpy()
    unet = jax.jit(lambda p, x, t, c: sd.unet.apply({"params": p}, x, t, c, train=False).sample)
    got = unet(sd.params["unet"], sample, timesteps, context)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).mean() > 1e-2  # a non-trivial output, so the comparison means something


def test_text_encoder_matches_pytorch(sd, encode, torch_pipeline):
    import torch

    ids = sd.tokenize(["a red apple on the green table", "blue"])
    with torch_one_thread():
        expected = torch_pipeline.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    got = encode(sd.params["text_encoder"], ids)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_vae_decode_matches_pytorch(sd, torch_pipeline):
    import torch

    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8), dtype=np.float32)
    with torch_one_thread():
        expected = torch_pipeline.vae.decode(torch.from_numpy(latents)).sample.numpy()
    decode = jax.jit(lambda p, z: sd.vae.apply({"params": p}, z, method=sd.vae.decode).sample)  # NCHW in and out
    got = decode(sd.params["vae"], latents)
    assert got.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


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
    weights = sorted(p for p in patterns if "*" not in p and p != "model_index.json")
    assert weights == [
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


def test_config_the_flax_unet_cannot_honour(tiny_path, tmp_path):
    broken = shutil.copytree(tiny_path, tmp_path / "groups")
    config_file = broken / "unet/config.json"
    config = json.loads(config_file.read_text())
    config["norm_num_groups"] = 16
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "norm_num_groups")


def test_weights_that_do_not_fit_the_config(tiny_path, tmp_path):
    broken = shutil.copytree(tiny_path, tmp_path / "wider")
    config_file = broken / "unet/config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [64, 64]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(broken)
    _assert_one_line(error, "unet", "does not fit")


def test_flax_deprecation_notice_is_silenced():
    import logging

    import herd_jax.models  # noqa: F401  (installs the filter)

    def record(name, message):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    for library, notice in (
        ("diffusers", "Flax classes are deprecated and will be removed in Diffusers v0.40.0. We recommend ..."),
        ("transformers", "TensorFlow and JAX classes are deprecated and will be removed in Transformers v5. We ..."),
    ):
        handlers = logging.getLogger(library).handlers
        assert handlers
        for handler in handlers:
            assert not handler.filter(record(f"{library}.models.x", notice))
            assert handler.filter(record(f"{library}.models.x", "Some weights were not used"))
