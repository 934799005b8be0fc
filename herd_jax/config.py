"""Typed configuration: dataclasses, layered TOML files and `key=value` overrides.

(Work in progress: the sections below RewardConfig are added by the core trainer work.)
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RewardConfig:
    """Which reward scores the images, and where its weights live."""

    name: str = "jpeg_compressibility"
    # aesthetic: CLIP ViT-L/14 (diffusers/transformers directory or hub id) + LAION MLP head (.pth).
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    aesthetic_head: str = ""
    # imagereward: checkpoint (local ImageReward.pt or hub name), its med_config.json, a local BERT vocab
    # directory (offline), and the python of the environment built by install_image_reward.sh.
    imagereward_checkpoint: str = "ImageReward-v1.0"
    imagereward_med_config: str = ""
    imagereward_bert: str = ""
    imagereward_python: str = ""
    timeout_s: float = 300.0
    max_restarts: int = 3
