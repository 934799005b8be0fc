"""One (possibly multi-process) launch of everything tests/test_multihost.py checks.

Usage: multihost_script.py RUN_DIR OUT.npz [train.py flags and overrides, e.g. the distributed
--coordinator_address HOST:PORT --num_processes N --process_id I]

1. `train.main` (train.py's CLI, given flags included: they start the multi-process run) trains
   FLAGS/OVERRIDES into RUN_DIR: 2 epochs, a checkpoint after each.
2. `train.main --resume RUN_DIR/checkpoints/1 --run_dir RUN_DIR_resumed`: every process restores
   checkpoint 1 from disk, trains epoch 1 and saves checkpoint 2 again. It prints RESUME_MARKER
   first, so the test can read this call's own output.
3. Only in a single process (the test's reference): the same 2 epochs from the same initial
   state, with each update counting only the first half of the batch's rows (`half_rows_update`:
   the others weighted 0): what process 0 of 2 computes when no gradient crosses processes.
   Written to OUT.npz.
Process 0 writes the process and device counts to OUT.npz. 1, 2 and 3 share one `trainer.build`
(`build_once`): every process compiles each program it runs (JAX's persistent compile cache is
off for the multi-process test, see test_multihost.launch), so a second build would compile
everything again.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from unittest import mock

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Settings shared by every run of test_multihost.py (and so by its compiled programs). Chosen so
# that two AdamW steps move the params far beyond the comparison tolerance (numbers in the test):
# lr 1e-2 (tiny.toml: 3e-4), and adam_eps 1e-4 (default 1e-8) so that float-rounding differences
# of another all-reduce order on near-zero gradients are not blown up into ±lr Adam steps.
FLAGS = ["--config", "configs/tiny.toml", "--config", "tests/fast.toml", "--log_with", "none", "--num_epochs", "2"]
OVERRIDES = [
    "algorithm.name=ddpo", "sample.num_steps=2", "checkpoint.save_every=1", "checkpoint.keep=2",
    "train.learning_rate=1e-2", "train.adam_eps=1e-4", "eval.every=0",
]
RESUME_MARKER = "=== multihost_script: resume ==="
DISTRIBUTED_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def half_rows_update(setup, share: int = 2):
    """Wraps setup.steps.update so that only the first 1/`share` of each batch's rows count: the
    others get weight 0 (as padding rows do), so every loss is the mean over those rows alone and
    so is each gradient. That is what process 0 of `share` steps on when no gradient crosses
    processes (it holds the batch's first rows), with the same compiled update: no second build."""
    import jax.numpy as jnp

    update = setup.steps.update

    def first_rows_only(params, opt_state, frozen, batch, timesteps, key):
        n = batch.weights.shape[0]
        weights = batch.weights * (jnp.arange(n) < n // share)
        return update(params, opt_state, frozen, batch._replace(weights=weights), timesteps, key)

    setup.steps = setup.steps._replace(update=first_rows_only)


def main(run_dir: str, out: str, flags: list[str]) -> None:
    import jax
    import numpy as np

    import train
    from builds import host_copy  # tests/builds.py (this script's directory is on sys.path)
    from herd_jax import config as config_lib
    from herd_jax import parallel, trainer
    from herd_jax.rewards import make_reward

    overrides = [f for f in flags if "=" in f and not f.startswith("-")]  # after every flag (argparse)
    distributed = [f for f in flags if f not in overrides]
    assert all(f in DISTRIBUTED_FLAGS for f in distributed[::2]), distributed
    built = []
    real_build = trainer.build

    def build_once(cfg):
        """The first build, then the same Setup (fresh reward, this cfg) and a copy of its initial state."""
        if not built:
            setup, state = real_build(cfg)
            built.append((setup, host_copy(state)))  # the update donates its inputs
            return setup, state
        setup, initial = built[0]
        without_run_dir = lambda c: dict(config_lib.to_dict(c), run_dir="")
        assert without_run_dir(cfg) == without_run_dir(setup.cfg), "a different config would need another build"
        return dataclasses.replace(setup, cfg=cfg, reward=make_reward(cfg.reward)), host_copy(initial)

    with mock.patch.object(trainer, "build", build_once):
        assert train.main([*FLAGS, "--run_dir", run_dir, *distributed, *OVERRIDES, *overrides]) == 0  # 1.
        print(RESUME_MARKER, flush=True)  # 2. (the processes have joined already: no distributed flags)
        resume = ["--resume", str(pathlib.Path(run_dir) / "checkpoints" / "1"), "--run_dir", f"{run_dir}_resumed"]
        assert train.main([*FLAGS, *resume, *OVERRIDES, *overrides]) == 0

    if jax.process_count() == 1:  # 3.
        setup, state = build_once(built[0][0].cfg)
        half_rows_update(setup)
        for _ in range(setup.cfg.num_epochs):
            state, _, _ = trainer.run_epoch(setup, state)
        setup.reward.close()
        params = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    else:
        params = {}
    if parallel.is_main_process():
        np.savez(out, num_processes=jax.process_count(), num_devices=len(jax.devices()), **params)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
