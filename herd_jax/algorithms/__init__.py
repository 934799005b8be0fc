"""RL algorithms by name: each a `make(ctx) -> Algorithm` (herd_jax/algorithms/api.py).

Adding one is a new module with its `make` (and, if it has settings, a config dataclass with a
`validate(cfg, num_devices)` method, added as a section of herd_jax.config.Config) plus one line
in `REGISTRY`; `register` adds one at run time (tests, plug-ins).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from herd_jax.algorithms import ddpg, ddpo, dpok, grpo, herd
from herd_jax.algorithms.api import Algorithm, Context


class Entry(NamedTuple):
    make: Callable[[Context], Algorithm]
    section: str | None = None  # the algorithm's config section (validated when it runs)


REGISTRY: dict[str, Entry] = {
    "herd": Entry(herd.make, "herd"),
    "ddpg": Entry(ddpg.make, "ddpg"),
    "ddpo": Entry(ddpo.make),
    "dpok": Entry(dpok.make, "dpok"),
    "grpo": Entry(grpo.make, "grpo"),
}


def names() -> list[str]:
    """The valid `algorithm.name` values (the CLI's --algorithm choices)."""
    return list(REGISTRY)


def register(name: str, make: Callable[[Context], Algorithm], section: str | None = None) -> None:
    """Adds (or replaces) an algorithm."""
    REGISTRY[name] = Entry(make, section)


def get(name: str) -> Entry:
    from herd_jax.errors import ConfigError

    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"algorithm.name={name!r} is not one of: {', '.join(REGISTRY)}") from None
