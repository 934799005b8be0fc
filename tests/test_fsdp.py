"""FSDP (`parallel.fsdp`): on 4 forced host devices the sharded scanned update gives the
replicated one's params after an epoch of full fine-tuning; it needs fewer temporaries per device
than replicating (weights gathered per layer); LoRA's frozen base is sharded; and the sharding rule itself (tests/fsdp_script.py says why LoRA is only placed, not trained)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from herd_jax import parallel

HERE = pathlib.Path(__file__).resolve().parent
# Stated tolerance: the same arithmetic with gradients reduced across devices in another order
# (reduce-scatter vs all-reduce) and the scanned update partitioned another way; measured max
# |Δparam| 1.75e-6 after one epoch at 1 sample per device (2026-12-02; the host loop's: ~1e-8),
# 4.5e-6 at the planned cell's 2 samples per device, remat blocks, 32 gradient calls (2026-12-07;
# 6.7e-7 with YNNPACK fusions off, XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=),
# while the params move up to 3e-4 (lr 3e-4, one AdamW step): 10x the tolerance must still fit
# under that, and a missing gradient reduction moves params by ~lr.
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def epochs(executing_xla_flags):
    # XLA:CPU's memory-optimised scheduler, as herd_jax.memory_plan compiles (its CPU_FAST_COMPILE
    # says why: the default one keeps every rematerialised block live at once); LLVM at -O1, not the
    # suite's -O0 (tests/conftest.py): these remat epochs execute more than they compile.
    flags = executing_xla_flags + " --xla_force_host_platform_device_count=4 --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    env = dict(os.environ, XLA_FLAGS=flags)
    result = subprocess.run([sys.executable, str(HERE / "fsdp_script.py")], env=env, capture_output=True, text=True, timeout=900, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fsdp_update_equals_replicated(epochs):
    assert epochs["devices"] == 4
    r = epochs["full"]
    print(f"full: loss {r['loss']}, params moved {r['moved']:.3g}, max |fsdp - replicated| {r['diff']:.3g}, where {r['fsdp_where']}")
    assert r["same_start"]
    assert r["diff"] <= TOLERANCE
    assert r["moved"] >= 10 * TOLERANCE
    # Really sharded under FSDP (params and both AdamW moments, still after the update); really
    # replicated without it.
    assert r["fsdp_where"]["params"] > 0.9 and r["fsdp_where"]["opt_state"] > 0.9 and r["fsdp_where"]["params_after"] > 0.9
    assert r["replicated_where"]["unet"] == 0.0 and r["replicated_where"]["params"] == 0.0 and r["replicated_where"]["params_after"] == 0.0


def test_fsdp_shards_lora_frozen_base(epochs):
    r = epochs["lora"]
    assert r["fsdp_where"]["unet"] > 0.9 and r["replicated_where"]["unet"] == 0.0
    assert r["fsdp_where"]["params"] == 0.0  # rank-2 adapters: too small to split (the rule's minimum size)


def test_fsdp_update_gathers_per_layer(epochs):
    """FSDP must cost less memory per device than replicating, not more: the update keeps the
    gradient sharded and gathers each weight where a layer uses it. Two ways it can fail, both
    measured on this tiny update (4 devices, 2 samples each, remat blocks; 2026-12-02, jax 0.10.2;
    the same numbers from the runs' own compiled updates on 2026-12-07):
    XLA hoists every weight's all-gather out of the timestep loop (the whole gathered UNet then
    stays resident; temp 13.58 MiB), or the partitioner replicates activations instead of
    gathering weights (no activation pinning in the UNet; 15.36 MiB). Replicated: 11.87 MiB,
    FSDP as built: 9.73 MiB, of which the full-size gradient replication would add ~2.2 MiB."""
    plan = epochs["plan"]
    print(f"temp per device: replicated {plan['replicated']['temp'] / 2**20:.2f} MiB, fsdp {plan['fsdp']['temp'] / 2**20:.2f} MiB")
    assert plan["fsdp"]["argument"] < plan["replicated"]["argument"] / 2  # params and AdamW state split
    assert plan["fsdp"]["temp"] < plan["replicated"]["temp"]


def test_fsdp_sharding_rule():
    """Each array split along its largest axis the device count divides; small or indivisible ones replicated."""
    one = jax.sharding.AbstractMesh((1,), (parallel.DATA_AXIS,))
    four = jax.sharding.AbstractMesh((4,), (parallel.DATA_AXIS,))
    spec = lambda shape, mesh=four: parallel.fsdp_sharding(shape, mesh).spec
    assert spec((3, 3, 320, 640), one) == P()  # one device: nothing to split
    assert spec((3, 3, 320, 640)) == P(None, None, None, parallel.DATA_AXIS)
    assert spec((1280, 30)) == P(parallel.DATA_AXIS)
    assert spec((3, 3, 321, 7)) == P()  # no axis divides
    assert spec((640,)) == P()  # a bias: too small to be worth a gather
    assert jax.tree.leaves(parallel.param_shardings({"k": np.zeros((64, 64))}, four, fsdp=False))[0].spec == P()


def test_unet_pins_activations_where_the_batch_split_divides():
    """Under FSDP the training UNet pins block activations to the batch split (so weights are
    gathered per layer); a batch the split does not divide (a few relabeled rows) is left alone
    rather than failing to partition."""
    from herd_jax import memory_plan as mp
    from herd_jax.models import UNet2DConditionModel, tiny_model_path

    config = mp.configs_from_dir(tiny_model_path()).unet
    split = jax.sharding.NamedSharding(jax.sharding.AbstractMesh((4,), (parallel.DATA_AXIS,)), P(parallel.DATA_AXIS))
    plain = UNet2DConditionModel(config)
    params = jax.eval_shape(plain.init_params, jax.random.PRNGKey(0))

    def constraints(unet, batch: int) -> int:
        sample = jax.ShapeDtypeStruct((batch, config.in_channels, 8, 8), np.float32)
        context = jax.ShapeDtypeStruct((batch, 4, config.cross_attention_dim), np.float32)
        jaxpr = jax.make_jaxpr(lambda p, x, c: unet.apply({"params": p}, x, np.zeros(batch, np.int32), c))(params, sample, context)
        return str(jaxpr).count("sharding_constraint")

    pinned = plain.clone(activation_sharding=split)
    assert constraints(pinned, 8) >= 10  # every block's input and output
    assert constraints(pinned, 6) == 0 and constraints(plain, 8) == 0
