"""Run logging at the edge of the trainer: wandb (offline unless it can go online), tensorboardX, or none.

The trainer builds one `Logger` with `make_logger` and calls `log` (scalars), `log_images`
(a batch of samples with captions) and `close`. Only process 0 logs in a multi-host run:
every other process gets the no-op logger. Scalars are logged as they are, NaN and inf
included, so a diverging run shows it in its curves instead of hiding it.

wandb goes online only when credentials exist (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a
netrc entry for the server) and a short TCP probe reaches the server; otherwise it runs
offline and prints the `wandb sync` command that uploads the run later. A WANDB_MODE set by
the user always wins.
"""
from __future__ import annotations

import math
import netrc
import os
import pathlib
import socket
import threading
from collections.abc import Mapping, Sequence
import typing
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import numpy as np

LogWith = Literal["wandb", "tensorboard", "none"]
LOGGERS = typing.get_args(LogWith)

WANDB_PROJECT = "herd-jax"
_WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"
_PROBE_TIMEOUT_S = 2.0
_BORDER_PX = 2


class Logger(Protocol):
    """What the trainer logs through; implementations hold the side effects."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars (keys namespaced "train/…", "rollout/…", "perf/…", "reward/prompt/<prompt>")."""

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None:
        """Log uint8[N, H, W, 3] samples with one caption each."""

    def close(self) -> None:
        """Flush and finish the run."""


def image_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """Tile uint8[N, H, W, 3] images row-major into one uint8 grid with 2 px black borders.

    `ncols` defaults to ceil(sqrt(N)); cells past N stay black. The result has shape
    [rows·(H+2)+2, ncols·(W+2)+2, 3].
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8[N, H, W, 3], got {images.dtype}{list(images.shape)}")
    n, h, w, _ = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    ncols = min(ncols or math.ceil(math.sqrt(n)), n)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    b = _BORDER_PX
    grid = np.zeros((nrows * (h + b) + b, ncols * (w + b) + b, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        y, x = b + r * (h + b), b + c * (w + b)
        grid[y : y + h, x : x + w] = image
    return grid


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert metric values (python, numpy or jax scalars) to floats; NaN/inf pass through."""
    out = {}
    for key, value in metrics.items():
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(f"metric {key!r} is not a scalar: shape {array.shape}")
        out[str(key)] = float(array.reshape(()))
    return out


def _check_images(images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"log_images expects uint8[N, H, W, 3], got {images.dtype}{list(images.shape)}")
    if len(captions) != len(images):
        raise ValueError(f"log_images got {len(images)} images but {len(captions)} captions")
    return images


class NullLogger:
    """Logs nothing: `kind="none"` and every process but the main one."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        del metrics, step

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None:
        del key, images, captions, step

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """tensorboardX event files in `run_dir/tensorboard`: scalars, one image grid, captions as text.

    tensorboardX rewrites characters outside [-/\\w.] in tags to "_" ("reward/prompt/a red cat"
    becomes "reward/prompt/a_red_cat").
    """

    def __init__(self, run_dir: str | os.PathLike, config: Mapping[str, Any]):
        from tensorboardX import SummaryWriter

        self.logdir = pathlib.Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=30)
        # The config as text, so a run's event files say how it was made.
        self._writer.add_text("config", _markdown_config(config), 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None:
        images = _check_images(images, captions)
        self._writer.add_image(key, image_grid(images), global_step=step, dataformats="HWC")
        lines = [f"{i}. {caption}" for i, caption in enumerate(captions)]
        self._writer.add_text(f"{key}/captions", "\n".join(lines), global_step=step)

    def close(self) -> None:
        self._writer.close()


def _markdown_config(config: Mapping[str, Any]) -> str:
    return "\n".join(f"    {k} = {v!r}" for k, v in sorted(_flatten(config).items())) or "    (empty)"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _has_wandb_credentials(base_url: str) -> bool:
    """True when an API key or identity token is in the environment or the netrc has the server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(base_url).hostname
    try:
        return bool(host) and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """TCP-connect to the server within `timeout_s`; a thread bounds DNS, which ignores socket timeouts."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (80 if parts.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def wandb_mode() -> str:
    """WANDB_MODE if set, else "online" with credentials and a reachable server, else "offline"."""
    if mode := os.environ.get("WANDB_MODE"):
        return mode
    base_url = os.environ.get("WANDB_BASE_URL", _WANDB_DEFAULT_BASE_URL)
    if _has_wandb_credentials(base_url) and _reachable(base_url):
        return "online"
    return "offline"


class WandbLogger:
    """One wandb run in `run_dir/wandb`; images as a list of `wandb.Image` under their key."""

    def __init__(self, run_dir: str | os.PathLike, config: Mapping[str, Any], run_name: str | None):
        import wandb

        self._wandb = wandb
        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode()
        settings = wandb.Settings(
            silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True
        )
        self.run = wandb.init(
            project=WANDB_PROJECT,
            dir=str(run_dir),
            config=dict(config),
            name=run_name,
            mode=self.mode,
            settings=settings,
        )
        # wandb's own console is silenced, so say where the run lives in one line.
        if self.mode == "online":
            print(f"wandb: logging to {self.run.url}", flush=True)
        elif self.mode != "disabled":
            sync_dir = self.run.settings.sync_dir
            print(f"wandb: offline run in {sync_dir}; upload with: wandb sync {sync_dir}", flush=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None:
        images = _check_images(images, captions)
        wb_images = [self._wandb.Image(im, caption=cap) for im, cap in zip(images, captions)]
        self.run.log({key: wb_images}, step=step)

    def close(self) -> None:
        # finish() can return before wandb's service has flushed the run file to disk (seen
        # under load: a 7-byte header); teardown waits for the service to write and exit.
        self.run.finish()
        self._wandb.teardown()


def make_logger(
    kind: str,
    run_dir: str | os.PathLike,
    *,
    config: dict,
    run_name: str | None = None,
    is_main_process: bool = True,
) -> Logger:
    """Build the run logger named `kind` (one of LOGGERS); non-main processes get the no-op one."""
    if kind not in LOGGERS:
        raise ValueError(f"unknown logger {kind!r}; valid loggers: {', '.join(LOGGERS)}")
    if kind == "none" or not is_main_process:
        return NullLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir, config)
    return WandbLogger(run_dir, config, run_name)
