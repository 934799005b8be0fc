"""Multi-process training: 2 processes × 2 CPU devices (gloo collectives on 127.0.0.1) == 1 process.

One 2-process launch of tests/multihost_script.py (start-up and compiles on every process are
the cost): `train.main` with train.py's distributed flags trains 2 epochs of ddpo with a
checkpoint per epoch; `train.main --resume` restores checkpoint 1 collectively and trains to 2
again. The same script runs in this process (1 process, 1 device) as the reference, while the 2
processes run, and there also trains the variant without the cross-process reduction: the same 2
epochs with every update counting only the first half of the batch's rows (the others weighted 0,
as padding rows are: each loss and gradient is the mean over those rows), which is what process
0 of 2 steps on when no gradient crosses processes (emulated in one process, with the reference's
own compiled update: a separate half-batch build cost the suite ~18 CPU-s, a third build on each
of the 2 processes about a CPU-minute). The params check must fail on it.
Settings (multihost_script.OVERRIDES): lr 1e-2, adam_eps 1e-4, 2 DDIM steps, 4 samples per epoch.
"""
import contextlib
import io
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "tests" / "multihost_script.py")
RESUME_MARKER = "=== multihost_script: resume ==="  # multihost_script.RESUME_MARKER

# Params tolerance. Measured (2 processes vs 1 process, after 2 AdamW steps): max |Δparam| 1.5e-5,
# median 9e-8 (the gradients are all-reduced in another order; epoch 1 samples with params that
# already differ by that much); optimizer state 1.6e-7, reward windows 3.9e-6. Params moved from
# the pretrained ones by median 1.1e-2, max 2.0e-2 (~lr per step): 55x the tolerance. Without the
# cross-process reduction (a real 2-process variant, measured before it was emulated in one
# process): max |Δparam| 3.6e-2, median 3.2e-3, 80% of the params off by > 1e-3.
# Other numerics move the few worst params most: the same test compiled at LLVM -O0 (2026-12-07,
# standing in for another CPU's code generation) gave median 1.2e-6, 99.9th percentile 4.5e-5,
# max 2.8e-4 (1 of 793k params above 2e-4, 33 above 1e-4: an AdamW step on a near-zero gradient
# amplifies rounding). So the check bounds the 99.9th percentile by TOL and every param by
# MAX_TOL; the emulated run without the reduction: 99.9th percentile 3.6e-2, 180x TOL (2026-12-07,
# zero-weighted rows: 3.59e-2, largest 3.9e-2).
TOL = 2e-4
MAX_TOL = 2e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], count: int) -> list[subprocess.Popen]:
    """`count` processes of `cmd` + train.py's distributed flags, 2 CPU devices each."""
    # No persistent compile cache: on CPU its keys differ between processes (they hash each
    # process's topology fingerprint) and only process 0 writes it, so with a warm cache process 0
    # loads every program while process 1 compiles it, and a process that reaches a new gloo
    # collective > 30 s before the other fails ("Gloo context initialization failed:
    # GetKeyValue() timed out"). Both compiling keeps them in step.
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1", JAX_ENABLE_COMPILATION_CACHE="false")
    port = free_port()
    return [
        subprocess.Popen(
            [*cmd, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(count), "--process_id", str(i)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(count)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 1500) -> list[str]:
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [f"process {i} exited with {p.returncode}:\n{out[-2500:]}" for i, (p, out) in enumerate(zip(procs, outputs)) if p.returncode]
    assert not failed, "\n".join(failed)
    return outputs


def numpy_state(step_dir: pathlib.Path) -> dict:
    """A checkpoint's TrainState as nested dicts of NumPy arrays, whatever devices wrote it."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(step_dir / "state").tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return handler.restore(step_dir / "state", args=ocp.args.PyTreeRestore(restore_args=args))


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_params(params: dict, reference: dict, initial: dict) -> None:
    """The check a multi-process run must pass: params moved >= 10x TOL (median) and agree: 99.9% of
    them within TOL, every one within MAX_TOL."""
    assert sorted(params) == sorted(reference) == sorted(initial)
    keys = sorted(params)
    moved = np.concatenate([np.abs(reference[k] - initial[k]).ravel() for k in keys])
    assert np.median(moved) >= 10 * TOL, f"training moved the params by only {np.median(moved):.2g} (median)"
    gaps = {k: np.abs(params[k] - reference[k]) for k in keys}
    bulk = float(np.quantile(np.concatenate([g.ravel() for g in gaps.values()]), 0.999))
    worst = max(keys, key=lambda k: gaps[k].max())
    largest = float(gaps[worst].max())
    assert bulk <= TOL, f"params differ by up to {bulk:.3g} > {TOL} (99.9th percentile; largest {largest:.3g} at {worst})"
    assert largest <= MAX_TOL, f"params differ by up to {largest:.3g} > {MAX_TOL} (at {worst})"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd):
    import multihost_script

    root = tmp_path_factory.mktemp("multihost")
    two = launch([sys.executable, SCRIPT, str(root / "two"), str(root / "two.npz")], 2)
    one_output = io.StringIO()
    try:  # the 1-process reference trains here while the 2 processes run
        with contextlib.redirect_stdout(one_output):
            multihost_script.main(str(root / "one"), str(root / "one_half_rows.npz"), [])
    finally:
        outputs = finish(two)
    return {
        "root": root,
        "outputs": {"two": outputs[0], "one": one_output.getvalue()},
        "two": numpy_state(root / "two" / "checkpoints" / "2"),
        "one": numpy_state(root / "one" / "checkpoints" / "2"),
        "two_counts": dict(np.load(root / "two.npz")),
        "one_half_rows": dict(np.load(root / "one_half_rows.npz")),
        "initial": flat(tiny_sd.params["unet"]),
    }


def test_two_process_run_trains_and_saves(runs):
    out = runs["two_counts"]
    assert int(out["num_processes"]) == 2 and int(out["num_devices"]) == 4
    straight = runs["outputs"]["two"].split(RESUME_MARKER)[0]
    assert "epoch    0 |" in straight and "epoch    1 |" in straight  # process 0 reports the epochs
    assert sorted(p.name for p in (runs["root"] / "two" / "checkpoints").iterdir()) == ["1", "2"]


def test_two_processes_match_one(runs):
    two, one = runs["two"], runs["one"]
    check_params(flat(two["params"]), flat(one["params"]), runs["initial"])
    a, b = flat(two), flat(one)
    assert sorted(a) == sorted(b)
    for k in a:
        if k.startswith("['params']"):
            continue  # checked above
        if np.issubdtype(a[k].dtype, np.floating):  # optimizer state, reward windows
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=TOL, err_msg=k)
        else:  # step, RNG key, reward counts and queries
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert int(two["step"]) == 2 and int(two["reward_queries"]) == 8


def test_without_cross_process_reduction_fails_the_check(runs):
    one = flat(runs["one"]["params"])
    half = {k: v for k, v in runs["one_half_rows"].items() if k not in ("num_processes", "num_devices")}
    assert sorted(half) == sorted(one) and int(runs["one_half_rows"]["num_processes"]) == 1
    # It trained as much as the real run (so the check fails on the gradient, not on idle params) ...
    moved = np.concatenate([np.abs(half[k] - runs["initial"][k]).ravel() for k in sorted(half)])
    assert np.median(moved) >= 10 * TOL
    # ... on half of each batch: the check must fail.
    with pytest.raises(AssertionError, match="params differ by up to") as failed:
        check_params(half, one, runs["initial"])
    print(f"without the reduction: {failed.value}".splitlines()[0])


@pytest.mark.parametrize("run", ["two", "one"])
def test_resume_is_bit_exact(runs, run):
    """`train.main --resume .../checkpoints/1` in a new run dir: every process restores checkpoint 1,
    trains epoch 1 and saves checkpoint 2 together, bit-identical to the straight run's."""
    run_dir = runs["root"] / run
    resumed_out = runs["outputs"][run].split(RESUME_MARKER)[1]
    assert f"resuming from {run_dir / 'checkpoints' / '1'} at epoch 1" in resumed_out
    assert "epoch    1 |" in resumed_out and "epoch    0 |" not in resumed_out  # restored, not retrained from scratch
    resumed_dir = run_dir.parent / f"{run}_resumed" / "checkpoints"
    assert sorted(p.name for p in resumed_dir.iterdir()) == ["2"]
    resumed, straight = flat(numpy_state(resumed_dir / "2")), flat(runs[run])
    assert sorted(resumed) == sorted(straight)
    for k in straight:
        assert resumed[k].dtype == straight[k].dtype and resumed[k].tobytes() == straight[k].tobytes(), k
