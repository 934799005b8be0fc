"""CLIP's text encoder (Stable Diffusion's conditioning) and vision tower (the aesthetic reward) in Flax linen.

    text = CLIPTextModel(clip_text_config(json.load(open("text_encoder/config.json"))))
    hidden = text.apply({"params": params}, input_ids)          # [B, L, D], after the final LayerNorm
    image = CLIPVisionModel(clip_vision_config(json.load(open("clip/config.json"))))
    embeds = image.apply({"params": params}, pixels_nhwc)        # [B, projection_dim], not normalised

Both follow transformers' CLIP (pre-LayerNorm encoder layers, `quick_gelu` or `gelu` MLPs; the
text encoder with a causal mask and no padding mask, as SD v1 runs it). Parameter names are
those of transformers' former Flax CLIP (`text_model/encoder/layers/0/self_attn/q_proj/kernel`,
`vision_model/pre_layrnorm/scale`, `visual_projection/kernel`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import ATTENTION, check_choice, dot_product_attention

# transformers' ACT2FN names for the CLIP MLP.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields that shape the network (defaults: transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields that shape the tower, plus the projection width."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512


def _fields(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    act = values.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"sets hidden_act={act!r}; supported: {', '.join(ACTIVATIONS)}")
    return values


def clip_text_config(config: Mapping[str, Any]) -> CLIPTextConfig:
    """From a CLIPTextModel config.json, or a CLIPModel one (its `text_config`)."""
    return CLIPTextConfig(**_fields(CLIPTextConfig, config.get("text_config", config)))


def clip_vision_config(config: Mapping[str, Any]) -> CLIPVisionConfig:
    """From a CLIPModel config.json (vision_config + top-level projection_dim) or a CLIPVisionModelWithProjection one."""
    if "vision_config" in config:
        return CLIPVisionConfig(**{**_fields(CLIPVisionConfig, config["vision_config"]), "projection_dim": config.get("projection_dim", 512)})
    return CLIPVisionConfig(**_fields(CLIPVisionConfig, config))


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q_proj/k_proj/v_proj/out_proj."""

    heads: int
    causal: bool = False
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        split = lambda t: t.reshape(*t.shape[:2], self.heads, dim // self.heads)
        q, k, v = (split(nn.Dense(dim, dtype=self.dtype, name=name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, implementation=self.attention, is_causal=self.causal)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(out.reshape(x.shape))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + CLIPAttention(c.num_attention_heads, self.causal, self.attention, self.dtype, name="self_attn")(norm("layer_norm1")(x))
        return x + CLIPMLP(c.intermediate_size, c.hidden_act, self.dtype, name="mlp")(norm("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The layer stack, as `layers/0`, `layers/1`, ... under `encoder`."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool = False
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _Layers(self.config, self.causal, self.attention, self.dtype, name="layers")(x)


class _Layers(CLIPEncoder):
    """CLIPEncoder's layers, named "0", "1", ... (same fields)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.causal, self.attention, self.dtype, name=str(i))(x)
        return x


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        x = _TextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(c, causal=True, attention=self.attention, dtype=self.dtype, name="encoder")(x)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)


class _TextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextModel(nn.Module):
    """Token ids int[B, L] -> last hidden state [B, L, hidden_size] (causal mask, final LayerNorm).

    `attention`: see `layers`.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    def init_params(self, key: jax.Array) -> Any:
        """Randomly initialised params (use under `jax.eval_shape` for the parameter shapes)."""
        return self.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        check_choice("attention", self.attention, ATTENTION)
        return CLIPTextTransformer(self.config, self.attention, self.dtype, name="text_model")(jnp.asarray(input_ids, jnp.int32))


class _VisionEmbeddings(nn.Module):
    """Patch conv (no bias), a class token in front, learned position embeddings."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixels)
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed((c.image_size // p) ** 2 + 1, c.hidden_size, dtype=self.dtype, name="position_embedding")
        return x + positions(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nn.Module):
    """Embeddings, pre-LayerNorm, encoder; returns the post-LayerNormed class token [B, D]."""

    config: CLIPVisionConfig
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
        x = norm("pre_layrnorm")(_VisionEmbeddings(c, self.dtype, name="embeddings")(pixels))  # sic: transformers' name
        x = CLIPEncoder(c, attention=self.attention, dtype=self.dtype, name="encoder")(x)
        return norm("post_layernorm")(x[:, 0])


class CLIPVisionModel(nn.Module):
    """CLIP image features = `CLIPModel.get_image_features`: pixels NHWC [B, S, S, C] -> [B, projection_dim].

    Pixels are already resized and normalised as CLIP's processor does. `attention`: see `layers`.
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    def init_params(self, key: jax.Array) -> Any:
        """Randomly initialised params (use under `jax.eval_shape` for the parameter shapes)."""
        c = self.config
        return self.init(key, jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32))["params"]

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        check_choice("attention", self.attention, ATTENTION)
        pooled = CLIPVisionTransformer(self.config, self.attention, self.dtype, name="vision_model")(pixels)
        return nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)
