"""Which UNet parameters train: all of them, a name-filtered subset, or LoRA adapters.

- `all`: full fine-tuning.
- `filter`: only parameters whose path matches `pattern` (a regex over "a/b/c" paths) train;
  the rest get `optax.set_to_zero` through `optax.multi_transform`, so they keep no optimizer
  state and stay bit-identical.
- `lora`: low-rank adapters W + (alpha/rank)·A·B on the kernels matching `pattern` (by default
  the attention projections to_q/to_k/to_v/to_out_0); the trainable pytree is only the adapters,
  the pretrained UNet stays frozen outside the optimizer. B starts at zero, so step 0 is the
  pretrained model.

The trainer keeps `TrainState.params` = the trainable pytree, and builds the UNet's params
with `unet_params(trainable, base)` wherever the policy runs.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal

import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

Params = Any
Mode = Literal["all", "filter", "lora"]
MODES = typing.get_args(Mode)
ATTENTION_PROJECTIONS = r"attn[12]/to_(q|k|v|out_0)/kernel$"


def _paths(params: Params) -> dict[str, jax.Array]:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


@dataclasses.dataclass(frozen=True)
class Trainable:
    """A trainable-subset policy for the UNet (see module docstring)."""

    mode: str = "all"
    pattern: str = ATTENTION_PROJECTIONS
    rank: int = 4
    alpha: float = 4.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown trainable mode {self.mode!r}; choose one of {', '.join(MODES)}")

    def targets(self, base: Params) -> list[str]:
        """Paths of the parameters that train (for `lora`: the kernels that get adapters)."""
        regex = re.compile(self.pattern)
        found = [p for p in _paths(base) if self.mode == "all" or regex.search(p)]
        if not found:
            raise ValueError(f"train.trainable_pattern {self.pattern!r} matches no UNet parameter")
        return found

    def init(self, base: Params, key: jax.Array) -> Params:
        """The initial trainable pytree: the UNet params themselves, or LoRA adapters {path: {a, b}}."""
        if self.mode != "lora":
            return base
        paths = _paths(base)
        adapters = {}
        for i, path in enumerate(self.targets(base)):
            kernel = paths[path]
            if kernel.ndim != 2:
                raise ValueError(f"LoRA needs 2-D kernels; {path} has shape {kernel.shape}")
            fan_in = kernel.shape[0]
            a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, self.rank), jnp.float32) / jnp.sqrt(fan_in)
            adapters[path] = {"a": a.astype(kernel.dtype), "b": jnp.zeros((self.rank, kernel.shape[1]), kernel.dtype)}
        return adapters

    def unet_params(self, trainable: Params, base: Params | None) -> Params:
        """The UNet's params for the policy: `trainable` itself, or `base` with the adapters merged in.

        A merged kernel takes the wider of the two dtypes: over a bfloat16 base
        (`model_options.frozen_dtype`) the float32 adapters' small updates are not rounded away.
        """
        if self.mode != "lora":
            return trainable
        scale = self.alpha / self.rank
        flat = _paths(base)
        for path, ab in trainable.items():
            flat[path] = flat[path] + scale * (ab["a"] @ ab["b"])
        return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})

    def wrap_loss(self, loss_fn: Any) -> Any:
        """A loss over UNet params -> a loss over the trainable pytree (`frozen.base`: the frozen UNet, for lora)."""
        if self.mode != "lora":
            return loss_fn
        return lambda trainable, frozen, transition: loss_fn(self.unet_params(trainable, frozen.base), frozen, transition)

    def optimizer(self, inner: optax.GradientTransformation, trainable: Params) -> optax.GradientTransformation:
        """`inner` on what trains; for `filter`, everything else is frozen by `optax.set_to_zero`."""
        if self.mode != "filter":
            return inner
        regex = re.compile(self.pattern)
        labels = flax.traverse_util.path_aware_map(
            lambda path, _: "train" if regex.search("/".join(path)) else "freeze", trainable
        )
        return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)

    def num_trainable(self, trainable: Params, base: Params) -> int:
        if self.mode == "filter":
            return sum(_paths(base)[p].size for p in self.targets(base))
        return sum(x.size for x in jax.tree.leaves(trainable))
