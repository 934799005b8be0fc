"""The decoder half of Stable Diffusion's AutoencoderKL in Flax linen: latents -> images.

    vae = VAEDecoder(vae_config(json.load(open("vae/config.json"))))
    images = vae.apply({"params": params}, latents_nchw / vae.config.scaling_factor)  # NCHW, ~[-1, 1]

Nothing in herd-jax encodes images, so the encoder and `quant_conv` are not built (the loader
skips their tensors). Parameter names are those of diffusers' former Flax AutoencoderKL
(`post_quant_conv`, `decoder/up_blocks_0/resnets_0/conv1/kernel`, the mid-block attention's
`query`/`key`/`value`/`proj_attn`). NHWC inside, NCHW at the boundary.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import ACTIVATIONS, ATTENTION, ResnetBlock2D, Upsample2D, check_choice, conv, dot_product_attention

_EPS = 1e-6  # diffusers' Decoder uses 1e-6 in every norm
# Config keys whose only supported value is diffusers' default.
_FIXED = {"shift_factor": None, "latents_mean": None, "latents_std": None, "mid_block_type": "UNetMidBlock2D"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """What the decoder needs from diffusers' vae/config.json (AutoencoderKL)."""

    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


def vae_config(config: Mapping[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL config dict; ValueError names what we cannot honour."""
    for key, value in _FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"sets {key}={config[key]!r}; herd-jax's VAE decoder supports only {value!r}")
    up = config.get("up_block_types", ["UpDecoderBlock2D"])
    if any(t != "UpDecoderBlock2D" for t in up):
        raise ValueError(f"sets up_block_types={list(up)}; supported: UpDecoderBlock2D")
    defaults = VAEConfig()
    get = lambda key: config.get(key, getattr(defaults, key))
    if get("act_fn") not in ACTIVATIONS:
        raise ValueError(f"sets act_fn={config['act_fn']!r}; supported: {', '.join(ACTIVATIONS)}")
    return VAEConfig(
        latent_channels=get("latent_channels"),
        out_channels=get("out_channels"),
        block_out_channels=tuple(get("block_out_channels")),
        layers_per_block=get("layers_per_block"),
        norm_num_groups=get("norm_num_groups"),
        act_fn=get("act_fn"),
        scaling_factor=float(get("scaling_factor")),
        use_post_quant_conv=bool(get("use_post_quant_conv")),
        mid_block_add_attention=bool(get("mid_block_add_attention")),
    )


class AttentionBlock(nn.Module):
    """Single-head self-attention over H·W with a GroupNorm in front and a residual (names: query, key, value, proj_attn)."""

    groups: int
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, name="group_norm")(x)
        h = h.reshape(batch, height * width, 1, channels)
        q, k, v = (nn.Dense(channels, dtype=self.dtype, name=name)(h) for name in ("query", "key", "value"))
        h = dot_product_attention(q, k, v, implementation=self.attention).reshape(batch, height * width, channels)
        h = nn.Dense(channels, dtype=self.dtype, name="proj_attn")(h)
        return x + h.reshape(batch, height, width, channels)


class Decoder(nn.Module):
    """conv_in, mid block (resnet, attention, resnet), up blocks (resnets + 2x upsample), GN, SiLU, conv_out."""

    config: VAEConfig
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        x = conv(c.block_out_channels[-1], 3, self.dtype, "conv_in")(z)
        x = _MidBlock(c, self.attention, self.dtype, name="mid_block")(x)
        widths = c.block_out_channels[::-1]
        for i, width in enumerate(widths):
            x = _UpDecoderBlock(c, width, i < len(widths) - 1, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.GroupNorm(c.norm_num_groups, epsilon=_EPS, dtype=self.dtype, name="conv_norm_out")(x)
        return conv(c.out_channels, 3, self.dtype, "conv_out")(nn.silu(x))


class _MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D without time embedding: resnets_0, attentions_0, resnets_1."""

    config: VAEConfig
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        width = x.shape[-1]
        x = ResnetBlock2D(width, c.norm_num_groups, _EPS, c.act_fn, dtype=self.dtype, name="resnets_0")(x)
        if c.mid_block_add_attention:
            x = AttentionBlock(c.norm_num_groups, self.attention, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(width, c.norm_num_groups, _EPS, c.act_fn, dtype=self.dtype, name="resnets_1")(x)


class _UpDecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: layers_per_block + 1 resnets, then a 2x upsample unless last."""

    config: VAEConfig
    width: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for j in range(c.layers_per_block + 1):
            x = ResnetBlock2D(self.width, c.norm_num_groups, _EPS, c.act_fn, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.width, self.dtype, name="upsamplers_0")(x)
        return x


class VAEDecoder(nn.Module):
    """Unscaled latents NCHW [B, C, h, w] -> images NCHW [B, 3, h·f, w·f], roughly in [-1, 1].

    Divide SD latents by `config.scaling_factor` first. `attention`: see `layers`.
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    def init_params(self, key: jax.Array) -> Any:
        """Randomly initialised params (use under `jax.eval_shape` for the parameter shapes)."""
        return self.init(key, jnp.zeros((1, self.config.latent_channels, 1, 1), jnp.float32))["params"]

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        check_choice("attention", self.attention, ATTENTION)
        z = jnp.transpose(latents, (0, 2, 3, 1))
        if self.config.use_post_quant_conv:
            z = conv(self.config.latent_channels, 1, self.dtype, "post_quant_conv")(z)
        x = Decoder(self.config, self.attention, self.dtype, name="decoder")(z)
        return jnp.transpose(x, (0, 3, 1, 2))
