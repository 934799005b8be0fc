"""A run directory that cannot lose work: one writer at a time, no silent reuse, clean stops.

- `RunLock`: an exclusive `flock` on `run_dir/.lock` for the life of a run (process 0 of a
  multi-host run takes it). The kernel drops it when the process dies, even by SIGKILL, so a
  crashed run never leaves a stale lock; a second run on the same directory stops at once with
  one line (exit 2) instead of both writing checkpoints into each other.
- `check_fresh`: a run that does not resume refuses a directory that already has checkpoints
  (they would be mixed with the new run's, and `config.toml` overwritten); `--resume` continues
  it and `--overwrite` deletes them first.
- `StopRequest`: SIGTERM (the preemption signal of cloud TPU/GPU VMs and of SLURM/Kubernetes) and
  Ctrl-C only raise a flag; the trainer finishes the epoch it is in, saves a checkpoint and
  exits 143 ("resume with --resume"). A second Ctrl-C interrupts at once. In a multi-host run
  every process stops at the same epoch: the flag is OR-ed over processes once per epoch.
"""
from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import shutil
import signal
import socket
import types
from typing import Any

import jax
import numpy as np

from herd_jax.checkpoint import CHECKPOINTS, committed_steps
from herd_jax.errors import StorageError, describe

LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message is one line for the user."""


class RunLock:
    """Context manager: an exclusive lock on a run directory (created if missing)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = pathlib.Path(run_dir)
        self._file = None

    def __enter__(self) -> "RunLock":
        if jax.process_index() != 0:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            file = open(self.run_dir / LOCK_FILE, "a+", encoding="utf-8")
        except OSError as e:
            raise StorageError(f"cannot write the run directory {self.run_dir}: {describe(e)}") from e
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                file.close()
                raise
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunDirError(f"run directory {self.run_dir} is in use by {holder}; wait for it to finish or pass another --run_dir") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def check_fresh(run_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """For a run that starts from scratch: refuse a run directory with checkpoints, or delete them
    (`overwrite`). Call with the lock held."""
    root = pathlib.Path(run_dir) / CHECKPOINTS
    steps = committed_steps(root)
    if not steps:
        return
    if not overwrite:
        raise RunDirError(
            f"{run_dir} already holds checkpoints (newest: epoch {steps[0]}); pass --resume to continue that run, "
            "--overwrite to delete them and start over, or another --run_dir"
        )
    if jax.process_index() == 0:
        shutil.rmtree(root)
        print(f"--overwrite: deleted the checkpoints in {root}", flush=True)


class StopRequest:
    """Context manager: while active, SIGTERM and Ctrl-C ask the run to stop after this epoch."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: stopping after this epoch and saving a checkpoint (Ctrl-C again to stop at once)", flush=True)

    def requested(self) -> bool:
        """Whether any process was asked to stop (a collective call in a multi-host run)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray([local]))))
