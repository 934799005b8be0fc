"""One `trainer.build` per training configuration in a test process (the `reuse_builds` fixture).

Why: a build traces and lowers every program of a run (~15-20 s of CPU on the tiny model even
when the persistent compile cache has them), and many tests start several runs of one config (a
straight run, then a resumed or a failing one). With the fixture, `trainer.build` keeps the first
Setup of each config and returns it again for later runs of the same config (compiled steps,
frozen params, prompt embeddings shared), with that run's own cfg, a fresh reward and logger, and
a fresh host copy of the initial state (the update donates its inputs). Nothing a run does is
skipped: it restores, trains, saves and reports as before. The config key is the whole config
but the run's edges (run_dir, logging, checkpoint settings, num_epochs), which no compiled step
reads. A fresh process resuming a run is tested without it (tests/test_checkpoint.py's killed
`train.py` runs, tests/test_multihost.py).
"""
from __future__ import annotations

import dataclasses
import json

_EDGES = ("run_dir", "logging", "checkpoint", "num_epochs")
_built: dict[str, tuple] = {}  # per test process: config key -> (Setup, host copy of the initial state)


def config_key(cfg) -> str:
    from herd_jax import config as config_lib

    d = config_lib.to_dict(cfg)
    return json.dumps({k: v for k, v in d.items() if k not in _EDGES}, sort_keys=True, default=str)


def host_copy(tree):
    """New device buffers with the same values and shardings, through the host (compiles nothing)."""
    import jax
    import numpy as np

    return jax.tree.map(
        lambda x: jax.make_array_from_single_device_arrays(
            x.shape, x.sharding, [jax.device_put(np.array(s.data), s.device) for s in x.addressable_shards]
        ),
        tree,
    )


def reusing(real_build):
    """`trainer.build` that reuses the first Setup of each config (see the module docstring)."""

    def build(cfg, sd=None):
        from herd_jax import rewards, trainer

        key = config_key(cfg)
        if sd is not None or key not in _built:
            setup, state = real_build(cfg, sd)
            if sd is None:
                _built[key] = (setup, host_copy(state))
            return setup, state
        setup, initial = _built[key]
        return dataclasses.replace(setup, cfg=cfg, reward=rewards.make_reward(cfg.reward), logger=trainer.make_run_logger(cfg)), host_copy(initial)

    return build
