"""Sidecar process protocol/restarts, and the ImageReward reward scored through it.

The sidecar tests use tiny stdlib-only workers run by this interpreter, so they run everywhere.
The ImageReward tests need the environment built by ``./install_image_reward.sh`` (skipped,
saying so, when it is absent): they build a tiny random ImageReward with the package's own
classes, save it in the published format, and compare the sidecar's scores with the package's
own ``ImageReward.score`` run in-process in that environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from herd_jax.config import RewardConfig
from herd_jax.rewards import RewardError, make_reward
from herd_jax.rewards.imagereward import (
    ENV_DIR_NAME,
    PYTHON_ENV_VAR,
    WORKER,
    ImageRewardScorer,
    find_python,
)
from herd_jax.rewards.sidecar import Sidecar

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Generic sidecar, with stdlib-only workers.

# score = mean pixel value + len(prompt); behaviour switches are marker files in the worker's dir.
TOY_WORKER = """
import os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))

def _flag(name):
    return os.path.exists(os.path.join(HERE, name))

def load(args):
    with open(os.path.join(HERE, "spawns"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    if _flag("fail_load"):
        raise FileNotFoundError("no weights at /nowhere/model.pt")
    print("toy worker ready")  # stdout of a worker must not reach the protocol pipe

    def score(images, prompts):
        if _flag("slow"):
            open(os.path.join(HERE, "busy"), "w").close()
            time.sleep(30)
        if _flag("hang_once"):
            os.remove(os.path.join(HERE, "hang_once"))
            time.sleep(30)
        if _flag("crash"):
            print("toy worker: about to crash", file=sys.stderr, flush=True)
            os._exit(3)
        if any(p == "bad" for p in prompts):
            raise ValueError("cannot score the prompt 'bad'")
        flat = images.reshape(len(images), -1)
        return [float(row.mean()) + len(p) for row, p in zip(flat, prompts)]
    return score
"""


def toy_expected(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    return (images.reshape(len(images), -1).mean(1) + np.array([len(p) for p in prompts])).astype(
        np.float32
    )


@pytest.fixture
def toy(tmp_path):
    worker = tmp_path / "toy_worker.py"
    worker.write_text(TOY_WORKER)
    sidecars = []

    def make(*, flags=(), **kwargs):
        for flag in flags:
            (tmp_path / flag).touch()
        kwargs.setdefault("timeout_s", 20.0)
        kwargs.setdefault("max_restarts", 2)
        sidecar = Sidecar(worker, ["--x"], name="toy", log_path=tmp_path / "toy.log", **kwargs)
        sidecars.append(sidecar)
        return sidecar

    make.dir = tmp_path
    make.spawns = lambda: (
        len((tmp_path / "spawns").read_text().split()) if (tmp_path / "spawns").exists() else 0
    )
    yield make
    for sidecar in sidecars:
        sidecar.close()


IMAGES = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
PROMPTS = ["a", "bb", ""]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sidecar_scores_and_restarts_after_sigkill_between_calls(toy):
    sidecar = toy()
    sidecar.start()
    np.testing.assert_allclose(sidecar(IMAGES, PROMPTS), toy_expected(IMAGES, PROMPTS), rtol=1e-6)
    first = sidecar.pid
    os.kill(first, signal.SIGKILL)
    np.testing.assert_allclose(sidecar(IMAGES, PROMPTS), toy_expected(IMAGES, PROMPTS), rtol=1e-6)
    assert sidecar.pid != first and toy.spawns() == 2
    log = sidecar.log_path.read_text()
    assert "toy worker ready" in log and "killed by SIGKILL; restarting" in log


def test_sidecar_restarts_after_sigkill_mid_call(toy):
    sidecar = toy(flags=["slow"])
    sidecar.start()
    victim = sidecar.pid

    def kill_when_busy():
        while not (toy.dir / "busy").exists():
            time.sleep(0.01)
        (toy.dir / "slow").unlink()  # the restarted worker answers at once
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    scores = sidecar(IMAGES, PROMPTS)
    killer.join()
    np.testing.assert_allclose(scores, toy_expected(IMAGES, PROMPTS), rtol=1e-6)
    assert sidecar.pid != victim and toy.spawns() == 2


def test_sidecar_timeout_kills_restarts_and_resends(toy):
    sidecar = toy(flags=["hang_once"], timeout_s=1.0)
    sidecar.start()
    t0 = time.monotonic()
    np.testing.assert_allclose(sidecar(IMAGES, PROMPTS), toy_expected(IMAGES, PROMPTS), rtol=1e-6)
    assert 1.0 <= time.monotonic() - t0 < 15
    assert (
        toy.spawns() == 2
        and "timed out waiting for the answer after 1 s" in sidecar.log_path.read_text()
    )


def test_sidecar_always_crashing_worker_raises_after_max_restarts(toy):
    sidecar = toy(flags=["crash"], max_restarts=2)
    sidecar.start()
    with pytest.raises(RewardError) as info:
        sidecar(IMAGES, PROMPTS)
    message = str(info.value)
    assert "\n" not in message
    assert "failed 3 times in a row" in message and "exited with code 3" in message
    assert "toy worker: about to crash" in message and str(sidecar.log_path) in message
    assert toy.spawns() == 3


def test_sidecar_always_hanging_worker_raises_timeout(toy):
    sidecar = toy(flags=["slow"], timeout_s=0.5, max_restarts=1)
    sidecar.start()
    with pytest.raises(
        RewardError, match=r"failed 2 times in a row \(last: timed out .* after 0.5 s"
    ):
        sidecar(IMAGES, PROMPTS)
    assert toy.spawns() == 2


def test_sidecar_reports_worker_errors_without_restarting(toy):
    sidecar = toy()
    sidecar.start()
    pid = sidecar.pid
    with pytest.raises(RewardError, match="ValueError: cannot score the prompt 'bad'"):
        sidecar(IMAGES, ["a", "bad", "c"])
    np.testing.assert_allclose(sidecar(IMAGES, PROMPTS), toy_expected(IMAGES, PROMPTS), rtol=1e-6)
    assert sidecar.pid == pid


def test_sidecar_load_error_is_one_clear_line_without_retries(toy):
    sidecar = toy(flags=["fail_load"])
    with pytest.raises(RewardError) as info:
        sidecar.start()
    assert str(info.value).startswith(
        "toy: worker could not start: FileNotFoundError: no weights at /nowhere/model.pt"
    )
    assert "\n" not in str(info.value) and toy.spawns() == 1


def test_sidecar_restart_and_close(toy):
    sidecar = toy()
    sidecar.start()
    first = sidecar.pid
    sidecar.restart()
    assert sidecar.pid != first and _gone(first)
    second = sidecar.pid
    sidecar.close()
    sidecar.close()
    assert sidecar.pid is None and _gone(second)
    with pytest.raises(RewardError, match="used after close"):
        sidecar(IMAGES, PROMPTS)


def test_sidecar_worker_stops_at_interpreter_exit(tmp_path):
    (tmp_path / "toy_worker.py").write_text(TOY_WORKER)
    script = textwrap.dedent(
        f"""
        from herd_jax.rewards.sidecar import Sidecar
        sidecar = Sidecar({str(tmp_path / 'toy_worker.py')!r}, name="toy")
        sidecar.start()
        print(sidecar.pid, flush=True)
    """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert _gone(int(out.stdout.split()[-1]))


def test_missing_environment_says_how_to_build_it(monkeypatch):
    monkeypatch.delenv(PYTHON_ENV_VAR, raising=False)
    with pytest.raises(RewardError, match="install_image_reward.sh"):
        find_python("/nonexistent/bin/python")
    with pytest.raises(RewardError, match="install_image_reward.sh"):
        make_reward(RewardConfig(name="imagereward", imagereward_python="/nonexistent/bin/python"))


# --------------------------------------------------------------------------------------------
# ImageReward through the sidecar (needs the environment from install_image_reward.sh).


def _imagereward_python() -> str | None:
    candidate = os.environ.get(PYTHON_ENV_VAR) or str(REPO / ENV_DIR_NAME / "bin" / "python")
    return candidate if os.path.isfile(candidate) else None


IR_PYTHON = _imagereward_python()
if IR_PYTHON is None and os.environ.get("CI"):
    raise RuntimeError("CI must build the ImageReward environment first (bash install_image_reward.sh)")
needs_env = pytest.mark.skipif(
    IR_PYTHON is None,
    reason=f"ImageReward environment not built: run ./install_image_reward.sh (or set {PYTHON_ENV_VAR})",
)

WORDS = [
    "a",
    "photo",
    "of",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "car",
    "tree",
    "on",
    "the",
    "grass",
    "sky",
]
TINY_PROMPTS = [
    "a photo of a red cat",
    "a blue car",
    "a dog on the grass",
    "green tree under the sky",
]
TINY_MED_CONFIG = (
    {  # BLIP's med_config.json, made small; hidden_size stays 768 (ImageReward's MLP(768))
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": 0,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
)

# Runs in the ImageReward environment: builds a tiny random ImageReward with the package's own
# classes (its BLIP ViT made tiny), saves it as the published ImageReward.pt state dict, and scores
# the test images with the package's own per-image ImageReward.score.
BUILD_AND_SCORE = """
import importlib, json, sys
import numpy as np, torch
from PIL import Image
out, worker_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, worker_dir)
import _imagereward_worker  # only for its import-time compatibility patches
_imagereward_worker.import_image_reward(out + "/bert")
blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
vit = importlib.import_module("ImageReward.models.BLIP.vit")
blip_pretrain.create_vit = lambda *args, **kwargs: (
    vit.VisionTransformer(img_size=224, patch_size=32, embed_dim=64, depth=1, num_heads=1), 64)
torch.manual_seed(0)
model = importlib.import_module("ImageReward.ImageReward").ImageReward(out + "/med_config.json", device="cpu")
with torch.no_grad():  # spread the random scores: the package's MLP init makes them all ~ -0.1618
    for layer in model.mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            layer.weight.normal_(0.0, layer.in_features ** -0.5)
            layer.bias.normal_(0.0, 0.1)
    model.blip.visual_encoder.pos_embed.normal_(0.0, 0.5)
model.eval()
torch.save(model.state_dict(), out + "/ImageReward.pt")
images = np.load(out + "/images.npy")
prompts = json.load(open(out + "/prompts.json"))
with torch.no_grad():
    scores = [model.score(p, Image.fromarray(im)) for im, p in zip(images, prompts)]
    swapped = [model.score(p, Image.fromarray(im)) for im, p in zip(images, prompts[::-1])]
json.dump({"scores": scores, "swapped": swapped}, open(out + "/reference.json", "w"))
"""


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """A tiny ImageReward checkpoint + local BERT vocab + reference scores from the package."""
    out = tmp_path_factory.mktemp("imagereward")
    (out / "bert").mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (out / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (out / "med_config.json").write_text(
        json.dumps({**TINY_MED_CONFIG, "vocab_size": len(vocab) + 2})
    )  # + [DEC] [ENC]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(len(TINY_PROMPTS), 48, 64, 3), dtype=np.uint8)
    images[:2, :, :32] = rng.integers(
        0, 256, size=(2, 1, 1, 3), dtype=np.uint8
    )  # flat halves: some structure
    np.save(out / "images.npy", images)
    (out / "prompts.json").write_text(json.dumps(TINY_PROMPTS))
    done = subprocess.run(
        [IR_PYTHON, "-I", "-c", BUILD_AND_SCORE, str(out), str(WORKER.parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads((out / "reference.json").read_text())
    cfg = RewardConfig(
        name="imagereward",
        imagereward_checkpoint=str(out / "ImageReward.pt"),
        imagereward_bert=str(out / "bert"),
        imagereward_python=IR_PYTHON,
        timeout_s=120.0,
        max_restarts=2,
    )
    return dict(
        cfg=cfg,
        images=images,
        reference=np.float32(reference["scores"]),
        swapped=np.float32(reference["swapped"]),
        dir=out,
    )


@pytest.fixture(scope="module")
def scorer(tiny_imagereward):
    reward = make_reward(tiny_imagereward["cfg"])
    yield reward
    reward.close()


@needs_env
def test_imagereward_sidecar_matches_package_in_process(scorer, tiny_imagereward):
    images, reference = tiny_imagereward["images"], tiny_imagereward["reference"]
    assert isinstance(scorer, ImageRewardScorer) and scorer.name == "imagereward"
    scores = scorer(images, TINY_PROMPTS)
    assert scores.dtype == np.float32 and scores.shape == (len(TINY_PROMPTS),)
    np.testing.assert_allclose(scores, reference, atol=1e-5, rtol=0)
    # The comparison can fail: scores differ between images and depend on the prompt.
    assert np.ptp(reference) > 0.1
    swapped = scorer(images, TINY_PROMPTS[::-1])
    np.testing.assert_allclose(swapped, tiny_imagereward["swapped"], atol=1e-5, rtol=0)
    assert np.abs(swapped - scores).max() > 1e-3
    # Batch order does not matter (each image is scored independently).
    np.testing.assert_allclose(
        scorer(images[::-1], TINY_PROMPTS[::-1]), reference[::-1], atol=1e-5, rtol=0
    )


@needs_env
def test_imagereward_restarts_after_sigkill_between_calls_and_during_restart(
    scorer, tiny_imagereward
):
    images, reference = tiny_imagereward["images"], tiny_imagereward["reference"]
    first = scorer.pid
    os.kill(first, signal.SIGKILL)
    np.testing.assert_allclose(scorer(images, TINY_PROMPTS), reference, atol=1e-5, rtol=0)
    second = scorer.pid
    assert second != first

    # Kill the worker, then kill its replacement while it is still loading the model.
    os.kill(second, signal.SIGKILL)

    def kill_replacement():
        deadline = time.monotonic() + 60
        while scorer.pid in (None, second) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(scorer.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_replacement)
    killer.start()
    scores = scorer(images, TINY_PROMPTS)
    killer.join()
    np.testing.assert_allclose(scores, reference, atol=1e-5, rtol=0)
    assert scorer.pid not in (first, second)
    assert scorer.sidecar.log_path.read_text().count("killed by SIGKILL; restarting") >= 3


@needs_env
def test_imagereward_always_crashing_worker_raises_after_max_restarts(tiny_imagereward):
    cfg = dataclasses.replace(tiny_imagereward["cfg"], max_restarts=1)
    before = {
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
    }  # e.g. the module's scorer
    seen: set[int] = set()
    stop = threading.Event()
    scorers: list[ImageRewardScorer] = []

    def kill_every_worker():  # every worker dies while it loads: it never comes up
        while not stop.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit() and int(proc.name) not in seen | before:
                    try:
                        cmdline = (proc / "cmdline").read_bytes()
                    except OSError:
                        continue
                    if (
                        str(WORKER).encode() in cmdline
                        and str(tiny_imagereward["dir"]).encode() in cmdline
                    ):
                        seen.add(int(proc.name))
                        try:
                            os.kill(int(proc.name), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            time.sleep(0.01)

    killer = threading.Thread(target=kill_every_worker)
    killer.start()
    try:
        with pytest.raises(
            RewardError, match=r"imagereward: worker failed 2 times in a row .*killed by SIGKILL"
        ):
            scorers.append(ImageRewardScorer(cfg))
    finally:
        stop.set()
        killer.join()
        for s in scorers:
            s.close()
    assert len(seen) == 2


@needs_env
def test_imagereward_without_weights_fails_with_one_clear_line(
    tmp_path, monkeypatch, tiny_imagereward
):
    cfg = dataclasses.replace(
        tiny_imagereward["cfg"],
        imagereward_checkpoint="ImageReward-v1.0",
        imagereward_med_config="",
    )
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": tmp_path / "hf",
        "HOME": tmp_path,
    }.items():
        monkeypatch.setenv(
            name, str(value)
        )  # the worker inherits them: no cached download can be found
    with pytest.raises(RewardError) as info:
        ImageRewardScorer(cfg, log_path=tmp_path / "ir.log")
    message = str(info.value)
    assert "\n" not in message and "imagereward: worker could not start" in message
    assert "hub download failed" in message and "offline" in message


def _build(tiny_imagereward, tmp_path):
    """ddpo on the tiny SD scored by the tiny ImageReward: (setup, initial state)."""
    from herd_jax import config as config_lib
    from herd_jax import trainer

    prompts = tmp_path / "prompts.txt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
    repo = Path(__file__).resolve().parents[1]
    cfg = config_lib.load_config(
        [str(repo / "configs" / "tiny.toml"), str(repo / "tests" / "fast.toml")],
        [f"run_dir={str(tmp_path / 'run')!r}", 'logging.log_with="none"', "checkpoint.save_every=0",
         'algorithm.name="ddpo"', f"prompts={str(prompts)!r}"],
    )
    cfg.reward = dataclasses.replace(tiny_imagereward["cfg"])
    return trainer.build(cfg)


def _train_two_epochs(setup, initial, kill_sidecar: bool) -> tuple[list[np.ndarray], str]:
    """Two epochs from a copy of `initial` scored by `setup.reward` (closed after); optionally SIGKILL its worker mid-run."""
    import jax
    import jax.numpy as jnp

    from herd_jax import trainer

    state = jax.tree.map(jnp.copy, initial)  # the update donates its inputs
    rewards = []
    try:
        for epoch in range(2):
            if kill_sidecar and epoch == 1:  # the worker that scored epoch 0 dies before epoch 1 is scored
                os.kill(setup.reward.pid, signal.SIGKILL)
            state, metrics, samples = trainer.run_epoch(setup, state)
            rewards.append(samples.rewards)
    finally:
        setup.reward.close()
    return rewards, setup.reward.sidecar.log_path.read_text()


@needs_env
def test_run_continues_with_nothing_lost_when_the_sidecar_is_killed(tiny_imagereward, tmp_path):
    setup, initial = _build(tiny_imagereward, tmp_path)  # one build (its compiles) for both runs
    straight, _ = _train_two_epochs(setup, initial, kill_sidecar=False)
    with_new_sidecar = dataclasses.replace(setup, reward=make_reward(setup.cfg.reward))
    killed, log = _train_two_epochs(with_new_sidecar, initial, kill_sidecar=True)
    assert "killed by SIGKILL; restarting" in log
    for a, b in zip(straight, killed):
        assert np.isfinite(b).all() and len(b) == len(a)
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
