"""The loop compiles each step once: a second epoch traces nothing new (every jitted function and
eager op hits its cache), checked with JAX's public monitoring events. herd here; the other
algorithms in tests/test_resume.py."""
import numpy as np

from herd_jax import config as config_lib
from herd_jax import trainer
from tracing import count_traces


def test_second_epoch_traces_nothing(tmp_path):
    cfg = config_lib.load_config(
        ["configs/tiny.toml", "tests/fast.toml"],
        [f'run_dir="{tmp_path}"', 'logging.log_with="none"', "checkpoint.save_every=0", 'algorithm.name="herd"', 'herd.goal_strategy="random"'],
    )
    setup, state = trainer.build(cfg)
    with count_traces() as first:
        state, _, _ = trainer.run_epoch(setup, state)
    with count_traces() as second:
        state, metrics, _ = trainer.run_epoch(setup, state)
    assert len(first) > 5, "the counter saw no traces: the check would be vacuous"
    assert second == [], f"the second epoch traced {len(second)} new functions"
    assert int(state.step) == 2
    # herd: 4 fresh samples + 4 relabeled copies (random strategy: one query each) per epoch.
    assert metrics["reward/queries"] == 16
    assert np.isfinite(metrics["train/loss"])
