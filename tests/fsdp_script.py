"""One epoch of full fine-tuning with `parallel.fsdp` on and off from the same initial state, and
where LoRA's arrays live under FSDP, on however many devices the process has (test_fsdp.py runs
it on 4 forced host devices); prints what the test checks as JSON.

The epoch runs the one-program scanned update (the GPU/TPU default, where FSDP is for): its
params all-gather, data split and gradient reduce-scatter are what FSDP adds. LoRA is only
built (its frozen base sharded, adapters replicated): its update is the same code on a smaller
trainable tree, and each trained case costs the suite about two CPU-minutes of compiling.
`plan` compiles the same update (memory_plan: abstract inputs, no run) with FSDP off and on for
its per-device temporaries.
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
    "full": ['train.trainable="all"', 'train.update_loop="scan"'],
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


def build(case: str, fsdp: bool):
    overrides = [*COMMON, *CASES[case], f"parallel.fsdp={str(fsdp).lower()}", f"run_dir={tempfile.mkdtemp()!r}"]
    cfg = config_lib.load_config([str(REPO / "configs/tiny.toml"), str(REPO / "tests/fast.toml")], overrides)
    setup, state = trainer.build(cfg)
    unet = state.params if case == "full" else setup.frozen.base
    where = {"params": sharded_fraction(state.params), "opt_state": sharded_fraction(state.opt_state), "unet": sharded_fraction(unet)}
    return setup, state, where


def run(case: str, fsdp: bool) -> dict:
    setup, state, where = build(case, fsdp)
    initial = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    state, metrics, _ = trainer.run_epoch(setup, state)
    where["params_after"] = sharded_fraction(state.params)
    return {"initial": initial, "final": [np.asarray(x) for x in jax.tree.leaves(state.params)], "where": where, "loss": metrics["train/loss"]}


def plan() -> dict:
    """Per-device temporaries of the tiny model's scanned full-fine-tune update, replicated vs FSDP."""
    from herd_jax import memory_plan as mp
    from herd_jax.models import tiny_model_path

    n = len(jax.devices())
    cells = [mp.Cell("train", "fp32", "all", 2 * n, remat="blocks", fsdp=fsdp) for fsdp in (False, True)]
    rows = mp.plan(mp.configs_from_dir(tiny_model_path()), cells, resolution=32, num_steps=4, devices=n)
    return {name: {"temp": r.temp, "argument": r.argument} for name, r in zip(("replicated", "fsdp"), rows)}


def main() -> None:
    out = {"devices": len(jax.devices())}
    replicated, sharded = run("full", False), run("full", True)
    out["full"] = {
        "moved": max(float(np.abs(a - b).max()) for a, b in zip(replicated["final"], replicated["initial"])),
        "diff": max(float(np.abs(a - b).max()) for a, b in zip(replicated["final"], sharded["final"])),
        "same_start": all(np.array_equal(a, b) for a, b in zip(replicated["initial"], sharded["initial"])),
        "replicated_where": replicated["where"],
        "fsdp_where": sharded["where"],
        "loss": [replicated["loss"], sharded["loss"]],
    }
    out["lora"] = {"fsdp_where": build("lora", True)[2], "replicated_where": build("lora", False)[2]}
    out["plan"] = plan()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
