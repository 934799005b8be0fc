"""Stable Diffusion v1.x in Flax: load a diffusers-format model, or build the embedded tiny one.

Importing this package silences exactly one kind of log line: the "Flax classes are deprecated"
notice that diffusers 0.39 logs from every Flax class body and `setup` (and the matching
transformers notice). We pin those versions on purpose (see DESIGN.md), so the notice is noise.
It must be installed before diffusers' Flax modules are imported: their class bodies log it.
"""

import logging

_DEPRECATION_PREFIXES = (
    "Flax classes are deprecated and will be removed in Diffusers",
    "TensorFlow and JAX classes are deprecated and will be removed in Transformers",
)


class _FlaxDeprecationFilter(logging.Filter):
    """Drops the diffusers/transformers Flax deprecation notices; lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DEPRECATION_PREFIXES)


def silence_flax_deprecation() -> None:
    """Adds the filter to the diffusers and transformers library handlers (idempotent)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library_logger in (diffusers_logging.get_logger("diffusers"), transformers_logging.get_logger("transformers")):
        for handler in library_logger.handlers:
            if not any(isinstance(f, _FlaxDeprecationFilter) for f in handler.filters):
                handler.addFilter(_FlaxDeprecationFilter())


silence_flax_deprecation()

from .loading import ModelNotFoundError, StableDiffusion, load_pipeline, resolve_model_path  # noqa: E402
from .tiny import build_tiny_model, tiny_model_path, write_bin_copy  # noqa: E402

__all__ = [
    "ModelNotFoundError",
    "StableDiffusion",
    "build_tiny_model",
    "load_pipeline",
    "resolve_model_path",
    "silence_flax_deprecation",
    "tiny_model_path",
    "write_bin_copy",
]
