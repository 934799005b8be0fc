"""Building blocks shared by the UNet, the VAE decoder and CLIP: attention, remat, resnets, resampling.

All activations are NHWC (images) or [B, T, D] (tokens). Attention runs through
`dot_product_attention`, whose `implementation` is the models' `attention` attribute:

- `xla`: `jax.nn.dot_product_attention` lowered by XLA (logits and softmax in float32);
- `cudnn`: the same call with cuDNN's fused flash attention (GPU, float16/bfloat16 only);
- `auto`: `cudnn` where it applies (GPU backend, 16-bit inputs, head dim a multiple of 8 and at
  most 128), `xla` elsewhere;
- `chunked`: ours, in plain `jax.lax`: queries in chunks (`lax.map`, each chunk rematerialised
  in the backward pass) and keys in chunks with an online softmax, so neither pass holds the
  T×S logits. For long sequences (4096 tokens at 512 px) on TPU/CPU. Rabe & Staats 2021,
  "Self-attention Does Not Need O(n²) Memory".

`remat` (UNet only) wraps each resnet and transformer block in `nn.remat`:
`none`; `blocks` (save only block inputs, recompute everything inside in the backward pass);
`dots` (also save matmul outputs without batch dimensions: the projections, not the attention
logits).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION = ("auto", "xla", "cudnn", "chunked")
REMAT = ("none", "blocks", "dots")
_REMAT_POLICIES = {
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# diffusers' `act_fn` names (models/activations.py); gelu is the exact erf form, as torch's.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def remat(module_class: type[nn.Module], policy: str) -> type[nn.Module]:
    """`module_class` rematerialised under `policy` (one of REMAT); "none" returns it unchanged."""
    check_choice("remat", policy, REMAT)
    if policy == "none":
        return module_class
    return nn.remat(module_class, policy=_REMAT_POLICIES[policy])


def _cudnn_applies(query: jax.Array) -> bool:
    head_dim = query.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    implementation: str = "auto",
    is_causal: bool = False,
    query_chunk_size: int | None = None,
    key_chunk_size: int = 4096,
) -> jax.Array:
    """softmax(q kᵀ / √H) v per head: query [B, T, N, H], key/value [B, S, N, H] -> [B, T, N, H].

    Logits and softmax are float32 whatever the input dtype (what diffusers' `upcast_attention`
    asks for). The chunk sizes only matter for `implementation="chunked"`.
    """
    check_choice("attention", implementation, ATTENTION)
    if implementation == "auto":
        implementation = "cudnn" if _cudnn_applies(query) else "xla"
    if implementation == "chunked":
        return chunked_attention(
            query, key, value, is_causal=is_causal, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size
        )
    return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal, implementation=implementation)


# Elements of one block of float32 logits in `chunked_attention` (2^24: 64 MiB): SD v1.5's
# 4096-token self-attention with 8 heads then takes 128 queries at a time for 4 rows, 16 for 32.
LOGITS_BLOCK = 2**24


def chunked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    is_causal: bool = False,
    query_chunk_size: int | None = None,
    key_chunk_size: int = 4096,
) -> jax.Array:
    """Memory-efficient attention: query chunks mapped, key chunks scanned with an online softmax.

    Same contract as `dot_product_attention`. Lengths need not divide the chunk sizes: the
    sequences are padded and padded keys masked. Peak memory is one [B, N, query_chunk,
    key_chunk] block of logits, in the backward pass too (each query chunk is rematerialised).
    `query_chunk_size` None: as many queries as keep that block within LOGITS_BLOCK elements
    (at least 16, at most 1024), so a large batch does not make the block large.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_len = key.shape[1]
    k_chunk = min(key_chunk_size, kv_len)
    if query_chunk_size is None:
        query_chunk_size = min(1024, max(16, LOGITS_BLOCK // (batch * heads * k_chunk)))
    q_chunk = min(query_chunk_size, q_len)
    num_q, num_k = math.ceil(q_len / q_chunk), math.ceil(kv_len / k_chunk)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    chunks = lambda x, n, size: jnp.moveaxis(x.reshape(batch, n, size, *x.shape[2:]), 1, 0)
    queries = chunks(pad(query, num_q * q_chunk), num_q, q_chunk)  # [num_q, B, q_chunk, N, H]
    keys = chunks(pad(key, num_k * k_chunk), num_k, k_chunk)  # [num_k, B, k_chunk, N, H]
    values = chunks(pad(value, num_k * k_chunk), num_k, k_chunk)
    key_positions = jnp.arange(num_k * k_chunk).reshape(num_k, k_chunk)
    scale = jnp.float32(head_dim**-0.5)

    @jax.checkpoint
    def attend(q: jax.Array, q_start: jax.Array) -> jax.Array:
        q_positions = q_start + jnp.arange(q_chunk)

        def over_keys(carry, inputs):
            running_max, denominator, numerator = carry  # [B, N, q], [B, N, q], [B, q, N, H]
            k, v, k_positions = inputs
            logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
            valid = k_positions[None, :] < kv_len
            if is_causal:
                valid = valid & (k_positions[None, :] <= q_positions[:, None])
            logits = jnp.where(valid, logits, -jnp.inf)
            new_max = jax.lax.stop_gradient(jnp.maximum(running_max, logits.max(axis=-1)))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # a row with no valid key yet
            weights = jnp.exp(logits - safe_max[..., None])
            correction = jnp.exp(running_max - safe_max)
            denominator = denominator * correction + weights.sum(axis=-1)
            update = jnp.einsum("bnqk,bknh->bqnh", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
            numerator = numerator * jnp.moveaxis(correction, 1, 2)[..., None] + update
            return (new_max, denominator, numerator), None

        init = (
            jnp.full((batch, heads, q_chunk), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, q_chunk), jnp.float32),
            jnp.zeros((batch, q_chunk, heads, value.shape[-1]), jnp.float32),
        )
        (_, denominator, numerator), _ = jax.lax.scan(over_keys, init, (keys, values, key_positions))
        return (numerator / jnp.moveaxis(denominator, 1, 2)[..., None]).astype(query.dtype)

    out = jax.lax.map(lambda args: attend(*args), (queries, jnp.arange(num_q) * q_chunk))
    return jnp.moveaxis(out, 0, 1).reshape(batch, num_q * q_chunk, heads, -1)[:, :q_len]


def conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, padding: Any = None) -> nn.Conv:
    """A PyTorch-style Conv2d on NHWC: `padding` defaults to (kernel - 1) // 2 on every side."""
    pad = (kernel - 1) // 2 if padding is None else padding
    pad = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D ("default" time-embedding norm): GN-act-conv (+ time) GN-act-conv + skip.

    `temb` [B, T] is optional (the VAE has none). A 1x1 `conv_shortcut` matches channels.
    """

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = ACTIVATIONS[self.act_fn]
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name=name)
        h = conv(self.out_channels, 3, self.dtype, "conv1")(act(norm("norm1")(x)))
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))[:, None, None, :]
        h = conv(self.out_channels, 3, self.dtype, "conv2")(act(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, self.dtype, "conv")(x)


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv; `padding=0` pads right and bottom by one first, as diffusers does."""

    channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(self.channels, 3, self.dtype, "conv", stride=2, padding=padding)(x)
