"""Errors that are the user's to fix: the CLI prints their one-line message and exits 2."""
from __future__ import annotations

import logging
import os
import warnings


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types whose message is a complete, one-line explanation for the user."""
    from herd_jax.checkpoint import CheckpointError
    from herd_jax.config import ConfigError
    from herd_jax.models import ModelNotFoundError
    from herd_jax.prompts import PromptError
    from herd_jax.rewards import RewardError

    return (CheckpointError, ConfigError, ModelNotFoundError, PromptError, RewardError)


def quiet_libraries() -> None:
    """Turns down start-up chatter from XLA, absl and the hub libraries (errors still show)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
