"""The ``imagereward`` reward: ImageReward (Xu et al. 2023) scored by the ``image-reward`` package.

image-reward 1.5 pins timm 0.6.13 / fairscale and needs a torchvision that cannot sit beside the
main environment's torch, so the model runs in a sidecar process (``sidecar.py``) in the
environment built by ``install_image_reward.sh`` (``.venv-imagereward`` in the repo by default);
``_imagereward_worker.py`` is the script it runs there. Scores are the package's normalised
rewards, ``(mlp(text_cls) - 0.16717362830052426) / 1.0333394966054072``.

Weights: a local ``ImageReward.pt`` with its ``med_config.json`` (default: the one beside the
checkpoint) and a local BERT vocab directory (``reward.imagereward_bert``, for offline use), or
the package's own hub download of ``ImageReward-v1.0`` when online.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from herd_jax.config import RewardConfig
from herd_jax.rewards.base import RewardError, check_batch, check_finite
from herd_jax.rewards.sidecar import Sidecar

WORKER = Path(__file__).with_name("_imagereward_worker.py")
ENV_DIR_NAME = ".venv-imagereward"
PYTHON_ENV_VAR = "HERD_IMAGEREWARD_PYTHON"


def find_python(configured: str = "") -> str:
    """Interpreter of the ImageReward environment: the configured one, ``$HERD_IMAGEREWARD_PYTHON``,
    or ``.venv-imagereward/bin/python`` in the repository or the working directory.

    Raises:
      RewardError: none exists (says how to build it).
    """
    explicit = configured or os.environ.get(PYTHON_ENV_VAR, "")
    if explicit:
        if not os.path.isfile(explicit):
            raise RewardError(
                f"imagereward: python {explicit!r} does not exist; build it with ./install_image_reward.sh"
            )
        return explicit
    bindir = "Scripts" if sys.platform == "win32" else "bin"
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / ENV_DIR_NAME / bindir / "python"
        if candidate.is_file():
            return str(candidate)
    raise RewardError(
        "imagereward: its environment is not built; run ./install_image_reward.sh "
        "(or set reward.imagereward_python to that environment's python)"
    )


def _local(path: str) -> str:
    """Absolute path for an existing file/directory (the worker may run elsewhere), else as given."""
    return str(Path(path).resolve()) if path and os.path.exists(path) else path


class ImageRewardScorer:
    """``scorer(images uint8[B,H,W,3], prompts) -> float32[B]`` through the ImageReward sidecar.

    Starting it loads the model (so missing weights fail here, with one line); a crashed or hung
    worker is restarted and the batch re-sent, up to ``cfg.max_restarts`` times in a row.
    """

    name = "imagereward"

    def __init__(self, cfg: RewardConfig, log_path: str | os.PathLike | None = None):
        args = ["--checkpoint", _local(cfg.imagereward_checkpoint)]
        if cfg.imagereward_med_config:
            args += ["--med-config", _local(cfg.imagereward_med_config)]
        if cfg.imagereward_bert:
            args += ["--bert", _local(cfg.imagereward_bert)]
        self.sidecar = Sidecar(
            WORKER,
            args,
            python=find_python(cfg.imagereward_python),
            timeout_s=cfg.timeout_s,
            max_restarts=cfg.max_restarts,
            name=self.name,
            log_path=log_path,
        )
        self.sidecar.start()

    @property
    def pid(self) -> int | None:
        """Process id of the worker (for monitoring and tests)."""
        return self.sidecar.pid

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = check_batch(images, prompts)
        return check_finite(self.sidecar(images, prompts), prompts)

    def close(self) -> None:
        self.sidecar.close()


def imagereward(cfg: RewardConfig) -> ImageRewardScorer:
    """Registry factory for ``reward.name = "imagereward"``."""
    return ImageRewardScorer(cfg)
