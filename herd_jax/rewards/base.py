"""The one reward signature every scorer implements, its error type, and batch checks.

A reward maps a batch of decoded images and the prompts they were sampled for to one float per
image: ``uint8[B, H, W, 3], Sequence[str] -> float32[B]``. The trainer calls it from a worker
thread (to overlap scoring with the next rollout), so an implementation must be safe for one
caller at a time and should spend its time in numpy/JAX/C code, not pure-Python loops.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


class RewardError(ValueError):
    """A reward cannot be built or cannot score a batch; the message is one line."""


class NonFiniteRewardError(RewardError):
    """A reward came back NaN or infinite (the run stops: it would poison the statistics)."""


class RewardModelError(RewardError):
    """The reward model stopped working while scoring (e.g. its sidecar is out of restarts)."""


@runtime_checkable
class Reward(Protocol):
    """A scorer: ``reward(images, prompts) -> float32[B]``; ``close()`` releases its resources."""

    name: str

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...

    def close(self) -> None: ...


def check_batch(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Returns ``images`` as a C-contiguous ``uint8[B, H, W, 3]`` array, checked against ``prompts``.

    Raises:
      RewardError: wrong dtype/rank/channels, or a prompt count that differs from the batch size.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise RewardError(
            f"rewards take uint8[B,H,W,3] images, got {images.dtype}{list(images.shape)}"
        )
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a single string" if isinstance(prompts, str) else len(prompts)
        raise RewardError(f"got {images.shape[0]} images but {n} prompts")
    return np.ascontiguousarray(images)


def check_finite(rewards: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Returns ``rewards`` as ``float32[B]``; raises if any is NaN or infinite.

    A non-finite reward would silently poison the advantage statistics, so the trainer stops
    with the first offending prompt instead.

    Raises:
      NonFiniteRewardError: naming the first prompt whose reward is NaN or +-inf (and how many are).
    """
    rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
    if len(rewards) != len(prompts):
        raise RewardError(f"got {len(rewards)} rewards for {len(prompts)} prompts")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        i = int(bad[0])
        raise NonFiniteRewardError(
            f"reward is {rewards[i]} for prompt {prompts[i]!r} (index {i}; "
            f"{bad.size} of {len(rewards)} rewards are not finite)"
        )
    return rewards
