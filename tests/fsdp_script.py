"""One epoch of full fine-tuning with `parallel.fsdp` on and off from the same initial state, and
where LoRA's arrays live under FSDP, on however many devices the process has (test_fsdp.py runs
it on 4 forced host devices); prints what the test checks as JSON.

The epoch runs the one-program scanned update (the GPU/TPU default, where FSDP is for): its
params all-gather, data split and gradient reduce-scatter are what FSDP adds. LoRA is only
built (its frozen base sharded, adapters replicated): its update is the same code on a smaller
trainable tree, and each trained case costs the suite about two CPU-minutes of compiling.
`plan` is the per-device memory analysis of the two runs' own compiled updates (what
`herd_jax.memory_plan` reports for the same cell: 2 samples per device, remat blocks, every
timestep one gradient call; test_fsdp.py compiles with XLA:CPU's memory-optimised scheduler, as
memory_plan does): compiling the update a third and fourth time for the plan cost the suite ~25 CPU-s.
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
    # The planned cell (test_fsdp_update_gathers_per_layer): 2 samples per device, remat blocks, one timestep per gradient call.
    "sample.batch_size=8", "train.batch_size=8", 'model_options.remat="blocks"', "train.timestep_batch=1",
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
    memory = {}
    update = setup.steps.update

    def analysed(*args):
        """The update, after reading its compiled program's memory analysis (the call reuses that compile)."""
        analysis = update.lower(*args).compile().memory_analysis()
        memory.update(temp=analysis.temp_size_in_bytes, argument=analysis.argument_size_in_bytes)
        return update(*args)

    setup.steps = setup.steps._replace(update=analysed)
    state, metrics, _ = trainer.run_epoch(setup, state)
    where["params_after"] = sharded_fraction(state.params)
    final = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    return {"initial": initial, "final": final, "where": where, "loss": metrics["train/loss"], "memory": memory}


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
    out["plan"] = {"replicated": replicated["memory"], "fsdp": sharded["memory"]}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
