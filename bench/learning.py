#!/usr/bin/env python
"""Learning benchmark: ddpo, ddpg, dpok and herd on the tiny model, reward against reward queries.

Each algorithm trains the embedded tiny SD (configs/learning.toml) on a task until it has spent
a fixed budget of reward queries (herd's relabeling queries count: the trainer's
"reward/queries"), over several seeds. The curve is the reward of the FRESH samples under their
own prompts, never relabeled rewards: "reward/mean", balanced over prompts (the mean of the
per-prompt means, so the random prompt mix of a small batch is not noise in the curve).

Writes to --out: learning.csv (one row per epoch and run), learning_<task>.png (mean over seeds
± spread, min to max, against reward queries) and learning.md (the table printed at the end):
reward at the start and after the budget, and the reward queries each algorithm needs to reach
DDPO's final reward (the first point where its seed-mean curve gets there).

Each variant is built once (`trainer.build`) and its seeds rerun from a copy of the initial
state, so its compiled functions are reused; the persistent compile cache in .cache/jax serves
repeated invocations. A seed changes every sampling / training key; the model weights are the
tiny model's fixed ones (and dpok's value network starts from the same init).

Notes (measured on the tiny model, 2 CPU cores):
- The tiny model's VAE has one GroupNorm group (tiny model v2). With diffusers' default 32 groups
  of 1-2 channels every norm erased the latent's per-channel means, an image's colour barely
  depended on its latent (colour reward std ~0.009) and nothing learned in minutes; with one
  group colour follows the latent as in real SD (linear R² of the reward on the latent 0.2-0.4 ->
  0.5-0.75) and every algorithm raises the `color` reward at lr 1e-2.
- "color" uses one colour in two prompts: all algorithms learn it in the budget. "color4" (four
  colours: the goal decides the reward, so relabeling changes it) moves by < 0.01 in 960 queries
  for every algorithm (3 seeds: ddpo −0.003, herd +0.008, herd with `best` +0.008).
- "color2" (orange vs blue ball, scored alike by the untrained model: 0.114 / 0.101) and its sparse
  twin "color2_sparse" (`color_success`) are the goal-conditional tasks: a prompt-blind policy
  cannot raise both goals, and a relabeled copy's reward differs from its original's. The random
  tiny UNet is prompt-blind in colour: the same noise under the other prompt moves a pixel by
  0.6/255 on average (another noise: 41/255) and the orange score by 0.0003; CFG 7.5 raises the
  pixel change to 4.5, a 16x cross-attention output to 3.5, q/k/v/out all 4x to 12 — yet the
  colour score still moves by < 0.005. Goal-conditional colour has to be learned from nothing,
  and in 1920-2880 trajectories no method does (README: the 8-seed table, the lr sweep, pilots).
  On a text-conditional start (bench/conditional_pretrain.py --colors orange blue, then
  `--set model=DIR --set train.trainable=lora`) replay learnt both tasks and relabeling did not
  add to it (README, 2026-12-03); full fine-tuning erases that start at every lr tried. A second
  start from the same command on another CPU has half the caption dependence, and there nothing
  learns, replay included (README, 2026-12-08): the outcome hinges on the start.
- Noisy updates drift the policy on their own: with shuffled advantages JPEG compressibility
  still rises by ~0.02-0.04 in 30 epochs (incompressibility falls as much). tests/learning_check.py
  therefore compares each run with one trained on −r.
- herd's gain needs replay over several epochs (keep_epochs 1 ends below its start at lr 1e-2);
  "herd-replay" (goal_strategy sentence on one-sentence prompts: no copies, no relabel queries)
  separates replay from relabeling. Over 8 seeds (2026-12-07) it ends highest and reaches ddpo's
  final with fewer queries than herd (colour 11% vs 28%, JPEG 69% vs not reached): on these tasks
  a relabeled copy has the same reward as its original, so its query buys nothing; at lr 1e-2
  `herd.correction=truncated` weights most replayed rows near 0 (mean weight 0.16-0.21) and
  `weighted`'s self-normalised trajectory weights put the replayed half on one or two rows (ESS
  0.06-0.14); the README has the table. dpok at DPOK's KL weight 0.01 stays near the pretrained
  policy (the KL term is doing its job); the preset uses 1e-3.

Examples:
  python bench/learning.py                        # color and jpeg tasks, 4 algorithms, 3 seeds
  python bench/learning.py --quick                # a short smoke run (1 seed, small budget)
  python bench/learning.py --tasks color --algorithms ddpo herd --budget 2000
  python bench/learning.py --variant herd-k4=herd:herd.keep_epochs=4,herd.replay_ratio=2.0
  python bench/learning.py --tasks color2 --algorithms --budget 1920 --budget_unit trajectories \
      --reference ddpo-2inner --variant ddpo-2inner=ddpo:train.num_inner_epochs=2 --variant herd=herd
  python bench/learning.py --from_csv a/learning.csv b/learning.csv --reference ddpo-2inner --budget 1920 --budget_unit trajectories
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Any, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "learning.toml"
sys.path.insert(0, str(REPO))
from herd_jax.algorithms import names as _algorithm_names  # noqa: E402

ALGORITHMS = tuple(_algorithm_names())
UNIT_LABELS = {"queries": "reward queries", "trajectories": "sampled trajectories"}  # --budget_unit's names in prose


@dataclasses.dataclass(frozen=True)
class Task:
    """A reward with its prompt set; `overrides` go on top of the preset."""

    name: str
    reward: str
    prompts: tuple[str, ...]
    overrides: tuple[str, ...] = ()


# One colour in two prompts: every image is scored for red, so all algorithms can learn it on the
# tiny model in the budget (prompt-conditional colour, "color4", is far slower: see the module notes), and
# hindsight relabeling ("a red ball" <-> "a red car") re-scores the image under a real second goal.
PROMPTS = ("a red ball", "a red car")
TASKS = {
    "color": Task("color", "color", PROMPTS),
    # Goal-conditional colour: two opposite hues that the untrained tiny model scores alike
    # (orange 0.114, blue 0.101 of a 0-1 score; red starts at 0.25 and would be a head start), so
    # a prompt-blind policy cannot raise both and a relabeled copy's reward differs from its original.
    "color2": Task("color2", "color", ("an orange ball", "a blue ball")),
    # Its sparse twin: reward 1 when the named colour's share of the image exceeds 1/8 (a grey
    # image's), else 0; the untrained model succeeds on ~12% of orange and ~8% of blue samples.
    "color2_sparse": Task("color2_sparse", "color_success", ("an orange ball", "a blue ball")),
    # Prompt-conditional colour over four goals.
    "color4": Task("color4", "color", ("a red ball", "a green ball", "a blue ball", "a yellow ball")),
    # DDPO's JPEG compressibility (−kB): prompt-independent.
    "jpeg": Task("jpeg", "jpeg_compressibility", PROMPTS),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named algorithm setting: algorithm.name plus config overrides."""

    name: str
    algorithm: str
    overrides: tuple[str, ...] = ()


def parse_variant(spec: str) -> Variant:
    """`NAME=ALGORITHM[:key=value,key=value]`, e.g. `herd-k4=herd:herd.keep_epochs=4`."""
    if "=" not in spec:
        raise argparse.ArgumentTypeError(f"variant {spec!r} is not NAME=ALGORITHM[:key=value,...]")
    name, rest = spec.split("=", 1)
    algorithm, _, overrides = rest.partition(":")
    if algorithm not in ALGORITHMS:
        raise argparse.ArgumentTypeError(f"variant {spec!r}: algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    return Variant(name, algorithm, tuple(o for o in overrides.split(",") if o))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["color", "jpeg"])
    p.add_argument("--algorithms", nargs="*", choices=ALGORITHMS, default=list(ALGORITHMS), help="variants named after the algorithm, preset settings")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], help="an extra variant NAME=ALGORITHM[:key=value,...] (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=960, help="reward queries (or sampled trajectories, --budget_unit) per run")
    p.add_argument("--budget_unit", choices=list(UNIT_LABELS), default="queries",
                   help="what --budget counts and the curves' x-axis: reward queries (herd's relabel scores count) or sampled trajectories (a rollout: the real cost of diffusion RL)")
    p.add_argument("--smooth", type=int, default=5, help="moving average over this many epochs before comparing curves")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "learning"), help="directory for the CSV, PNGs and table")
    p.add_argument("--reference", default="ddpo", help="the variant whose final reward the table's 'to reach' column measures against")
    p.add_argument("--from_csv", nargs="+", default=[], help="redraw the table and PNGs from these learning.csv files (merged) instead of training")
    p.add_argument("--quick", action="store_true", help="1 seed, budget 320, color task only: a smoke run")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a config override for every run, key=value (repeatable); a --variant's own overrides take precedence")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.budget, args.tasks = args.seeds[:1], min(args.budget, 320), ["color"]
    return args


def set_environment() -> None:
    """Offline hubs, CPU unless told otherwise, the repo's compile cache; before jax is imported."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DIFFUSERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "JAX_PLATFORMS": "cpu",
        "HERD_JAX_CACHE": str(REPO / ".cache" / "herd_jax"),
        "JAX_COMPILATION_CACHE_DIR": str(REPO / ".cache" / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }.items():
        os.environ.setdefault(key, value)


def prompt_means(metrics: dict[str, float]) -> list[float]:
    """The fresh samples' per-prompt mean rewards (trainer's reward/prompt/*), or the overall mean."""
    return [v for k, v in metrics.items() if k.startswith("reward/prompt/")] or [metrics["reward/mean"]]


def balanced_reward(metrics: dict[str, float]) -> float:
    """Mean over prompts of the fresh samples' per-prompt mean reward."""
    import numpy as np

    return float(np.mean(prompt_means(metrics)))


def make_config(task: Task, variant: Variant, prompts_file: pathlib.Path, run_dir: pathlib.Path, overrides: Sequence[str]) -> Any:
    from herd_jax import config as config_lib

    return config_lib.load_config(
        [str(PRESET)],
        [
            f"algorithm.name={variant.algorithm}",
            f"reward.name={task.reward}",
            f"prompts={prompts_file}",
            f"run_dir={run_dir}",
            *task.overrides,
            *overrides,
            *variant.overrides,  # last: a variant's own setting (e.g. its learning rate) beats a --set for every run
        ],
    )


def run_variant(task: Task, variant: Variant, seeds: Sequence[int], budget: int, workdir: pathlib.Path, overrides: Sequence[str], unit: str = "queries") -> list[dict[str, Any]]:
    """Trains `variant` on `task` once per seed until `budget` reward queries or sampled trajectories (`unit`); one record per epoch."""
    import jax
    import jax.numpy as jnp

    from herd_jax import trainer

    prompts_file = workdir / f"{task.name}_prompts.txt"
    prompts_file.write_text("\n".join(task.prompts) + "\n")
    cfg = make_config(task, variant, prompts_file, workdir / "run", overrides)
    setup, initial = trainer.build(cfg)
    records = []
    try:
        for seed in seeds:
            state = jax.tree.map(jnp.copy, initial).replace(rng=jax.random.PRNGKey(seed))
            start, epoch, runs = time.perf_counter(), 0, []
            per_epoch = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
            while (int(state.reward_queries) if unit == "queries" else epoch * per_epoch) < budget:
                state, metrics, _ = trainer.run_epoch(setup, state)
                if not math.isfinite(metrics["train/loss"]):  # as train_and_evaluate stops: the params are NaN from here on
                    print(f"  {task.name:6s} {variant.name:12s} seed {seed}: non-finite loss at epoch {epoch}; run stopped", flush=True)
                    if runs:
                        runs[-1]["stopped"] = True
                    break
                runs.append(
                    {
                        "task": task.name,
                        "variant": variant.name,
                        "algorithm": variant.algorithm,
                        "seed": seed,
                        "epoch": epoch,
                        "trajectories": (epoch + 1) * per_epoch,
                        "queries": int(metrics["reward/queries"]),
                        "reward": metrics["reward/mean"],
                        "reward_balanced": balanced_reward(metrics),
                        "reward_worst_prompt": min(prompt_means(metrics)),
                        # herd's truncated or weighted correction on the replayed rows: the weights'
                        # effective sample size, mean and largest value (NaN otherwise)
                        "replay_ess": float(metrics.get("herd/ess", math.nan)),
                        "replay_weight_mean": float(metrics.get("herd/weight_mean", math.nan)),
                        "replay_weight_max": float(metrics.get("herd/weight_max", math.nan)),
                        "seconds": time.perf_counter() - start,
                        "stopped": False,
                    }
                )
                epoch += 1
            records += runs
            if runs:
                print(f"  {task.name:6s} {variant.name:12s} seed {seed}: {epoch} epochs, {runs[-1]['queries']} queries, "
                      f"reward {runs[0]['reward_balanced']:.4f} -> {runs[-1]['reward_balanced']:.4f}, {runs[-1]['seconds']:.0f}s", flush=True)
    finally:
        setup.logger.close()
        setup.reward.close()
    return records


# ----------------------------------------------------------------------------------------------
# Curves and the table


def curves(records: list[dict[str, Any]], budget: int, smooth: int, unit: str = "queries", points: int = 64) -> dict[str, dict[str, Any]]:
    """Per variant: a grid of `unit` (queries or trajectories) and, per seed, the smoothed balanced reward at each point."""
    import numpy as np

    grid = np.linspace(0, budget, points + 1)[1:]
    out: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = []
        for seed in dict.fromkeys(r["seed"] for r in records if r["variant"] == variant):
            rows = [r for r in records if r["variant"] == variant and r["seed"] == seed]
            q = np.array([r[unit] for r in rows], float)
            y = np.array([r["reward_balanced"] for r in rows], float)
            kernel = np.ones(min(smooth, len(y)))
            y_smooth = np.convolve(y, kernel, "full")[: len(y)] / np.convolve(np.ones_like(y), kernel, "full")[: len(y)]
            # The curve at q: the smoothed reward of the last epoch finished with ≤ q queries
            # (or trajectories; the last epoch may overshoot the budget by less than one epoch's).
            idx = np.searchsorted(q, grid, side="right") - 1
            idx[-1] = len(q) - 1
            runs.append(np.where(idx >= 0, y_smooth[np.maximum(idx, 0)], np.nan))
        runs = np.array(runs)
        with warnings.catch_warnings():  # grid points before a run's first epoch are NaN for every seed
            warnings.simplefilter("ignore", RuntimeWarning)
            out[variant] = {"grid": grid, "runs": runs, "mean": np.nanmean(runs, 0), "lo": np.nanmin(runs, 0), "hi": np.nanmax(runs, 0)}
    return out


def summary(records: list[dict[str, Any]], budget: int, smooth: int, reference: str = "ddpo", unit: str = "queries") -> list[dict[str, Any]]:
    """One row per variant: start and final reward, and the queries to reach the reference's final reward.

    start / final: the mean over seeds of the first / last `smooth` epochs' reward (± std over
    seeds); worst_start / worst_final: the same for the epoch's lowest per-prompt mean (a policy
    that favours one goal over another raises the balanced reward less than it lowers this).
    The reference's final reward is its seed-mean curve at the budget, and "queries to reach"
    (in `unit`) is the first grid point where a variant's seed-mean curve gets to it.
    paired / paired_se: the final minus the reference's final of the same seed, mean and standard
    error over the seeds both ran (a seed fixes the sampling noise of every variant's first epochs,
    so paired differences are less noisy than the difference of the means); None below 2 seeds.
    """
    import numpy as np

    curve = curves(records, budget, smooth, unit)
    rows = []
    for variant, c in curve.items():
        starts, final_by_seed, worst_starts, worst_finals = [], {}, [], []
        for seed in dict.fromkeys(r["seed"] for r in records if r["variant"] == variant):
            rows_seed = [r for r in records if r["variant"] == variant and r["seed"] == seed]
            ys = [r["reward_balanced"] for r in rows_seed]
            starts.append(np.mean(ys[:smooth]))
            final_by_seed[seed] = float(np.mean(ys[-smooth:]))
            worst = [r.get("reward_worst_prompt", np.nan) for r in rows_seed]
            worst_starts.append(np.mean(worst[:smooth]))
            worst_finals.append(np.mean(worst[-smooth:]))
        finals = list(final_by_seed.values())
        stopped = sum(bool(r["stopped"]) for r in records if r["variant"] == variant)
        rows.append({"variant": variant, "start": float(np.mean(starts)), "final": float(np.mean(finals)),
                     "final_std": float(np.std(finals)), "gain": float(np.mean(finals) - np.mean(starts)), "stopped": stopped,
                     "worst_start": float(np.mean(worst_starts)), "worst_final": float(np.mean(worst_finals)),
                     "final_by_seed": final_by_seed})
    target = next((r["final"] for r in rows if r["variant"] == reference), None)
    ref_finals = next((r["final_by_seed"] for r in rows if r["variant"] == reference), {})
    for row in rows:
        diffs = [f - ref_finals[seed] for seed, f in row["final_by_seed"].items() if seed in ref_finals]
        row["paired"] = float(np.mean(diffs)) if len(diffs) >= 2 else None
        row["paired_se"] = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) >= 2 else None
        row["queries_to_ref"] = None
        if target is not None:
            c = curve[row["variant"]]
            reached = np.flatnonzero(c["mean"] >= target - 1e-9)
            row["queries_to_ref"] = int(round(c["grid"][reached[0]])) if len(reached) else None
    return rows


def table_markdown(task: str, rows: list[dict[str, Any]], budget: int, seeds: Sequence[int], smooth: int, reference: str = "ddpo", unit: str = "queries") -> str:
    lines = [
        f"Task `{task}`, budget {budget} {UNIT_LABELS[unit]}, seeds {list(seeds)}; reward = fresh samples under their own prompts "
        f"(mean of per-prompt means); start/final = mean of the first/last {smooth} epochs (final ± std over seeds).",
        "",
        f"| variant | start | final (after {budget} {unit}) | gain | {unit} to reach {reference}'s final | runs stopped (NaN) | worst prompt: start → final "
        f"| final − {reference}'s, paired by seed (± s.e.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = "not reached" if r["queries_to_ref"] is None else f"{r['queries_to_ref']} ({r['queries_to_ref'] / budget:.0%} of budget)"
        paired = "—" if r["paired"] is None or r["variant"] == reference else f"{r['paired']:+.4f} ± {r['paired_se']:.4f}"
        lines.append(f"| {r['variant']} | {r['start']:.4f} | {r['final']:.4f} ± {r['final_std']:.4f} | {r['gain']:+.4f} | {reach} | {r['stopped']} "
                     f"| {r['worst_start']:.4f} → {r['worst_final']:.4f} | {paired} |")
    return "\n".join(lines)


def plot_png(path: pathlib.Path, title: str, curve: dict[str, dict[str, Any]], xlabel: str = "reward queries") -> None:
    """Mean reward against `xlabel`'s unit, a translucent band from the min to the max over seeds."""
    from herd_jax.plots import Series, line_plot

    series = [Series(name, c["grid"], c["mean"], c["lo"], c["hi"]) for name, c in curve.items()]
    line_plot(series, title=title, xlabel=xlabel).save(path)


def report(records: list[dict[str, Any]], args: argparse.Namespace, out: pathlib.Path) -> list[str]:
    """Per task: the table (in the budget's unit) and two PNGs, reward against trajectories and against queries."""
    tables = []
    for task in dict.fromkeys(r["task"] for r in records):
        task_records = [r for r in records if r["task"] == task]
        seeds = list(dict.fromkeys(r["seed"] for r in task_records))
        rows = summary(task_records, args.budget, args.smooth, args.reference, args.budget_unit)
        tables.append(table_markdown(task, rows, args.budget, seeds, args.smooth, args.reference, args.budget_unit))
        # The other axis ends where the runs ended: queries differ between algorithms at a trajectory budget.
        for unit in [u for u in ("trajectories", "queries") if u in task_records[0]]:
            end = args.budget if unit == args.budget_unit else max(r[unit] for r in task_records)
            name = f"learning_{task}.png" if unit == args.budget_unit else f"learning_{task}_{unit}.png"
            plot_png(out / name, f"{task}: reward of fresh samples vs {unit} (mean, min-max over seeds {seeds})",
                     curves(task_records, end, args.smooth, unit), xlabel=UNIT_LABELS[unit])
    return tables


def read_csv(path: pathlib.Path) -> list[dict[str, Any]]:
    """Records written by an earlier run (numbers parsed back; CSVs from before `trajectories` lack it)."""
    types = {"seed": int, "epoch": int, "queries": int, "trajectories": int, "reward": float, "reward_balanced": float, "reward_worst_prompt": float, "replay_ess": float, "replay_weight_mean": float, "replay_weight_max": float, "seconds": float}
    records = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            record: dict[str, Any] = {k: types[k](v) if k in types else v for k, v in row.items()}
            record["stopped"] = row.get("stopped") == "True"
            records.append(record)
    return records


def write_csv(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
    """Every column any record has (older CSVs lack some: "nan" there)."""
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="nan")
        writer.writeheader()
        writer.writerows(records)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    set_environment()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/learning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_csv:
        records = [r for path in args.from_csv for r in read_csv(pathlib.Path(path))]
    else:
        variants = [Variant(a, a) for a in args.algorithms] + list(args.variant)
        records = []
        with tempfile.TemporaryDirectory(prefix="herd_learning_") as tmp:
            for task_name in args.tasks:
                for variant in variants:
                    records += run_variant(TASKS[task_name], variant, args.seeds, args.budget, pathlib.Path(tmp), args.overrides, args.budget_unit)
                    if records:  # after every variant: a long sweep that dies keeps what it ran
                        write_csv(out / "learning.csv", records)
    tables = report(records, args, out)
    for table in tables:
        print("\n" + table + "\n", flush=True)
    (out / "learning.md").write_text(f"`{command}`\n\n" + "\n\n".join(tables) + "\n")
    print(f"wrote {out / 'learning.md'} and the PNGs" + ("" if args.from_csv else f", and {out / 'learning.csv'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
