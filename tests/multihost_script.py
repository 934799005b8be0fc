"""Two epochs of ddpo on the tiny model in one process of a (possibly multi-process) run.

Usage: multihost_script.py OUT.npz [PROCESS_ID NUM_PROCESSES PORT]. Process 0 writes the
per-epoch rewards and the final UNet params. Run by test_multihost.py.
"""
import sys

import jax
import numpy as np

from herd_jax import config as config_lib
from herd_jax import parallel

if len(sys.argv) > 2:
    pid, count, port = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    parallel.initialize_distributed(f"127.0.0.1:{port}", count, pid)

from herd_jax import trainer  # noqa: E402

cfg = config_lib.load_config(
    ["configs/tiny.toml"],
    [
        "run_dir=\"/tmp/herd_jax_multihost\"", "logging.log_with=\"none\"", "checkpoint.save_every=0",
        "algorithm.name=\"ddpo\"", "sample.num_steps=2", "sample.batch_size=4", "sample.num_batches_per_epoch=1",
        "train.batch_size=4",
    ],
)
setup, state = trainer.build(cfg)
rewards = []
for _ in range(2):
    state, metrics, samples = trainer.run_epoch(setup, state)
    rewards.append(samples.rewards)
params = {"/".join(str(k) for k in path): np.asarray(leaf.addressable_data(0)) for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
if parallel.is_main_process():
    np.savez(sys.argv[1], rewards=np.stack(rewards), queries=int(np.asarray(state.reward_queries.addressable_data(0))), num_devices=len(jax.devices()), **params)
