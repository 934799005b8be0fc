"""Learning: on a short seeded run of the tiny model, each algorithm raises the `color` reward.

The tiny model's noisy updates drift the policy on their own (a run
with shuffled advantages changes the JPEG reward too), so "the last epochs beat the first" alone
could pass by drift. Each algorithm therefore trains twice from the same initial state with the
same keys: once on the colour reward r and once on −r (same compiled functions, only the reward
object swapped). It has learned when, for the true reward r of its fresh samples (mean of the
per-prompt means), (a) its last epochs beat its first ones and (b) the r run ends above the −r run,
each by MARGIN; a sign error in the update fails (b), a stalled learner fails both.

Settings: configs/learning.toml (4 DDIM steps, guidance 1, 16 samples per epoch, lr 1e-2, clip
0.2, dpok's KL weight 1e-3), prompts "a red ball" / "a red car" (one colour, so herd's relabeling
is a real second goal and every algorithm can learn it: bench/learning.py explains why
prompt-conditional colours learn far more slowly on the tiny model).
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "learning.toml"
PROMPTS = ("a red ball", "a red car")
EPOCHS = 20
# "First epochs": the untrained policy and the one after a single update. At lr 1e-2 the reward
# moves within a few epochs and then fluctuates (16 samples per update), so a 5-epoch start
# window would already hold trained epochs; the end is a 5-epoch mean.
FIRST = 2
ENDS = 5
SEED = 0
# The colour reward's per-image std is ~0.02-0.04 on the tiny model, so a 5-epoch mean of 16 images
# per epoch is known to ~0.005; learning runs move it by 0.03-0.3 (bench/learning.py).
MARGIN = 0.01


class _Negated:
    """The control run's reward: −r, same name and prompts contract."""

    def __init__(self, reward):
        self.reward, self.name = reward, f"-{getattr(reward, 'name', 'reward')}"

    def __call__(self, images, prompts):
        return -self.reward(images, prompts)

    def close(self) -> None:
        pass


def _fresh_reward(metrics: dict[str, float]) -> float:
    per_prompt = [v for k, v in metrics.items() if k.startswith("reward/prompt/")]
    return float(np.mean(per_prompt))


def _train(setup, initial, sign: int) -> np.ndarray:
    """EPOCHS epochs from a copy of `initial` on sign·r; the true reward r of each epoch's fresh samples."""
    import jax
    import jax.numpy as jnp

    from herd_jax import trainer

    reward = setup.reward
    setup.reward = reward if sign > 0 else _Negated(reward)
    try:
        state = jax.tree.map(jnp.copy, initial)
        rewards = []
        for epoch in range(EPOCHS):
            state, metrics, _ = trainer.run_epoch(setup, state)
            assert np.isfinite(metrics["train/loss"]), f"non-finite loss at epoch {epoch}"
            rewards.append(sign * _fresh_reward(metrics))
        return np.array(rewards)
    finally:
        setup.reward = reward


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("learning") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.mark.parametrize(
    "algorithm", ["ddpo", "ddpg", "dpok", "herd"]
)
def test_algorithm_raises_color_reward(algorithm: str, prompts_file: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from herd_jax import config as config_lib
    from herd_jax import trainer

    cfg = config_lib.load_config(
        [str(PRESET)], [f"algorithm.name={algorithm}", f"prompts={prompts_file}", f"run_dir={tmp_path}", f"seed={SEED}", "reward.name=color"]
    )
    setup, initial = trainer.build(cfg)
    try:
        plus = _train(setup, initial, +1)
        minus = _train(setup, initial, -1)
    finally:
        setup.reward.close()
        setup.logger.close()
    first, last, control = plus[:FIRST].mean(), plus[-ENDS:].mean(), minus[-ENDS:].mean()
    summary = (
        f"{algorithm}: reward of fresh samples, first {FIRST} epochs {first:.4f}, last {ENDS} {last:.4f}; "
        f"trained on -r instead: last {ENDS} {control:.4f} (margin {MARGIN})\n  r run:  {np.round(plus, 3)}\n  -r run: {np.round(minus, 3)}"
    )
    assert last - first > MARGIN, "did not raise its reward: " + summary
    assert last - control > MARGIN, "ends no better than training on -r: " + summary
