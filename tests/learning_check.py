"""Paired learning runs (train on r, and on −r from the same start) and their spread over seeds.

tests/test_demo.py uses its `curve`; run this file to measure the paired leads and their spread
over seeds that test_demo.py's docstring quotes (the spread over seeds stands in for the spread
over machines: float differences between CPUs change a run as much as another seed does):

  python tests/learning_check.py --algorithms ddpo herd --seeds 0 1 2 3 4 5 6 7 [key=value ...]
  python tests/learning_check.py --preset configs/demo.toml --algorithms herd --epochs 30 --no_control

(the second: the README demo's per-seed gains over its whole run, without the −r runs).

For each algorithm and seed it prints gain = last − first and lead = last − last of the −r run
(`last`: mean of the final ENDS epochs, `first`: the first FIRST epochs; rewards of fresh samples,
balanced over prompts), then per algorithm the mean and std over seeds of both and of their
mean over SEEDS_PER_TEST consecutive seeds (what the test checks).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
from typing import Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "learning.toml"
PROMPTS = ("a red ball", "a red car")
EPOCHS = 16
FIRST = 2  # the untrained policy and the one after a single update
ENDS = 4


class Negated:
    """The control run's reward: −r."""

    def __init__(self, reward):
        self.reward, self.name = reward, f"-{getattr(reward, 'name', 'reward')}"

    def __call__(self, images, prompts):
        return -self.reward(images, prompts)

    def close(self) -> None:
        pass


def balanced_reward(metrics: dict[str, float]) -> float:
    """Mean of the per-prompt means of an epoch's fresh samples (the prompt mix is not noise)."""
    return float(np.mean([v for k, v in metrics.items() if k.startswith("reward/prompt/")]))


def build(algorithm: str, run_dir: str, overrides: Sequence[str] = (), preset: pathlib.Path = PRESET):
    """`preset` (the learning preset by default) for `algorithm` on the one-colour task: (setup, initial state)."""
    from herd_jax import config as config_lib
    from herd_jax import trainer

    prompts = pathlib.Path(run_dir) / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = config_lib.load_config(
        [str(preset)],
        [f"algorithm.name={algorithm}", f"prompts={str(prompts)!r}", f"run_dir={run_dir!r}", "reward.name=color", *overrides],
    )
    return trainer.build(cfg)


def curve(setup, initial, seed: int, sign: int, epochs: int = EPOCHS) -> np.ndarray:
    """`epochs` epochs from `initial` with the seed's keys on sign·r; the true r of each epoch."""
    import jax
    import jax.numpy as jnp

    from herd_jax import trainer

    reward = setup.reward
    setup.reward = reward if sign > 0 else Negated(reward)
    try:
        state = jax.tree.map(jnp.copy, initial).replace(rng=jax.random.PRNGKey(seed))
        out = []
        for epoch in range(epochs):
            state, metrics, _ = trainer.run_epoch(setup, state)
            if not np.isfinite(metrics["train/loss"]):
                raise AssertionError(f"non-finite loss at epoch {epoch} (seed {seed}, sign {sign})")
            out.append(sign * balanced_reward(metrics))
        return np.array(out)
    finally:
        setup.reward = reward


def paired(setup, initial, seed: int, epochs: int = EPOCHS, control: bool = True) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(gain, lead, r-run curve, −r-run curve) for one seed; without `control` no −r run (lead and its curve NaN)."""
    plus = curve(setup, initial, seed, +1, epochs)
    minus = curve(setup, initial, seed, -1, epochs) if control else np.full(epochs, np.nan)
    last = plus[-ENDS:].mean()
    return float(last - plus[:FIRST].mean()), float(last - minus[-ENDS:].mean()), plus, minus


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", default=["ddpo", "ddpg", "dpok", "herd"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--group", type=int, default=3, help="seeds averaged per test")
    p.add_argument("--preset", type=pathlib.Path, default=PRESET, help="config file the runs start from")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per run")
    p.add_argument("--no_control", action="store_true", help="skip the −r runs (gains only; half the time)")
    p.add_argument("overrides", nargs="*", help="config overrides on top of the preset")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    for algorithm in args.algorithms:
        with tempfile.TemporaryDirectory() as tmp:
            setup, initial = build(algorithm, tmp, args.overrides, args.preset)
            rows = []
            for seed in args.seeds:
                gain, lead, plus, minus = paired(setup, initial, seed, args.epochs, not args.no_control)
                rows.append((gain, lead))
                lead_text, minus_text = ("", "") if args.no_control else (f" lead {lead:+.4f}", f"  -r {np.round(minus, 3)}")
                print(f"{algorithm} seed {seed}: gain {gain:+.4f}{lead_text}  r {np.round(plus, 3)}{minus_text}", flush=True)
            setup.reward.close()
            setup.logger.close()
        g, l = np.array(rows).T
        k = args.group
        groups = [(g[i : i + k].mean(), l[i : i + k].mean()) for i in range(0, len(g) - k + 1, k)]
        gg, gl = np.array(groups).T if groups else (np.array([np.nan]), np.array([np.nan]))
        leads = "" if args.no_control else f"lead {l.mean():+.4f} ± {l.std(ddof=1):.4f} (min {l.min():+.4f}); "
        print(
            f"== {algorithm}: gain {g.mean():+.4f} ± {g.std(ddof=1):.4f} (min {g.min():+.4f}), {leads}"
            f"means of {k} seeds: gain min {gg.min():+.4f}" + ("" if args.no_control else f", lead min {gl.min():+.4f}"),
            flush=True,
        )


if __name__ == "__main__":
    main()


def evaluate(setup, params, batches: int = 8) -> float:
    """Mean true reward of the policy on fixed prompts and fixed noise (common random numbers:
    two policies evaluated here see the same initial and per-step noise)."""
    import jax

    from herd_jax import parallel

    n = setup.cfg.sample.batch_size
    ids = np.arange(n, dtype=np.int32) % len(setup.prompts)
    unet = setup.steps.unet_params(params, setup.frozen.base)
    total = []
    for b in range(batches):
        traj = setup.steps.rollout(unet, setup.frozen, parallel.shard_batch(ids, setup.mesh), jax.random.PRNGKey(10_000 + b))
        images = np.asarray(traj.images)
        total.append(setup.reward(images, [setup.prompts[i] for i in ids]))
    return float(np.mean(np.concatenate(total)))


def one_step(setup, initial, seed: int, epochs: int = 1) -> tuple[float, float, float]:
    """(before, after `epochs` epochs on r, after on −r), each `evaluate`d with the same noise."""
    import jax
    import jax.numpy as jnp

    from herd_jax import trainer

    reward = setup.reward
    out = [evaluate(setup, initial.params)]
    for sign in (1, -1):
        setup.reward = reward if sign > 0 else Negated(reward)
        try:
            state = jax.tree.map(jnp.copy, initial).replace(rng=jax.random.PRNGKey(seed))
            for _ in range(epochs):
                state, _, _ = trainer.run_epoch(setup, state)
        finally:
            setup.reward = reward
        out.append(evaluate(setup, state.params))
    return tuple(out)
