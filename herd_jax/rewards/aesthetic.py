"""The LAION aesthetic predictor in JAX: CLIP image embedding -> linear MLP -> score (~1..10).

As DDPO's ``aesthetic_score``: CLIP ViT-L/14 image features (our Flax CLIP vision tower and
visual projection, ``herd_jax.models.CLIPVisionModel``), L2-normalised, then the MLP of christophschuhmann's
improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``; TRL mirrors it as
``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth`` with the same ``layers.{0,2,4,6,7}`` keys).
The MLP is purely linear (no activations) with dropout between the first layers (identity at
inference, kept for structural fidelity).

Preprocessing is JAX (so the whole score is one jitted function) and emulates
``CLIPImageProcessor``: resize the shortest side bicubically, centre crop, scale to [0, 1],
normalise with the CLIP mean/std. The processor resizes with PIL, which resamples the width
then the height and rounds to uint8 after each pass; ``clip_preprocess`` does the same with
``jax.image.resize`` (same Keys a=-0.5 cubic, same antialiasing support when downscaling), so
the remaining difference is PIL's fixed-point arithmetic: about 0.1-0.3% of the values differ,
by one uint8 level (rarely two, one per pass), i.e. <= 0.015 (0.03) after normalisation
(tests/test_aesthetic.py checks <= 2 levels on <= 1% of values). Without the per-pass rounding
and clipping, bicubic overshoot on noisy images differs by up to ~40 levels. The rounding makes the score piecewise constant in
the pixels; it is a reward, not a differentiable loss.

The pure score is ``aesthetic_score(params, images_uint8, spec=spec) -> float32[B]``;
``AestheticReward`` wraps it (jitted, fixed-size chunks) behind the ``Reward`` signature.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from herd_jax.models import weights
from herd_jax.models.clip import CLIPVisionConfig, CLIPVisionModel, clip_vision_config
from herd_jax.rewards.base import RewardError, check_batch

# The published head: Linear(768,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64)
# Dropout(.1) Linear(64,16) Linear(16,1); torch indices of the Linear layers and the dropout
# rate that follows each.
HEAD_LAYER_INDICES = (0, 2, 4, 6, 7)
HEAD_DROPOUT = (0.2, 0.2, 0.1, 0.0, 0.0)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {2: "linear", 3: "cubic"}  # PIL.Image.Resampling.BILINEAR / BICUBIC -> jax method

Params = Mapping[str, Any]


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """What ``CLIPImageProcessor`` does, as static numbers (hashable, jit-friendly)."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    method: str = "cubic"

    @classmethod
    def from_processor(cls, processor: Any) -> "ClipPreprocess":
        """Reads a transformers ``CLIPImageProcessor`` (resize + crop + rescale + normalise only)."""
        flags = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
        off = [f for f in flags if not getattr(processor, f, True)]
        if off or "shortest_edge" not in processor.size or processor.resample not in _RESAMPLE:
            raise RewardError(
                f"unsupported CLIP preprocessor settings (off: {off}, size: {processor.size}, "
                f"resample: {processor.resample}); expected shortest-edge bicubic/bilinear resize"
            )
        return cls(
            shortest_edge=int(processor.size["shortest_edge"]),
            crop_height=int(processor.crop_size["height"]),
            crop_width=int(processor.crop_size["width"]),
            mean=tuple(float(m) for m in processor.image_mean),
            std=tuple(float(s) for s in processor.image_std),
            rescale_factor=float(processor.rescale_factor),
            method=_RESAMPLE[int(processor.resample)],
        )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the shortest-edge resize, truncated as transformers does."""
        if height <= width:
            return self.shortest_edge, int(self.shortest_edge * width / height)
        return int(self.shortest_edge * height / width), self.shortest_edge


def _resize_axis_uint8(x: jax.Array, axis: int, size: int, method: str) -> jax.Array:
    """One separable resampling pass along ``axis``, rounded and clipped to uint8 levels (as PIL)."""
    if x.shape[axis] == size:
        return x
    shape = list(x.shape)
    shape[axis] = size
    y = jax.image.resize(x, shape, method=method, antialias=True)
    return jnp.clip(jnp.floor(y + 0.5), 0.0, 255.0)


def clip_preprocess(images: jax.Array, pre: ClipPreprocess) -> jax.Array:
    """``uint8[B,H,W,3]`` -> CLIP pixel values ``float32[B, crop_h, crop_w, 3]`` (NHWC, normalised).

    Emulates ``CLIPImageProcessor`` (see the module docstring for the residual difference).
    """
    _, h, w, _ = images.shape
    new_h, new_w = pre.resized_shape(h, w)
    if new_h < pre.crop_height or new_w < pre.crop_width:
        raise RewardError(
            f"CLIP crop {pre.crop_height}x{pre.crop_width} is larger than the resized image "
            f"{new_h}x{new_w} (shortest_edge {pre.shortest_edge})"
        )
    x = images.astype(jnp.float32)
    x = _resize_axis_uint8(x, 2, new_w, pre.method)  # PIL: horizontal pass first,
    x = _resize_axis_uint8(x, 1, new_h, pre.method)  # then vertical, uint8 after each.
    top = (new_h - pre.crop_height) // 2
    left = (new_w - pre.crop_width) // 2
    x = x[:, top : top + pre.crop_height, left : left + pre.crop_width]
    mean = jnp.asarray(pre.mean, jnp.float32)
    std = jnp.asarray(pre.std, jnp.float32)
    return (x * pre.rescale_factor - mean) / std


# ----------------------------------------------------------------------------- models


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP: linear layers (no activations), dropout after the first three.

    ``features`` are the output sizes of the five Linear layers ((1024, 128, 64, 16, 1) when
    published); parameter names are ``layers_{i}`` for torch's ``layers.{i}``.
    """

    features: tuple[int, ...] = (1024, 128, 64, 16, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, feat, rate in zip(HEAD_LAYER_INDICES, self.features, HEAD_DROPOUT):
            x = nn.Dense(feat, name=f"layers_{index}")(x)
            if rate:
                x = nn.Dropout(rate, deterministic=True)(x)
        return x


@dataclasses.dataclass(frozen=True)
class AestheticSpec:
    """The static half of the scorer: architecture and preprocessing (hashable)."""

    vision_config: CLIPVisionConfig
    head_features: tuple[int, ...]
    preprocess: ClipPreprocess


def aesthetic_score(params: Params, images: jax.Array, *, spec: AestheticSpec) -> jax.Array:
    """Aesthetic score of ``uint8[B,H,W,3]`` images -> ``float32[B]``; pure and jittable.

    Args:
      params: ``{"clip": CLIPVisionModel params, "head": AestheticHead params}``.
      images: uint8 RGB images, any size (resized/cropped as CLIPImageProcessor does).
      spec: static architecture and preprocessing (bind with functools.partial before jit).
    """
    pixels = clip_preprocess(images, spec.preprocess)
    embed = CLIPVisionModel(spec.vision_config).apply({"params": params["clip"]}, pixels)
    embed = embed / jnp.linalg.norm(embed, axis=-1, keepdims=True)
    return AestheticHead(spec.head_features).apply({"params": params["head"]}, embed)[:, 0]


# ----------------------------------------------------------------------------- loading


def _resolve_clip_dir(name: str) -> str:
    """A local directory, or a hub id fetched (config, preprocessor, safetensors) into the cache."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # offline, unknown repo, no network: one line, not a traceback
        raise RewardError(
            f"cannot load CLIP {name!r}: not a local directory and not available from the hub "
            f"({type(e).__name__}); set reward.aesthetic_clip to a downloaded CLIP directory"
        ) from e


def _clip_config(clip_dir: str) -> CLIPVisionConfig:
    """The vision tower's config from a CLIPModel or CLIPVisionModelWithProjection config.json."""
    file = os.path.join(clip_dir, "config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise RewardError(f"cannot read a CLIP config in {clip_dir!r}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if config.get("model_type") not in ("clip", "clip_vision_model"):
        raise RewardError(f"{clip_dir!r} holds a {config.get('model_type')!r} model, not a CLIP model")
    try:
        return clip_vision_config(config)
    except ValueError as e:
        raise RewardError(f"{file} {e}") from e


def _clip_params(clip_dir: str, config: CLIPVisionConfig) -> Params:
    """The vision tower + projection params from safetensors, .bin or Flax msgpack files (strictly checked)."""
    shapes = jax.eval_shape(CLIPVisionModel(config).init_params, jax.random.key(0))
    files = sorted(glob.glob(os.path.join(clip_dir, "*.safetensors"))) or sorted(
        glob.glob(os.path.join(clip_dir, "pytorch_model*.bin"))
    )
    msgpack = pathlib.Path(clip_dir, "flax_model.msgpack")
    try:
        if files:
            state = {}
            for file in files:
                state.update(weights.read_state_dict(pathlib.Path(file)))
            where = files[0] if len(files) == 1 else f"{clip_dir}/{os.path.basename(files[0])}..."
            return weights.params_from_state_dict(state, shapes, "clip_vision", where, np.float32)
        if msgpack.exists():
            return weights.params_from_msgpack(msgpack, shapes, "clip_vision", np.float32)
    except weights.WeightsError as e:
        raise RewardError(str(e)) from e
    raise RewardError(f"no CLIP weights (*.safetensors, pytorch_model*.bin, flax_model.msgpack) in {clip_dir!r}")


def load_clip_embedder(name: str) -> tuple[CLIPVisionConfig, Params, ClipPreprocess]:
    """Loads CLIP's image side: (vision config incl. projection width, params, preprocessing).

    ``name`` is a local directory (PyTorch safetensors/.bin or Flax msgpack weights, as
    ``save_pretrained`` writes) or a hub id. Only the vision tower and visual projection are
    kept in memory.
    """
    from transformers import CLIPImageProcessorPil

    clip_dir = _resolve_clip_dir(name)
    config = _clip_config(clip_dir)
    params = jax.tree.map(jnp.asarray, _clip_params(clip_dir, config))
    if os.path.exists(os.path.join(clip_dir, "preprocessor_config.json")):
        preprocess = ClipPreprocess.from_processor(CLIPImageProcessorPil.from_pretrained(clip_dir))
    else:
        size = config.image_size
        preprocess = ClipPreprocess(shortest_edge=size, crop_height=size, crop_width=size)
    return config, params, preprocess


_HEAD_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(weight|bias)$")


def load_aesthetic_head(path: str) -> tuple[tuple[int, ...], int, Params]:
    """Loads the LAION MLP from a ``.pth`` state dict -> (features, input dim, AestheticHead params).

    Accepts the published ``layers.{0,2,4,6,7}.{weight,bias}`` keys (improved-aesthetic-predictor
    and TRL's ``aesthetic-model.pth``), also under a prefix such as ``mlp.`` or ``module.``.
    ``path`` may also be ``owner/repo/filename`` on the hub.
    """
    import torch

    if not os.path.isfile(path):
        parts = path.split("/")
        if len(parts) < 3 or os.path.isabs(path):
            raise RewardError(f"aesthetic head {path!r} does not exist")
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
        except Exception as e:
            raise RewardError(f"aesthetic head {path!r} is not a file nor on the hub ({type(e).__name__})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardError(f"cannot read aesthetic head {path!r}: {e}".splitlines()[0]) from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise RewardError(f"aesthetic head {path!r} is a {type(state).__name__}, not a state dict")
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = _HEAD_KEY.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value.float().numpy()
    if tuple(sorted(layers)) != HEAD_LAYER_INDICES or any(len(v) != 2 for v in layers.values()):
        raise RewardError(
            f"aesthetic head {path!r}: expected weight+bias for layers {list(HEAD_LAYER_INDICES)}, "
            f"found {sorted(layers)} (keys like {next(iter(state), None)!r})"
        )
    params, features = {}, []
    in_dim = int(layers[0]["weight"].shape[1])
    prev = in_dim
    for index in HEAD_LAYER_INDICES:
        w, b = layers[index]["weight"], layers[index]["bias"]
        if w.ndim != 2 or w.shape[1] != prev or b.shape != (w.shape[0],):
            raise RewardError(f"aesthetic head {path!r}: layers.{index} has shape {w.shape}, input {prev} expected")
        params[f"layers_{index}"] = {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}
        features.append(int(w.shape[0]))
        prev = w.shape[0]
    if prev != 1:
        raise RewardError(f"aesthetic head {path!r} outputs {prev} values, expected 1")
    return tuple(features), in_dim, params


def load_aesthetic(clip: str, head: str) -> tuple[AestheticSpec, Params]:
    """(spec, params) for ``aesthetic_score`` from a CLIP directory/hub id and a head ``.pth``."""
    features, in_dim, head_params = load_aesthetic_head(head)
    vision_config, clip_params, preprocess = load_clip_embedder(clip)
    if in_dim != vision_config.projection_dim:
        raise RewardError(
            f"aesthetic head takes {in_dim}-d embeddings but CLIP {clip!r} projects to {vision_config.projection_dim}"
        )
    spec = AestheticSpec(vision_config, features, preprocess)
    return spec, {"clip": clip_params, "head": head_params}


# ----------------------------------------------------------------------------- reward


class AestheticReward:
    """``Reward`` around ``aesthetic_score``: jitted, on the default device, fixed-size chunks.

    Images are scored in chunks of ``min(batch_size, B)``, the last one padded, so a fixed
    trainer batch compiles once. ``score_fn(params, images)`` is the jitted pure function.
    """

    name = "aesthetic"

    def __init__(self, spec: AestheticSpec, params: Params, batch_size: int = 32):
        if batch_size < 1:
            raise RewardError(f"reward batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.params = jax.device_put(params)
        self.batch_size = batch_size
        self.score_fn = jax.jit(functools.partial(aesthetic_score, spec=spec))

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if self.params is None:
            raise RewardError("aesthetic reward used after close()")
        images = check_batch(images, prompts)
        n = len(images)
        chunk = min(self.batch_size, n)
        pad = -n % chunk
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        scores = [self.score_fn(self.params, images[i : i + chunk]) for i in range(0, len(images), chunk)]
        return np.asarray(jnp.concatenate(scores), np.float32)[:n]

    def close(self) -> None:
        self.params = None


def aesthetic(cfg: Any) -> AestheticReward:
    """Registry factory: ``cfg.aesthetic_clip`` (dir or hub id), ``cfg.aesthetic_head`` (.pth)."""
    if not cfg.aesthetic_head:
        raise RewardError(
            "reward 'aesthetic' needs reward.aesthetic_head: a path to the LAION MLP .pth "
            "(sac+logos+ava1-l14-linearMSE.pth, or trl-lib/ddpo-aesthetic-predictor's aesthetic-model.pth)"
        )
    spec, params = load_aesthetic(cfg.aesthetic_clip, cfg.aesthetic_head)
    return AestheticReward(spec, params, batch_size=getattr(cfg, "batch_size", 32))
