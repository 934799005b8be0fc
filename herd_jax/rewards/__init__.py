"""Reward registry: ``make_reward(cfg)`` looks ``cfg.name`` up in ``REWARDS``.

Every entry is a factory ``RewardConfig -> Reward`` (see ``base.Reward``). Factories are
imported lazily, so listing names or using the JPEG/colour rewards never imports CLIP or torch.
Adding a reward is one line: ``"name": _lazy("module", "factory")``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from herd_jax.rewards.base import NonFiniteRewardError, Reward, RewardError, RewardModelError, check_batch, check_finite

__all__ = [
    "REWARDS",
    "NonFiniteRewardError",
    "Reward",
    "RewardError",
    "RewardModelError",
    "check_batch",
    "check_finite",
    "make_reward",
    "reward_names",
]


def _lazy(module: str, factory: str) -> Callable[[Any], Reward]:
    """A factory that imports ``herd_jax.rewards.<module>.<factory>`` when first called."""

    def make(cfg: Any) -> Reward:
        return getattr(importlib.import_module(f"herd_jax.rewards.{module}"), factory)(cfg)

    make.__name__ = make.__qualname__ = factory
    return make


REWARDS: dict[str, Callable[[Any], Reward]] = {
    "jpeg_compressibility": _lazy("jpeg", "jpeg_compressibility"),
    "jpeg_incompressibility": _lazy("jpeg", "jpeg_incompressibility"),
    "color": _lazy("color", "color"),
    "color_success": _lazy("color", "color_success"),
    "aesthetic": _lazy("aesthetic", "aesthetic"),
    "imagereward": _lazy("imagereward", "imagereward"),
}


def reward_names() -> list[str]:
    """The valid ``reward.name`` values (the CLI's ``--reward_model`` choices)."""
    return list(REWARDS)


def make_reward(cfg: Any) -> Reward:
    """Builds the reward named ``cfg.name`` (a ``RewardConfig``).

    Raises:
      RewardError: unknown name (listing the valid ones), or the reward's own setup error.
    """
    try:
        factory = REWARDS[cfg.name]
    except KeyError:
        raise RewardError(
            f"unknown reward {cfg.name!r}; valid: {', '.join(reward_names())}"
        ) from None
    return factory(cfg)
