"""Memory planning without a GPU: compile the rollout and the train step for abstract shapes.

Builds the SD v1.5 modules (or any diffusers directory's, `--model`) from their configs alone,
gets the parameter shapes with `jax.eval_shape(init)` (no weights, no memory), and lowers and
compiles, with abstract inputs, the functions the trainer's own builders return:
`trainer.make_rollout` (the guided DDIM rollout with VAE decode) and `trainer.make_update` (the
one-program update GPUs and TPUs run, with the DDPO plug-in's loss through the training
policy), under the trainer's options — `precision` (compute dtype over float32 master params),
`train.trainable` (full fine-tune, LoRA, filter), `model_options.attention`/`remat`/
`frozen_dtype` and `parallel.fsdp` — and prints XLA's `compiled.memory_analysis()` per device.

What the numbers are: XLA's buffer assignment for this HLO on the backend that compiled it
(XLA:CPU by default). A GPU or TPU compiles the same program with other fusions, layouts and
(cuDNN/cuBLAS) workspaces and a different rematerialisation, so treat the CPU numbers as a
planning estimate — the argument/output sizes are exact, the temporaries approximate. With
`--devices N` the command sets `XLA_FLAGS=--xla_force_host_platform_device_count=N` itself
before JAX starts its backend and shards the batch over a `data` mesh of N host devices, so
the figures are per device.

Examples:
  python -m herd_jax.memory_plan                      # SD v1.5, 512 px, 50 steps, batch 1,4, the trainer's defaults
  python -m herd_jax.memory_plan --phases train --trainable lora --train_batch 4 --attention chunked --remat none,blocks
  python -m herd_jax.memory_plan --devices 8 --fsdp --phases train --trainable all --train_batch 32 --attention chunked
  python -m herd_jax.memory_plan --model tiny --resolution 32 --steps 4
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

GiB = 1024**3
PLATFORMS = ("cpu", "gpu", "tpu")
PHASES = ("rollout", "train")
# herd_jax.config.ModelOptions' choices (tests/test_memory_plan.py checks they agree), here so
# that parsing the command line imports no JAX before --devices is applied.
ATTENTION = ("auto", "xla", "cudnn", "chunked")
REMAT = ("none", "blocks", "dots")
FROZEN_DTYPES = ("float32", "bfloat16")

# Stable Diffusion v1.5 (runwayml/stable-diffusion-v1-5) configs, as in its config.json files
# (keys left out take diffusers' defaults, as the loader's readers do).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,  # diffusers' legacy name: the number of heads in SD v1
    "cross_attention_dim": 768,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "use_linear_projection": False,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

NOTE = (
    "Per-device bytes from XLA's buffer assignment of the compiled program on {backend} "
    "(GiB = 2^30). args/out/alias/temp/code: compiled.memory_analysis(); total = args + out - alias + temp "
    "+ code, what must fit in device memory; trained/opt: the trainable pytree and the AdamW state (both "
    "inside args). Exact for params, optimizer state and inputs; temp is XLA's buffer assignment for this "
    "backend, and a GPU/TPU differs (fusion, layouts, cuDNN/cuBLAS workspaces, native bf16): treat it as a "
    "planning estimate. XLA's own peak_memory_in_bytes is in --json; on XLA:CPU it leaves the temporaries out."
)


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    """Configs of the three networks and the noise schedule (herd_jax.models' config dataclasses)."""

    unet: Any  # herd_jax.models.UNetConfig
    vae: Any  # herd_jax.models.VAEConfig
    text: Any  # herd_jax.models.CLIPTextConfig
    scheduler: Any  # herd_jax.diffusion.SchedulerConfig
    name: str = "sd-v1.5"


def sd15_configs() -> ModelConfigs:
    from herd_jax.diffusion import scheduler_config
    from herd_jax.models import clip_text_config, unet_config, vae_config

    return ModelConfigs(
        unet_config(SD15_UNET), vae_config(SD15_VAE), clip_text_config(SD15_TEXT), scheduler_config(SD15_SCHEDULER)
    )


def configs_from_dir(model: str | os.PathLike) -> ModelConfigs:
    """Reads a diffusers-format directory's configs (or "tiny") exactly as the loader does; no weights."""
    from herd_jax.models import read_configs, resolve_model_path

    configs = read_configs(resolve_model_path(model))
    return ModelConfigs(configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"], name=str(model))


@dataclasses.dataclass(frozen=True, eq=False)
class AbstractModel:
    """Flax modules computing in `compute_dtype` plus float32 master params as ShapeDtypeStructs."""

    unet: Any
    vae: Any
    text_encoder: Any
    scheduler: Any  # herd_jax.diffusion.SchedulerConfig
    params: dict[str, Any]  # {"unet", "vae", "text_encoder"}: trees of jax.ShapeDtypeStruct
    scaling_factor: float
    latent_channels: int
    vae_scale_factor: int
    text_length: int
    text_width: int


def _as_float32(tree: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), tree)


def abstract_model(configs: ModelConfigs, compute_dtype: Any, attention: str = "auto") -> AbstractModel:
    """Builds the modules and their parameter shapes with `jax.eval_shape` (nothing is allocated)."""
    from herd_jax.models import CLIPTextModel, UNet2DConditionModel, VAEDecoder, abstract_params

    unet = UNet2DConditionModel(configs.unet, dtype=compute_dtype, attention=attention)
    vae = VAEDecoder(configs.vae, dtype=compute_dtype, attention=attention)
    text_encoder = CLIPTextModel(configs.text, dtype=compute_dtype, attention=attention)
    return AbstractModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=configs.scheduler,
        params=_as_float32(abstract_params(unet, vae, text_encoder)),
        scaling_factor=configs.vae.scaling_factor,
        latent_channels=configs.vae.latent_channels,
        vae_scale_factor=configs.vae.scale_factor,
        text_length=configs.text.max_position_embeddings,
        text_width=configs.text.hidden_size,
    )


def make_abstract_policy(
    model: AbstractModel, *, resolution: int, num_steps: int, eta: float = 1.0, guidance_scale: float = 5.0
) -> Any:
    """The trainer's `Policy` (UNet + DDIM + CFG) for images of `resolution` pixels."""
    from herd_jax.diffusion import Policy, make_schedule

    if resolution % model.vae_scale_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling {model.vae_scale_factor}")
    size = resolution // model.vae_scale_factor
    return Policy(
        unet=model.unet,
        vae=model.vae,
        scaling_factor=model.scaling_factor,
        latent_shape=(model.latent_channels, size, size),
        schedule=make_schedule(model.scheduler, num_steps),
        eta=float(eta),
        guidance_scale=float(guidance_scale),
        prediction_type=model.scheduler.prediction_type,
    )


def tree_bytes(tree: Any) -> int:
    """Bytes of all array leaves (ShapeDtypeStructs or arrays)."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_size(tree: Any) -> int:
    """Number of array elements (parameters) in a pytree."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One program to plan: which phase, at what batch, under which trainer options."""

    phase: str  # "rollout" | "train"
    precision: str  # "fp32" | "bf16": compute dtype (master params are float32)
    trainable: str  # "all" | "lora" | "filter" | "-" (rollout)
    batch: int  # global batch (rollout: images; train: samples per minibatch)
    attention: str = "auto"  # model_options.attention
    remat: str = "blocks"  # model_options.remat (train only)
    frozen_dtype: str = "float32"  # model_options.frozen_dtype
    fsdp: bool = False  # parallel.fsdp

    def config(self, *, num_steps: int, lora_rank: int) -> Any:
        """The trainer config this cell runs: DDPO, one inner epoch, one minibatch, every timestep
        trained, the one-program (`scan`) update that GPUs and TPUs run."""
        from herd_jax import config as config_lib

        return config_lib.load_config([], [{
            "algorithm": {"name": "ddpo"},
            "precision": self.precision,
            "sample": {"num_steps": num_steps, "batch_size": self.batch, "num_batches_per_epoch": 1},
            "train": {
                "trainable": "all" if self.trainable == "-" else self.trainable, "lora_rank": lora_rank, "lora_alpha": float(lora_rank),
                "batch_size": self.batch, "num_inner_epochs": 1, "timestep_fraction": 1.0, "update_loop": "scan",
            },
            "model_options": {"attention": self.attention, "remat": self.remat, "frozen_dtype": self.frozen_dtype},
            "parallel": {"fsdp": self.fsdp},
        }])


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """One compiled program's per-device memory analysis (bytes) and how long it took to build."""

    cell: Cell
    devices: int
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    peak: int  # XLA's heap-simulated peak (0 where the backend does not report it)
    trained_params: int  # bytes of the trainable pytree, all devices together (train rows)
    opt_state: int  # bytes of the optimizer state, all devices together (train rows)
    flops: float  # per device: XLA's cost analysis of the partitioned program (loop bodies counted once)
    lower_s: float
    compile_s: float

    @property
    def total(self) -> int:
        """Everything resident at once: arguments, outputs not aliased to arguments, temporaries, code."""
        return self.argument + self.output - self.alias + self.temp + self.code


def _row(cell: Cell, devices: int, compiled: Any, lower_s: float, compile_s: float, trained: int = 0, opt: int = 0) -> MemoryRow:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend returns no memory analysis")
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return MemoryRow(
        cell=cell,
        devices=devices,
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
        peak=int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
        trained_params=trained,
        opt_state=opt,
        flops=float(cost.get("flops", 0.0)),
        lower_s=lower_s,
        compile_s=compile_s,
    )


# Only the analysis is wanted, never the executable: on CPU skip LLVM's expensive optimisations.
# They run after fusion and buffer assignment, so the memory analysis is unchanged (checked on
# the tiny model's rollout and train step) and SD-size compiles take about half as long.
# XLA:CPU's default scheduler optimises for concurrency, not memory: it hoists the rematerialised
# forward of every remat block out of the backward pass (each recomputation depends only on the
# block's saved input), so all of them are live at once and remat saves nothing (SD v1.5 LoRA,
# train batch 4, remat blocks: 24.0 GiB; 10.1 GiB with the memory-optimised scheduler). GPU/TPU
# schedulers are memory-aware, so the plan compiles with XLA:CPU's memory-optimised one.
CPU_FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def _compile(jitted: Any, *args: Any) -> tuple[Any, float, float]:
    """(compiled, lower seconds, compile seconds)."""
    import jax

    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile(CPU_FAST_COMPILE if jax.default_backend() == "cpu" else None)
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def _abstract_key() -> Any:
    import jax

    return jax.eval_shape(lambda: jax.random.PRNGKey(0))


def _abstract_frozen(model: AbstractModel, cfg: Any, batch: int, needs_pretrained: bool) -> Any:
    """The trainer's `Frozen` (`trainer.make_frozen`: frozen dtype, LoRA base) as ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    from herd_jax import trainer

    embed = lambda n: jax.ShapeDtypeStruct((n, model.text_length, model.text_width), jnp.float32)
    make = functools.partial(trainer.make_frozen, cfg, needs_pretrained=needs_pretrained)
    return jax.eval_shape(make, model.params, embed(batch), embed(1))


def plan_rollout(model: AbstractModel, policy: Any, cell: Cell, mesh: Any) -> MemoryRow:
    """Compiles the trainer's rollout (`trainer.make_rollout`: guided DDIM scan + VAE decode) for `cell.batch` images."""
    import jax
    import jax.numpy as jnp

    from herd_jax import parallel, trainer

    parallel.check_divisible(cell.batch, mesh, "rollout batch")
    cfg = cell.config(num_steps=policy.num_steps, lora_rank=1)
    frozen = _abstract_frozen(model, cfg, cell.batch, needs_pretrained=False)
    unet_at = parallel.param_shardings(model.params["unet"], mesh, cell.fsdp)
    rollout = trainer.make_rollout(policy, mesh, unet_at, trainer.frozen_shardings(frozen, mesh, cell.fsdp))
    ids = jax.ShapeDtypeStruct((cell.batch,), jnp.int32)
    compiled, lower_s, compile_s = _compile(rollout, model.params["unet"], frozen, ids, _abstract_key())
    return _row(cell, mesh.size, compiled, lower_s, compile_s)


def plan_train(model: AbstractModel, policy: Any, cell: Cell, mesh: Any, lora_rank: int = 4) -> MemoryRow:
    """Compiles the trainer's update (`trainer.make_update`, the one-program `scan` update) on one
    minibatch of `cell.batch` samples, every timestep: the DDPO plug-in's loss through the
    training policy (remat), `Trainable`, AdamW, params and optimizer state donated, FSDP or
    replicated as the cell says, the batch sharded on `data`.
    """
    import jax
    import jax.numpy as jnp

    from herd_jax import parallel, trainer
    from herd_jax.algorithms.api import Batch
    from herd_jax.train_step import UpdateShardings

    parallel.check_divisible(cell.batch, mesh, "train batch")
    cfg = cell.config(num_steps=policy.num_steps, lora_rank=lora_rank)
    algorithm = trainer.make_algorithm(cfg, trainer.training_policy(policy, cfg, mesh), ("",), (model.text_length, model.text_width))
    trainable = trainer.make_trainable(cfg)
    trained = jax.eval_shape(lambda base: trainable.init(base, jax.random.PRNGKey(0)), model.params["unet"])
    optimizer = trainer.make_train_optimizer(cfg, trainable, trained)
    opt_state = jax.eval_shape(optimizer.init, trained)
    frozen = _abstract_frozen(model, cfg, 1, algorithm.needs_pretrained)
    shardings = UpdateShardings(
        params=parallel.param_shardings(trained, mesh, cell.fsdp),
        opt_state=parallel.param_shardings(opt_state, mesh, cell.fsdp),
        frozen=trainer.frozen_shardings(frozen, mesh, cell.fsdp),
    )
    update = trainer.make_update(cfg, algorithm, trainable, optimizer, mesh, shardings)
    steps = policy.num_steps
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    batch = Batch(
        latents=f32(cell.batch, steps + 1, *policy.latent_shape),
        log_probs=f32(cell.batch, steps),
        cond=f32(cell.batch, model.text_length, model.text_width),
        advantages=f32(cell.batch, steps),
        weights=f32(cell.batch),
    )
    timesteps = jax.ShapeDtypeStruct((steps,), jnp.int32)
    compiled, lower_s, compile_s = _compile(update, trained, opt_state, frozen, batch, timesteps, _abstract_key())
    return _row(cell, mesh.size, compiled, lower_s, compile_s, trained=tree_bytes(trained), opt=tree_bytes(opt_state))


def plan(
    configs: ModelConfigs,
    cells: Sequence[Cell],
    *,
    resolution: int,
    num_steps: int,
    lora_rank: int = 4,
    devices: int = 1,
    progress: Any = None,
) -> list[MemoryRow]:
    """Compiles every cell and returns its memory row. `progress(row)` is called after each
    compile (the CLI prints as it goes: SD cells take minutes)."""
    import jax
    import jax.numpy as jnp

    from herd_jax import parallel

    if devices > len(jax.devices()):
        raise ValueError(f"--devices {devices} but JAX sees {len(jax.devices())} device(s)")
    mesh = parallel.make_mesh(jax.devices()[:devices])
    dtypes = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
    rows = []
    for cell in cells:
        model = abstract_model(configs, dtypes[cell.precision], cell.attention)
        policy = make_abstract_policy(model, resolution=resolution, num_steps=num_steps)
        if cell.phase == "rollout":
            rows.append(plan_rollout(model, policy, cell, mesh))
        else:
            rows.append(plan_train(model, policy, cell, mesh, lora_rank))
        if progress is not None:
            progress(rows[-1])
    return rows


def grid(
    *,
    batches: Sequence[int],
    train_batches: Sequence[int],
    precisions: Sequence[str] = ("fp32", "bf16"),
    trainables: Sequence[str] = ("all", "lora"),
    phases: Sequence[str] = PHASES,
    attentions: Sequence[str] = ("auto",),
    remats: Sequence[str] = ("blocks",),
    frozen_dtypes: Sequence[str] = ("float32",),
    fsdp: bool = False,
) -> list[Cell]:
    """Every combination of the options (remat and trainable only for train cells)."""
    import itertools

    cells = []
    for precision, attention, frozen in itertools.product(precisions, attentions, frozen_dtypes):
        common = dict(precision=precision, attention=attention, frozen_dtype=frozen, fsdp=fsdp)
        if "rollout" in phases:
            cells += [Cell("rollout", trainable="-", batch=b, **common) for b in batches]
        if "train" in phases:
            cells += [Cell("train", trainable=t, batch=b, remat=r, **common) for r in remats for t in trainables for b in train_batches]
    return cells


def model_summary(configs: ModelConfigs) -> dict[str, dict[str, int]]:
    """Parameter counts and float32 bytes of each network, from the abstract pytrees."""
    import jax.numpy as jnp

    model = abstract_model(configs, jnp.float32)
    return {name: {"params": tree_size(tree), "bytes": tree_bytes(tree)} for name, tree in model.params.items()}


_COLUMNS = ("phase", "prec", "train", "batch", "dev", "attention", "remat", "frozen", "fsdp", "args", "out-alias", "temp", "total", "compile s")


def format_table(rows: Sequence[MemoryRow]) -> str:
    """A Markdown table of rows, sizes in GiB per device (batch: global)."""
    gib = lambda b: f"{b / GiB:.2f}" if b == 0 or b >= 0.1 * GiB else f"{b / GiB:.3f}"
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" if i < 9 and i != 3 and i != 4 else "---:" for i in range(len(_COLUMNS))) + "|",
    ]
    for r in rows:
        c = r.cell
        cells = (
            c.phase, c.precision, c.trainable, str(c.batch), str(r.devices), c.attention, c.remat if c.phase == "train" else "-",
            {"float32": "fp32", "bfloat16": "bf16"}[c.frozen_dtype], "on" if c.fsdp else "off",
            gib(r.argument), gib(r.output - r.alias), gib(r.temp), f"**{gib(r.total)}**", f"{r.lower_s + r.compile_s:.0f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m herd_jax.memory_plan",
        description="Per-device memory of the rollout and train step for SD v1.5 shapes, from compiling with "
        "abstract inputs (no weights, no GPU needed).",
        epilog="Numbers come from XLA's buffer assignment on the compiling backend (CPU by default): a planning "
        "estimate; GPU/TPU temporaries differ.",
    )
    parser.add_argument("--model", default=None, help="read the configs of a diffusers directory (or 'tiny') instead of SD v1.5's")
    parser.add_argument("--resolution", type=int, default=512, help="image size in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps, all of them trained (default 50)")
    parser.add_argument("--batch", type=_ints, default=[1, 4], help="rollout batch sizes (default 1,4)")
    parser.add_argument("--train_batch", type=_ints, default=[1, 4], help="train minibatch sizes (default 1,4)")
    parser.add_argument("--full", action="store_true", help="the full grid: batch and train_batch 1,2,4,8 (slow)")
    parser.add_argument("--precision", type=_choices(("fp32", "bf16")), default=["fp32", "bf16"], help="compute dtypes (default fp32,bf16)")
    parser.add_argument("--trainable", type=_choices(("all", "lora", "filter")), default=["all", "lora"], help="trainable subsets (default all,lora)")
    parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--phases", type=_choices(PHASES), default=list(PHASES), help="rollout,train (default both)")
    parser.add_argument("--attention", type=_choices(ATTENTION), default=["auto"], help="model_options.attention values (default auto)")
    parser.add_argument("--remat", type=_choices(REMAT), default=["blocks"], help="model_options.remat values, train cells (default blocks)")
    parser.add_argument("--frozen_dtype", type=_choices(FROZEN_DTYPES), default=["float32"], help="model_options.frozen_dtype values (default float32)")
    parser.add_argument("--fsdp", action="store_true", help="parallel.fsdp: shard params, gradients, optimizer state and frozen UNet copies over the devices")
    parser.add_argument("--devices", type=int, default=1, help="shard the batch over N devices (CPU: N forced host devices)")
    parser.add_argument("--platform", choices=PLATFORMS, default="cpu", help="backend that compiles (default cpu)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the rows and metadata as JSON")
    args = parser.parse_args(argv)
    if args.full:
        args.batch = args.train_batch = [1, 2, 4, 8]
    for name in ("resolution", "steps", "devices", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name, phase in (("batch", "rollout"), ("train_batch", "train")):
        if phase not in args.phases:  # the other phase's default sizes need not divide --devices
            continue
        bad = [b for b in getattr(args, name) if b % args.devices]
        if bad:
            parser.error(f"--{name} {bad[0]} is not a multiple of --devices {args.devices}")
    return args


def _configure_backend(platform_name: str, devices: int) -> None:
    """Chooses the backend and, on CPU, forces `devices` host devices, before JAX starts a backend."""
    if platform_name == "cpu" and devices > 1:
        flag = f"--xla_force_host_platform_device_count={devices}"
        os.environ["XLA_FLAGS"] = " ".join(
            [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")] + [flag]
        )
    import jax

    jax.config.update("jax_platforms", platform_name)


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_backend(args.platform, args.devices)
    import jax

    try:
        configs = sd15_configs() if args.model is None else configs_from_dir(args.model)
        if len(jax.devices()) < args.devices:
            raise ValueError(f"--devices {args.devices} but the {args.platform} backend has {len(jax.devices())}")
    except ValueError as e:  # includes ModelNotFoundError: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend = f"XLA:{jax.default_backend().upper()} ({jax.devices()[0].device_kind})"
    summary = model_summary(configs)
    print(f"model {configs.name}: " + ", ".join(
        f"{name} {s['params'] / 1e6:.1f}M params ({s['bytes'] / GiB:.2f} GiB fp32)" for name, s in summary.items()
    ))
    print(
        f"{args.resolution} px, {args.steps} DDIM steps, CFG on (two UNet passes per step), every step trained; "
        f"{args.devices} device(s) on {backend}, {os.cpu_count()} host cores. Compiling each cell (may take minutes)...",
        flush=True,
    )
    report = lambda r: print(f"  {r.cell}: total {r.total / GiB:.2f} GiB, compiled in {r.lower_s + r.compile_s:.0f} s (lower {r.lower_s:.0f} s)", flush=True)
    started = time.perf_counter()
    cells = grid(
        batches=args.batch, train_batches=args.train_batch, precisions=args.precision, trainables=args.trainable, phases=args.phases,
        attentions=args.attention, remats=args.remat, frozen_dtypes=args.frozen_dtype, fsdp=args.fsdp,
    )
    rows = plan(configs, cells, resolution=args.resolution, num_steps=args.steps, lora_rank=args.lora_rank, devices=args.devices, progress=report)
    print()
    print(format_table(rows))
    print()
    print(NOTE.format(backend=backend))
    print(f"{len(rows)} compiles in {time.perf_counter() - started:.0f} s.")
    if args.json is not None:
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
            "backend": backend,
            "jax": jax.__version__,
            "model": configs.name,
            "resolution": args.resolution,
            "steps": args.steps,
            "devices": args.devices,
            "command": "python -m herd_jax.memory_plan " + " ".join(sys.argv[1:] if argv is None else argv),
            "params": summary,
            "note": NOTE.format(backend=backend),
        }
        rows_json = [dict(dataclasses.asdict(r), total=r.total) for r in rows]
        args.json.write_text(json.dumps({"meta": meta, "rows": rows_json}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
