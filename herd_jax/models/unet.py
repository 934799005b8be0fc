"""The Stable Diffusion v1.x / 2.x UNet (diffusers' UNet2DConditionModel family) in Flax linen.

    unet = UNet2DConditionModel(unet_config(json.load(open("unet/config.json"))))
    eps = unet.apply({"params": params}, latents_nchw, timesteps, text_embeddings)  # NCHW out

Supported: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn (or no mid block),
UpBlock2D / CrossAttnUpBlock2D; `attention_head_dim` (diffusers' legacy name for the number of
heads) int or per block; `use_linear_projection`; `only_cross_attention`; `upcast_attention`
(always honoured: softmax is float32); `norm_num_groups`, `norm_eps`, `act_fn`,
`flip_sin_to_cos`, `freq_shift`, `downsample_padding`, `mid_block_scale_factor`,
`transformer_layers_per_block` (int), `center_input_sample`, `time_embedding_dim`, odd
`conv_in_kernel`/`conv_out_kernel`. `unet_config` refuses anything else that would change the
network (class/addition embeddings, other attention or block types, ...) with a ValueError
naming the key. `dropout` is read and ignored: the network is always deterministic.

Parameter names are those of diffusers' former Flax UNet (`down_blocks_0/attentions_0/
transformer_blocks_0/attn1/to_q/kernel`, ...), which existing checkpoints, LoRA patterns and the
PyTorch name mapping (`weights.py`) rely on. NHWC inside, NCHW at the boundary.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import ACTIVATIONS, ATTENTION, REMAT, Downsample2D, ResnetBlock2D, Upsample2D, check_choice, conv, dot_product_attention, remat

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
# Config keys whose only supported value is diffusers' default (anything else changes the network).
_FIXED = {
    "num_attention_heads": None,  # diffusers itself refuses it (its issue 2011)
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """What the network needs from diffusers' unet/config.json, per-block lists expanded."""

    sample_size: int
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # per down block (diffusers' `attention_head_dim`)
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    only_cross_attention: tuple[bool, ...] = (False,) * 4  # per down block
    mid_block_only_cross_attention: bool = False
    upcast_attention: bool = False  # informational: the softmax is float32 in every case
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


def unet_config(config: Mapping[str, Any]) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DConditionModel config dict; ValueError names what we cannot honour.

    A missing key takes diffusers' default.
    """
    for key, value in _FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"sets {key}={config[key]!r}; herd-jax's UNet supports only {value!r}")
    defaults = UNetConfig(sample_size=0)
    get = lambda key: config.get(key, getattr(defaults, key))
    down, up = tuple(get("down_block_types")), tuple(get("up_block_types"))
    n = len(down)
    for key, types, allowed in (("down_block_types", down, _DOWN_BLOCKS), ("up_block_types", up, _UP_BLOCKS)):
        if any(t not in allowed for t in types) or len(types) != len(get("block_out_channels")):
            raise ValueError(
                f"sets {key}={list(types)}; supported: {' or '.join(allowed)}, one per block_out_channels entry"
            )
    if config.get("mid_block_type", defaults.mid_block_type) not in _MID_BLOCKS:
        raise ValueError(f"sets mid_block_type={config['mid_block_type']!r}; supported: UNetMidBlock2DCrossAttn or null")
    for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "norm_num_groups"):
        if not isinstance(get(key), int):
            raise ValueError(f"sets {key}={config.get(key)!r}; herd-jax's UNet supports only a single int")
    if get("act_fn") not in ACTIVATIONS:
        raise ValueError(f"sets act_fn={config['act_fn']!r}; supported: {', '.join(ACTIVATIONS)}")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if get(key) % 2 != 1:
            raise ValueError(f"sets {key}={config[key]!r}; supported: odd kernel sizes")
    if not config.get("sample_size"):
        raise ValueError("has no sample_size (the latent size the UNet was trained at)")
    per_block = lambda value: tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    heads = per_block(config.get("attention_head_dim", 8))
    only_cross = config.get("only_cross_attention", False)
    mid_only_cross = config.get("mid_block_only_cross_attention")
    if mid_only_cross is None:
        mid_only_cross = only_cross if isinstance(only_cross, bool) else False
    channels = tuple(get("block_out_channels"))
    for width, h in zip(channels, heads):
        if width % h:
            raise ValueError(f"sets attention_head_dim={config.get('attention_head_dim')!r}: {h} heads do not divide {width} channels")
    return UNetConfig(
        sample_size=int(config["sample_size"]),
        in_channels=get("in_channels"),
        out_channels=get("out_channels"),
        down_block_types=down,
        up_block_types=up,
        mid_block_type=config.get("mid_block_type", defaults.mid_block_type),
        block_out_channels=channels,
        layers_per_block=get("layers_per_block"),
        num_heads=heads,
        cross_attention_dim=get("cross_attention_dim"),
        transformer_layers_per_block=get("transformer_layers_per_block"),
        use_linear_projection=bool(get("use_linear_projection")),
        only_cross_attention=tuple(bool(x) for x in per_block(only_cross)),
        mid_block_only_cross_attention=bool(mid_only_cross),
        upcast_attention=bool(get("upcast_attention")),
        norm_num_groups=get("norm_num_groups"),
        norm_eps=float(get("norm_eps")),
        act_fn=get("act_fn"),
        flip_sin_to_cos=bool(get("flip_sin_to_cos")),
        freq_shift=get("freq_shift"),
        downsample_padding=get("downsample_padding"),
        mid_block_scale_factor=float(get("mid_block_scale_factor")),
        center_input_sample=bool(get("center_input_sample")),
        time_embedding_dim=config.get("time_embedding_dim"),
        conv_in_kernel=get("conv_in_kernel"),
        conv_out_kernel=get("conv_out_kernel"),
    )


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding f32[B, dim] of timesteps [B] (diffusers' get_timestep_embedding)."""
    half = dim // 2
    exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class Attention(nn.Module):
    """Multi-head attention with diffusers' names: to_q/to_k/to_v (no bias), to_out_0."""

    heads: int
    head_dim: int
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
        q = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x))
        k = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context))
        v = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context))
        out = dot_product_attention(q, k, v, implementation=self.attention)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out.reshape(*out.shape[:2], inner))


class GEGLUFeedForward(nn.Module):
    """diffusers' FeedForward with activation "geglu" (4x inner width), under its names ff/net_0/proj, ff/net_2."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h, gate = jnp.split(_Proj(8 * dim, self.dtype, name="net_0")(x), 2, axis=-1)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h * nn.gelu(gate, approximate=False))


class _Proj(nn.Module):
    """A Dense named `proj` (diffusers' GEGLU module holds its Linear under that name)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, dtype=self.dtype, name="proj")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (or cross-attention if `only_cross_attention`), cross-attention, GEGLU."""

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    attention: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.head_dim, self.attention, self.dtype, name=name)
        x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + GEGLUFeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, 1x1-conv (or linear) projection in, transformer blocks over H·W tokens, projection out, residual."""

    heads: int
    head_dim: int
    depth: int
    groups: int
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    attention: str = "auto"
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = conv(inner, 1, self.dtype, "proj_in")(h).reshape(batch, height * width, inner)
        block = remat(BasicTransformerBlock, self.remat)
        for i in range(self.depth):
            h = block(self.heads, self.head_dim, self.only_cross_attention, self.attention, self.dtype,
                      name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = conv(channels, 1, self.dtype, "proj_out")(h.reshape(batch, height, width, inner))
        return h + x


def _constrain(x: jax.Array, sharding: jax.sharding.NamedSharding | None) -> jax.Array:
    """`x` ([B, ...]) pinned to `sharding` (a split of the leading axis); unchanged for None or
    when the split does not divide B (e.g. a loss's forward on a few relabeled rows)."""
    if sharding is None:
        return x
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    if x.shape[0] % math.prod(sharding.mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    """The per-block settings the down, mid and up blocks share."""

    out_channels: int
    num_layers: int
    cross_attention: bool
    heads: int
    only_cross_attention: bool


class _UNetBlock(nn.Module):
    """Fields every UNet block reads from the model."""

    spec: _BlockSpec
    config: UNetConfig
    attention: str = "auto"
    remat: str = "none"
    dtype: Any = jnp.float32
    activation_sharding: Any = None

    def constrain(self, x: jax.Array) -> jax.Array:
        return _constrain(x, self.activation_sharding)

    def resnet(self, index: int, scale: float = 1.0) -> nn.Module:
        c = self.config
        return remat(ResnetBlock2D, self.remat)(
            self.spec.out_channels, c.norm_num_groups, c.norm_eps, c.act_fn, scale, self.dtype, name=f"resnets_{index}"
        )

    def transformer(self, index: int) -> nn.Module:
        s, c = self.spec, self.config
        return Transformer2DModel(
            s.heads, s.out_channels // s.heads, c.transformer_layers_per_block, c.norm_num_groups,
            c.use_linear_projection, s.only_cross_attention, self.attention, self.remat, self.dtype,
            name=f"attentions_{index}",
        )


class DownBlock2D(_UNetBlock):
    """CrossAttnDownBlock2D (`spec.cross_attention`) or DownBlock2D; returns (x, skip states)."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        states = []
        for i in range(self.spec.num_layers):
            x = self.constrain(self.resnet(i)(x, temb))
            if self.spec.cross_attention:
                x = self.constrain(self.transformer(i)(x, context))
            states.append(x)
        if self.add_downsample:
            x = self.constrain(Downsample2D(self.spec.out_channels, self.config.downsample_padding, self.dtype, name="downsamplers_0")(x))
            states.append(x)
        return x, states


class UNetMidBlock2DCrossAttn(_UNetBlock):
    """resnet, then (transformer, resnet) per layer; resnets scaled by `mid_block_scale_factor`."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        scale = self.config.mid_block_scale_factor
        x = self.constrain(self.resnet(0, scale)(x, temb))
        for i in range(self.spec.num_layers):
            x = self.constrain(self.transformer(i)(x, context))
            x = self.constrain(self.resnet(i + 1, scale)(x, temb))
        return x


class UpBlock2D(_UNetBlock):
    """CrossAttnUpBlock2D (`spec.cross_attention`) or UpBlock2D: each layer concatenates one skip state."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array) -> jax.Array:
        """`skips`: this block's skip states, in the order the down path made them (used last first)."""
        for i in range(self.spec.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.constrain(self.resnet(i)(x, temb))
            if self.spec.cross_attention:
                x = self.constrain(self.transformer(i)(x, context))
        if self.add_upsample:
            x = self.constrain(Upsample2D(self.spec.out_channels, self.dtype, name="upsamplers_0")(x))
        return x


class TimestepEmbedding(nn.Module):
    """linear_1, act, linear_2 (diffusers' TimestepEmbedding)."""

    features: int
    act_fn: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(ACTIVATIONS[self.act_fn](x))


class UNet2DConditionModel(nn.Module):
    """The noise-prediction UNet: NCHW latents f32[B, C, h, w], timesteps [B], text [B, L, D] -> NCHW output.

    Attributes:
      config: the architecture (`unet_config` of a diffusers config.json).
      dtype: compute dtype (params are cast to it at use; they keep their own dtype).
      attention: "auto" | "xla" | "cudnn" | "chunked" (see `layers`).
      remat: "none" | "blocks" | "dots": rematerialise each resnet and transformer block in
        the backward pass (see `layers`). Same params and outputs whatever the choice.
      activation_sharding: None, or a `jax.sharding.Sharding` of [B, ...] arrays (the batch split,
        under `parallel.fsdp`) that every block's input and output is pinned to: with params
        sharded too, the SPMD partitioner then all-gathers each weight where a layer uses it
        instead of replicating activations (every device computing the whole batch).
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    remat: str = "none"
    activation_sharding: Any = None

    def init_params(self, key: jax.Array) -> Any:
        """Randomly initialised params (use under `jax.eval_shape` for the parameter shapes)."""
        c = self.config
        size = 2 ** (len(c.block_out_channels) - 1)
        sample = jnp.zeros((1, c.in_channels, size, size), jnp.float32)
        context = jnp.zeros((1, 1, c.cross_attention_dim), jnp.float32)
        return self.init(key, sample, jnp.zeros((1,), jnp.int32), context)["params"]

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        c = self.config
        check_choice("attention", self.attention, ATTENTION)
        check_choice("remat", self.remat, REMAT)
        factor = 2 ** (len(c.block_out_channels) - 1)
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(f"latent size {sample.shape[-2:]} is not a multiple of the UNet's downsampling {factor}")
        block = dict(config=c, attention=self.attention, remat=self.remat, dtype=self.dtype, activation_sharding=self.activation_sharding)
        constrain = functools.partial(_constrain, sharding=self.activation_sharding)
        context = constrain(encoder_hidden_states)

        if c.center_input_sample:
            sample = 2 * sample - 1.0
        t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = constrain(TimestepEmbedding(c.time_embed_dim, c.act_fn, self.dtype, name="time_embedding")(constrain(temb)))

        x = constrain(conv(c.block_out_channels[0], c.conv_in_kernel, self.dtype, "conv_in")(constrain(jnp.transpose(sample, (0, 2, 3, 1)))))
        skips = [x]
        last = len(c.block_out_channels) - 1
        for i, (kind, width) in enumerate(zip(c.down_block_types, c.block_out_channels)):
            spec = _BlockSpec(width, c.layers_per_block, kind == "CrossAttnDownBlock2D", c.num_heads[i], c.only_cross_attention[i])
            x, states = DownBlock2D(spec, add_downsample=i < last, name=f"down_blocks_{i}", **block)(x, temb, context)
            skips += states

        if c.mid_block_type is not None:
            spec = _BlockSpec(c.block_out_channels[-1], 1, True, c.num_heads[-1], c.mid_block_only_cross_attention)
            x = UNetMidBlock2DCrossAttn(spec, name="mid_block", **block)(x, temb, context)

        heads, only_cross = c.num_heads[::-1], c.only_cross_attention[::-1]
        for i, (kind, width) in enumerate(zip(c.up_block_types, c.block_out_channels[::-1])):
            spec = _BlockSpec(width, c.layers_per_block + 1, kind == "CrossAttnUpBlock2D", heads[i], only_cross[i])
            skips, block_skips = skips[: -spec.num_layers], skips[-spec.num_layers :]
            x = UpBlock2D(spec, add_upsample=i < last, name=f"up_blocks_{i}", **block)(x, block_skips, temb, context)

        x = nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, dtype=self.dtype, name="conv_norm_out")(x)
        x = conv(c.out_channels, c.conv_out_kernel, self.dtype, "conv_out")(ACTIVATIONS[c.act_fn](x))
        return jnp.transpose(constrain(x), (0, 3, 1, 2))
