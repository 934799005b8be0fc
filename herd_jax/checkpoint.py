"""Checkpoints: one orbax save of the whole TrainState pytree, with the config and prompts beside it.

Whatever fields TrainState has (params, optimizer state, RNG key, step, per-prompt stats, replay
buffer, value network) are saved and restored together, so a resumed run continues exactly
where the saved one stopped: epoch keys are `fold_in(state.rng, state.step)`.

Layout of a run directory:
  run_dir/config.toml, run_dir/prompts.txt     the resolved config and prompt list (for people)
  run_dir/checkpoints/<step>/state             the TrainState (orbax, OCDBT); <step> = epochs done
  run_dir/checkpoints/<step>/config            the resolved config as JSON (read back on resume)
  run_dir/checkpoints/<step>/prompts           the prompt list as JSON
A save is written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` once complete, so a
process killed mid-save leaves only a tmp directory, which orbax ignores (and removes when the
next manager opens the directory). Saves are asynchronous by default: the arrays are copied to
host memory, then written by a background thread while the next epoch runs; the trainer waits
for the last write before it exits.

Resume order (`train.py --resume [PATH]`, `train_and_evaluate(cfg, resume=...)`):
  1. `--resume PATH`, PATH a step directory (`.../checkpoints/<step>`): that checkpoint.
  2. `--resume PATH`, PATH a run directory or its `checkpoints/`: its newest checkpoint.
  3. `--resume` alone: the newest checkpoint of `--run_dir`; with none there (yet), the run
     starts from scratch, so a job script can always pass `--resume`.
  Candidates are tried newest first. One that does not restore (truncated, corrupt, missing
  files) is skipped with a one-line warning and the previous one is tried; when none restores,
  the run stops with a one-line CheckpointError (it never crashes, and it never silently
  restarts a run that has checkpoints).
  The config is the one saved in the checkpoint, under any --config files, flags and overrides
  (so `--resume` alone continues the same run and `num_epochs=N` extends it); the run dir
  defaults to the one holding the checkpoint. Training continues at `state.step` (epochs done)
  up to `num_epochs`. Continuing in the same run dir from an older step while newer readable
  checkpoints exist is refused (pass a new --run_dir to branch); newer unreadable ones are
  renamed to `<step>.corrupt-<time>` so that the step can be saved again.

Test-only hook: with HERD_JAX_TEST_HANG_IN_SAVE=<step> in the environment, the save of that
step hangs in the background thread after writing, just before the rename that commits it, so
tests can SIGKILL a process in the middle of a save deterministically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import sys
import time
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from herd_jax import config as config_lib
from herd_jax.errors import StorageError, first_line, root_reason

State = TypeVar("State")

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^\d+$")
_TEST_HANG_ENV = "HERD_JAX_TEST_HANG_IN_SAVE"


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for; the message is one line for the user."""


# Before 2026-12 the TrainState held per-algorithm fields (buffer, value); since, one `algorithm` pytree.
OLD_LAYOUT = "(before 2026-12); this version cannot resume it: start a new --run_dir (its params can still be evaluated and exported)"


class UnreadableCheckpointError(StorageError):
    """No candidate checkpoint reads back (truncated, corrupt, unreadable files); one line."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- saving ------------------------------------------------------------------------------


def make_manager(cfg: config_lib.Config) -> ocp.CheckpointManager | None:
    """The orbax manager of `cfg.run_dir/checkpoints`, or None when checkpoints are off (save_every = 0).

    It saves at every `save_every`-th step and at step `num_epochs` (the end), keeps the newest
    `keep`, and removes tmp directories that a killed save left behind.
    """
    c = cfg.checkpoint
    if c.save_every <= 0:
        return None
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(c.save_every), policies.SpecificStepsPolicy([cfg.num_epochs])]
        ),
        preservation_policy=policies.LatestN(c.keep),
        enable_async_checkpointing=c.async_save,
        cleanup_tmp_directories=True,
        temporary_path_class=_test_hang_path_class(),
    )
    return ocp.CheckpointManager(pathlib.Path(cfg.run_dir).resolve() / CHECKPOINTS, options=options)


def save(manager: ocp.CheckpointManager | None, state: Any, cfg: config_lib.Config, prompts: list[str], *, force: bool = False) -> bool:
    """Saves `state` at step `int(state.step)` when the manager's policy says so (or `force`);
    True if it did.

    Returns once the arrays are on the host (async) or on disk (sync); `state` may then be
    donated to the next update. A previous async save that failed to write raises here.

    Raises:
      StorageError: this or the previous save could not be written (one line; the checkpoints
        committed before it are intact).
    """
    if manager is None:
        return False
    step = int(jax.device_get(state.step))
    if not (force or manager.should_save(step)) or step in manager.all_steps():
        return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_lib.to_dict(cfg)),
        prompts=ocp.args.JsonSave(list(prompts)),
    )
    with _storage_errors(manager, step):
        return bool(manager.save(step, args=args, force=force))


def close(manager: ocp.CheckpointManager | None) -> None:
    """Waits for a pending async save to be committed, then releases the manager.

    Raises:
      StorageError: the pending save could not be written.
    """
    if manager is None:
        return
    try:
        with _storage_errors(manager, None):
            manager.wait_until_finished()
    finally:
        manager.close()


@contextlib.contextmanager
def _storage_errors(manager: ocp.CheckpointManager, step: int | None):
    """Orbax's write failures (a full disk, a read-only path; raised by the save itself or, for an
    async save, by the next call) as one-line StorageErrors that say what is still intact."""
    try:
        yield
    except Exception as e:
        if isinstance(e, (StorageError, KeyboardInterrupt)):
            raise
        committed = committed_steps(pathlib.Path(manager.directory))
        intact = f"the last intact checkpoint is {committed[0]}" if committed else "no checkpoint was committed"
        failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))  # an earlier async save's failure
        what = f"checkpoint {failed.group(1) if failed else step}" if failed or step is not None else "a checkpoint"
        raise StorageError(f"cannot write {what} in {manager.directory} ({root_reason(e)}); {intact}") from e


def write_run_files(cfg: config_lib.Config, prompts: list[str]) -> None:
    """run_dir/config.toml and run_dir/prompts.txt: what this (re)start runs with, for people to read."""
    if jax.process_index() != 0:
        return
    run_dir = pathlib.Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_lib.to_toml(cfg))
    (run_dir / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))


def _test_hang_path_class() -> type | None:
    """Test-only (see the module docstring): a tmp-path class whose commit of one step never ends."""
    value = os.environ.get(_TEST_HANG_ENV)
    if not value:
        return None
    from orbax.checkpoint.path import atomicity

    class HangBeforeCommit(atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *args, **kwargs):
            if self.get_final().name == value:
                print(f"test hook: hanging before committing checkpoint {value}", file=sys.stderr, flush=True)
                time.sleep(3600)
            return await super().finalize(*args, **kwargs)

    return HangBeforeCommit


# --- finding and restoring ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Checkpoints to resume from: an orbax root directory and candidate steps, newest first."""

    root: pathlib.Path  # the `checkpoints/` directory
    steps: tuple[int, ...]  # candidates, newest first (one step for an explicit step directory)
    explicit_step: bool = False  # the user named one step directory

    @property
    def run_dir(self) -> pathlib.Path:
        return self.root.parent

    def step_dir(self, step: int) -> pathlib.Path:
        return self.root / str(step)


def committed_steps(root: pathlib.Path) -> tuple[int, ...]:
    """Committed steps under `root`, newest first (tmp and renamed-aside directories excluded)."""
    if not root.is_dir():
        return ()
    return tuple(sorted((int(p.name) for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), reverse=True))


def find(path: str | os.PathLike, *, must_exist: bool = True) -> Checkpoints:
    """The checkpoints at `path`: a step directory, a run directory, or a `checkpoints/` directory.

    Raises:
      CheckpointError: `path` does not exist, is an uncommitted save, or (with must_exist) holds no checkpoint.
    """
    path = pathlib.Path(path).expanduser().resolve()
    if path.is_dir() and _STEP_DIR.match(path.name) and (path / "state").is_dir():
        return Checkpoints(root=path.parent, steps=(int(path.name),), explicit_step=True)
    if ".orbax-checkpoint-tmp" in path.name:
        raise CheckpointError(f"{path} is an unfinished save (the process stopped while writing it); use a committed step directory")
    if not path.exists() and must_exist:
        raise CheckpointError(f"no checkpoint at {path}: no such directory")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; --resume and --checkpoint take a run, checkpoints or step directory")
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() or not committed_steps(path) else path
    found = Checkpoints(root=root, steps=committed_steps(root))
    if must_exist and not found.steps:
        raise CheckpointError(f"no checkpoint in {path} (expected {CHECKPOINTS}/<step>/ directories written by train.py)")
    return found


def _read_json(step_dir: pathlib.Path, item: str) -> Any:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / item)


def saved_config(checkpoints: Checkpoints) -> dict[str, Any]:
    """The config dict saved with the newest candidate whose config reads back, its run_dir set
    to the directory that actually holds the checkpoint (the saved one may be relative)."""
    for step in checkpoints.steps:
        try:
            saved = _read_json(checkpoints.step_dir(step), "config")
        except Exception as e:  # a corrupt checkpoint: the restore below skips it too
            _warn(f"cannot read the config of {checkpoints.step_dir(step)} ({first_line(e)})")
            continue
        if isinstance(saved, dict):
            return dict(config_lib.upgrade(saved), run_dir=str(checkpoints.run_dir))
    raise CheckpointError(f"no readable config in the checkpoints of {checkpoints.root}")


def saved_prompts(step_dir: str | os.PathLike) -> list[str]:
    """The prompt list saved with one checkpoint."""
    prompts = _read_json(pathlib.Path(step_dir), "prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise CheckpointError(f"{step_dir}/prompts is not a list of prompts")
    return prompts


def abstract_like(state: State) -> State:
    """ShapeDtypeStructs (with shardings) of a built state: the target a checkpoint restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore(checkpoints: Checkpoints, like: State, cfg: config_lib.Config | None = None) -> tuple[State, int]:
    """Restores the newest candidate that reads back into the structure, shapes and shardings of `like`.

    `like` is the freshly built state (or its `abstract_like`); a candidate that fails to read is
    skipped with a one-line warning. A checkpoint whose state has another layout than `like` (a
    run resumed with another algorithm, trainable subset, buffer size, ...) is not corrupt: it
    stops the resume at once, naming what differs from its saved config when `cfg` is given.

    Raises:
      CheckpointError: the checkpoints hold another layout (nothing is renamed or skipped).
      UnreadableCheckpointError: no candidate reads back (the message names the newest one's error).
    """
    abstract = abstract_like(like)
    manager = ocp.CheckpointManager(checkpoints.root, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    errors = []
    try:
        for step in checkpoints.steps:
            step_dir = checkpoints.step_dir(step)
            try:
                metadata = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
                saved = _leaf_layout(metadata)
            except Exception:  # no metadata: corrupt, handled as a failed restore below
                metadata, saved = None, None
            if saved and saved != _leaf_layout(abstract):  # empty: metadata unreadable, a corrupt checkpoint
                if "algorithm" not in metadata:
                    raise CheckpointError(f"{step_dir} was written by an older herd-jax, whose training state had another layout {OLD_LAYOUT}")
                raise CheckpointError(_layout_message(checkpoints, step, cfg))
            try:
                state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
                saved_step = int(jax.device_get(state["step"] if isinstance(state, dict) else state.step))
                if saved_step != step:
                    raise ValueError(f"holds step {saved_step}")
                return state, step
            except Exception as e:  # corrupt or incomplete: fall back to the previous checkpoint
                errors.append(f"{step_dir}: {root_reason(e)}")
                # The whole (multi-page) orbax error goes to run_dir/train.log, the one line to stderr.
                logging.getLogger("herd_jax.libraries").warning("restoring %s failed", step_dir, exc_info=True)
                if step != checkpoints.steps[-1]:
                    _warn(f"skipping unreadable checkpoint {errors[-1]}; trying the previous one")
    finally:
        manager.close()
    raise UnreadableCheckpointError(
        f"no checkpoint in {checkpoints.root} reads back; newest error: {errors[0]}" if errors else f"no checkpoint in {checkpoints.root}"
    )


def _leaf_layout(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """The state's leaves as sorted (shape, dtype) pairs: what a layout change alters, whatever
    the container types orbax saved them in."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves if hasattr(x, "shape"))


# Keys that never change the state's layout: left out when naming what differs.
_LAYOUT_NEUTRAL = ("run_dir", "num_epochs", "seed", "logging.", "checkpoint.", "reward.", "model_options.", "parallel.")


def _layout_message(checkpoints: Checkpoints, step: int, cfg: config_lib.Config | None) -> str:
    where = f"checkpoint {checkpoints.step_dir(step)} holds a training state of another layout than this run's"
    if cfg is None:
        return where
    try:
        saved = config_lib.load_config([saved_config(checkpoints)])
    except CheckpointError:
        return where
    from flax.traverse_util import flatten_dict

    before, now = (flatten_dict(config_lib.to_dict(c), sep=".") for c in (saved, cfg))
    changed = [k for k in now if before.get(k) != now[k] and not k.startswith(_LAYOUT_NEUTRAL)]
    if not changed:
        return f"{where}; resume it with the config it was saved with, or pass a new --run_dir"
    diffs = ", ".join(f"{k} {before.get(k)!r} -> {now[k]!r}" for k in changed[:4])
    return f"{where}: it was written with other settings ({diffs}); resume without changing them, or pass a new --run_dir"


def prepare_resume(checkpoints: Checkpoints, restored_step: int, run_dir: str | os.PathLike) -> None:
    """Makes room to continue after `restored_step` in `run_dir`.

    Newer steps in the same checkpoints directory that failed to restore are renamed aside;
    newer readable ones (an explicitly chosen older step) are an error: branch into a new run dir.
    """
    root = pathlib.Path(run_dir).resolve() / CHECKPOINTS
    newer = [s for s in committed_steps(root) if s > restored_step]
    if not newer:
        return
    if checkpoints.root.resolve() != root or checkpoints.explicit_step:
        raise CheckpointError(
            f"{root} already has checkpoints after step {restored_step} (steps {', '.join(map(str, sorted(newer)))}); "
            f"pass a new --run_dir to continue from step {restored_step}"
        )
    if jax.process_index() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in newer:
            aside = root / f"{step}.corrupt-{stamp}"
            (root / str(step)).rename(aside)
            _warn(f"moved unreadable checkpoint {root / str(step)} to {aside}")


def load_params(step_dir: str | os.PathLike) -> Any:
    """Only the trained params of one checkpoint, as host numpy arrays (no optimizer state is read)."""
    from etils import epath

    state_dir = epath.Path(step_dir) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        params_meta = handler.metadata(state_dir).tree["params"]
        item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), params_meta)}
        restore_args = {"params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)}
        restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    except Exception as e:
        raise CheckpointError(f"cannot read the params of {step_dir} ({first_line(e)})") from e
    return restored["params"]


def resume(source: Checkpoints | str | os.PathLike, state: State, cfg: config_lib.Config) -> State:
    """The trainer's resume: `state` (freshly built) replaced by the newest checkpoint that restores.

    `source` is a `find` result or a path for it. Prints where the run continues from.
    """
    checkpoints = source if isinstance(source, Checkpoints) else find(source)
    if not checkpoints.steps:
        return state
    restored, step = restore(checkpoints, state, cfg)
    prepare_resume(checkpoints, step, cfg.run_dir)
    note = "" if step < cfg.num_epochs else f"; nothing to do: num_epochs={cfg.num_epochs} (raise it to train on)"
    print(f"resuming from {checkpoints.step_dir(step)} at epoch {step}{note}", flush=True)
    return restored
