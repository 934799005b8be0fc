"""Evaluate checkpoints: images for fixed prompts and seeds, scored with the run's reward.

  python -m herd_jax.evaluate --checkpoint runs/x                      # the newest checkpoint of a run
  python -m herd_jax.evaluate --checkpoint runs/x --compare            # ... next to the pretrained model (step 0)
  python -m herd_jax.evaluate --checkpoint runs/x/checkpoints/10 --checkpoint runs/x --prompts my.txt --seeds 8

For each model it writes `<out>/<label>.png` (rows: prompts, columns: seeds) and `<out>/<label>.json`
(per-prompt scores and means); with two or more models also `<out>/compare.png` (each prompt's row
holds every model's seeds, in order) and `<out>/compare.json` (per-prompt means side by side).
Seed s gives every prompt and every model the same initial and per-step noise, so comparisons are
paired. The base model, sampler settings and reward are those saved in the first checkpoint's
config; every model is sampled and scored with them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from herd_jax import checkpoint
from herd_jax import config as config_lib

PRETRAINED = "pretrained"


@dataclasses.dataclass(frozen=True)
class Model:
    """One set of UNet params to evaluate."""

    label: str
    params: Any
    step: int  # epochs trained (0: the pretrained model)
    checkpoint: str | None  # the step directory, None for the pretrained model


@dataclasses.dataclass(frozen=True)
class Result:
    model: Model
    images: np.ndarray  # uint8[P, S, H, W, 3]
    scores: np.ndarray  # f32[P, S]


def load_checkpoint(path: str) -> tuple[pathlib.Path, Any]:
    """(step directory, params) of `path`'s newest checkpoint whose params read back."""
    checkpoints = checkpoint.find(path)
    error = None
    for step in checkpoints.steps:
        try:
            return checkpoints.step_dir(step), checkpoint.load_params(checkpoints.step_dir(step))
        except checkpoint.CheckpointError as e:
            error = error or e
            if step != checkpoints.steps[-1]:
                print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr, flush=True)
    raise error


def unet_params(cfg: config_lib.Config, trained: Any, base: Callable[[], Any]) -> Any:
    """The UNet params a checkpoint's `TrainState.params` stands for under `cfg.train.trainable`.

    `all`/`filter` checkpoints hold the whole UNet; `lora` ones hold adapters, merged here into
    the base UNet (`base()` is only called then).
    """
    from herd_jax.trainable import Trainable

    t = cfg.train
    trainable = Trainable(t.trainable, t.trainable_pattern, t.lora_rank, t.lora_alpha)
    if t.trainable != "lora":
        return trained
    return jax.tree.map(np.asarray, trainable.unet_params(trained, base()))


def make_render(policy: Any) -> Callable[..., jax.Array]:
    """jit((unet, vae, cond f32[B,L,D], uncond f32[1,L,D], seeds int32[B]) -> uint8[B,H,W,3]).

    Each image is its own rollout keyed by PRNGKey(seed), so it does not depend on the batch
    it was rendered in.
    """

    def render(unet_params, vae_params, cond, uncond, seeds):
        one = lambda c, seed: policy.rollout(unet_params, vae_params, c[None], uncond, jax.random.PRNGKey(seed)).images[0]
        return jax.vmap(one)(cond, seeds)

    return jax.jit(render)


def evaluate_model(
    model: Model,
    render: Callable[..., jax.Array],
    reward: Callable[[np.ndarray, list[str]], np.ndarray],
    frozen: dict[str, Any],
    prompts: list[str],
    seeds: Sequence[int],
    batch_size: int,
) -> Result:
    """Renders every (prompt, seed) pair in fixed-size batches (the last one padded) and scores it."""
    from herd_jax.rewards import check_finite

    pairs = [(p, s) for p in range(len(prompts)) for s in seeds]
    images, scores = [], []
    params = jax.device_put(model.params)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        ids = np.asarray([p for p, _ in padded], np.int32)
        batch = np.asarray(render(params, frozen["vae"], frozen["prompt_embeds"][ids], frozen["uncond"], jnp.asarray([s for _, s in padded], jnp.int32)))
        batch = batch[: len(chunk)]
        texts = [prompts[p] for p, _ in chunk]
        images.append(batch)
        scores.append(np.asarray(check_finite(reward(batch, texts), texts), np.float32))
    shape = (len(prompts), len(seeds))
    return Result(model, np.concatenate(images).reshape(*shape, *images[0].shape[1:]), np.concatenate(scores).reshape(shape))


def summary(result: Result, prompts: list[str], seeds: Sequence[int], cfg: config_lib.Config) -> dict[str, Any]:
    m = result.model
    return {
        "label": m.label,
        "checkpoint": m.checkpoint,
        "step": m.step,
        "model": cfg.model,
        "reward": cfg.reward.name,
        "seeds": list(seeds),
        "mean": float(result.scores.mean()),
        "prompts": [
            {"prompt": p, "mean": float(row.mean()), "scores": [float(x) for x in row]} for p, row in zip(prompts, result.scores)
        ],
    }


def writable_dir(path: pathlib.Path) -> None:
    """Creates `path` and checks a file can be written in it; raises StorageError (one line) if not."""
    from herd_jax.errors import StorageError, describe

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"cannot write to {path}: {describe(e)}") from e


def write_outputs(results: list[Result], prompts: list[str], seeds: Sequence[int], cfg: config_lib.Config, out: pathlib.Path) -> list[pathlib.Path]:
    """The PNG and JSON files described in the module docstring; returns their paths."""
    from PIL import Image

    from herd_jax.metrics import image_grid

    out.mkdir(parents=True, exist_ok=True)
    written = []
    P, S = len(prompts), len(seeds)
    for r in results:
        png, js = out / f"{r.model.label}.png", out / f"{r.model.label}.json"
        Image.fromarray(image_grid(r.images.reshape(P * S, *r.images.shape[2:]), ncols=S)).save(png)
        js.write_text(json.dumps(summary(r, prompts, seeds, cfg), indent=2) + "\n")
        written += [png, js]
    if len(results) > 1:
        stacked = np.stack([r.images for r in results], axis=1)  # [P, M, S, H, W, 3]
        grid = image_grid(stacked.reshape(-1, *stacked.shape[3:]), ncols=len(results) * S)
        Image.fromarray(grid).save(out / "compare.png")
        labels = [r.model.label for r in results]
        comparison = {
            "models": labels,
            "reward": cfg.reward.name,
            "seeds": list(seeds),
            "means": {r.model.label: float(r.scores.mean()) for r in results},
            "prompts": [{"prompt": p, "means": {r.model.label: float(r.scores[i].mean()) for r in results}} for i, p in enumerate(prompts)],
        }
        (out / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
        written += [out / "compare.png", out / "compare.json"]
    return written


def _labels(step_dirs: list[pathlib.Path]) -> list[str]:
    """step<k>, or <run>-step<k> where two checkpoints share a step."""
    short = [f"step{d.name}" for d in step_dirs]
    return [s if short.count(s) == 1 else f"{d.parent.parent.name}-{s}" for s, d in zip(short, step_dirs)]


def run(
    checkpoints: Sequence[str], *, compare: bool = False, prompts: str | None = None, num_prompts: int = 8, seeds: int = 4, out: str | None = None
) -> list[pathlib.Path]:
    """Evaluates the checkpoints (and with `compare` the pretrained model first); returns the files written."""
    from herd_jax.diffusion import make_policy
    from herd_jax.models import load_pipeline
    from herd_jax.prompts import load_prompts
    from herd_jax.rewards import make_reward
    from herd_jax.trainer import encode_prompts

    if seeds < 1 or num_prompts < 1:
        raise config_lib.ConfigError(f"--seeds and --num_prompts must be >= 1, got {seeds} and {num_prompts}")
    loaded = [load_checkpoint(c) for c in checkpoints]
    first = loaded[0][0]
    out_dir = pathlib.Path(out) if out else first.parent.parent / "eval"
    writable_dir(out_dir)  # fail before the sampling, not after it
    cfg = config_lib.load_config([checkpoint.saved_config(checkpoint.find(first))])
    prompt_list = load_prompts(prompts) if prompts else checkpoint.saved_prompts(first)[:num_prompts]
    sd = load_pipeline(cfg.model)
    expected = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), sd.params["unet"])
    models = [Model(PRETRAINED, sd.params["unet"], 0, None)] if compare else []
    for label, (step_dir, trained) in zip(_labels([d for d, _ in loaded]), loaded):
        params = unet_params(config_lib.load_config([checkpoint.saved_config(checkpoint.find(step_dir))]), trained, lambda: sd.params["unet"])
        if jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), params) != expected:
            raise checkpoint.CheckpointError(f"{step_dir} holds UNet params of another shape than {cfg.model}")
        models.append(Model(label, params, int(step_dir.name), str(step_dir)))

    s = cfg.sample
    policy = make_policy(sd, num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale)
    prompt_embeds, uncond = encode_prompts(sd, prompt_list, s.negative_prompt)
    frozen = {"vae": sd.params["vae"], "prompt_embeds": prompt_embeds, "uncond": uncond}
    render = make_render(policy)
    reward = make_reward(cfg.reward)
    seed_list = list(range(seeds))
    try:
        results = [evaluate_model(m, render, reward, frozen, prompt_list, seed_list, s.batch_size) for m in models]
    finally:
        reward.close()
    written = write_outputs(results, prompt_list, seed_list, cfg, out_dir)
    for r in results:
        print(f"{r.model.label:>12s}: mean {cfg.reward.name} {r.scores.mean():+.4f} over {len(prompt_list)} prompts x {seeds} seeds")
    print(f"wrote {', '.join(str(w) for w in written)}")
    return written


def parser() -> argparse.ArgumentParser:
    from herd_jax.errors import ArgumentParser

    summary_line, _, details = __doc__.partition("\n\n")
    p = ArgumentParser(prog="python -m herd_jax.evaluate", description=summary_line, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="DIR", help="run, checkpoints/ or step directory (newest checkpoint); repeat to compare")
    p.add_argument("--compare", action="store_true", help="also evaluate the pretrained model the run started from (step 0)")
    p.add_argument("--prompts", help="built-in prompt set or a text file, one prompt per line (default: the run's first --num_prompts prompts)")
    p.add_argument("--num_prompts", type=int, default=8, help="prompts taken from the run's list when --prompts is not given (default 8)")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt (default 4)")
    p.add_argument("--out", help="output directory (default: <run_dir>/eval)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code (herd_jax/errors.py lists them)."""
    from herd_jax.errors import quiet_libraries, report

    quiet_libraries()
    args = parser().parse_args(argv)
    return report(lambda: run(args.checkpoint, compare=args.compare, prompts=args.prompts, num_prompts=args.num_prompts, seeds=args.seeds, out=args.out))


if __name__ == "__main__":
    sys.exit(main())
