"""JPEG (in)compressibility rewards, as in DDPO (Black et al. 2023).

The image is saved with PIL as a quality-95 JPEG and its size is measured in kB (bytes / 1000,
as DDPO does): ``jpeg_incompressibility`` rewards +size, ``jpeg_compressibility`` -size.
The prompt is ignored. References: kvablack/ddpo-pytorch ``rewards.py``, jannerm/ddpo.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np
from PIL import Image

from herd_jax.rewards.base import check_batch

JPEG_QUALITY = 95


def jpeg_size_kb(images: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Size in kB (1000 bytes) of each ``uint8[B,H,W,3]`` image saved as a PIL JPEG -> ``float32[B]``.

    PIL's encoder releases the GIL, so this overlaps with work in other threads.
    """
    sizes = np.empty(len(images), dtype=np.float32)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000
    return sizes


@dataclasses.dataclass
class JpegReward:
    """``sign * jpeg_size_kb(images)``: sign -1 is compressibility, +1 incompressibility."""

    name: str
    sign: float

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return (self.sign * jpeg_size_kb(check_batch(images, prompts))).astype(np.float32)

    def close(self) -> None:
        pass


def jpeg_compressibility(cfg: object = None) -> JpegReward:
    """Reward = -(JPEG size in kB): smaller files are better."""
    del cfg
    return JpegReward("jpeg_compressibility", -1.0)


def jpeg_incompressibility(cfg: object = None) -> JpegReward:
    """Reward = +(JPEG size in kB): larger files are better."""
    del cfg
    return JpegReward("jpeg_incompressibility", 1.0)
