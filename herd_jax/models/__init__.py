"""Stable Diffusion v1.x / 2.x-base in Flax linen: our own UNet, VAE decoder and CLIP, and their loader.

    sd = load_pipeline("tiny")                       # or a diffusers directory / hub id
    eps = sd.unet.apply({"params": sd.params["unet"]}, latents_nchw, timesteps, text_embeddings)
    images = sd.vae.apply({"params": sd.params["vae"]}, latents_nchw / sd.scaling_factor)   # NCHW, ~[-1, 1]
    hidden = sd.encode_text(sd.params["text_encoder"], sd.tokenize(["a red ball"]))

Contract:
- Modules (`UNet2DConditionModel`, `VAEDecoder`, `CLIPTextModel`, `CLIPVisionModel`) hold only
  configuration; params are plain nested dicts with the names diffusers'/transformers' former
  Flax classes used, so checkpoints, LoRA/filter patterns and exports key on them.
- `attention` ("auto" | "xla" | "cudnn" | "chunked") and, for the UNet, `remat` ("none" |
  "blocks" | "dots") are module attributes. They change memory and speed, never the params or
  (beyond float noise) the outputs. Take a variant of a loaded module with flax's `clone`:
      train_unet = sd.unet.clone(remat="blocks", attention="chunked")   # same sd.params["unet"]
  or load with `load_pipeline(model, attention=..., remat=...)`. The trainer uses a remat'd
  clone for the update and the plain module for rollouts.
- `load_pipeline` raises `ModelNotFoundError` (one line naming the file and key or tensor) for
  anything missing, unreadable or outside what the modules support.
- `weights.torch_state_dict(params, "unet")` maps params back to PyTorch names (export).
- The DDIM noise schedule is `herd_jax.diffusion.SchedulerConfig` / `make_schedule`.

Why flax linen: params stay a plain pytree (the TrainState holds it, orbax saves it, optax and
LoRA map over it by name) and modules are stateless configuration that jitted functions close
over; NNX would put the state in the module objects.
"""

from .clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, clip_text_config, clip_vision_config
from .layers import ATTENTION, REMAT, dot_product_attention
from .loading import ModelNotFoundError, StableDiffusion, abstract_params, load_pipeline, read_configs, resolve_model_path
from .tiny import build_tiny_model, tiny_model_path, write_bin_copy
from .unet import UNet2DConditionModel, UNetConfig, unet_config
from .vae import VAEConfig, VAEDecoder, vae_config

__all__ = [
    "ATTENTION",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "ModelNotFoundError",
    "REMAT",
    "StableDiffusion",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "VAEDecoder",
    "abstract_params",
    "build_tiny_model",
    "clip_text_config",
    "clip_vision_config",
    "dot_product_attention",
    "load_pipeline",
    "read_configs",
    "resolve_model_path",
    "tiny_model_path",
    "unet_config",
    "vae_config",
    "write_bin_copy",
]
