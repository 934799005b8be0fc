"""The ``color`` reward (ours): does the image show the colour its prompt names?

Prompts are ``"a {color} {object}"`` over a fixed palette (``COLORS``) and object list
(``OBJECTS``). The reward is built to give a smooth, prompt-dependent signal even on tiny
(32x32) images from a random-weight Stable Diffusion, so a learning benchmark on the tiny
model can show whether hindsight relabeling helps:

1. Each pixel's sRGB value (gamma-encoded, in [0, 1]) is centred on mid-grey and mapped to a
   fixed opponent colour space ``v = (w * luminance, red-green, yellow-blue)`` (orthonormal
   axes; luminance down-weighted by ``w = 0.5`` so hue counts more than brightness).
2. Its *soft cosine* with each palette colour's direction ``u_k`` is
   ``s_k = <v, u_k> / sqrt(|v|^2 + c0^2)`` with ``c0 = 0.3``: the cosine for saturated pixels,
   shrinking smoothly to 0 for near-grey pixels (no division by ~0); a grey image tinted by
   t uint8 levels gains reward steadily over t = 0..64 rather than all at once.
3. ``p_k = softmax_k(kappa * s_k)`` with ``kappa = 12`` is how much the pixel looks like each
   palette colour relative to the others.
4. reward = mean over pixels of ``p_named``, in [0, 1]. A grey image scores ~1/8 for every
   colour; a pure palette colour scores highest for its own name (0.72-1.0; orange, between
   red and yellow, is the least separable).

There is no argmax or threshold anywhere, so small colour shifts change the reward smoothly.
White and black are palette colours too (luminance axis); grey is not (it is the origin).
Everything is vectorised numpy (which releases the GIL), chunked to bound memory.

``color_success`` is its sparse twin, the thresholded success signal hindsight relabeling was
made for (HER, Andrychowicz et al. 2017): 1 when the named colour's score exceeds
``reward.success_threshold``, else 0. The default 1/8 is the share every palette colour gets on a
mid-grey image: success means the image leans towards the named colour more than grey does.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from herd_jax.rewards.base import RewardError, check_batch

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 192, 0),
    "blue": (0, 64, 255),
    "purple": (160, 0, 224),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
OBJECTS: list[str] = ["car", "ball", "flower", "bird", "house", "chair"]

LUMINANCE_WEIGHT = 0.5
SOFT_NORM = 0.3  # c0: opponent-space radius below which a pixel counts as "greyish"
KAPPA = 12.0  # softmax sharpness over the palette
_CHUNK_PIXELS = 1 << 20  # pixels scored at once: bounds the [N, K] temporaries to ~32 MB

_COLOR_RE = re.compile(r"\b(" + "|".join(map(re.escape, COLORS)) + r")\b", re.IGNORECASE)


def color_prompts() -> list[str]:
    """All ``"a {color} {object}"`` prompts, colour-major (``len(COLORS) * len(OBJECTS)``)."""
    return [f"a {color} {obj}" for color in COLORS for obj in OBJECTS]


def parse_color(prompt: str) -> str | None:
    """The first palette colour named in ``prompt`` as a whole word (case-insensitive), or None."""
    match = _COLOR_RE.search(prompt)
    return match.group(1).lower() if match else None


def _opponent_matrix() -> np.ndarray:
    """Rows: weighted luminance, red-green and yellow-blue axes (orthonormal before weighting)."""
    s2, s3, s6 = np.sqrt(2.0), np.sqrt(3.0), np.sqrt(6.0)
    return np.array(
        [
            [LUMINANCE_WEIGHT / s3] * 3,
            [1 / s2, -1 / s2, 0.0],
            [1 / s6, 1 / s6, -2 / s6],
        ]
    )


def _to_opponent(rgb: np.ndarray) -> np.ndarray:
    """uint8/float RGB [..., 3] in 0..255 -> grey-centred opponent coordinates [..., 3]."""
    return (np.asarray(rgb, np.float64) / 255.0 - 0.5) @ _opponent_matrix().T


def _palette_directions() -> np.ndarray:
    """Unit opponent-space direction of each palette colour, [K, 3]."""
    v = _to_opponent(np.array(list(COLORS.values())))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def color_scores(images: np.ndarray) -> np.ndarray:
    """Mean per-pixel palette probabilities: ``uint8[B,H,W,3] -> float32[B, len(COLORS)]``.

    Column k is the ``color`` reward of each image for the k-th colour of ``COLORS``; rows sum
    to 1. Scoring every colour at once lets hindsight relabeling rank all goals in one pass.
    """
    images = np.asarray(images)
    b = images.shape[0]
    pixels = images.reshape(b, -1, 3)
    n = pixels.shape[1]
    m = _opponent_matrix() / 255.0  # acts on pixel values centred at 127.5
    proj = (_palette_directions() @ m).astype(np.float32)  # [K, 3]: s_k numerator = proj @ x
    m = m.astype(np.float32)
    out = np.empty((b, len(COLORS)), np.float32)
    per_chunk = max(1, _CHUNK_PIXELS // max(n, 1))
    for start in range(0, b, per_chunk):
        chunk = pixels[start : start + per_chunk]
        # Pixels as columns ([3, b'N]) so every product is one BLAS call and every reduction
        # over the palette is a reduction over a handful of long rows.
        x = chunk.reshape(-1, 3).T.astype(np.float32) - np.float32(127.5)
        v = m @ x  # [3, b'N] opponent coordinates
        inv_norm = np.float32(KAPPA) / np.sqrt(np.einsum("ij,ij->j", v, v) + np.float32(SOFT_NORM**2))
        # |kappa * s_k| <= kappa = 12, so exp cannot overflow: no max-subtraction needed.
        p = np.exp((proj @ x) * inv_norm)  # [K, b'N]
        p /= p.sum(axis=0, keepdims=True)
        out[start : start + len(chunk)] = p.reshape(len(COLORS), len(chunk), n).mean(axis=2).T
    return out


def color_indices(prompts: Sequence[str]) -> np.ndarray:
    """Index into ``COLORS`` of each prompt's colour, ``int[B]``.

    Raises:
      RewardError: for the first prompt that names no palette colour.
    """
    names = list(COLORS)
    idx = np.empty(len(prompts), np.int64)
    for i, prompt in enumerate(prompts):
        color = parse_color(prompt)
        if color is None:
            raise RewardError(
                f"color reward: prompt {prompt!r} names no known colour ({', '.join(names)})"
            )
        idx[i] = names.index(color)
    return idx


@dataclasses.dataclass
class ColorReward:
    """``reward(images, prompts)[i] = color_scores(images)[i, colour named by prompts[i]]``."""

    name: str = "color"

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = check_batch(images, prompts)
        idx = color_indices(prompts)
        return color_scores(images)[np.arange(len(idx)), idx]

    def close(self) -> None:
        pass


def color(cfg: object = None) -> ColorReward:
    """Factory for the registry (the reward has no settings)."""
    del cfg
    return ColorReward()


@dataclasses.dataclass
class ColorSuccessReward:
    """``reward(images, prompts)[i] = 1.0 if color_scores[i, named colour] > threshold else 0.0``."""

    threshold: float = 1.0 / len(COLORS)
    name: str = "color_success"

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return (ColorReward()(images, prompts) > self.threshold).astype(np.float32)

    def close(self) -> None:
        pass


def color_success(cfg: object = None) -> ColorSuccessReward:
    """Factory for the registry: ``reward.success_threshold`` sets the threshold."""
    threshold = getattr(cfg, "success_threshold", None)
    return ColorSuccessReward() if threshold is None else ColorSuccessReward(float(threshold))
