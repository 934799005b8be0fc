"""How a run ends: exit codes, the errors that map to them, and the one-line report.

Every command-line entry point (train.py, `python -m herd_jax.evaluate`, `python -m
herd_jax.export`) runs its body through `report`, so every failure that is not a bug is one
`error: ...` line on stderr and an exit code a job script can act on:

  0    finished
  1    internal error: a bug; the traceback is printed
  2    bad input: usage, config, model, prompt file, checkpoint choice or layout, run directory
       in use or holding checkpoints
  3    storage: a path cannot be read or written (read-only, full disk, not a directory), or no
       checkpoint reads back
  4    training diverged: a non-finite loss (the last checkpoint is intact)
  5    a non-finite reward (the last checkpoint is intact)
  6    the reward model failed (its sidecar out of restarts; the last checkpoint is intact)
  130  interrupted (a second Ctrl-C)
  143  stopped by SIGTERM or Ctrl-C after saving a checkpoint: resume with --resume
"""
from __future__ import annotations

import argparse
import enum
import logging
import os
import re
import sys
import warnings
from typing import Callable


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    STORAGE = 3
    DIVERGED = 4
    BAD_REWARD = 5
    REWARD_MODEL = 6
    INTERRUPTED = 130
    STOPPED = 143


class ConfigError(ValueError):
    """A bad configuration value or key; the message is one line meant for the user."""


class StorageError(OSError):
    """A file or directory cannot be read or written; the message is one line for the user."""


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss; the message is one line for the user."""


class Stopped(Exception):
    """The run stopped early on request (SIGTERM, Ctrl-C) after saving; the message says where."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types whose message is a complete, one-line explanation of bad input."""
    from herd_jax.checkpoint import CheckpointError
    from herd_jax.models import ModelNotFoundError
    from herd_jax.prompts import PromptError
    from herd_jax.rewards import RewardError
    from herd_jax.rundir import RunDirError

    return (CheckpointError, ConfigError, ModelNotFoundError, PromptError, RewardError, RunDirError, FileExistsError)


def exit_code(error: BaseException) -> ExitCode:
    """The exit code for an exception that ended a run (INTERNAL for anything unexpected)."""
    from herd_jax.rewards.base import NonFiniteRewardError, RewardModelError

    if isinstance(error, Stopped):
        return ExitCode.STOPPED
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(error, DivergedError):
        return ExitCode.DIVERGED
    if isinstance(error, NonFiniteRewardError):
        return ExitCode.BAD_REWARD
    if isinstance(error, RewardModelError):
        return ExitCode.REWARD_MODEL
    if isinstance(error, user_errors()):
        return ExitCode.BAD_INPUT
    if isinstance(error, (OSError, UnicodeError)):  # StorageError included
        return ExitCode.STORAGE
    return ExitCode.INTERNAL


def describe(error: BaseException) -> str:
    """One line for the user: our errors carry it; an OSError gets its reason and path."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, OSError) and not isinstance(error, StorageError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    if isinstance(error, UnicodeDecodeError):
        return f"cannot decode a file as {error.encoding} ({error.reason} at byte {error.start})"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)")


def root_reason(error: BaseException) -> str:
    """The root cause of a (possibly chained, possibly multi-page) library error, one line: the
    operating system's reason where there is one (tensorstore puts its errno in the message), else
    the root error's first line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f' ({error.filename})' if error.filename else ''}"
    code = _OS_ERROR_CODE.search(str(error))
    if code:
        return os.strerror(int(code.group(1)))
    return first_line(error)


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`, cut to ~160 characters."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line[:157] + '...' if len(line) > 160 else line}"


def report(body: Callable[[], object]) -> int:
    """Runs a command's body; returns its exit code, printing one `error:` line for known failures.

    A bug (ExitCode.INTERNAL) keeps its traceback: that is what a bug report needs.
    """
    try:
        body()
    except (Exception, KeyboardInterrupt) as error:
        code = exit_code(error)
        if code == ExitCode.INTERNAL:
            raise
        if code == ExitCode.STOPPED:
            print(describe(error), file=sys.stderr, flush=True)
        else:
            print(f"error: {describe(error)}", file=sys.stderr, flush=True)
        return int(code)
    return int(ExitCode.OK)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit code 2) instead of the whole usage block."""

    def error(self, message: str):
        self.exit(int(ExitCode.BAD_INPUT), f"error: {message} (see {self.prog} --help)\n")


# Loggers whose records go to the run's log file (train.log), never to the terminal: for a failed
# write or a corrupt checkpoint orbax logs multi-page tracebacks through absl, its asyncio tasks
# log "exception was never retrieved", and tensorstore callbacks that outlive their event loop
# raise unraisable errors (sent to "herd_jax.libraries"); our one-line errors already report it.
_LIBRARY_LOGGERS = ("absl", "orbax", "asyncio", "herd_jax.libraries")


def _log_unraisable(unraisable: "sys.UnraisableHookArgs") -> None:
    logging.getLogger("herd_jax.libraries").warning(
        "unraisable exception in %r", unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


def quiet_libraries() -> None:
    """Turns down start-up chatter from XLA, absl and the hub libraries, and keeps orbax's
    (absl's) log records out of the terminal (`log_to_file` sends them to the run's log)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers first logs
    logging.getLogger("transformers").setLevel(logging.ERROR)  # in case it already has
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.propagate = False
        if not library.handlers:
            library.addHandler(logging.NullHandler())
    sys.unraisablehook = _log_unraisable


class _BestEffortFileHandler(logging.FileHandler):
    """A log file that never speaks in the terminal: on a full disk the log's own write fails as
    the checkpoint's did, and logging's default would print a traceback per record to stderr
    under the one-line error that already says what happened. It stops writing after a failure."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.emit = lambda record: None  # the file is unwritable from here on


def log_to_file(path: os.PathLike | str) -> logging.Handler:
    """Appends the libraries' log records (orbax/absl, INFO and up) to `path`; returns the handler
    so the caller can remove it when the run ends. A failed write to it is dropped silently."""
    handler = _BestEffortFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.addHandler(handler)
        library.setLevel(min(library.level or logging.INFO, logging.INFO))
    return handler


def stop_logging_to(handler: logging.Handler) -> None:
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    try:
        handler.close()
    except OSError:  # the last buffered records could not be written (full disk): already reported
        pass
