"""Run a scorer in its own process (any Python environment), fed batches over pipes.

Why: some reward models (ImageReward) need PyTorch packages that cannot live beside JAX and the
pinned transformers/diffusers of the main environment. The sidecar spawns

    <python> -I sidecar.py <worker.py> [worker args...]

in that other environment. This file is then the worker *host*: it imports only the stdlib and
numpy, loads ``worker.py`` by path and calls its ``load(args: list[str])``, which returns a scorer
``(images uint8[B,H,W,3], prompts list[str]) -> float32[B]``. The host answers requests on its
stdin/stdout; anything the worker or its libraries print goes to stderr, which the parent writes
to a log file.

Wire format (both directions): a frame is ``b"HJS1"``, u32 JSON length, u64 blob length (little
endian), the UTF-8 JSON header, then the blob.
  host -> parent on start: ``{"ready": true}`` or ``{"ok": false, "fatal": true, "error": ...}``
  parent -> host: ``{"op": "score", "shape": [B,H,W,3], "prompts": [...]}`` + uint8 image bytes
  host -> parent: ``{"ok": true, "shape": [B]}`` + float32 bytes, or ``{"ok": false, "error": ...}``
End of stdin ends the host.

Failure policy (parent): a worker that dies, or does not answer within ``timeout_s``, is killed,
restarted, and the batch sent again; after ``max_restarts`` restarts that all failed in a row the
call raises ``RewardError`` with one line naming the cause, the log file and the log's last lines.
An error the worker *reports* (fatal load error, exception while scoring) is raised at once: it is
deterministic, so restarting would only repeat it.

Waiting on the pipes (``selectors`` + ``os.read``/``os.write``) releases the GIL, so a trainer
thread can block here while the main thread keeps sampling.
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

_MAGIC = b"HJS1"
_HEADER = struct.Struct("<4sIQ")
_CHUNK = 1 << 20
_LOG_TAIL_LINES = 8
_CLOSE_GRACE_S = 5.0


# --------------------------------------------------------------------------------------------
# Wire format (used by both sides).


def encode_frame(meta: dict[str, Any], blob: bytes = b"") -> bytes:
    """One frame: magic, lengths, JSON header, blob."""
    head = json.dumps(meta).encode()
    return _HEADER.pack(_MAGIC, len(head), len(blob)) + head + blob


def _parse_header(raw: bytes) -> tuple[int, int]:
    magic, head_len, blob_len = _HEADER.unpack(raw)
    if magic != _MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (stray output on the protocol pipe?)")
    return head_len, blob_len


class ProtocolError(RuntimeError):
    """The other side sent bytes that are not a frame."""


class WorkerDied(RuntimeError):
    """The worker closed its pipe (exited or crashed)."""


class WorkerTimeout(RuntimeError):
    """The worker did not answer before the deadline."""


# --------------------------------------------------------------------------------------------
# Worker host: runs in the scorer's environment (stdlib + numpy only).


def _host_read_exact(stream, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _host_read_frame(stream) -> tuple[dict[str, Any], bytes] | None:
    raw = _host_read_exact(stream, _HEADER.size)
    if raw is None:
        return None
    head_len, blob_len = _parse_header(raw)
    head = _host_read_exact(stream, head_len)
    blob = _host_read_exact(stream, blob_len) if blob_len else b""
    if head is None or blob is None:
        return None
    return json.loads(head), blob


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def serve(worker_path: str, args: list[str]) -> int:
    """Host loop: load the worker's scorer, then answer score requests until stdin closes."""
    # The protocol owns the real stdout; everything printed from here on goes to stderr (the log).
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(meta: dict[str, Any], blob: bytes = b"") -> None:
        proto_out.write(encode_frame(meta, blob))

    try:
        spec = importlib.util.spec_from_file_location("_sidecar_worker", worker_path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load worker script {worker_path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        scorer: Callable[[np.ndarray, list[str]], np.ndarray] = module.load(list(args))
    except (Exception, SystemExit) as exc:  # one line to the parent; the traceback to the log
        import traceback

        traceback.print_exc()
        send({"ok": False, "fatal": True, "error": _one_line(exc)})
        return 1
    send({"ready": True})

    while True:
        frame = _host_read_frame(proto_in)
        if frame is None:
            return 0
        meta, blob = frame
        try:
            if meta.get("op") != "score":
                raise ValueError(f"unknown op {meta.get('op')!r}")
            images = np.frombuffer(blob, dtype=np.uint8).reshape(meta["shape"])
            scores = np.asarray(scorer(images, list(meta["prompts"])), dtype="<f4").reshape(-1)
            if scores.shape[0] != images.shape[0]:
                raise ValueError(
                    f"scorer returned {scores.shape[0]} scores for {images.shape[0]} images"
                )
        except Exception as exc:
            import traceback

            traceback.print_exc()
            send({"ok": False, "error": _one_line(exc)})
            continue
        send({"ok": True, "shape": [int(scores.shape[0])]}, scores.tobytes())


# --------------------------------------------------------------------------------------------
# Parent side: runs in the main environment.


def _reward_error(message: str, *, model_failed: bool = False) -> Exception:
    """RewardError; RewardModelError when the model fails while scoring (out of restarts, or the
    worker's own error): a run stops on it with its own exit code."""
    # Imported here, not at the top: the worker host runs this file in another environment.
    from herd_jax.rewards.base import RewardError, RewardModelError

    return (RewardModelError if model_failed else RewardError)(message)


class _Process:
    """One spawned worker: its Popen and the log offset where its stderr starts."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            self.popen = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,  # a Ctrl-C in the trainer's terminal is the trainer's to handle
            )
        os.set_blocking(self.popen.stdin.fileno(), False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def write_all(self, data: bytes, deadline: float) -> None:
        fd = self.popen.stdin.fileno()
        view = memoryview(data)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_WRITE)
            while view:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise WorkerTimeout("timed out sending the batch")
                try:
                    n = os.write(fd, view[:_CHUNK])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise WorkerDied("worker closed its input") from exc
                view = view[n:]

    def read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.popen.stdout.fileno()
        data = bytearray()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while len(data) < n:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise WorkerTimeout("timed out waiting for the answer")
                chunk = os.read(fd, min(n - len(data), _CHUNK))
                if not chunk:
                    raise WorkerDied("worker closed its output")
                data += chunk
        return bytes(data)

    def read_frame(self, deadline: float) -> tuple[dict[str, Any], bytes]:
        head_len, blob_len = _parse_header(self.read_exact(_HEADER.size, deadline))
        try:
            meta = json.loads(self.read_exact(head_len, deadline))
        except ValueError as exc:
            raise ProtocolError(f"bad frame header: {exc}") from exc
        return meta, self.read_exact(blob_len, deadline) if blob_len else b""

    def exit_description(self) -> str:
        code = self.popen.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> list[str]:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                text = log.read()[-16384:].decode(errors="replace")
        except OSError:
            return []
        return [line.strip() for line in text.splitlines() if line.strip()][-lines:]

    def stop(self, grace_s: float = _CLOSE_GRACE_S) -> None:
        """Closes stdin (the host exits on EOF), waits ``grace_s``, then kills."""
        popen = self.popen
        if popen.poll() is None:
            try:
                popen.stdin.close()
            except OSError:
                pass
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        for stream in (popen.stdin, popen.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.stop(grace_s=0.0)


def _stop_process(holder: list[_Process | None]) -> None:
    """Finalizer (also run at interpreter exit): stops the current worker, if any."""
    proc, holder[0] = holder[0], None
    if proc is not None:
        proc.stop()


class Sidecar:
    """A restartable worker process that scores batches: ``sidecar(images, prompts) -> float32[B]``.

    Args:
      worker: path of the worker script (defines ``load(args) -> scorer``).
      args: command-line arguments passed to the worker's ``load``.
      python: interpreter of the environment the worker runs in.
      timeout_s: limit for starting the worker and for each request.
      max_restarts: restarts allowed after consecutive failures before ``RewardError``.
      name: used in error messages and the default log file name.
      log_path: where the worker's stderr goes (appended across restarts); default a temp file.
      env: environment of the worker (default: this process's).
    """

    def __init__(
        self,
        worker: str | os.PathLike,
        args: Sequence[str] = (),
        *,
        python: str = sys.executable,
        timeout_s: float = 300.0,
        max_restarts: int = 3,
        name: str = "sidecar",
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        if timeout_s <= 0 or max_restarts < 0:
            raise _reward_error(
                f"{name}: need timeout_s > 0 and max_restarts >= 0, got {timeout_s}, {max_restarts}"
            )
        self.name = name
        self.timeout_s = float(timeout_s)
        self.max_restarts = int(max_restarts)
        self._cmd = [
            str(python),
            "-I",
            str(Path(__file__).resolve()),
            str(Path(worker).resolve()),
            *map(str, args),
        ]
        self._env = env
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"herd_jax-{name}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._lock = threading.Lock()
        self._holder: list[_Process | None] = [None]
        self._failures = 0  # consecutive failures (crash/timeout), reset by a success
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_process, self._holder)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Process id of the running worker (None before start / after close)."""
        proc = self._holder[0]
        return proc.pid if proc is not None else None

    def start(self) -> None:
        """Starts the worker (if not running) and waits until its scorer is loaded."""
        with self._lock:
            self._with_retries(lambda proc: None)

    def restart(self) -> None:
        """Stops the worker (if any) and starts a fresh one."""
        with self._lock:
            self._discard()
            self._with_retries(lambda proc: None)

    def close(self) -> None:
        """Stops the worker; the sidecar cannot be used afterwards. Safe to call twice."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "Sidecar":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- scoring -----------------------------------------------------------------------------

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Scores a batch: ``uint8[B,H,W,3]``, B prompts -> ``float32[B]`` (restarting on crashes)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        request = encode_frame(
            {"op": "score", "shape": list(images.shape), "prompts": list(prompts)}, images.tobytes()
        )

        def exchange(proc: _Process) -> np.ndarray:
            deadline = time.monotonic() + self.timeout_s
            proc.write_all(request, deadline)
            meta, blob = proc.read_frame(deadline)
            if not meta.get("ok"):
                raise _reward_error(
                    f"{self.name}: worker failed to score the batch: {meta.get('error')} (log: {self.log_path})",
                    model_failed=True,
                )
            return np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(meta["shape"])

        with self._lock:
            return self._with_retries(exchange)

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self) -> _Process:
        try:
            proc = _Process(self._cmd, self.log_path, self._env)
        except OSError as exc:  # no such interpreter, not executable: restarting will not help
            raise _reward_error(
                f"{self.name}: cannot run {self._cmd[0]}: {_one_line(exc)}"
            ) from exc
        self._holder[0] = proc
        meta, _ = proc.read_frame(time.monotonic() + self.timeout_s)
        if not meta.get("ready"):
            error = meta.get("error", meta)
            proc.stop()
            self._holder[0] = None
            raise _reward_error(
                f"{self.name}: worker could not start: {error} (log: {self.log_path})"
            )
        return proc

    def _discard(self) -> None:
        proc, self._holder[0] = self._holder[0], None
        if proc is not None:
            proc.stop()

    def _with_retries(self, step: Callable[[_Process], Any]) -> Any:
        """Runs ``step`` on a live worker, restarting it after a crash/timeout (up to the limit)."""
        if self._closed:
            raise _reward_error(f"{self.name}: used after close()")
        while True:
            proc = self._holder[0]
            try:
                if proc is None:
                    proc = self._spawn()
                result = step(proc)
                self._failures = 0
                return result
            except (WorkerDied, WorkerTimeout, ProtocolError, OSError) as exc:
                proc = self._holder[0]
                cause = str(exc)
                if proc is not None:
                    if isinstance(exc, WorkerTimeout):
                        cause += f" after {self.timeout_s:g} s"
                    proc.kill()
                    cause += f"; worker {proc.exit_description()}"
                    tail = proc.log_tail()
                else:
                    tail = []
                self._holder[0] = None
                self._failures += 1
                if self._failures > self.max_restarts:
                    self._failures = 0
                    last = " | ".join(tail) if tail else "(empty)"
                    raise _reward_error(
                        f"{self.name}: worker failed {self.max_restarts + 1} times in a row "
                        f"(last: {cause}); giving up. Log {self.log_path}, last lines: {last}",
                        model_failed=True,
                    ) from exc
                with open(self.log_path, "ab") as log:
                    log.write(
                        f"--- failure {self._failures}/{self.max_restarts}: {cause}; restarting\n".encode()
                    )


def main(argv: Sequence[str]) -> int:
    """``python sidecar.py WORKER.py [ARGS...]``: serve the worker's scorer on stdin/stdout."""
    if len(argv) < 1:
        print("usage: sidecar.py WORKER.py [ARGS...]", file=sys.stderr)
        return 2
    return serve(argv[0], list(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
