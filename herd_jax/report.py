"""What a person sees of a run: a short header, pictures in the run directory, a closing summary.

- `header`: model, algorithm, reward, devices, samples per epoch, the run directory and how to
  watch it — instead of a dump of the whole config (that is in run_dir/config.toml and behind
  `train.py --print_config`).
- `RewardCurve`: run_dir/reward.png, rewritten after every epoch's log call: the fresh samples'
  reward (mean ± std) and the evaluation reward per epoch, and the same against reward queries.
- `sample_grid`: run_dir/samples/epoch_XXXX.png, the evaluation's fixed prompts (rows) × seeds
  (columns) after XXXX epochs, each row captioned with its prompt and each cell with its reward.
- `closing`: epochs, reward first → last, queries, wall time, the last checkpoint and the
  commands that evaluate, export and resume it.
"""
from __future__ import annotations

import pathlib
from typing import Any, Sequence

import numpy as np

from herd_jax import plots

SAMPLES = "samples"


def header(cfg: Any, *, num_params: int, devices: Sequence[Any], run_dir: pathlib.Path) -> str:
    s = cfg.sample
    samples = s.batch_size * s.num_batches_per_epoch
    platform = devices[0].platform if devices else "?"
    trainable = {"all": "full fine-tuning", "filter": f"params matching {cfg.train.trainable_pattern!r}", "lora": f"LoRA rank {cfg.train.lora_rank}"}[cfg.train.trainable]
    lines = [
        f"herd-jax: {cfg.algorithm.name} on reward {cfg.reward.name!r}, prompts {cfg.prompts!r}",
        f"  model      {cfg.model} ({num_params / 1e6:.1f}M trained params: {trainable}; {cfg.precision})",
        f"  sampling   {samples} samples/epoch ({s.num_batches_per_epoch} x {s.batch_size}), {s.num_steps} DDIM steps, guidance {s.guidance_scale}; {cfg.num_epochs} epochs",
        f"  devices    {len(devices)} x {platform} (batch split over mesh axis 'data')",
        f"  run dir    {run_dir}  (config.toml, reward.png, {SAMPLES}/, checkpoints/, train.log)",
    ]
    if cfg.logging.log_with == "tensorboard":
        lines.append(f"  watch      tensorboard --logdir {run_dir / 'tensorboard'}")
    elif cfg.logging.log_with == "wandb":
        lines.append(f"  watch      wandb (in {run_dir / 'wandb'}; offline without a login: `wandb sync` it later)")
    else:
        lines.append(f"  watch      {run_dir / 'reward.png'} (logging.log_with=none)")
    return "\n".join(lines)


class RewardCurve:
    """Accumulates each epoch's reward and writes run_dir/reward.png."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.epochs: list[int] = []
        self.mean: list[float] = []
        self.std: list[float] = []
        self.queries: list[float] = []
        self.eval_epochs: list[int] = []
        self.eval_queries: list[float] = []
        self.eval_mean: list[float] = []

    def add_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.append(epoch)  # epoch e's samples come from the policy trained for e epochs
        self.mean.append(metrics["reward/mean"])
        self.std.append(metrics["reward/std"])
        self.queries.append(metrics["reward/queries"])

    def add_eval(self, epochs_done: int, queries: float, mean: float) -> None:
        self.eval_epochs.append(epochs_done)
        self.eval_queries.append(queries)
        self.eval_mean.append(mean)

    def write(self) -> None:
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        fresh = lambda x: plots.Series("fresh samples (mean ± std)", np.asarray(x), mean, mean - std, mean + std)
        evaluation = lambda x: plots.Series("eval (fixed prompts, seeds)", np.asarray(x), np.asarray(self.eval_mean))
        panels = [
            plots.line_plot([fresh(self.epochs), evaluation(self.eval_epochs)], title="reward per epoch", xlabel="epochs trained", width=700, height=420),
            plots.line_plot([fresh(self.queries), evaluation(self.eval_queries)], title="reward against reward queries", xlabel="reward queries", width=700, height=420),
        ]
        plots.side_by_side(panels, self.path)


def sample_grid(images: np.ndarray, prompts: Sequence[str], rewards: np.ndarray, path: pathlib.Path, title: str) -> None:
    """uint8[P, S, H, W, 3] as a captioned grid PNG: prompts as rows, seeds as columns."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    p, s, h, w, _ = images.shape
    cell, label, gap, top = max(w, 64), 150, 4, 24
    scale = cell // w if cell % w == 0 else 1
    cell_h, text_h = h * scale, 14
    out = Image.new("RGB", (label + s * (cell + gap) + gap, top + p * (cell_h + text_h + gap) + gap), "white")
    draw = ImageDraw.Draw(out)
    draw.text((gap, 6), title, fill="black", font=font)
    for i in range(p):
        y = top + i * (cell_h + text_h + gap)
        draw.text((gap, y + cell_h // 2 - 6), prompts[i][:24], fill="black", font=font)
        for j in range(s):
            x = label + gap + j * (cell + gap)
            out.paste(Image.fromarray(images[i, j]).resize((w * scale, cell_h), Image.NEAREST), (x, y))
            draw.text((x, y + cell_h + 1), f"{rewards[i, j]:.3f}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def grid_path(run_dir: pathlib.Path, epochs_done: int) -> pathlib.Path:
    return run_dir / SAMPLES / f"epoch_{epochs_done:04d}.png"


def closing(history: Sequence[dict[str, float]], curve: RewardCurve, *, run_dir: pathlib.Path, last_checkpoint: pathlib.Path | None,
            wall_s: float, start_epoch: int) -> str:
    minutes, seconds = divmod(int(round(wall_s)), 60)
    lines = []
    if history:
        first, last = history[0], history[-1]
        lines.append(
            f"done: epochs {start_epoch}..{start_epoch + len(history) - 1} in {minutes}m{seconds:02d}s; reward of fresh samples "
            f"{first['reward/mean']:.4f} (first epoch) -> {last['reward/mean']:.4f} (last); {last['reward/queries']:.0f} reward queries"
        )
    if len(curve.eval_mean) > 1:
        lines.append(f"  eval       {curve.eval_mean[0]:.4f} after {curve.eval_epochs[0]} epochs -> {curve.eval_mean[-1]:.4f} after {curve.eval_epochs[-1]} (same prompts and noise)")
    lines.append(f"  pictures   {run_dir / 'reward.png'}" + (f", {run_dir / SAMPLES}/epoch_*.png" if curve.eval_epochs else ""))
    if last_checkpoint is not None:
        lines += [
            f"  checkpoint {last_checkpoint}",
            f"  evaluate   python -m herd_jax.evaluate --checkpoint {run_dir} --compare",
            f"  export     python -m herd_jax.export --checkpoint {run_dir} --out {run_dir / 'export'}",
            f"  resume     python train.py --run_dir {run_dir} --resume num_epochs=<more>",
        ]
    return "\n".join(lines)
