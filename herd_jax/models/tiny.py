"""The embedded tiny Stable Diffusion: random weights in the exact diffusers layout.

Tests and the offline default (`--model tiny`) need a model without downloading one. We build
it with the PyTorch diffusers/transformers classes and `save_pretrained(safe_serialization=True)`,
so the directory is what the hub publishes and the real loader (PyTorch safetensors -> Flax)
is what runs on it. 32x32 images, 4x8x8 latents, a ~0.8M-parameter UNet, a 2-layer CLIP text
encoder of width 32 and a byte-level BPE tokenizer generated locally (no download).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import safetensors

from herd_jax.errors import StorageError, root_reason

__all__ = ["build_tiny_model", "tiny_model_path", "write_bin_copy", "TINY_MODEL_VERSION"]

# Bump when the architecture or the build changes: a cached copy with another version is rebuilt.
# v3: tokenizer files written by transformers 5 (v2's do not load there); weights identical to v2.
TINY_MODEL_VERSION = 3
_STAMP = "herd_jax_tiny.json"
_CACHE_NAME = "tiny-sd-v1"

# A few byte-level BPE merges so the tokenizer exercises merging like CLIP's (order matters:
# each merge's parts must exist before it).
_MERGES = (
    "t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "e r", "o n", "o n</w>",
    "r e", "re d</w>", "o f</w>", "e d</w>", "b l", "bl u", "blu e</w>", "g r", "gr e",
)
# Tiny model v2 also listed the merge "gre en</w>", which no input can reach (no merge makes
# "en</w>"); the `tokenizers` BPE behind transformers >= 5 rejects it. Its token stays in the
# vocabulary, unreachable as before, so token ids, vocabulary size and weights are unchanged.
_UNREACHABLE = ("green</w>",)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_LENGTH = 77


def _tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style (vocab, merges): 256 byte chars, their `</w>` forms, merged tokens, specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in _MERGES] + list(_UNREACHABLE)
    tokens += [_BOS, _EOS]
    if len(set(tokens)) != len(tokens):
        raise AssertionError("tiny tokenizer vocabulary has duplicates")
    return {t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in _MERGES]


def _redraw_text_encoder_as_transformers_4(model: Any, rng_state: Any) -> None:
    """Redraws the CLIP text encoder's weights from `rng_state` in transformers 4.x's order.

    transformers 5 initialises CLIPTextModel with other draws, which would change every text
    encoder weight of the tiny model (and the learning benchmarks tuned on it). 4.x drew, from
    the generator state before `CLIPTextModel(config)`: at construction, each Embedding N(0, 1)
    and each Linear's weight and bias uniformly (values overwritten below, but they advance the
    generator); then CLIP's init: the embeddings N(0, 0.02), per layer q/k/v N(0, d^-1/2 (2L)^-1/2),
    out N(0, d^-1/2), fc1 N(0, (2d)^-1/2), fc2 N(0, d^-1/2 (2L)^-1/2); biases 0, LayerNorms 1 and 0
    (as transformers 5 sets them too).
    """
    import torch

    config = model.config
    d, layers = config.hidden_size, config.num_hidden_layers
    params = {name.removeprefix("text_model."): p for name, p in model.named_parameters()}
    embeddings = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight")
    in_std, out_std, fc_std = d**-0.5 * (2 * layers) ** -0.5, d**-0.5, (2 * d) ** -0.5
    constructed = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    init = (("self_attn.q_proj", in_std), ("self_attn.k_proj", in_std), ("self_attn.v_proj", in_std),
            ("self_attn.out_proj", out_std), ("mlp.fc1", fc_std), ("mlp.fc2", in_std))
    torch.set_rng_state(rng_state)
    with torch.no_grad():
        for name in embeddings:
            torch.empty_like(params[name]).normal_()
        for i in range(layers):
            for name in constructed:
                torch.empty_like(params[f"encoder.layers.{i}.{name}.weight"]).uniform_()
                torch.empty_like(params[f"encoder.layers.{i}.{name}.bias"]).uniform_()
        for name in embeddings:
            params[name].normal_(0.0, 0.02)
        for i in range(layers):
            for name, std in init:
                params[f"encoder.layers.{i}.{name}.weight"].normal_(0.0, std)


def build_tiny_model(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Writes a tiny random SD v1-style pipeline (PyTorch safetensors) to `path` and returns it.

    Deterministic: the same seed gives byte-identical weight files. `path` must not exist or be
    empty. The result loads with `diffusers.StableDiffusionPipeline.from_pretrained(path)`.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = pathlib.Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"refusing to build the tiny model into non-empty {path}")

    vocab, merges = _tokenizer_vocab()
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, unk_token=_EOS, bos_token=_BOS, eos_token=_EOS, pad_token=_EOS,
        model_max_length=_MAX_LENGTH,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads, as in SD v1
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        # One group: GroupNorm then keeps the latent channels' relative means, so the decoded
        # image's colour follows the latent as in real SD. With diffusers' default (32 groups of
        # 1-2 channels) every norm erases the per-channel means and a random decoder's colour
        # barely depends on the latent: the `color` task had nothing for RL to learn.
        norm_num_groups=1,
        sample_size=32,
        scaling_factor=0.18215,
    )
    text_rng = torch.get_rng_state()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    _redraw_text_encoder_as_transformers_4(text_encoder, text_rng)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    (path / _STAMP).write_text(json.dumps({"version": TINY_MODEL_VERSION, "seed": seed}) + "\n")
    return path


def write_bin_copy(src: str | os.PathLike, dst: str | os.PathLike) -> pathlib.Path:
    """Copies the pipeline at `src` to `dst` with every `*.safetensors` replaced by a PyTorch `.bin`.

    Same tensors, other format (`diffusion_pytorch_model.bin`, `pytorch_model.bin`): lets tests
    check that both checkpoint formats load to the same parameters.
    """
    import safetensors.torch
    import torch

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    renames = {"diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin",
               "model.safetensors": "pytorch_model.bin"}
    for file in sorted(src.rglob("*.safetensors")):
        if file.name not in renames:
            raise ValueError(f"don't know the .bin name for {file}")
        out = dst / file.relative_to(src).with_name(renames[file.name])
        torch.save(safetensors.torch.load_file(file), out)
    return dst


def _cache_root() -> pathlib.Path:
    root = os.environ.get("HERD_JAX_CACHE") or pathlib.Path.home() / ".cache" / "herd_jax"
    return pathlib.Path(root)


def _is_current(path: pathlib.Path) -> bool:
    try:
        return json.loads((path / _STAMP).read_text()).get("version") == TINY_MODEL_VERSION
    except (OSError, ValueError):
        return False


def tiny_model_path() -> pathlib.Path:
    """Returns `$HERD_JAX_CACHE/tiny-sd-v1` (default `~/.cache/herd_jax`), building it on first use.

    The build goes to a temporary sibling directory that is renamed into place, so a reader never
    sees a half-written model and two racing processes both end with one complete copy.
    """
    final = _cache_root() / _CACHE_NAME
    if _is_current(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{_CACHE_NAME}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            build_tiny_model(tmp, seed=0)
        except (OSError, safetensors.SafetensorError) as e:  # full disk, read-only cache
            raise StorageError(f"cannot build the tiny model in {final.parent} ({root_reason(e)}); set HERD_JAX_CACHE to a writable folder") from e
        if final.exists() and not _is_current(final):  # stale version: move it aside, then replace
            stale = final.parent / f".{_CACHE_NAME}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass  # another process moved it first
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final):  # lost the race to a complete copy is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
