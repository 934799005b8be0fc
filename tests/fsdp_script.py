"""One epoch with `parallel.fsdp` on and off from the same initial state, on however many devices
the process has (test_fsdp.py runs it on 4 forced host devices); prints what the test checks as JSON.

Cases: full fine-tuning through the host-loop update (the CPU default) and LoRA through the
one-program scanned update (the GPU/TPU default), so both update paths run sharded.
"""
import json
import pathlib
import sys
import tempfile

import jax
import numpy as np

from herd_jax import config as config_lib
from herd_jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
CASES = {
    "full": ['train.trainable="all"', 'train.update_loop="host"'],
    "lora": ['train.trainable="lora"', 'train.update_loop="scan"', "train.lora_rank=2"],
}
COMMON = [
    'algorithm.name="ddpo"', 'logging.log_with="none"', "checkpoint.save_every=0", "eval.every=0",
    "train.adam_eps=1e-4",  # see test_update_paths.py: keeps updates of near-zero-gradient params proportional
]


def sharded_fraction(tree) -> float:
    """Fraction of the tree's bytes held in arrays split over devices (not fully replicated)."""
    leaves = jax.tree.leaves(tree)
    total = sum(x.nbytes for x in leaves)
    return sum(x.nbytes for x in leaves if not x.sharding.is_fully_replicated) / total


def run(case: str, fsdp: bool) -> dict:
    overrides = [*COMMON, *CASES[case], f"parallel.fsdp={str(fsdp).lower()}", f"run_dir={tempfile.mkdtemp()!r}"]
    cfg = config_lib.load_config([str(REPO / "configs/tiny.toml"), str(REPO / "tests/fast.toml")], overrides)
    setup, state = trainer.build(cfg)
    unet = state.params if case == "full" else setup.frozen.base
    where = {"params": sharded_fraction(state.params), "opt_state": sharded_fraction(state.opt_state), "unet": sharded_fraction(unet)}
    initial = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    state, metrics, _ = trainer.run_epoch(setup, state)
    where["params_after"] = sharded_fraction(state.params)
    return {"initial": initial, "final": [np.asarray(x) for x in jax.tree.leaves(state.params)], "where": where, "loss": metrics["train/loss"]}


def main() -> None:
    out = {"devices": len(jax.devices())}
    for case in CASES:
        replicated, sharded = run(case, False), run(case, True)
        out[case] = {
            "moved": max(float(np.abs(a - b).max()) for a, b in zip(replicated["final"], replicated["initial"])),
            "diff": max(float(np.abs(a - b).max()) for a, b in zip(replicated["final"], sharded["final"])),
            "same_start": all(np.array_equal(a, b) for a, b in zip(replicated["initial"], sharded["initial"])),
            "replicated_where": replicated["where"],
            "fsdp_where": sharded["where"],
            "loss": [replicated["loss"], sharded["loss"]],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
