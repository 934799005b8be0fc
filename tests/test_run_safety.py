"""A run directory cannot lose work, and every way a run ends is one line with its own exit code.

The runs here use the shapes of tests/test_checkpoint.py's shared runs (herd, tiny model, fast
shapes), so their compiled programs come from the persistent compile cache, and a checkpoint
left by a failed run can be compared bit for bit with the straight run's checkpoint of the same
step: "intact" means identical to what an undisturbed run saved.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import train  # noqa: E402
from herd_jax import checkpoint, rundir  # noqa: E402
from herd_jax.errors import ExitCode  # noqa: E402
from test_checkpoint import TINY, TINY_FILE, _toy_run, assert_trees_identical, raw_state, tiny_runs  # noqa: E402

pytestmark = [
    pytest.mark.xdist_group("tiny_runs"),  # shares the session's runs with test_checkpoint.py
    pytest.mark.usefixtures("reuse_builds"),  # its in-process runs reuse the straight run's build (tests/builds.py)
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> pathlib.Path:
    """The undisturbed 3-epoch run (checkpoints 1, 2, 3)."""
    return tiny_runs(tmp_path_factory).straight[0]


def main(capsys, *argv: str) -> tuple[int, list[str]]:
    """train.main in-process: (exit code, the lines it wrote to stderr other than progress bars)."""
    code = train.main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and not line.lstrip("\r").startswith("epochs")]


def tiny_args(run_dir: pathlib.Path, *extra: str) -> list[str]:
    return ["--config", TINY_FILE, *TINY, "--run_dir", str(run_dir), "--num_epochs", "3", "--log_with", "none", *extra]


# --- one writer, no silent reuse, no mix-ups on resume -------------------------------------


def test_a_second_run_on_a_locked_run_dir_stops_at_once(tmp_path, capsys):
    with rundir.RunLock(tmp_path):
        code, err = main(capsys, *tiny_args(tmp_path))
    assert code == ExitCode.BAD_INPUT
    assert len(err) == 1 and err[0].startswith(f"error: run directory {tmp_path} is in use by pid {os.getpid()}"), err
    assert not (tmp_path / "config.toml").exists() and not (tmp_path / "checkpoints").exists()
    with rundir.RunLock(tmp_path):  # released: the next run gets it
        pass


def test_a_run_dir_with_checkpoints_is_not_reused_without_resume(tmp_path, capsys):
    _toy_run(tmp_path, "checkpoint.save_every=1", "checkpoint.async_save=false", steps=2)
    (tmp_path / "config.toml").write_text("# the first run's\n")
    code, err = main(capsys, *tiny_args(tmp_path))
    assert code == ExitCode.BAD_INPUT
    assert len(err) == 1 and "already holds checkpoints (newest: epoch 2); pass --resume" in err[0] and "--overwrite" in err[0], err
    assert (tmp_path / "config.toml").read_text() == "# the first run's\n"
    assert checkpoint.find(tmp_path).steps == (2, 1)
    # --overwrite is the explicit way to start over: it deletes the checkpoints first.
    assert train.parser().parse_intermixed_args(tiny_args(tmp_path, "--overwrite")).overwrite
    rundir.check_fresh(tmp_path, overwrite=True)
    assert checkpoint.find(tmp_path, must_exist=False).steps == ()


def test_resume_with_another_algorithm_names_the_setting_and_renames_nothing(straight, capsys):
    before = sorted(p.name for p in (straight / "checkpoints").iterdir())
    code, err = main(capsys, "--run_dir", str(straight), "--resume", "--algorithm", "ddpo", "--log_with", "none")
    assert code == ExitCode.BAD_INPUT
    assert len(err) == 1 and "holds a training state of another layout" in err[0] and "algorithm.name 'herd' -> 'ddpo'" in err[0], err
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == before


def test_corrupt_newest_checkpoint_is_one_warning_and_resume_goes_on(straight, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(straight, run)
    for data in (run / "checkpoints" / "3" / "state").rglob("d/*"):
        data.write_bytes(data.read_bytes()[:7])
    code, err = main(capsys, "--run_dir", str(run), "--resume", "--num_epochs", "2", "--log_with", "none")
    assert code == ExitCode.OK, err
    assert len(err) == 2, err  # orbax's own multi-page tracebacks go to train.log, not here
    assert err[0].startswith(f"warning: skipping unreadable checkpoint {run / 'checkpoints' / '3'}") and err[1].startswith("warning: moved unreadable checkpoint")
    assert checkpoint.find(run).steps == (2, 1)
    assert "Traceback" in (run / "train.log").read_text() or "Error" in (run / "train.log").read_text()


def test_override_after_a_flag_is_accepted(tmp_path, capsys):
    assert train.main(["--config", TINY_FILE, "seed=3", "--run_dir", str(tmp_path), "train.learning_rate=0.5", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "seed = 3" in out and "learning_rate = 0.5" in out


# --- storage failures: one line, exit 3 ----------------------------------------------------


def test_unwritable_run_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = main(capsys, *tiny_args(blocker / "run"))
    assert code == ExitCode.STORAGE
    assert err == [f"error: cannot write the run directory {blocker / 'run'}: Not a directory: {blocker / 'run'}"]


def test_undecodable_prompt_file_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red ball\nune balle rouge \xe9\n".encode("latin-1"))
    code, err = main(capsys, *tiny_args(tmp_path / "run", "--prompts", str(prompts)))
    assert code == ExitCode.BAD_INPUT
    assert len(err) == 1 and "is not UTF-8 text" in err[0], err


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_unwritable_out_fails_before_any_work(command, straight, tmp_path, capsys, monkeypatch):
    from herd_jax import evaluate, export

    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("sampled before checking --out"))
    monkeypatch.setattr(export, "write_unet", lambda *a, **k: pytest.fail("converted before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    module = {"evaluate": evaluate, "export": export}[command]
    code = module.main(["--checkpoint", str(straight), "--out", str(blocker / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == ExitCode.STORAGE
    assert err == [f"error: cannot write to {blocker / 'out'}: Not a directory: {blocker / 'out'}"]


def _train_on_a_full_disk(run_dir: pathlib.Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """train.py under a file-size limit: every write past 200 kB fails as on a full disk (EFBIG,
    not ENOSPC); returns the process and its stderr lines other than the progress bar."""
    # A small launcher sets the limit and execs train.py (limits and ignored signals survive exec);
    # SIGXFSZ ignored: the write fails with EFBIG instead of the signal killing the process.
    launcher = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    # JAX writes compile-cache entries in place: under the limit it would leave truncated ones in
    # the suite's shared cache (read back later with a warning each), so this run only reads it.
    env = {**(env or os.environ), "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": str(2**62)}
    result = subprocess.run(
        [sys.executable, "-c", launcher, "train.py", *tiny_args(run_dir, "--num_epochs", "2")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    return result, [line for line in result.stderr.splitlines() if line.strip() and not line.lstrip("\r").startswith("epochs")]


def test_full_disk_is_one_line_and_exit_3(tmp_path):
    """Every checkpoint write fails; so may the run's own log file (it did on the CI machine)."""
    from herd_jax.models.tiny import tiny_model_path

    tiny_model_path()  # built here, before the limit, when this test runs first
    result, err = _train_on_a_full_disk(tmp_path / "run")
    assert result.returncode == ExitCode.STORAGE, result.stderr[-3000:]
    assert len(err) == 1, result.stderr[-3000:]
    assert err[0].startswith(f"error: cannot write checkpoint 1 in {(tmp_path / 'run' / 'checkpoints').resolve()} (File too large)"), err
    assert "no checkpoint was committed" in err[0]


def test_a_full_disk_while_building_the_tiny_model_is_one_line(tmp_path):
    result, err = _train_on_a_full_disk(tmp_path / "run", env={**os.environ, "HERD_JAX_CACHE": str(tmp_path / "cache")})
    assert result.returncode == ExitCode.STORAGE, result.stderr[-3000:]
    assert len(err) == 1, result.stderr[-3000:]
    assert err[0].startswith(f"error: cannot build the tiny model in {tmp_path / 'cache'} ("), err
    assert "File too large" in err[0] and "HERD_JAX_CACHE" in err[0], err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a write that always fails")
def test_a_full_disk_under_the_run_log_stays_silent(capsys):
    """On a full disk the run's log file fails too (the CI machine's orbax logged past the test
    above's size limit); logging's default then prints a traceback per record under our one line."""
    import logging

    from herd_jax import errors

    handler = errors.log_to_file("/dev/full")  # every write: ENOSPC
    try:
        for _ in range(3):
            logging.getLogger("orbax").warning("a record that cannot be written")
    finally:
        errors.stop_logging_to(handler)
    assert capsys.readouterr().err == ""


# --- failures while training: their own exit codes, the last checkpoint intact --------------


@contextlib.contextmanager
def failing_from_epoch(monkeypatch, epoch: int, fail):
    """Calls `fail(metrics)` on the metrics of every epoch from `epoch` on; sets `.active` before
    that epoch runs (for rewards that fail from then on)."""
    from herd_jax import trainer

    real = trainer.run_epoch
    state = type("State", (), {"active": False})()

    def run_epoch(setup, train_state):
        state.active = int(train_state.step) >= epoch
        new_state, metrics, samples = real(setup, train_state)
        if state.active:
            fail(metrics)
        return new_state, metrics, samples

    monkeypatch.setattr(trainer, "run_epoch", run_epoch)
    yield state


def assert_only_checkpoint_1_intact(run_dir: pathlib.Path, straight: pathlib.Path) -> None:
    assert checkpoint.find(run_dir).steps == (1,)
    assert_trees_identical(raw_state(run_dir / "checkpoints" / "1"), raw_state(straight / "checkpoints" / "1"))


def test_non_finite_loss_exits_4_with_the_last_checkpoint_intact(straight, tmp_path, capsys, monkeypatch):
    with failing_from_epoch(monkeypatch, 1, lambda metrics: metrics.update({"train/loss": float("nan")})):
        code, err = main(capsys, *tiny_args(tmp_path))
    assert code == ExitCode.DIVERGED
    last = tmp_path.resolve() / "checkpoints" / "1"
    assert err == [f"error: non-finite loss at epoch 1; stopping (the last checkpoint, {last}, is intact)"]
    assert_only_checkpoint_1_intact(tmp_path, straight)


def test_nan_reward_exits_5_with_the_last_checkpoint_intact(straight, tmp_path, capsys, monkeypatch):
    import herd_jax.rewards as rewards

    make_reward = rewards.make_reward
    with failing_from_epoch(monkeypatch, 1, lambda metrics: None) as failing:
        monkeypatch.setattr(rewards, "make_reward", lambda cfg: _Poisoned(make_reward(cfg), failing))
        code, err = main(capsys, *tiny_args(tmp_path))
    assert code == ExitCode.BAD_REWARD
    assert len(err) == 1 and err[0].startswith("error: reward is nan for prompt "), err
    assert_only_checkpoint_1_intact(tmp_path, straight)


class _Poisoned:
    """A reward that turns NaN once `failing.active` is set."""

    def __init__(self, reward, failing):
        self.reward, self.failing, self.name = reward, failing, reward.name

    def __call__(self, images, prompts):
        scores = np.asarray(self.reward(images, prompts), np.float32)
        return np.full_like(scores, np.nan) if self.failing.active else scores

    def close(self):
        self.reward.close()


# Scores like the colour reward's contract (one float per image); crashes once a marker file exists.
CRASHING_WORKER = """
import os
HERE = os.path.dirname(os.path.abspath(__file__))

def load(args):
    def score(images, prompts):
        if os.path.exists(os.path.join(HERE, "crash")):
            os._exit(3)
        return [float(row.mean()) / 255.0 for row in images.reshape(len(images), -1)]
    return score
"""


def test_reward_model_out_of_restarts_exits_6_with_the_last_checkpoint_intact(tmp_path, capsys, monkeypatch):
    import herd_jax.rewards as rewards
    from herd_jax.rewards.sidecar import Sidecar

    worker = tmp_path / "worker" / "crashing_worker.py"
    worker.parent.mkdir()
    worker.write_text(CRASHING_WORKER)

    def crash(metrics):
        (worker.parent / "crash").touch()  # every worker from the next call on dies

    sidecar = Sidecar(worker, name="toy", timeout_s=30.0, max_restarts=1, log_path=tmp_path / "worker.log")
    monkeypatch.setattr(rewards, "make_reward", lambda cfg: sidecar)
    with failing_from_epoch(monkeypatch, 0, crash):
        code, err = main(capsys, *tiny_args(tmp_path / "run"))
    assert code == ExitCode.REWARD_MODEL
    assert len(err) == 1 and err[0].startswith("error: toy: worker failed 2 times in a row") and "giving up" in err[0], err
    # Epoch 0 was scored and saved before the worker broke; the run stopped in epoch 1.
    assert checkpoint.find(tmp_path / "run").steps == (1,)
    restored = raw_state(tmp_path / "run" / "checkpoints" / "1")
    assert int(restored["step"]) == 1 and all(np.isfinite(np.asarray(x)).all() for x in _float_leaves(restored["params"]))


def _float_leaves(tree):
    import jax

    return [x for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.floating)]
