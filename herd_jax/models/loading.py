"""Load a diffusers-format Stable Diffusion v1.x / 2.x-base pipeline into our Flax modules and params.

`load_pipeline(model)` accepts a local directory in the hub layout (`unet/ vae/ text_encoder/
tokenizer/ scheduler/`), a hub id (`owner/name`, downloaded with `huggingface_hub` when the
network allows), or `"tiny"` for the embedded tiny model. Each config.json builds our module
(`unet.py`, `vae.py`, `clip.py`), whose parameter shapes come from `jax.eval_shape` (no init
runs); the weights (PyTorch safetensors or `.bin`, or Flax msgpack) are mapped onto them by
`weights.py`. The tokenizer is transformers' CLIPTokenizer; the noise schedule is read into
`diffusion.SchedulerConfig`.

Every failure to find, read or honour a model is a `ModelNotFoundError` with a one-line message
naming the file (and the config key or tensor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer

from herd_jax.diffusion import SchedulerConfig, scheduler_config

from . import weights
from .weights import first_line
from .clip import CLIPTextModel, clip_text_config
from .layers import ATTENTION, REMAT, check_choice
from .unet import UNet2DConditionModel, unet_config
from .vae import VAEDecoder, vae_config

__all__ = ["ModelNotFoundError", "StableDiffusion", "abstract_params", "load_pipeline", "read_configs", "resolve_model_path"]

logger = logging.getLogger(__name__)

_TINY = "tiny"
_HINT = "`--model tiny` runs the embedded tiny model"
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Per component, weight files in order of preference (as published on the hub).
_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(ValueError):
    """No usable Stable Diffusion model at the given path or hub id (message: one line)."""


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """A loaded SD pipeline: stateless Flax modules plus their params, tokenizer and noise schedule.

    `params` = {"unet", "vae", "text_encoder"} pytrees; the modules hold only configuration,
    so the object can be closed over by jitted functions (eq=False: hashed by identity).
    """

    unet: UNet2DConditionModel
    vae: VAEDecoder
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerConfig
    params: dict
    path: str

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor

    @property
    def latent_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def resolution(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """int32[B, max_length]: padded to max_length, truncated beyond it (as SD pipelines do)."""
        if isinstance(prompts, str):
            raise TypeError("tokenize takes a sequence of prompts, not a single string")
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
        ).input_ids
        return ids.astype(np.int32)

    def encode_text(self, text_params: Any, input_ids: jax.Array) -> jax.Array:
        """float32[B, max_length, D]: CLIP last hidden state (no attention mask, as in SD v1). Pure."""
        return self.text_encoder.apply({"params": text_params}, input_ids).astype(jnp.float32)


def load_pipeline(
    model: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    attention: str = "auto",
    remat: str = "none",
) -> StableDiffusion:
    """Loads an SD pipeline from a local directory, a hub id, or "tiny".

    Args:
      model: directory in the diffusers layout, hub id `owner/name`, or "tiny".
      dtype: dtype of the returned params.
      compute_dtype: dtype the modules compute in (default: `dtype`); e.g. float32 params with
        bfloat16 compute for mixed-precision training.
      attention: the modules' attention implementation, "auto" | "xla" | "cudnn" | "chunked".
      remat: the UNet's rematerialisation, "none" | "blocks" | "dots" (see `herd_jax.models`).

    Raises:
      ModelNotFoundError: nothing usable found, or a config/weight file is missing, unreadable or
        not supported by our modules.
      ValueError: an unknown `attention` or `remat`.
    """
    check_choice("attention", attention, ATTENTION)
    check_choice("remat", remat, REMAT)
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    path = resolve_model_path(model)
    missing = [c for c in _COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"model directory {str(path)!r} has no {', '.join(m + '/' for m in missing)} subfolder"
            f"{'s' if len(missing) > 1 else ''} (expected diffusers layout {' '.join(c + '/' for c in _COMPONENTS)}); "
            f"{_HINT}"
        )
    configs = read_configs(path)
    unet = UNet2DConditionModel(configs["unet"], dtype=compute_dtype, attention=attention, remat=remat)
    vae = VAEDecoder(configs["vae"], dtype=compute_dtype, attention=attention)
    text_encoder = CLIPTextModel(configs["text_encoder"], dtype=compute_dtype, attention=attention)
    tokenizer = _tokenizer(path)
    if configs["text_encoder"].vocab_size < len(tokenizer):
        raise ModelNotFoundError(
            f"tokenizer in {str(path)!r} has {len(tokenizer)} tokens, the text encoder only {configs['text_encoder'].vocab_size}"
        )
    shapes = abstract_params(unet, vae, text_encoder)
    with _on_host():  # read and cast in host memory; one transfer of the final params below
        params = {name: _load_params(path, name, shapes[name], dtype) for name in _WEIGHTS}
    return StableDiffusion(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=configs["scheduler"],
        params=jax.device_put(params), path=str(path),
    )


def read_configs(path: pathlib.Path) -> dict[str, Any]:
    """The four configs of a diffusers directory as our config dataclasses ("unet", "vae", "text_encoder", "scheduler").

    Raises ModelNotFoundError naming the file and key our modules cannot honour.
    """
    readers: dict[str, tuple[str, Callable[[dict], Any]]] = {
        "unet": ("unet/config.json", unet_config),
        "vae": ("vae/config.json", vae_config),
        "text_encoder": ("text_encoder/config.json", clip_text_config),
        "scheduler": ("scheduler/scheduler_config.json", scheduler_config),
    }
    configs = {}
    for name, (rel, read) in readers.items():
        file = path / rel
        data = _read_json(file)
        try:
            configs[name] = read(data)
        except (ValueError, TypeError) as e:
            raise ModelNotFoundError(f"{file} {first_line(e)}") from e
    width = configs["text_encoder"].hidden_size
    if configs["unet"].cross_attention_dim != width:
        raise ModelNotFoundError(
            f"{path / 'unet/config.json'} sets cross_attention_dim={configs['unet'].cross_attention_dim}, "
            f"but the text encoder's width is {width}; not a single-text-encoder SD pipeline"
        )
    return configs


def resolve_model_path(model: str | os.PathLike) -> pathlib.Path:
    """Local directory for `model`: "tiny" (built on first use), an existing path, or a hub download."""
    text = os.fspath(model)
    if text == _TINY:
        from .tiny import tiny_model_path

        return tiny_model_path()
    path = pathlib.Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {text!r} is a file, not a diffusers model directory; {_HINT}")
        return path.resolve()
    if not _HUB_ID.match(text) or ".." in text:
        raise ModelNotFoundError(
            f"no model at {text!r}: not an existing directory nor a hub id (owner/name); {_HINT}"
        )
    return _download(text)


def _download(repo_id: str) -> pathlib.Path:
    """Fetches configs, tokenizer files and one weight file per component; falls back to the cache."""
    from huggingface_hub import HfApi, snapshot_download

    configs = ["model_index.json", "tokenizer/*"] + [f"{c}/*.json" for c in _COMPONENTS]
    try:
        files = set(HfApi().list_repo_files(repo_id))
        wanted = []
        for component, names in _WEIGHTS.items():
            wanted += [f"{component}/{n}" for n in names if f"{component}/{n}" in files][:1]
        return pathlib.Path(snapshot_download(repo_id, allow_patterns=configs + wanted))
    except Exception as online_error:  # offline, unknown repo, gated, network: try the local cache
        all_weights = [f"{c}/{n}" for c, names in _WEIGHTS.items() for n in names]
        try:
            cached = snapshot_download(repo_id, allow_patterns=configs + all_weights, local_files_only=True)
            return pathlib.Path(cached)
        except Exception:
            reason = first_line(online_error)
            raise ModelNotFoundError(
                f"no local directory {repo_id!r} and the hub could not provide it "
                f"({type(online_error).__name__}{': ' + reason if reason else ''}); {_HINT}"
            ) from online_error


def _read_json(file: pathlib.Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"missing {file}; {_HINT}") from None
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read {file}: {type(e).__name__}: {first_line(e)}") from e


def _tokenizer(path: pathlib.Path) -> CLIPTokenizer:
    directory = path / "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise ModelNotFoundError(
            f"cannot load the CLIP tokenizer in {directory}: {type(e).__name__}: {first_line(e)}"
        ) from e


def _weight_file(path: pathlib.Path, component: str) -> pathlib.Path:
    directory = path / component
    for name in _WEIGHTS[component]:
        if (directory / name).is_file():
            return directory / name
    raise ModelNotFoundError(
        f"no weights in {directory} (looked for {', '.join(_WEIGHTS[component])}); {_HINT}"
    )


def abstract_params(unet: UNet2DConditionModel, vae: VAEDecoder, text_encoder: CLIPTextModel) -> dict[str, Any]:
    """The three modules' parameter shapes (ShapeDtypeStructs via `jax.eval_shape`; no init runs)."""
    key = jax.random.key(0)
    return {name: jax.eval_shape(module.init_params, key)
            for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}


def _load_params(path: pathlib.Path, component: str, shapes: Any, dtype: Any) -> dict:
    """One component's weights as host arrays of `dtype`, checked against the module's parameter shapes."""
    file = _weight_file(path, component)
    try:
        if file.suffix == ".msgpack":
            return weights.params_from_msgpack(file, shapes, component, dtype)
        return weights.params_from_state_dict(weights.read_state_dict(file), shapes, component, file, dtype)
    except weights.WeightsError as e:
        raise ModelNotFoundError(str(e)) from e


def _on_host() -> contextlib.AbstractContextManager:
    """Makes arrays created while loading land on the CPU, where one is available."""
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # JAX_PLATFORMS excludes cpu
        return contextlib.nullcontext()
