"""Load a diffusers-format Stable Diffusion v1.x pipeline into Flax modules and params.

`load_pipeline(model)` accepts a local directory in the hub layout (`unet/ vae/ text_encoder/
tokenizer/ scheduler/`), a hub id (`owner/name`, downloaded with `huggingface_hub` when the
network allows), or `"tiny"` for the embedded tiny model. Weights may be PyTorch safetensors,
PyTorch `.bin` or Flax msgpack; PyTorch weights are converted with the libraries' own
PyTorch->Flax functions (diffusers for UNet/VAE, transformers for CLIP). Unlike
`from_pretrained(from_pt=True)`, which reads only `.bin` and runs a full random init, we convert
against `jax.eval_shape` of the init, so loading costs what reading the weights costs.

Every failure to find or read a model is a `ModelNotFoundError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import pathlib
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxUNet2DConditionModel
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers import CLIPTextConfig, CLIPTokenizer
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModel, FlaxCLIPTextModule

__all__ = ["ModelNotFoundError", "StableDiffusion", "load_pipeline", "resolve_model_path"]

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
# PyTorch config values the Flax modules do not read but silently assume. A checkpoint with
# another value would load and give wrong outputs, so we refuse it instead.
_FLAX_ASSUMES = {
    "unet": {
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "center_input_sample": False,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional", "class_embed_type": None, "num_class_embeds": None,
        "encoder_hid_dim": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "dual_cross_attention": False, "attention_type": "default", "timestep_post_act": None,
        "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "cross_attention_norm": None,
    },
    "vae": {
        "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        "shift_factor": None, "latents_mean": None, "latents_std": None,
    },
}
_IGNORED_BUFFERS = ("position_ids", "num_batches_tracked")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(ValueError):
    """No usable Stable Diffusion model at the given path or hub id (message: one line)."""


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """A loaded SD v1.x pipeline: stateless Flax modules plus their params, tokenizer, scheduler.

    `params` = {"unet", "vae", "text_encoder"} pytrees; the modules hold only configuration,
    so the object can be closed over by jitted functions (eq=False: hashed by identity).
    """

    unet: FlaxUNet2DConditionModel
    vae: FlaxAutoencoderKL
    text_encoder: FlaxCLIPTextModule
    tokenizer: CLIPTokenizer
    scheduler: FlaxDDIMScheduler
    params: dict
    path: str

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def resolution(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

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
        input_ids = jnp.asarray(input_ids, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        out = self.text_encoder.apply(
            {"params": text_params}, input_ids, jnp.ones_like(input_ids), positions, deterministic=True
        )
        return out[0].astype(jnp.float32)


def load_pipeline(
    model: str | os.PathLike, *, dtype: Any = jnp.float32, compute_dtype: Any = None
) -> StableDiffusion:
    """Loads an SD v1.x pipeline from a local directory, a hub id, or "tiny".

    Args:
      model: directory in the diffusers layout, hub id `owner/name`, or "tiny".
      dtype: dtype of the returned params.
      compute_dtype: dtype the modules compute in (default: `dtype`); e.g. float32 params with
        bfloat16 compute for mixed-precision training.

    Raises:
      ModelNotFoundError: nothing usable found, or a config/weight file is missing or unreadable.
    """
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    path = resolve_model_path(model)
    missing = [c for c in _COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"model directory {str(path)!r} has no {', '.join(m + '/' for m in missing)} subfolder"
            f"{'s' if len(missing) > 1 else ''} (expected diffusers layout {' '.join(c + '/' for c in _COMPONENTS)}); "
            f"{_HINT}"
        )

    unet_config = _module_config(path, "unet", FlaxUNet2DConditionModel)
    unet = FlaxUNet2DConditionModel.from_config(unet_config, dtype=compute_dtype)
    vae = FlaxAutoencoderKL.from_config(_module_config(path, "vae", FlaxAutoencoderKL), dtype=compute_dtype)
    text_config = _text_config(path)
    text_encoder = FlaxCLIPTextModule(config=text_config, dtype=compute_dtype)
    if unet.cross_attention_dim != text_config.hidden_size:
        raise ModelNotFoundError(
            f"{path}: unet cross_attention_dim {unet.cross_attention_dim} != text encoder width "
            f"{text_config.hidden_size}; not a single-text-encoder SD v1.x pipeline"
        )
    tokenizer = _tokenizer(path)
    if text_config.vocab_size < len(tokenizer):
        raise ModelNotFoundError(
            f"tokenizer in {str(path)!r} has {len(tokenizer)} tokens, the text encoder only {text_config.vocab_size}"
        )
    scheduler = _scheduler(path)

    shapes = abstract_params(unet, vae, text_encoder)
    with _on_host():  # convert and cast in host memory; one transfer of the final params below
        params = {name: _load_params(path, name, shapes[name], dtype) for name in _WEIGHTS}
    params = jax.device_put(params)
    return StableDiffusion(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        params=params, path=str(path),
    )


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
        weights = []
        for component, names in _WEIGHTS.items():
            weights += [f"{component}/{n}" for n in names if f"{component}/{n}" in files][:1]
        return pathlib.Path(snapshot_download(repo_id, allow_patterns=configs + weights))
    except Exception as online_error:  # offline, unknown repo, gated, network: try the local cache
        all_weights = [f"{c}/{n}" for c, names in _WEIGHTS.items() for n in names]
        try:
            cached = snapshot_download(repo_id, allow_patterns=configs + all_weights, local_files_only=True)
            return pathlib.Path(cached)
        except Exception:
            reason = _first_line(online_error)
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
        raise ModelNotFoundError(f"cannot read {file}: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


def _module_config(path: pathlib.Path, component: str, cls: type) -> dict:
    """The component's config.json restricted to what the Flax class takes, after checking the rest."""
    file = path / component / "config.json"
    config = _read_json(file)
    for key, expected in _FLAX_ASSUMES[component].items():
        if key in config and config[key] != expected:
            raise ModelNotFoundError(
                f"{file} sets {key}={config[key]!r}; the Flax {cls.__name__} only supports {expected!r}"
            )
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype"}
    return {k: v for k, v in config.items() if k in fields}


def _text_config(path: pathlib.Path) -> CLIPTextConfig:
    file = path / "text_encoder" / "config.json"
    config = _read_json(file)
    if "text_config" in config:  # a full CLIPModel config: use its text tower
        config = config["text_config"]
    try:
        return CLIPTextConfig(**config)
    except Exception as e:
        raise ModelNotFoundError(f"cannot use {file}: {type(e).__name__}: {_first_line(e)}") from e


def _tokenizer(path: pathlib.Path) -> CLIPTokenizer:
    directory = path / "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise ModelNotFoundError(
            f"cannot load the CLIP tokenizer in {directory}: {type(e).__name__}: {_first_line(e)}"
        ) from e


def _scheduler(path: pathlib.Path) -> FlaxDDIMScheduler:
    """DDIM with the directory's noise schedule, whatever scheduler class the directory names."""
    config = _read_json(path / "scheduler" / "scheduler_config.json")
    fields = set(inspect.signature(FlaxDDIMScheduler.__init__).parameters) - {"self", "dtype"}
    return FlaxDDIMScheduler.from_config({k: v for k, v in config.items() if k in fields})


def _weight_file(path: pathlib.Path, component: str) -> pathlib.Path:
    directory = path / component
    for name in _WEIGHTS[component]:
        if (directory / name).is_file():
            return directory / name
    raise ModelNotFoundError(
        f"no weights in {directory} (looked for {', '.join(_WEIGHTS[component])}); {_HINT}"
    )


def _read_torch_state(file: pathlib.Path) -> dict:
    import torch

    if file.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(file))
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a flat PyTorch state dict")
    return dict(state)


def abstract_params(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Any]:
    """The three modules' parameter shapes (ShapeDtypeStructs via `jax.eval_shape`; no init runs)."""
    key = jax.random.PRNGKey(0)
    ids = jnp.zeros((1, 1), jnp.int32)
    return {
        "unet": jax.eval_shape(unet.init_weights, key),
        "vae": jax.eval_shape(vae.init_weights, key),
        "text_encoder": jax.eval_shape(lambda k: text_encoder.init(k, ids, ids, ids)["params"], key),
    }


def _load_params(path: pathlib.Path, component: str, shapes: Any, dtype: Any) -> dict:
    """One component's weights as host arrays of `dtype`, checked against the module's parameter shapes."""
    file = _weight_file(path, component)
    try:
        if file.suffix == ".msgpack":
            from flax.serialization import msgpack_restore

            tree = msgpack_restore(file.read_bytes())
            tree = tree.get("params", tree) if isinstance(tree, dict) else tree
        else:
            state = _read_torch_state(file)
    except Exception as e:
        raise ModelNotFoundError(f"cannot read {file}: {type(e).__name__}: {_first_line(e)}") from e
    if file.suffix != ".msgpack":
        try:
            tree = _convert_torch(component, state, shapes)
        except ValueError as e:  # the converters' shape check
            raise ModelNotFoundError(
                f"{file} does not fit {component}/config.json: {_first_line(e)}"
            ) from e
    return _check_tree(file, tree, shapes, dtype)


def _convert_torch(component: str, state: dict, shapes: Any) -> dict:
    """PyTorch state dict -> Flax params with the libraries' converters, fed shapes instead of a random init."""
    import torch

    state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}  # numpy has no bf16
    if component == "text_encoder":
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

        shim = types.SimpleNamespace(params=shapes, base_model_prefix=FlaxCLIPTextModel.base_model_prefix)
        return convert_pytorch_state_dict_to_flax(state, shim)
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    shim = types.SimpleNamespace(init_weights=lambda _key: shapes)
    return convert_pytorch_state_dict_to_flax(state, shim)


def _check_tree(file: pathlib.Path, tree: Any, shapes: Any, dtype: Any) -> dict:
    """Keeps the expected leaves; a missing or mis-shaped one is an error, an extra one a warning."""
    got = flatten_dict(dict(tree))
    want = flatten_dict(dict(shapes))
    missing = [k for k in want if k not in got]
    if missing:
        raise ModelNotFoundError(
            f"{file} lacks {len(missing)} of {len(want)} parameters the config implies (e.g. {'/'.join(missing[0])}); "
            "config and weights do not match"
        )
    for k, spec in want.items():
        if tuple(got[k].shape) != tuple(spec.shape):
            raise ModelNotFoundError(
                f"{file}: parameter {'/'.join(k)} has shape {tuple(got[k].shape)}, "
                f"the config implies {tuple(spec.shape)}"
            )
    extra = [k for k in got if k not in want and k[-1] not in _IGNORED_BUFFERS]
    if extra:
        logger.warning("%s: ignoring %d unexpected tensors (e.g. %s)", file, len(extra), "/".join(extra[0]))
    return unflatten_dict({k: np.asarray(got[k]).astype(dtype, copy=False) for k in want})


def _on_host() -> contextlib.AbstractContextManager:
    """Makes arrays that the library converters create land on the CPU, where one is available."""
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:  # JAX_PLATFORMS excludes cpu
        return contextlib.nullcontext()
