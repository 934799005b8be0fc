#!/usr/bin/env python
"""Core throughput benchmark: rollout and whole-epoch samples/s against the bare-UNet floor.

For fixed settings it builds the trainer exactly as `train.py` does (`trainer.build`) and times,
after a compile warm-up, the median of several repeats of:
  rollout   one `setup.rollout` call (B samples: T guided UNet steps with log-probs + VAE decode)
  epoch     one `trainer.run_epoch` (sample + JPEG reward + advantages + update), B·K samples
  floor     T evaluations of the bare jitted UNet on the rollout's batch incl. the CFG doubling
            (2B), each fed the previous output so nothing is hoisted; as T dispatches of one
            jitted call ("floor, T calls") and as one jitted `fori_loop` ("floor, 1 call")
  decode    the VAE decode of B latents alone (part of the rollout, not of the floor)
and prints them as a Markdown table, with rollout/floor (target ≤ 1.2, issue 7).

Examples:
  python bench/throughput.py                                 # tiny model, 8 steps, batch 8
  python bench/throughput.py --steps 50 --batch 16 --devices 2
  python bench/throughput.py --model /models/sd-v1-5 --steps 50 --batch 8   # a real SD dir (GPU)
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (embedded random SD) or a diffusers-format SD v1.x directory")
    p.add_argument("--steps", type=int, default=8, help="DDIM steps T (sample.num_steps)")
    p.add_argument("--batch", type=int, default=8, help="samples per rollout call B (sample.batch_size)")
    p.add_argument("--batches", type=int, default=2, help="rollout calls per epoch K (sample.num_batches_per_epoch)")
    p.add_argument("--train_batch", type=int, default=None, help="train.batch_size (default: --batch)")
    p.add_argument("--algorithm", default="ddpo", help="algorithm.name (default ddpo; herd adds replayed samples to each update)")
    p.add_argument("--trainable", default="all", help="train.trainable: all (full fine-tune, default), filter or lora")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance scale (1.0 skips the unconditional pass)")
    p.add_argument("--devices", type=int, default=None, help="devices on the data axis; on CPU forces that many host devices")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (compilation)")
    p.add_argument("--only", choices=["rollout", "epoch", "floor", "decode"], action="append", help="measure only these (repeatable)")
    p.add_argument("--update", choices=["auto", "scan", "host"], default="auto",
                   help="train.update_loop: scan (one jitted update), host (Python loop over jitted gradient steps), auto (host on CPU)")
    p.add_argument("--breakdown", action="store_true", help="also time each jitted step and the reward inside the epoch (blocking after each)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="further config override (repeatable), e.g. --set train.timestep_batch=8")
    return p.parse_args(argv)


def set_environment(devices: int | None) -> None:
    """Offline hubs, the repo's compile cache, and forced host devices; before jax is imported."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DIFFUSERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "JAX_COMPILATION_CACHE_DIR": str(REPO / ".cache" / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }.items():
        os.environ.setdefault(key, value)
    if devices and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def timed(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, list[float], float]:
    """(median seconds, all timings, first-call seconds) of `fn`, which must block until done."""
    first = time.perf_counter()
    for _ in range(max(warmup, 0)):
        fn()
    first = time.perf_counter() - first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, first


def make_config(args: argparse.Namespace, run_dir: str):
    from herd_jax import config as config_lib

    overrides = {
        "model": args.model,
        "run_dir": run_dir,
        "prompts": "animals",
        "algorithm.name": args.algorithm,
        "precision": "fp32",
        "train.trainable": args.trainable,
        "sample.num_steps": args.steps,
        "sample.batch_size": args.batch,
        "sample.num_batches_per_epoch": args.batches,
        "sample.guidance_scale": args.guidance,
        "train.batch_size": args.train_batch or args.batch,
        "reward.name": "jpeg_compressibility",
        "logging.log_with": "none",
        "logging.image_every": 0,
    }
    return config_lib.load_config([str(REPO / "configs" / "tiny.toml")], [config_lib.nested({k: v}) for k, v in overrides.items()] + list(args.set))


def unet_params(setup, state):
    """The full UNet params the rollout takes (for LoRA: base + adapters merged, as run_epoch does)."""
    return setup.steps.unet_params(state.params, setup.frozen.base)


def unet_floor_fns(policy, mesh, batch: int):
    """Jitted bare-UNet evaluations on the guided batch (2B when guidance != 1): one call, and T in one loop."""
    import jax
    import jax.numpy as jnp

    from herd_jax import parallel

    rows = batch if policy.guidance_scale == 1.0 else 2 * batch
    sharded, replicated = parallel.batch_sharded(mesh), parallel.replicated(mesh)

    def one(params, x, t, cond):
        return policy.unet.apply({"params": params}, x, jnp.broadcast_to(t, (x.shape[0],)), cond)

    def loop(params, x, cond):
        timesteps = policy.schedule.timesteps
        return jax.lax.fori_loop(0, policy.num_steps, lambda i, x: one(params, x, timesteps[i], cond), x)

    call = jax.jit(one, in_shardings=(replicated, sharded, replicated, sharded), out_shardings=sharded)
    scan = jax.jit(loop, in_shardings=(replicated, sharded, sharded), out_shardings=sharded)
    return rows, call, scan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_environment(args.devices)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))

    import jax
    import numpy as np

    from herd_jax import parallel, trainer
    from herd_jax.errors import quiet_libraries

    quiet_libraries()
    if args.devices and args.devices != len(jax.devices()):
        print(f"error: asked for {args.devices} devices, jax has {len(jax.devices())}", file=sys.stderr)
        return 2
    measure = set(args.only or ["rollout", "epoch", "floor", "decode"])
    run_dir = tempfile.mkdtemp(prefix="herd-bench-")
    cfg = make_config(args, run_dir)
    cfg.train.update_loop = args.update
    setup, state = trainer.build(cfg)
    policy, mesh, B, T, K = setup.policy, setup.mesh, args.batch, args.steps, args.batches
    key = jax.random.PRNGKey(0)
    ids = parallel.shard_batch(np.arange(B, dtype=np.int32) % len(setup.prompts), mesh)
    rows: list[tuple[str, float, float, float, str]] = []  # name, median s, samples/s, first-call s, note
    params = unet_params(setup, state)

    if "rollout" in measure:
        def rollout():
            jax.block_until_ready(setup.steps.rollout(params, setup.frozen, ids, key))

        med, _, first = timed(rollout, args.repeats, args.warmup)
        rows.append(("rollout (T steps + decode)", med, B / med, first, f"{B} samples"))

    if "floor" in measure:
        n, call, scan = unet_floor_fns(policy, mesh, B)
        x = parallel.shard_batch(np.random.default_rng(0).standard_normal((n, *policy.latent_shape), np.float32), mesh)
        cond = parallel.shard_batch(np.asarray(jax.device_get(setup.frozen.goal_embeds))[np.arange(n) % len(setup.prompts)], mesh)
        timesteps = [policy.schedule.timesteps[i] for i in range(T)]

        def floor_calls():
            y = x
            for t in timesteps:
                y = call(params, y, t, cond)
            jax.block_until_ready(y)

        med, _, first = timed(floor_calls, args.repeats, args.warmup)
        rows.append(("floor, T calls (bare UNet)", med, B / med, first, f"{T} x UNet[{n}]"))
        med, _, first = timed(lambda: jax.block_until_ready(scan(params, x, cond)), args.repeats, args.warmup)
        rows.append(("floor, 1 call (bare UNet)", med, B / med, first, f"fori_loop {T} x UNet[{n}]"))

    if "decode" in measure:
        decode = jax.jit(policy.decode)
        z = jax.device_put(np.random.default_rng(1).standard_normal((B, *policy.latent_shape), np.float32))
        med, _, first = timed(lambda: jax.block_until_ready(decode(setup.frozen.vae, z)), args.repeats, args.warmup)
        rows.append(("VAE decode alone", med, B / med, first, f"{B} latents"))

    if "epoch" in measure:
        del params  # run_epoch donates the state's buffers
        holder = {"state": state}

        def epoch():
            new_state, _, _ = trainer.run_epoch(setup, holder["state"])
            holder["state"] = jax.block_until_ready(new_state)

        med, _, first = timed(epoch, args.repeats, args.warmup)
        rows.append(("epoch (sample+reward+train)", med, B * K / med, first, f"{B * K} samples, {K} rollouts + update"))
        if args.breakdown:
            rows += epoch_breakdown(setup, epoch, args.repeats, B * K)
    setup.logger.close()
    setup.reward.close()

    print_table(args, rows, len(jax.devices()), jax.devices()[0].platform)
    return 0


def epoch_breakdown(setup, epoch: Callable[[], None], repeats: int, samples: int) -> list[tuple[str, float, float, float, str]]:
    """Median seconds per epoch spent in each jitted step, the rollouts and the reward (each call blocked on)."""
    import collections

    import jax

    spent: dict[str, float] = collections.defaultdict(float)

    def timer(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a, **k):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            spent[name] += time.perf_counter() - start
            return out

        return call

    saved = setup.steps, setup.reward
    reward = setup.reward
    setup.steps = type(setup.steps)(**{k: timer("rollouts" if k == "rollout" else f"step {k}", v) for k, v in setup.steps._asdict().items()})
    setup.reward = type("TimedReward", (), {"__call__": staticmethod(timer("reward (worker thread)", reward)), "close": reward.close})()
    per_epoch: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for _ in range(repeats):
            spent.clear()
            start = time.perf_counter()
            epoch()
            total = time.perf_counter() - start
            for name, seconds in spent.items():
                per_epoch[name].append(seconds)
            per_epoch["rest (host code, transfers)"].append(total - sum(v for k, v in spent.items() if not k.startswith("reward")))
    finally:
        setup.steps, setup.reward = saved
    return [(f"  in epoch: {name}", statistics.median(v), samples / max(statistics.median(v), 1e-9), float("nan"), "breakdown")
            for name, v in per_epoch.items()]


def print_table(args: argparse.Namespace, rows, num_devices: int, platform: str) -> None:
    print(
        f"\nmodel={args.model} algorithm={args.algorithm} steps={args.steps} batch={args.batch} batches/epoch={args.batches} "
        f"train_batch={args.train_batch or args.batch} trainable={args.trainable} guidance={args.guidance} update={args.update} devices={num_devices} ({platform}) "
        f"repeats={args.repeats} (median)\n"
    )
    print("| measurement | median s | samples/s | first call s | what |")
    print("|---|---:|---:|---:|---|")
    for name, med, rate, first, note in rows:
        first_text = f"{first:.2f}" if first == first else "-"
        print(f"| {name} | {med:.4f} | {rate:.1f} | {first_text} | {note} |")
    by_name = {name: med for name, med, *_ in rows}
    roll = by_name.get("rollout (T steps + decode)")
    floors = [v for k, v in by_name.items() if k.startswith("floor")]
    if roll and floors:
        floor = min(floors)
        print(f"\nrollout / floor = {roll / floor:.2f}  (floor = fastest bare-UNet timing; target <= 1.2)")


if __name__ == "__main__":
    sys.exit(main())
