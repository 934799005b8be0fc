"""Checkpoints: bit-exact resume, SIGKILL during an epoch and during a save, corrupt fallbacks, configs.

Runs are tiny (herd on the colour task, 4 DDIM steps, 4 samples, 1 batch per epoch) and shared by
this file, test_logging_integration.py and test_evaluate_export.py through `TinyRuns` (one per
test session, each run made on first use):
  straight: epochs 0..3 in one process (in-process, tensorboard, a checkpoint every epoch)
  killed:   three `train.py` subprocesses (started together, to share start-up time), SIGKILLed
            while training epoch 2 ("epoch") and while committing checkpoint 2 ("save"), and sent
            SIGTERM during epoch 1 with no periodic checkpoints ("sigterm")
  resumed:  `train.py --resume` of the "save" run: epochs 1..3 in-process (wandb offline)
Exactness: "resumed" must end bit-identical to "straight", and every checkpoint the killed
processes committed must equal the straight run's checkpoint of the same step.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [
    pytest.mark.xdist_group("tiny_runs"),  # the session's shared tiny runs live on one worker
    pytest.mark.usefixtures("reuse_builds"),  # in-process runs of one config share a build (tests/builds.py)
]

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from herd_jax import checkpoint  # noqa: E402
from herd_jax import config as config_lib  # noqa: E402

NUM_EPOCHS = 3
TINY_FILE = str(REPO / "configs" / "tiny.toml")
TINY = [
    "sample.num_steps=4",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "train.batch_size=4",
    "checkpoint.save_every=1",
    "checkpoint.keep=5",
    "logging.image_every=1",
]
KILL_POINTS = {  # name: (extra environment, output line that triggers the signal, the signal, extra overrides)
    "epoch": ({}, r"^epoch +1 \|", signal.SIGKILL, ()),  # checkpoint 1 is committed once epoch 1 is reported (saves are serialised)
    "save": ({"HERD_JAX_TEST_HANG_IN_SAVE": "2"}, r"hanging before committing checkpoint 2", signal.SIGKILL, ()),
    "sigterm": ({}, r"^epoch +0 \|", signal.SIGTERM, ("checkpoint.save_every=100",)),  # only the stop saves
}


def tiny_config(run_dir: pathlib.Path, num_epochs: int, log_with: str) -> config_lib.Config:
    return config_lib.load_config([TINY_FILE], TINY + [f"run_dir={str(run_dir)!r}", f"num_epochs={num_epochs}", f"logging.log_with={log_with!r}"])


@contextlib.contextmanager
def wandb_home(root: pathlib.Path):
    """wandb's config/cache dirs inside the test's tmp dir (as tests/test_metrics.py does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / var.lower()))
        yield


def _train_process(run_dir: pathlib.Path, env: dict[str, str], overrides=()) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "--config", TINY_FILE, "--run_dir", str(run_dir), "--log_with", "none", "--num_epochs", "50", *TINY, "checkpoint.keep=4", *overrides]
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _kill_when(process: subprocess.Popen, pattern: str, sig: int, done: "queue.Queue") -> None:
    """Reads the process's output; sends `sig` as soon as a line matches (runs in a thread)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line):
            process.send_signal(sig)
            break
    lines += process.stdout.readlines()  # what it says while it stops
    process.wait()
    done.put((process.returncode, "".join(lines)))


class TinyRuns:
    """The session's shared runs (see the module docstring); each is made on first use."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self._kills: dict = {}
        self.traces: list[int] = []  # new traces per epoch of the straight run

    def start_kills(self) -> None:
        """Starts the subprocesses now, so they run while the in-process runs train."""
        for name, (env, pattern, sig, overrides) in KILL_POINTS.items():
            if name not in self._kills:
                process = _train_process(self.root / name, env, overrides)
                done: queue.Queue = queue.Queue()
                threading.Thread(target=_kill_when, args=(process, pattern, sig, done), daemon=True).start()
                self._kills[name] = (process, done)

    @functools.cached_property
    def straight(self) -> tuple[pathlib.Path, list[dict[str, float]]]:
        from herd_jax.trainer import train_and_evaluate

        from herd_jax import trainer
        from tracing import count_traces

        run_dir = self.root / "straight"
        run_epoch = trainer.run_epoch

        def counting(setup, state):  # new traces per epoch: the second epoch must reuse every compiled step
            with count_traces() as found:
                out = run_epoch(setup, state)
            self.traces.append(len(found))
            return out

        trainer.run_epoch = counting
        try:
            return run_dir, train_and_evaluate(tiny_config(run_dir, NUM_EPOCHS, "tensorboard"), progress=False)
        finally:
            trainer.run_epoch = run_epoch

    @functools.cached_property
    def killed(self) -> dict[str, tuple[pathlib.Path, int, str]]:
        """{name: (run_dir, returncode, output)} once both processes were killed (or failed)."""
        self.start_kills()
        results = {}
        for name, (process, done) in self._kills.items():
            try:
                results[name] = (self.root / name, *done.get(timeout=300))
            except queue.Empty:
                process.kill()
                raise AssertionError(f"train.py ({name}) did not reach its kill point in time") from None
        return results

    @functools.cached_property
    def resumed(self) -> tuple[pathlib.Path, int, str]:
        """(run_dir, exit code, stdout) of `train.py --resume` on the run killed during its save."""
        run_dir = self.killed["save"][0]
        self.pre_resume_dirs = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        out = io.StringIO()
        with wandb_home(self.root / "wandb_home"), contextlib.redirect_stdout(out):
            code = train.main(["--run_dir", str(run_dir), "--resume", "--num_epochs", str(NUM_EPOCHS), "--log_with", "wandb"])
        return run_dir, code, out.getvalue()


_RUNS: list[TinyRuns] = []


def tiny_runs(tmp_path_factory) -> TinyRuns:
    if not _RUNS:
        _RUNS.append(TinyRuns(tmp_path_factory.mktemp("tiny_runs")))
    return _RUNS[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> TinyRuns:
    runs = tiny_runs(tmp_path_factory)
    # The straight run first: it fills the persistent compile cache, so the killed runs' processes
    # (same programs) load their executables instead of compiling them three times at once.
    runs.straight  # noqa: B018
    runs.start_kills()
    return runs


def raw_state(step_dir: pathlib.Path):
    """A checkpoint's whole TrainState as nested dicts of arrays (no target structure needed)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(pathlib.Path(step_dir) / "state")


def assert_trees_identical(a, b) -> None:
    import jax

    paths_a = jax.tree_util.tree_leaves_with_path(a)
    paths_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
    assert paths_a, "empty state"
    for (path, x), (_, y) in zip(paths_a, paths_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


# --- exact resume and SIGKILL ------------------------------------------------------------


def test_straight_run_saves_every_epoch_with_config_and_prompts(runs):
    from herd_jax.prompts import load_prompts

    straight, history = runs.straight
    assert len(history) == NUM_EPOCHS
    # herd: epochs after the first trace nothing new (test_resume.py checks ddpg, dpok and grpo).
    assert runs.traces[0] > 5 and runs.traces[1:] == [0] * (NUM_EPOCHS - 1), runs.traces
    assert checkpoint.find(straight).steps == (3, 2, 1)
    cfg = config_lib.load_config([straight / "config.toml"])
    assert cfg == tiny_config(straight, NUM_EPOCHS, "tensorboard")
    assert (straight / "prompts.txt").read_text().splitlines() == load_prompts(cfg.prompts)
    found = checkpoint.find(straight / "checkpoints" / "2")
    assert found.steps == (2,) and found.explicit_step
    assert config_lib.load_config([checkpoint.saved_config(found)]) == cfg
    assert checkpoint.saved_prompts(found.step_dir(2)) == load_prompts(cfg.prompts)
    state = raw_state(straight / "checkpoints" / "3")
    assert {"step", "params", "opt_state", "rng", "stats", "algorithm"} <= set(state)  # the whole TrainState
    assert {"items", "valid", "next_index"} <= set(state["algorithm"]["buffer"])  # herd's state: its replay buffer
    assert {"rewards", "count"} <= set(state["algorithm"]["relabeled"])  # ... and the relabeled rewards' windows
    assert int(state["step"]) == NUM_EPOCHS


def test_sigkill_during_epoch_leaves_committed_checkpoints(runs):
    run_dir, returncode, output = runs.killed["epoch"]
    assert returncode == -signal.SIGKILL, output
    found = checkpoint.find(run_dir)
    assert found.steps and found.steps[0] in (1, 2, 3), output  # killed in epoch 2 (or while saving 2)
    state, step = checkpoint.restore(found, raw_state(found.step_dir(found.steps[-1])))
    assert step == found.steps[0]
    # Written by another process, asynchronously while training went on (params donated to the
    # next update): every committed checkpoint equals the straight run's at the same step.
    straight, _ = runs.straight
    for step in found.steps:
        assert_trees_identical(raw_state(found.step_dir(step)), raw_state(straight / "checkpoints" / str(step)))


def test_sigterm_saves_at_the_end_of_the_epoch_and_exits_143(runs):
    run_dir, returncode, output = runs.killed["sigterm"]
    assert returncode == 143, output
    stopped = re.search(r"stopped by SIGTERM after epoch (\d+): the last checkpoint, (\S+), is intact; continue with: .*--resume", output)
    assert stopped, output
    step = int(stopped.group(1)) + 1
    assert stopped.group(2) == str((run_dir / "checkpoints" / str(step)).resolve())
    assert checkpoint.find(run_dir).steps == (step,)  # save_every=100: only the stop saved
    assert "Traceback" not in output and "error:" not in output
    straight, _ = runs.straight
    assert_trees_identical(raw_state(run_dir / "checkpoints" / str(step)), raw_state(straight / "checkpoints" / str(step)))


def test_sigkill_during_save_then_resume_is_bit_exact(runs):
    run_dir, returncode, output = runs.killed["save"]
    assert returncode == -signal.SIGKILL, output
    resumed, code, out = runs.resumed
    assert code == 0, out
    assert "2.orbax-checkpoint-tmp" in runs.pre_resume_dirs, "the kill did not land inside the save"
    assert [d for d in runs.pre_resume_dirs if "tmp" not in d] == ["1"]
    assert f"resuming from {run_dir / 'checkpoints' / '1'} at epoch 1" in out
    resumed_config = (run_dir / "config.toml").read_text()  # what this restart ran with
    assert "keep = 4" in resumed_config  # the checkpoint's config is the base; --num_epochs/--log_with went on top
    assert not list((run_dir / "checkpoints").glob("*tmp*")), "the unfinished save was not cleaned up"
    assert checkpoint.find(run_dir).steps == (3, 2, 1)
    # Epochs 0..1 in a killed process + 1..3 after resume == 0..3 straight: params, optimizer
    # state, RNG key, step, per-prompt reward windows, replay buffer, reward-query count.
    straight, _ = runs.straight
    final = raw_state(straight / "checkpoints" / "3")
    assert_trees_identical(raw_state(run_dir / "checkpoints" / "3"), final)
    first = raw_state(straight / "checkpoints" / "1")  # training moved the params: not a trivial comparison
    assert any(np.asarray(a).tobytes() != np.asarray(b).tobytes() for a, b in zip(_leaves(first["params"]), _leaves(final["params"])))


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# --- the manager on a toy state, corrupt checkpoints, bad input ---------------------------


@flax.struct.dataclass
class Toy:
    """Any pytree with a `step` saves and restores (None fields included)."""

    step: jax.Array
    params: dict
    buffer: object = None


def _toy(step: int) -> Toy:
    return Toy(jnp.int32(step), {"w": jnp.full((3,), step, jnp.float32), "b": {"c": jnp.arange(8.0) * step}})


def _toy_run(run_dir: pathlib.Path, *overrides: str, steps: int = 5) -> list[bool]:
    cfg = config_lib.load_config([], [f"run_dir={str(run_dir)!r}", f"num_epochs={steps}", *overrides])
    manager = checkpoint.make_manager(cfg)
    saved = [checkpoint.save(manager, _toy(s), cfg, ["a", "b"]) for s in range(1, steps + 1)]
    checkpoint.close(manager)
    return saved


@pytest.mark.parametrize("async_save", [True, False])
def test_manager_policy_keep_and_any_pytree(tmp_path, async_save):
    saved = _toy_run(tmp_path, "checkpoint.save_every=2", "checkpoint.keep=2", f"checkpoint.async_save={str(async_save).lower()}")
    assert saved == [False, True, False, True, True]  # every 2nd epoch and the last
    found = checkpoint.find(tmp_path)
    assert found.steps == (5, 4)  # keep=2
    state, step = checkpoint.restore(found, _toy(0))
    assert step == 5 and isinstance(state, Toy) and state.buffer is None
    assert_trees_identical(state, _toy(5))
    assert checkpoint.saved_prompts(found.step_dir(4)) == ["a", "b"]
    np.testing.assert_array_equal(checkpoint.load_params(found.step_dir(4))["w"], [4.0, 4.0, 4.0])
    assert checkpoint.make_manager(config_lib.load_config([], ["checkpoint.save_every=0"])) is None


@pytest.fixture
def toy_run(tmp_path) -> pathlib.Path:
    _toy_run(tmp_path, "checkpoint.save_every=1", "checkpoint.keep=3", "checkpoint.async_save=false", steps=3)
    assert checkpoint.find(tmp_path).steps == (3, 2, 1)
    return tmp_path


def _truncate_arrays(step_dir: pathlib.Path) -> None:
    data_files = list((step_dir / "state").rglob("d/*"))
    assert data_files
    for data in data_files:
        data.write_bytes(data.read_bytes()[:7])


def test_corrupt_newest_checkpoint_is_skipped(toy_run, capsys):
    _truncate_arrays(toy_run / "checkpoints" / "3")
    found = checkpoint.find(toy_run)
    state, step = checkpoint.restore(found, _toy(0))
    assert step == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipping unreadable checkpoint" in err and "/3" in err
    assert_trees_identical(state, _toy(2))
    # Continuing in that run dir renames the unreadable step aside, so step 3 can be saved again.
    checkpoint.prepare_resume(found, step, toy_run)
    assert checkpoint.find(toy_run).steps == (2, 1)
    assert len(list((toy_run / "checkpoints").glob("3.corrupt-*"))) == 1


def test_all_checkpoints_unreadable_is_one_line_error(toy_run):
    for step in (1, 2, 3):
        _truncate_arrays(toy_run / "checkpoints" / str(step))
    with pytest.raises(checkpoint.UnreadableCheckpointError, match="no checkpoint in .* reads back") as info:
        checkpoint.restore(checkpoint.find(toy_run), _toy(0))
    assert "\n" not in str(info.value)


def test_branching_from_an_older_step_needs_a_new_run_dir(toy_run):
    older = checkpoint.find(toy_run / "checkpoints" / "1")
    with pytest.raises(checkpoint.CheckpointError, match="pass a new --run_dir"):
        checkpoint.prepare_resume(older, 1, toy_run)
    checkpoint.prepare_resume(older, 1, toy_run / "branch")  # a new run dir is fine


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--resume", "/nonexistent/run"], r"no checkpoint at /nonexistent/run"),
        (["--resume"], r"--resume without a PATH"),
        (["--resume", "{tmp}"], r"no checkpoint in"),
        (["--resume", "{tmp}/checkpoints/4.orbax-checkpoint-tmp"], r"unfinished save"),
    ],
)
def test_bad_resume_is_one_line(argv, pattern, tmp_path, capsys):
    (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp").mkdir(parents=True)
    code = train.main(["--config", TINY_FILE, *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and re.search(pattern, err), err


def test_resume_without_checkpoints_starts_from_scratch(tmp_path, capsys):
    assert train.main(["--config", TINY_FILE, "--run_dir", str(tmp_path / "new"), "--resume", "--print_config", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "starting from scratch" in out and "seed = 3" in out


def test_resume_key_value_is_an_override_not_a_path(tmp_path, capsys):
    assert train.main(["--config", TINY_FILE, "--run_dir", str(tmp_path), "--print_config", "--resume", "seed=5"]) == 0
    assert "seed = 5" in capsys.readouterr().out


# --- configs -----------------------------------------------------------------------------


def test_base_toml_lists_every_key_with_its_default():
    import tomllib

    base = tomllib.loads((REPO / "configs" / "base.toml").read_text())

    def flat(tree, prefix=""):
        return {k: v for key, value in tree.items() for k, v in (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) else [(f"{prefix}{key}", value)])}

    hint = "regenerate it: python -m herd_jax.config > configs/base.toml"
    assert flat(base) == flat(config_lib.to_dict(config_lib.Config())), hint
    assert config_lib.load_config([REPO / "configs" / "base.toml"]) == config_lib.Config(), hint


@pytest.mark.parametrize("name", ["aesthetic", "imagereward", "color"])
def test_reward_configs_load(name):
    cfg = config_lib.load_config([REPO / "configs" / "rewards" / f"{name}.toml"])
    assert cfg.reward.name == name


def test_run_dir_holds_reward_curve_and_first_and_last_sample_grids(runs):
    """Pictures without tensorboard: reward.png and the eval grids before the first and after the
    last epoch (same prompts and seeds), PNGs PIL reads, of the sizes their layout gives."""
    from PIL import Image

    from herd_jax import report

    straight, _ = runs.straight
    cfg = config_lib.load_config([straight / "config.toml"])
    with Image.open(straight / "reward.png") as curve:
        assert curve.format == "PNG" and curve.size[0] >= 2 * 700 and curve.size[1] >= 420
    prompts, seeds = min(cfg.eval.num_prompts, len(runs_prompts(cfg))), cfg.eval.seeds
    grids = sorted(p.name for p in (straight / report.SAMPLES).glob("*.png"))
    assert grids == ["epoch_0000.png", f"epoch_{NUM_EPOCHS:04d}.png"], grids
    for name in grids:
        with Image.open(straight / report.SAMPLES / name) as grid:
            grid.load()
            # 64-px cells (the 32-px images twice), a 150-px label column, 4-px gaps, a caption per row.
            assert grid.size == (150 + seeds * (64 + 4) + 4, 24 + prompts * (64 + 14 + 4) + 4), (name, grid.size)


def runs_prompts(cfg):
    from herd_jax.prompts import load_prompts

    return load_prompts(cfg.prompts)


def test_header_is_short_and_names_the_run_dir(tmp_path):
    import jax

    from herd_jax import report

    for log_with in ("tensorboard", "wandb", "none"):
        cfg = tiny_config(tmp_path / "run", NUM_EPOCHS, log_with)
        text = report.header(cfg, num_params=1_234_567, devices=jax.devices(), run_dir=tmp_path / "run")
        lines = text.splitlines()
        assert 4 <= len(lines) <= 15, text
        assert str(tmp_path / "run") in text and cfg.algorithm.name in text and cfg.reward.name in text
