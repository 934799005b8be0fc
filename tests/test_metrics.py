"""Tests for herd_jax.metrics: write with each logger, then read back what landed on disk.

tensorboard event files are parsed with tensorboardX's protos and the TFRecord framing (the
`tensorboard` package is not a dependency); the wandb run's `.wandb` file is parsed with
wandb's protos and its leveldb-log framing (wandb 0.31 ships no reader). One wandb run, made
by a module fixture, serves every wandb assertion because starting wandb costs a service process.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib
import socket
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from herd_jax import metrics

CONFIG = {"algorithm": "herd", "train": {"lr": 3e-4, "batch": 4}}
SCALARS_1 = {"train/loss": 0.25, "train/nan": float("nan"), "perf/inf": float("inf"),
             "reward/prompt/a red cat": np.float32(1.5)}
SCALARS_2 = {"train/loss": -0.75}
CAPTIONS = ["a red cat | 0.50", "a blue dog | -1.25", "a green car | 2.00"]


def _images(n: int = 3, h: int = 8, w: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# --- image_grid -------------------------------------------------------------------------


def test_image_grid_shape_and_placement():
    images = _images(5, 4, 6)
    grid = metrics.image_grid(images)  # ncols = ceil(sqrt(5)) = 3 -> 2 rows
    assert grid.dtype == np.uint8 and grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    # Image 4 sits at row 1, col 1; the borders around it and the empty last cell are black.
    np.testing.assert_array_equal(grid[8:12, 10:16], images[4])
    np.testing.assert_array_equal(grid[0:2], 0)
    np.testing.assert_array_equal(grid[:, 8:10], 0)
    np.testing.assert_array_equal(grid[8:12, 18:24], 0)
    assert metrics.image_grid(images, ncols=5).shape == (4 + 4, 5 * 8 + 2, 3)
    assert metrics.image_grid(images[:1]).shape == (8, 10, 3)


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        metrics.image_grid(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        metrics.image_grid(np.zeros((4, 4, 3), np.uint8))


# --- make_logger ------------------------------------------------------------------------


def test_unknown_kind_names_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="wandb, tensorboard, none") as info:
        metrics.make_logger("mlflow", tmp_path, config={})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", metrics.LOGGERS)
def test_non_main_process_logs_nothing(tmp_path, kind):
    logger = metrics.make_logger(kind, tmp_path / "run", config=CONFIG, is_main_process=False)
    assert isinstance(logger, metrics.NullLogger)
    logger.log(SCALARS_1, step=1)
    logger.log_images("rollout/images", _images(), CAPTIONS, step=1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_none_logger_accepts_everything(tmp_path):
    logger = metrics.make_logger("none", tmp_path, config=CONFIG)
    logger.log(SCALARS_1, step=1)
    logger.log_images("rollout/images", _images(), CAPTIONS, step=1)
    logger.close()
    assert list(tmp_path.iterdir()) == []


# --- tensorboard ------------------------------------------------------------------------


def _read_tfrecords(path: pathlib.Path):
    """Yield tensorboard Events from a TFRecord file (length, masked crc, data, masked crc)."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        pos += 12
        event = event_pb2.Event()
        event.ParseFromString(data[pos : pos + length])
        pos += length + 4
        yield event


def test_tensorboard_round_trip(tmp_path):
    logger = metrics.make_logger("tensorboard", tmp_path, config=CONFIG)
    logger.log(SCALARS_1, step=1)
    logger.log_images("rollout/images", _images(), CAPTIONS, step=1)
    logger.log(SCALARS_2, step=2)
    logger.close()

    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars, images, texts = {}, {}, {}
    for event in _read_tfrecords(event_file):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
            elif value.HasField("image"):
                images[(value.tag, event.step)] = value.image
            elif value.metadata.plugin_data.plugin_name == "text":
                texts[(value.tag, event.step)] = value.tensor.string_val[0].decode()

    assert scalars["train/loss"] == [(1, 0.25), (2, -0.75)]
    assert scalars["reward/prompt/a_red_cat"] == [(1, 1.5)]  # tensorboardX turns spaces into "_"
    assert math.isnan(scalars["train/nan"][0][1]) and scalars["perf/inf"] == [(1, math.inf)]

    image = images[("rollout/images", 1)]
    expected = metrics.image_grid(_images())
    assert (image.height, image.width, image.colorspace) == (*expected.shape[:2], 3)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, expected)

    captions = texts[("rollout/images/captions/text_summary", 1)]
    for i, caption in enumerate(CAPTIONS):
        assert f"{i}. {caption}" in captions
    assert "lr" in texts[("config/text_summary", 0)]


# --- wandb mode selection ---------------------------------------------------------------


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return monkeypatch


def test_wandb_mode_honours_user_setting(no_wandb_env):
    no_wandb_env.setenv("WANDB_MODE", "disabled")
    assert metrics.wandb_mode() == "disabled"


def test_wandb_mode_offline_without_credentials(no_wandb_env, tmp_path):
    no_wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")
    assert metrics.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password " + "k" * 40 + "\n")
    no_wandb_env.setenv("NETRC", str(tmp_path / "netrc"))
    assert metrics._has_wandb_credentials("http://127.0.0.1:1")


def test_wandb_mode_needs_a_reachable_server(no_wandb_env):
    no_wandb_env.setenv("WANDB_API_KEY", "k" * 40)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        no_wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert metrics.wandb_mode() == "online"
    no_wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")  # closed now
    assert metrics.wandb_mode() == "offline"


def test_reachability_probe_is_bounded(monkeypatch):
    def hang(*args, **kwargs):  # a DNS lookup that never answers ignores socket timeouts
        time.sleep(5.0)
        raise OSError("hung")

    monkeypatch.setattr(metrics.socket, "create_connection", hang)
    start = time.monotonic()
    assert not metrics._reachable("https://api.wandb.ai", timeout_s=0.3)
    assert time.monotonic() - start < 1.0


# --- wandb offline run ------------------------------------------------------------------


def _read_wandb_records(path: pathlib.Path):
    """Yield wandb Records from a .wandb file: 7-byte ':W&B' header, then leveldb-log records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, pending = 32768, 7, b""
    while pos < len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        assert crc == zlib.crc32(payload, zlib.crc32(bytes([kind]))), f"bad checksum at {pos}"
        pending += payload
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """One offline wandb run logged with scalars and images; returns (run_dir, stdout, records)."""
    run_dir = tmp_path_factory.mktemp("wandb_run")
    home = tmp_path_factory.mktemp("wandb_home")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        with contextlib.redirect_stdout(stdout):
            logger = metrics.make_logger("wandb", run_dir, config=CONFIG, run_name="unit")
            logger.log(SCALARS_1, step=1)
            logger.log_images("rollout/images", _images(), CAPTIONS, step=1)
            logger.log(SCALARS_2, step=2)
            logger.close()
    (offline_dir,) = (run_dir / "wandb").glob("offline-run-*")
    (wandb_file,) = offline_dir.glob("run-*.wandb")
    return run_dir, offline_dir, stdout.getvalue(), list(_read_wandb_records(wandb_file))


def _history_rows(records) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) if len(item.nested_key) > 1 else
                         (item.nested_key[0] if item.nested_key else item.key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_prints_sync_command(wandb_run):
    _, offline_dir, stdout, _ = wandb_run
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    assert f"wandb sync {offline_dir}" in lines[0]


def test_wandb_run_has_config_and_name(wandb_run):
    _, _, _, records = wandb_run
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "herd-jax" and run.display_name == "unit"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algorithm"] == "herd"
    assert config["train"] == {"lr": 3e-4, "batch": 4}
    assert any(r.WhichOneof("record_type") == "exit" for r in records), "close() did not finish the run"


def test_wandb_history_scalars(wandb_run):
    _, _, _, records = wandb_run
    rows = {row["_step"]: row for row in _history_rows(records)}
    assert rows[1]["train/loss"] == 0.25 and rows[2]["train/loss"] == -0.75
    assert rows[1]["reward/prompt/a red cat"] == 1.5
    assert math.isnan(rows[1]["train/nan"]) and rows[1]["perf/inf"] == math.inf


def test_wandb_history_images(wandb_run):
    _, offline_dir, _, records = wandb_run
    row = {row["_step"]: row for row in _history_rows(records)}[1]
    assert row["rollout/images/_type"] == "images/separated"
    assert row["rollout/images/captions"] == CAPTIONS
    assert row["rollout/images/count"] == 3
    files = sorted((offline_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(files) == 3
    written = {np.asarray(Image.open(f).convert("RGB")).tobytes() for f in files}
    assert written == {image.tobytes() for image in _images()}
