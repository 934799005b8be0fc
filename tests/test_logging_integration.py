"""What real tiny training runs logged, read back from disk (runs shared with tests/test_checkpoint.py).

The straight run logged to tensorboard (epochs 0..2); the resumed run (`train.py --resume` after a
SIGKILL, epochs 1..2) logged to wandb offline. Both must hold every metric the trainer promises,
and an image grid per epoch (logging.image_every=1) captioned with prompt and reward.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from test_checkpoint import NUM_EPOCHS, tiny_runs
from test_metrics import _history_rows, _read_tfrecords, _read_wandb_records

pytestmark = [
    pytest.mark.xdist_group("tiny_runs"),  # the session's shared tiny runs live on one worker
    pytest.mark.usefixtures("reuse_builds"),  # in-process runs of one config share a build (tests/builds.py)
]

# Scalars every epoch must log, whatever the algorithm.

REQUIRED = (
    "reward/mean",
    "reward/std",
    "train/loss",
    "train/approx_kl",
    "train/clipfrac",
    "train/grad_norm",
    "train/learning_rate",
    "perf/samples_per_s",
    "perf/checkpoint_s",
)
DETERMINISTIC = ("reward/mean", "reward/std", "train/loss", "train/approx_kl", "train/clipfrac", "train/grad_norm")
SAMPLES = 4  # sample.batch_size x num_batches_per_epoch in the tiny runs
CAPTION = re.compile(r"^(.+) \| ([-+]?\d+\.\d{3})$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def tensorboard(runs):
    run_dir, history = runs.straight
    (event_file,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    scalars, images, texts = {}, {}, {}
    for event in _read_tfrecords(event_file):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
            elif value.HasField("image"):
                images[(value.tag, event.step)] = value.image
            elif value.metadata.plugin_data.plugin_name == "text":
                texts[(value.tag, event.step)] = value.tensor.string_val[0].decode()
    return history, scalars, images, texts


def _tb_tag(key: str) -> str:
    return re.sub(r"[^-/\w.]", "_", key)  # what tensorboardX does to tags


def test_tensorboard_has_every_scalar_each_epoch(tensorboard):
    history, scalars, _, _ = tensorboard
    epochs = list(range(NUM_EPOCHS))
    for key in REQUIRED:
        assert sorted(scalars.get(key, {})) == epochs, key
        for epoch in epochs:
            assert scalars[key][epoch] == np.float32(history[epoch][key]), (key, epoch)
    for epoch in epochs:
        per_prompt = {k: v for k, v in history[epoch].items() if k.startswith("reward/prompt/")}
        assert per_prompt, "no per-prompt reward means"
        for key, value in per_prompt.items():
            assert scalars[_tb_tag(key)][epoch] == np.float32(value), key


def _grid_cells(grid: np.ndarray, n: int, size: int = 32, border: int = 2) -> np.ndarray:
    """The n images of a metrics.image_grid (row-major, 2 px borders), back out of the grid."""
    ncols = (grid.shape[1] - border) // (size + border)
    at = lambda k: border + k * (size + border)
    return np.stack([grid[at(i // ncols) : at(i // ncols) + size, at(i % ncols) : at(i % ncols) + size] for i in range(n)])


def test_logged_reward_means_are_those_of_the_logged_samples(tensorboard, runs):
    """reward/prompt/<p>, reward/mean and reward/std against the epoch's samples, re-scored here.

    The grid (PNG: lossless) holds every sample of the epoch (4 <= 16) and the captions their
    prompts; each cell is scored again with the run's reward function and the per-prompt means
    are recomputed from those scores, independently of the trainer's bookkeeping.
    """
    from herd_jax import config as config_lib
    from herd_jax.rewards import make_reward

    history, _, images, texts = tensorboard
    run_dir, _ = runs.straight
    reward = make_reward(config_lib.load_config([run_dir / "config.toml"]).reward)
    for epoch in range(NUM_EPOCHS):
        grid = np.asarray(Image.open(io.BytesIO(images[("rollout/images", epoch)].encoded_image_string)).convert("RGB"))
        lines = texts[("rollout/images/captions/text_summary", epoch)].strip().splitlines()
        prompts, captioned = zip(*(CAPTION.match(line.split(". ", 1)[1]).groups() for line in lines))
        rescored = reward(_grid_cells(grid, SAMPLES), list(prompts)).astype(np.float64)
        # Each caption's reward is its own image's (printed to 3 decimals).
        np.testing.assert_allclose(rescored, np.asarray(captioned, float), rtol=0, atol=5e-4 + 1e-6)
        prompts = np.asarray(prompts)
        expected = {f"reward/prompt/{p}": rescored[prompts == p].mean() for p in set(prompts)}
        logged = {k: v for k, v in history[epoch].items() if k.startswith("reward/prompt/")}
        assert sorted(logged) == sorted(expected), epoch
        for key, value in expected.items():  # float32 rewards averaged in float32 vs float64 here
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, epoch)
        assert history[epoch]["reward/mean"] == pytest.approx(rescored.mean(), rel=1e-6, abs=1e-7)
        assert history[epoch]["reward/std"] == pytest.approx(rescored.std(), rel=1e-5, abs=1e-7)
    reward.close()


def test_tensorboard_image_grid_with_captions(tensorboard, runs):
    _, _, images, texts = tensorboard
    prompts = (runs.straight[0] / "prompts.txt").read_text().splitlines()
    for epoch in range(NUM_EPOCHS):
        image = images[("rollout/images", epoch)]
        grid = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)  # 4 samples of 32x32 in a 2x2 grid
        assert grid[2:34, 2:34].std() > 0  # a rendered sample, not an empty cell
        lines = texts[("rollout/images/captions/text_summary", epoch)].strip().splitlines()
        assert len(lines) == SAMPLES
        for i, line in enumerate(lines):
            prompt, reward = CAPTION.match(line.split(". ", 1)[1]).groups()
            assert line.startswith(f"{i}. ") and prompt in prompts and np.isfinite(float(reward))


@pytest.fixture(scope="module")
def wandb_run(runs):
    run_dir, code, out = runs.resumed
    assert code == 0, out
    (offline_dir,) = (run_dir / "wandb").glob("offline-run-*")
    (wandb_file,) = offline_dir.glob("run-*.wandb")
    rows = {row["_step"]: row for row in _history_rows(_read_wandb_records(wandb_file))}
    return offline_dir, out, rows


def test_wandb_offline_run_has_every_scalar(wandb_run, runs):
    offline_dir, out, rows = wandb_run
    assert f"wandb sync {offline_dir}" in out  # the one line telling the user how to upload
    _, history = runs.straight
    resumed_epochs = list(range(1, NUM_EPOCHS))
    assert sorted(step for step, row in rows.items() if "reward/mean" in row) == resumed_epochs
    for epoch in resumed_epochs:
        row = rows[epoch]
        for key in REQUIRED:
            assert key in row, (key, epoch)
        # A resumed run is the straight run: its logged values are the same, bit for bit.
        for key in DETERMINISTIC:
            assert row[key] == history[epoch][key], (key, epoch)
        assert {k: v for k, v in row.items() if k.startswith("reward/prompt/")} == {
            k: v for k, v in history[epoch].items() if k.startswith("reward/prompt/")
        }


def test_wandb_image_grid_with_captions(wandb_run):
    offline_dir, _, rows = wandb_run
    for epoch in range(1, NUM_EPOCHS):
        row = rows[epoch]
        assert row["rollout/images/_type"] == "images/separated"
        assert row["rollout/images/count"] == SAMPLES
        assert all(CAPTION.match(c) for c in row["rollout/images/captions"]), row["rollout/images/captions"]
    media = offline_dir / "files" / "media" / "images"
    files = sorted(f for f in media.rglob("*.png") if "eval" not in f.relative_to(media).parts)  # eval/ grids: test_evaluation
    assert len(files) == SAMPLES * (NUM_EPOCHS - 1)
    assert {np.asarray(Image.open(f)).shape for f in files} == {(32, 32, 3)}
