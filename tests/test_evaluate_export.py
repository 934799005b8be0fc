"""herd_jax.evaluate and herd_jax.export on the shared tiny run's checkpoints (tests/test_checkpoint.py)."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from herd_jax import checkpoint, evaluate, export
from test_checkpoint import tiny_runs
from torch_threads import torch_one_thread

pytestmark = [
    pytest.mark.xdist_group("tiny_runs"),  # the session's shared tiny runs live on one worker
    pytest.mark.usefixtures("reuse_builds"),  # in-process runs of one config share a build (tests/builds.py)
]

CELL = 32 + 2  # a 32x32 tiny-model image plus image_grid's border


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    return tiny_runs(tmp_path_factory).straight[0]




def _cells(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Cuts an image_grid back into uint8[rows, cols, 32, 32, 3]."""
    return np.stack([np.stack([grid[2 + r * CELL : r * CELL + CELL, 2 + c * CELL : c * CELL + CELL] for c in range(cols)]) for r in range(rows)])


# --- evaluate ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    argv = ["--checkpoint", str(run_dir / "checkpoints" / "1"), "--checkpoint", str(run_dir), "--compare", "--seeds", "2", "--num_prompts", "3", "--out", str(out)]
    assert evaluate.main(argv) == 0
    return out


def test_evaluate_writes_grids_and_scores(evaluation, run_dir):
    from herd_jax.rewards import make_reward
    from herd_jax import config as config_lib

    names = {p.name for p in evaluation.iterdir()}
    assert names == {f"{m}.{ext}" for m in ("pretrained", "step1", "step3", "compare") for ext in ("png", "json")}
    prompts = checkpoint.saved_prompts(run_dir / "checkpoints" / "3")[:3]
    cfg = config_lib.load_config([run_dir / "config.toml"])
    reward = make_reward(cfg.reward)
    for label, step in [("pretrained", 0), ("step1", 1), ("step3", 3)]:
        summary = json.loads((evaluation / f"{label}.json").read_text())
        assert summary["step"] == step and summary["reward"] == cfg.reward.name and summary["seeds"] == [0, 1]
        assert [p["prompt"] for p in summary["prompts"]] == prompts
        grid = np.asarray(Image.open(evaluation / f"{label}.png").convert("RGB"))
        assert grid.shape == (3 * CELL + 2, 2 * CELL + 2, 3)
        # The JSON's scores are the reward of the images in the PNG (prompt rows, seed columns).
        cells = _cells(grid, 3, 2)
        for row, entry in zip(cells, summary["prompts"]):
            np.testing.assert_allclose(entry["scores"], reward(row, [entry["prompt"]] * 2), rtol=1e-6)
            assert entry["mean"] == pytest.approx(np.mean(entry["scores"]))
    comparison = json.loads((evaluation / "compare.json").read_text())
    assert comparison["models"] == ["pretrained", "step1", "step3"]
    assert set(comparison["prompts"][0]["means"]) == {"pretrained", "step1", "step3"}
    compare = np.asarray(Image.open(evaluation / "compare.png").convert("RGB"))
    assert compare.shape == (3 * CELL + 2, 3 * 2 * CELL + 2, 3)
    # Each row holds pretrained | step1 | step3 for the same seeds: the fine-tuned images moved.
    cells = _cells(compare, 3, 6)
    np.testing.assert_array_equal(cells[:, 4:6], _cells(np.asarray(Image.open(evaluation / "step3.png").convert("RGB")), 3, 2))
    assert not np.array_equal(cells[:, 0:2], cells[:, 4:6])


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--checkpoint", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
        (["--checkpoint", "{run}", "--prompts", "/nonexistent/prompts.txt"], "neither a built-in set"),
        (["--checkpoint", "{run}", "--seeds", "0"], "--seeds and --num_prompts must be >= 1"),
        (["--checkpoint"], "expected one argument"),
    ],
)
def test_evaluate_bad_input_is_one_line(argv, pattern, run_dir, capsys):
    try:
        code = evaluate.main([a.replace("{run}", str(run_dir)) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and pattern in err, err


# --- export ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "pipeline"
    with torch_one_thread():
        assert export.main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    return out


def test_export_loads_in_pytorch_and_matches_flax(exported, run_dir, tiny_sd):
    import jax
    import torch
    from diffusers import StableDiffusionPipeline

    with torch_one_thread():
        pipeline = StableDiffusionPipeline.from_pretrained(exported)
        rng = np.random.default_rng(0)
        sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        timesteps = np.array([17, 901], dtype=np.int32)
        context = rng.standard_normal((2, 77, 32), dtype=np.float32)
        expected = pipeline.unet(torch.from_numpy(sample), torch.from_numpy(timesteps).long(), torch.from_numpy(context)).sample.numpy()
    params = checkpoint.load_params(run_dir / "checkpoints" / "3")
    unet = jax.jit(lambda p, x, t, c: tiny_sd.unet.apply({"params": p}, x, t, c))
    got = np.asarray(unet(params, sample, timesteps, context))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).mean() > 1e-2  # a non-trivial output
    # The exported UNet is the fine-tuned one, not the base model's.
    base = np.asarray(unet(tiny_sd.params["unet"], sample, timesteps, context))
    assert np.abs(base - got).max() > 1e-3
    provenance = json.loads((exported / "herd_jax_export.json").read_text())
    assert provenance["step"] == 3 and provenance["base_model"] == "tiny"


def test_export_keeps_the_other_components(exported):
    from herd_jax.models import tiny_model_path

    source = tiny_model_path()
    for rel in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "model_index.json"):
        assert (exported / rel).read_bytes() == (source / rel).read_bytes(), rel
    assert sorted(p.name for p in (exported / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_export_refuses_a_non_empty_out(exported, run_dir, capsys):
    assert export.main(["--checkpoint", str(run_dir), "--out", str(exported)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty directory" in err


def test_export_merges_lora_adapters(tmp_path, tiny_sd):
    """A LoRA checkpoint holds only adapters; the export is the base UNet with them merged in."""
    import flax.struct
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel

    from herd_jax import config as config_lib
    from herd_jax.trainable import Trainable
    from test_checkpoint import TINY, TINY_FILE

    @flax.struct.dataclass
    class State:
        step: jax.Array
        params: dict

    cfg = config_lib.load_config([TINY_FILE], TINY + [f"run_dir={str(tmp_path / 'run')!r}", "num_epochs=1", "train.trainable='lora'"])
    t = cfg.train
    trainable = Trainable(t.trainable, t.trainable_pattern, t.lora_rank, t.lora_alpha)
    adapters = trainable.init(tiny_sd.params["unet"], jax.random.PRNGKey(0))
    adapters = {path: {"a": ab["a"], "b": jax.random.normal(jax.random.PRNGKey(i), ab["b"].shape) * 0.5} for i, (path, ab) in enumerate(adapters.items())}
    manager = checkpoint.make_manager(cfg)
    assert checkpoint.save(manager, State(jnp.int32(1), adapters), cfg, ["a cat"])
    checkpoint.close(manager)

    with torch_one_thread():
        assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
        model = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
        rng = np.random.default_rng(1)
        sample = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
        timesteps = np.array([500], dtype=np.int32)
        context = rng.standard_normal((1, 77, 32), dtype=np.float32)
        expected = model(torch.from_numpy(sample), torch.from_numpy(timesteps).long(), torch.from_numpy(context)).sample.numpy()
    unet = jax.jit(lambda p, x, t, c: tiny_sd.unet.apply({"params": p}, x, t, c))
    merged = np.asarray(unet(trainable.unet_params(adapters, tiny_sd.params["unet"]), sample, timesteps, context))
    np.testing.assert_allclose(merged, expected, atol=1e-4, rtol=0)
    base = np.asarray(unet(tiny_sd.params["unet"], sample, timesteps, context))
    assert np.abs(base - merged).max() > 1e-3  # the adapters changed the UNet
