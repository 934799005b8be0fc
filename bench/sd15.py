#!/usr/bin/env python
"""SD v1.5-shaped throughput and model FLOP utilisation, on random weights (nothing downloaded).

Builds SD v1.5's UNet, VAE decoder and CLIP text encoder from their configs
(herd_jax/memory_plan.py's constants, or `--model DIR|tiny`), gives them random float32
master params (one `jax.random.normal` per tensor, scaled by 1/sqrt(fan-in): no init graph to
compile), hands them to the trainer (`trainer.build(cfg, sd=...)`) and times, after a compile
warm-up, the median of `--repeats` calls of
  rollout  one sampling batch: T guided DDIM steps (two UNet passes each) + VAE decode
  epoch    one whole DDPO epoch (`trainer.run_epoch`): K rollouts, JPEG reward, advantages, update
Model FLOPs come from XLA's cost analysis of the lowered programs (`Lowered.cost_analysis()`):
one UNet forward on the guided batch, one VAE decode, and one gradient of the DDPO loss on a
train minibatch with the plain (not rematerialised) UNet, so recomputation is not counted as
useful work; they are multiplied by how often an epoch runs each. MFU = those FLOPs per second
over the device's peak: a table of dense bf16 peaks for accelerators (below), and on a CPU the
float32 matmul rate measured here with `jnp.dot` (XLA:CPU computes bf16 dots in float32).

Examples:
  python bench/sd15.py                                         # GPU/TPU: 512 px, 50 steps, bf16
  python bench/sd15.py --resolution 64 --steps 2 --batch 2 --batches 1 --train_batch 2 --trainable lora  # CPU smoke test
  python bench/sd15.py --model tiny --resolution 32 --steps 2 --batch 2 --batches 1 --repeats 1          # seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 peak FLOP/s by device kind (substring of jax's device_kind, first match wins).
PEAKS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="sd15 (SD v1.5's configs, random weights), tiny, or a diffusers directory (its configs only)")
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels (default 512)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps T (default 50)")
    p.add_argument("--batch", type=int, default=16, help="samples per rollout B (default 16)")
    p.add_argument("--batches", type=int, default=2, help="rollouts per epoch K (default 2)")
    p.add_argument("--train_batch", type=int, default=4, help="train.batch_size (default 4)")
    p.add_argument("--trainable", choices=["all", "lora"], default="all", help="train.trainable (default all)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="compute dtype (default bf16; params stay float32)")
    p.add_argument("--attention", default="auto", help="model_options.attention (default auto)")
    p.add_argument("--remat", default="blocks", help="model_options.remat (default blocks)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    return p.parse_args(argv)


def random_params(abstract: Any, key: Any) -> Any:
    """Random float32 params shaped like `abstract`: N(0, 1/fan_in) kernels and embeddings, ones
    for norm scales, zeros for biases. Activations stay O(1) through the depth, like a trained net."""
    import jax
    import jax.numpy as jnp

    leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)

    def one(i: int, path: Any, leaf: Any) -> Any:
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 1:
            return (jnp.ones if "scale" in name else jnp.zeros)(leaf.shape, jnp.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32) / math.sqrt(fan_in)

    return jax.tree_util.tree_unflatten(tree, [one(i, p, x) for i, (p, x) in enumerate(leaves)])


def random_pipeline(args: argparse.Namespace) -> Any:
    """A `StableDiffusion` with the model's architecture at `args.resolution`, random weights, the tiny model's tokenizer."""
    import jax
    import jax.numpy as jnp
    from transformers import CLIPTokenizer

    from herd_jax import memory_plan
    from herd_jax.models import CLIPTextModel, StableDiffusion, UNet2DConditionModel, VAEDecoder, abstract_params, tiny_model_path

    configs = memory_plan.sd15_configs() if args.model == "sd15" else memory_plan.configs_from_dir(args.model)
    if args.resolution % configs.vae.scale_factor:
        raise SystemExit(f"error: --resolution {args.resolution} is not a multiple of the VAE's {configs.vae.scale_factor}")
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.precision]
    unet_config = dataclasses.replace(configs.unet, sample_size=args.resolution // configs.vae.scale_factor)
    unet = UNet2DConditionModel(unet_config, dtype=dtype, attention=args.attention)
    vae = VAEDecoder(configs.vae, dtype=dtype, attention=args.attention)
    text_encoder = CLIPTextModel(configs.text, dtype=dtype, attention=args.attention)
    shapes = abstract_params(unet, vae, text_encoder)
    params = {name: random_params(tree, jax.random.PRNGKey(i)) for i, (name, tree) in enumerate(sorted(shapes.items()))}
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_model_path() / "tokenizer"), local_files_only=True)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, configs.scheduler, params, path=f"random {configs.name}")


def peak_flops(device: Any) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) of one device."""
    for kind, peak in PEAKS:
        if kind.lower() in device.device_kind.lower():
            return peak, f"{device.device_kind} dense bf16 peak"
    if device.platform == "cpu":
        return measured_sgemm(), "float32 jnp.dot 2048x2048, measured here"
    raise SystemExit(f"error: no peak FLOP/s known for {device.device_kind!r}; add it to PEAKS in bench/sd15.py")


def measured_sgemm(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a float32 n x n matmul on the default device (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops(jitted: Any, *args: Any) -> float:
    """XLA's FLOP count of one call (cost analysis of the lowered, loop-free program)."""
    analysis = jitted.lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def epoch_flops(setup: Any, state: Any) -> tuple[float, float]:
    """(model FLOPs of one rollout batch, of one DDPO epoch): UNet forwards, VAE decodes and loss
    gradients counted from XLA's cost analysis, times how often the epoch runs each."""
    import jax
    import jax.numpy as jnp

    from herd_jax.algorithms import ddpo
    from herd_jax.algorithms.api import Frozen, Transition

    cfg, policy = setup.cfg, setup.policy
    s, t = cfg.sample, cfg.train
    plain = dataclasses.replace(policy, unet=policy.unet.clone(remat="none"))
    unet_params = setup.steps.unet_params(state.params, setup.frozen.base)
    latents = lambda n: jnp.zeros((n, *policy.latent_shape), jnp.float32)
    cond = lambda n: jnp.zeros((n, *setup.frozen.uncond.shape[1:]), jnp.float32)
    guided = 2 * s.batch_size if s.guidance_scale != 1.0 else s.batch_size
    unet = flops(jax.jit(lambda p, x, c: policy.unet.apply({"params": p}, x, jnp.zeros((x.shape[0],), jnp.int32), c)), unet_params, latents(guided), cond(guided))
    decode = flops(jax.jit(policy.decode), setup.frozen.vae, latents(s.batch_size))
    rollout = s.num_steps * unet + decode
    b = t.batch_size
    transition = Transition(latents(b), latents(b), jnp.zeros((b,), jnp.int32), jnp.zeros((b,)), cond(b), jnp.ones((b,)), jnp.ones((b,)))
    loss = setup.trainable.wrap_loss(ddpo.make_loss(plain))
    frozen = Frozen(None, None, setup.frozen.uncond, setup.frozen.base, None)
    # frozen (the LoRA base UNet) is an argument: closed over, its 3.2 GiB would be inlined into the HLO as constants.
    grad = flops(jax.jit(jax.grad(lambda p, fr, tr: loss(p, fr, tr)[0])), state.params, frozen, transition)
    samples = s.batch_size * s.num_batches_per_epoch
    trained_steps = max(1, int(s.num_steps * t.timestep_fraction))
    return rollout, s.num_batches_per_epoch * rollout + t.num_inner_epochs * (samples // b) * trained_steps * grad


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    import jax
    import numpy as np

    from herd_jax import config as config_lib
    from herd_jax import parallel, trainer
    from herd_jax.errors import quiet_libraries

    quiet_libraries()
    device = jax.devices()[0]
    peak, peak_source = peak_flops(device)
    sd = random_pipeline(args)
    cfg = config_lib.load_config([], [{
        "model": sd.path, "run_dir": tempfile.mkdtemp(prefix="sd15-bench-"), "prompts": "animals", "precision": args.precision,
        "algorithm": {"name": "ddpo"}, "reward": {"name": "jpeg_compressibility"},
        "sample": {"num_steps": args.steps, "batch_size": args.batch, "num_batches_per_epoch": args.batches},
        "train": {"batch_size": args.train_batch, "trainable": args.trainable},
        "model_options": {"attention": args.attention, "remat": args.remat},
        "logging": {"log_with": "none", "image_every": 0}, "checkpoint": {"save_every": 0}, "eval": {"every": 0},
    }])
    setup, state = trainer.build(cfg, sd=sd)
    del sd
    rollout_flops, epoch_flops_ = epoch_flops(setup, state)
    ids = parallel.shard_batch(np.arange(args.batch, dtype=np.int32) % len(setup.prompts), setup.mesh)
    holder = {"state": state}

    def rollout() -> None:
        params = setup.steps.unet_params(holder["state"].params, setup.frozen.base)
        jax.block_until_ready(setup.steps.rollout(params, setup.frozen, ids, jax.random.PRNGKey(0)))

    def epoch() -> None:
        holder["state"] = jax.block_until_ready(trainer.run_epoch(setup, holder["state"])[0])

    rows = []
    samples = {"rollout": args.batch, "epoch": args.batch * args.batches}
    for name, fn, work in (("rollout", rollout, rollout_flops), ("epoch", epoch, epoch_flops_)):
        start = time.perf_counter()
        fn()  # compile
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append((name, samples[name], seconds, first, work, work / seconds))

    print(f"\n{setup.policy.unet.config.block_out_channels} UNet ({cfg.model}), {args.resolution} px, {args.steps} steps, "
          f"{args.precision} compute over float32 params, guidance {cfg.sample.guidance_scale}, train.trainable={args.trainable}, "
          f"attention={args.attention}, remat={args.remat}; {len(jax.devices())} x {device.device_kind} ({jax.default_backend()}), "
          f"peak {peak / 1e12:.3g} TFLOP/s ({peak_source}); epoch = {args.batches} x {args.batch} samples, train batch {args.train_batch}")
    print("\n| measurement | samples | median s | first call s | samples/s | model TFLOP | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, seconds, first, work, rate in rows:
        print(f"| {name} | {n} | {seconds:.3f} | {first:.1f} | {n / seconds:.3g} | {work / 1e12:.3g} | {rate / 1e12:.3g} | {rate / peak:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
