"""The loop compiles each step once: a second epoch reuses every jitted function (no retrace)."""
import numpy as np

from herd_jax import config as config_lib
from herd_jax import trainer


def cache_sizes(setup) -> dict[str, int]:
    """Compiled-variant count of every jitted function the loop uses."""
    fns = dict(setup.steps, rollout=setup.rollout)
    update = fns.pop("update")
    fns.update({f"update/{k}": f for k, f in getattr(update, "jitted", {"": update}).items()})
    return {name: fn._cache_size() for name, fn in fns.items()}


def test_second_epoch_does_not_recompile(tmp_path):
    cfg = config_lib.load_config(
        ["configs/tiny.toml", "tests/fast.toml"],
        [f'run_dir="{tmp_path}"', 'logging.log_with="none"', "checkpoint.save_every=0", 'algorithm.name="herd"', 'herd.goal_strategy="random"'],
    )
    setup, state = trainer.build(cfg)
    state, first, _ = trainer.run_epoch(setup, state)
    sizes, after = cache_sizes(setup), None
    state, second, _ = trainer.run_epoch(setup, state)
    after = cache_sizes(setup)
    assert after == sizes, {k: (sizes[k], after[k]) for k in sizes if sizes[k] != after[k]}
    assert sizes["rollout"] == 1 and sizes["herd_replay"] == 1
    if "update/accumulate" in sizes:  # the host-loop update (CPU): one gradient step, one optimizer step
        assert sizes["update/accumulate"] == 1 and sizes["update/apply"] == 1
    else:
        assert sizes["update/"] == 1
    assert int(state.step) == 2
    # herd: 4 fresh samples + 4 relabeled copies (random strategy: one query each) per epoch.
    assert second["reward/queries"] == 16
    assert np.isfinite(second["train/loss"])
