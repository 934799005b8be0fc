#!/usr/bin/env python
"""herd-jax against TRL's DDPOTrainer (trl 0.23.1) on one tiny random SD, same settings, same CPU.

Both systems load the same diffusers-format directory (herd-jax's embedded tiny SD, PyTorch
safetensors) and run DDPO with the same settings: DDIM steps, eta 1, guidance 5 against the
empty prompt, sample batch size and batches per epoch, train batch size, every timestep trained,
one inner epoch, AdamW (lr 3e-4, wd 1e-4, grad-norm clip 1), per-prompt advantages (window 16,
min count 4), JPEG-compressibility reward (PIL, quality 95, -kB), full UNet fine-tuning (TRL:
use_lora=False; --lora: rank-4 adapters on the attention q/k/v/out projections on both), float32 (TRL: mixed_precision="no"), CPU, DDPO's "animals" prompts.

Each system runs in its own long-lived worker process (herd-jax in this interpreter, TRL in
bench/.venv-trl built by bench/setup_trl_env.sh). Both are built and warmed up (one sampling
pass and one epoch: compilation, lazy initialisation) before timing; then the measurements
alternate A B A B ... for --rounds rounds, so load from other processes on the machine hits
both sides alike. Reported: median seconds and samples/s for
  sampling  K rollout batches of B samples (T guided steps with log-probs, VAE decode), no reward
  epoch     one whole epoch: sampling + reward + advantages + training on all B·K samples
and herd-jax/TRL ratios (issue 14 targets: epoch >= 2x TRL on the embedded tiny SD, >= 1.5x on
`--model second`), and each system's model FLOP/s: the epoch's model FLOPs (bench/sd15.py's count
from XLA's cost analysis: T UNet forwards on the guided batch and a VAE decode per sampling batch,
one loss gradient per trained timestep and sample; both systems do this same work) over its median
time, next to this machine's float32 matmul rate (jnp.dot 2048x2048, the best any kernel here does).

  bash bench/setup_trl_env.sh                 # once: TRL's own environment
  python bench/trl_compare.py                 # tiny SD, 8 steps, batch 8 x 2, train batch 8
  python bench/trl_compare.py --update both     # herd-jax with both update loops (scan, host)
  python bench/trl_compare.py --steps 20 --batch 4 --batches 2 --train_batch 4 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_TRL_PYTHON = HERE / ".venv-trl" / "bin" / "python"

# Settings both sides share beyond the command-line ones (herd-jax: configs/tiny.toml + DDPO's file).
LEARNING_RATE = 3e-4
STATS_WINDOW = 16
STATS_MIN_COUNT = 4
GUIDANCE = 5.0
ETA = 1.0
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="DDIM steps T")
    p.add_argument("--batch", type=int, default=8, help="samples per sampling batch B")
    p.add_argument("--batches", type=int, default=2, help="sampling batches per epoch K")
    p.add_argument("--train_batch", type=int, default=None, help="samples per optimizer step (default: --batch)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (each: sampling + epoch, per side)")
    p.add_argument("--update", choices=["auto", "scan", "host", "both"], default="auto",
                   help="herd-jax's train.update_loop: auto (host on CPU), scan, host, or both (scan and host) side by side")
    p.add_argument("--torch_threads", default="default",
                   help="torch.set_num_threads for TRL, comma-separated for one TRL worker each, e.g. 'default,1'; "
                        "ratios are taken against the fastest TRL worker")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 4, alpha 4, attention q/k/v/out) on both sides instead of the full UNet")
    p.add_argument("--model", default=None,
                   help="diffusers SD directory both load (default: herd-jax's tiny model; 'second': the second tiny shape, built in bench/out/)")
    p.add_argument("--trl_python", default=os.environ.get("TRL_PYTHON", str(DEFAULT_TRL_PYTHON)), help="python of the TRL environment")
    p.add_argument("--worker", choices=["herd", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Worker protocol: one JSON line per command on stdin ("sample" | "epoch" | "quit"), one JSON line
# back on the original stdout; everything the libraries print goes to stderr.


def serve(measure: dict[str, Any], info: dict[str, Any]) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter on stdout would corrupt the protocol
    sys.stdout = sys.stderr
    out.write(json.dumps({"ready": True, **info}) + "\n")
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        start = time.perf_counter()
        measure[command]()
        out.write(json.dumps({"command": command, "seconds": time.perf_counter() - start}) + "\n")


def jpeg_compressibility(images_uint8_nhwc) -> list[float]:
    """-(JPEG size in kB) at quality 95, exactly as herd_jax.rewards.jpeg (and DDPO) define it."""
    import io

    from PIL import Image

    sizes = []
    for image in images_uint8_nhwc:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000)
    return sizes


def herd_worker(s: dict[str, Any], update: str) -> None:
    """herd-jax: `trainer.build` from configs/tiny.toml with the shared settings; times its own functions."""
    sys.path.insert(0, str(HERE))
    import throughput  # the same config helper as the core benchmark

    throughput.set_environment(None)
    import jax
    import numpy as np

    from herd_jax import parallel, trainer
    from herd_jax.errors import quiet_libraries

    quiet_libraries()
    args = throughput.parse_args(
        ["--model", s["model"], "--steps", str(s["steps"]), "--batch", str(s["batch"]), "--batches", str(s["batches"]),
         "--train_batch", str(s["train_batch"]), "--guidance", str(GUIDANCE), "--trainable", "lora" if s["lora"] else "all"]
    )
    cfg = throughput.make_config(args, tempfile.mkdtemp(prefix="herd-trl-compare-"))
    cfg.seed, cfg.sample.eta = SEED, ETA
    cfg.train.learning_rate, cfg.train.stats_window, cfg.train.stats_min_count = LEARNING_RATE, STATS_WINDOW, STATS_MIN_COUNT
    cfg.train.num_inner_epochs, cfg.train.timestep_fraction = 1, 1.0
    cfg.train.lora_rank, cfg.train.lora_alpha = 4, 4.0  # TRL's LoraConfig(r=4, lora_alpha=4)
    cfg.train.update_loop = update
    setup, state = trainer.build(cfg)
    holder = {"state": state, "key": jax.random.PRNGKey(1)}

    def sample():
        outs = []
        for _ in range(s["batches"]):
            holder["key"], prompt_key, key = jax.random.split(holder["key"], 3)
            ids = np.asarray(jax.random.randint(prompt_key, (s["batch"],), 0, len(setup.prompts)), np.int32)
            outs.append(setup.steps.rollout(throughput.unet_params(setup, holder["state"]), setup.frozen, parallel.shard_batch(ids, setup.mesh), key))
        jax.block_until_ready(outs)

    def epoch():
        new_state, _, _ = trainer.run_epoch(setup, holder["state"])
        holder["state"] = jax.block_until_ready(new_state)

    sample(), epoch()  # warm-up: compilation
    import sd15  # model FLOPs and the matmul peak, counted as the SD v1.5 benchmark counts them

    rollout_flops, epoch_flops = sd15.epoch_flops(setup, holder["state"])
    serve({"sample": sample, "epoch": epoch}, {
        "system": "herd-jax", "algorithm": cfg.algorithm.name, "update": update, "jax": jax.__version__, "devices": len(jax.devices()),
        "sample_flops": s["batches"] * rollout_flops, "epoch_flops": epoch_flops, "sgemm_flops": sd15.measured_sgemm(),
    })


def trl_worker(s: dict[str, Any], threads: str) -> None:
    """TRL: DefaultDDPOStableDiffusionPipeline(model, use_lora=...) + DDPOTrainer; times its own methods."""
    import random
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import trl
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    random.seed(SEED)
    torch.manual_seed(SEED)
    if threads != "default":
        torch.set_num_threads(int(threads))
    prompts = s["prompts"]

    def prompt_fn():
        return random.choice(prompts), {}

    def reward_fn(images, prompts_, metadata):
        images = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.tensor(jpeg_compressibility(images), dtype=torch.float32), {}

    logdir = tempfile.mkdtemp(prefix="trl-compare-")
    config = DDPOConfig(
        exp_name="trl_compare",
        seed=SEED,
        log_with=None,
        logdir=logdir,
        project_kwargs={"project_dir": logdir},
        num_epochs=10**9,
        save_freq=10**9,  # no checkpoints (herd-jax saves none here either)
        mixed_precision="no",
        allow_tf32=False,
        sample_num_steps=s["steps"],
        sample_eta=ETA,
        sample_guidance_scale=GUIDANCE,
        sample_batch_size=s["batch"],
        sample_num_batches_per_epoch=s["batches"],
        train_batch_size=s["train_batch"],
        train_learning_rate=LEARNING_RATE,
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=1,
        train_timestep_fraction=1.0,
        train_cfg=True,
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=STATS_WINDOW,
        per_prompt_stat_tracking_min_count=STATS_MIN_COUNT,
        negative_prompts="",
    )
    PartialState()  # TRL logs through accelerate before DDPOTrainer creates its Accelerator
    pipeline = DefaultDDPOStableDiffusionPipeline(s["model"], use_lora=s["lora"])
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    pipeline.set_progress_bar_config(disable=True)  # tqdm per sampling step is pure overhead here
    if trainer.accelerator.device.type != "cpu" or next(pipeline.unet.parameters()).dtype != torch.float32:
        raise SystemExit(f"TRL is not on CPU/float32: {trainer.accelerator.device}, {next(pipeline.unet.parameters()).dtype}")
    counter = {"epoch": 0, "global_step": 0}

    def sample():
        with torch.no_grad():
            trainer._generate_samples(iterations=s["batches"], batch_size=s["batch"])

    def epoch():
        counter["global_step"] = trainer.step(counter["epoch"], counter["global_step"])
        counter["epoch"] += 1

    sample(), epoch()  # warm-up: lazy initialisation, allocator
    serve(
        {"sample": sample, "epoch": epoch},
        {"system": "TRL", "lora": s["lora"], "trl": trl.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "trainable_params": sum(p.numel() for p in pipeline.unet.parameters() if p.requires_grad)},
    )


# ----------------------------------------------------------------------------------------------
# Orchestrator


class Worker:
    """A worker process (`--worker KIND`) answering timing commands over pipes."""

    def __init__(self, label: str, kind: str, python: str, settings_file: str, variant: str):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if kind == "trl":
            env.pop("PYTHONPATH", None)  # TRL's venv must not see herd-jax's packages
        self.label = label
        self.log = pathlib.Path(settings_file).with_name(f"{kind}-{variant}.log")
        self.proc = subprocess.Popen(
            [python, str(pathlib.Path(__file__).resolve()), "--worker", kind, "--settings", settings_file, "--variant", variant],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=env, cwd=str(REPO),
        )

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise SystemExit(f"error: the {self.label} worker exited (code {self.proc.wait()}); its log ends:\n{tail}")
        return json.loads(line)

    def run(self, command: str) -> float:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


SECOND_SHAPE = REPO / "bench" / "out" / "tiny-sd-second-shape"


def second_shape() -> pathlib.Path:
    """A second tiny SD, shaped unlike the embedded one: 2 resnet + transformer layers per block
    (tiny: 1), widths 48/96 (32/64), 4 and 6 heads of 12 and 16 dims (4 heads of 8/16),
    16 norm groups; the tiny model's VAE, text encoder, tokenizer and schedule. Written once
    (diffusers, PyTorch safetensors) into bench/out/."""
    import shutil

    if (SECOND_SHAPE / "unet" / "config.json").is_file():
        return SECOND_SHAPE
    import torch
    from diffusers import UNet2DConditionModel

    from herd_jax.models.tiny import tiny_model_path

    staging = SECOND_SHAPE.with_name(SECOND_SHAPE.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tiny_model_path(), staging, ignore=shutil.ignore_patterns("unet", "herd_jax_tiny.json"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(48, 96), layers_per_block=2, attention_head_dim=(4, 6), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    unet.save_pretrained(staging / "unet", safe_serialization=True)
    staging.rename(SECOND_SHAPE)
    return SECOND_SHAPE


def trl_readable(model: str, workdir: str) -> str:
    """The model directory as TRL's transformers 4.57 can load it: herd-jax writes tokenizers with
    transformers 5 (tokenizer.json only), while 4.x's CLIPTokenizer reads vocab.json + merges.txt.
    Returns a folder of links to every component but the tokenizer, which gets those two files,
    taken from tokenizer.json's BPE model (same vocabulary, same merges)."""
    src = pathlib.Path(model)
    tokenizer = src / "tokenizer"
    if (tokenizer / "vocab.json").is_file() or not (tokenizer / "tokenizer.json").is_file():
        return model
    view = pathlib.Path(workdir) / "model-for-trl"
    view.mkdir()
    for item in src.iterdir():
        if item.name != "tokenizer":
            (view / item.name).symlink_to(item.resolve())
    (view / "tokenizer").mkdir()
    bpe = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
    (view / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (view / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config.pop("backend", None)
    (view / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    return str(view)


def orchestrate(args: argparse.Namespace) -> int:
    if not pathlib.Path(args.trl_python).exists():
        print(f"error: no TRL environment at {args.trl_python}; run `bash bench/setup_trl_env.sh` first", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from herd_jax.prompts import load_prompts

    if args.model is None:
        from herd_jax.models.tiny import tiny_model_path

        args.model = str(tiny_model_path())
    elif args.model == "second":
        args.model = str(second_shape())
    settings = {
        "model": args.model, "steps": args.steps, "batch": args.batch, "batches": args.batches,
        "train_batch": args.train_batch or args.batch, "prompts": load_prompts("animals"), "lora": args.lora,
    }
    workdir = tempfile.mkdtemp(prefix="trl-compare-")
    settings_file = os.path.join(workdir, "settings.json")
    pathlib.Path(settings_file).write_text(json.dumps(settings))
    trl_settings_file = os.path.join(workdir, "settings-trl.json")
    pathlib.Path(trl_settings_file).write_text(json.dumps(dict(settings, model=trl_readable(args.model, workdir))))
    n = settings["batch"] * settings["batches"]
    print(f"model={args.model}\nsteps={args.steps} batch={args.batch} batches/epoch={args.batches} "
          f"train_batch={settings['train_batch']} lora={args.lora} rounds={args.rounds}; worker logs in {workdir}\n"
          f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)

    updates = ["scan", "host"] if args.update == "both" else [args.update]
    plan = [(f"herd-jax ({u} update)" if len(updates) > 1 else "herd-jax", "herd", sys.executable, u) for u in updates]
    threads = args.torch_threads.split(",")
    plan += [(f"TRL (torch threads {t})" if len(threads) > 1 else "TRL", "trl", args.trl_python, t) for t in threads]
    workers: dict[str, Worker] = {}
    times: dict[tuple[str, str], list[float]] = {}
    work: dict[str, float] = {}  # model FLOPs per sampling pass / epoch and the matmul rate, from herd-jax's worker
    try:
        for label, kind, python, variant in plan:  # built one at a time: each warm-up uses every core
            start = time.perf_counter()
            workers[label] = Worker(label, kind, python, trl_settings_file if kind == "trl" else settings_file, variant)
            info = workers[label].read()
            work.update({k: info[k] for k in ("sample_flops", "epoch_flops", "sgemm_flops") if k in info})
            print(f"{label}: ready in {time.perf_counter() - start:.1f}s (build + warm-up) {info}", flush=True)
        for r in range(args.rounds):  # A B A B ...: load from elsewhere hits every side alike
            for label, worker in workers.items():
                for command in ("sample", "epoch"):
                    times.setdefault((label, command), []).append(worker.run(command))
            print(f"round {r + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f}): "
                  + ", ".join(f"{k[0]} {k[1]} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    finally:
        for w in workers.values():
            w.close()
    print_results(args, n, times, list(workers), work)
    return 0


def print_results(args: argparse.Namespace, n: int, times: dict[tuple[str, str], list[float]], labels: list[str], work: dict[str, float]) -> None:
    print(f"\n{n} samples per epoch ({args.batch} x {args.batches}), {args.steps} steps, train batch "
          f"{args.train_batch or args.batch}; {args.rounds} alternating rounds; load average at end {os.getloadavg()[0]:.2f}\n")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    trl = min((label for label in labels if label.startswith("TRL")), key=lambda label: med[(label, "epoch")])
    print(f"| system | sampling s (median / min) | sampling samples/s | sampling GFLOP/s | epoch s (median / min) | epoch samples/s "
          f"| epoch GFLOP/s | epoch vs {trl} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        s, e = (label, "sample"), (label, "epoch")
        print(f"| {label} | {med[s]:.3f} / {best[s]:.3f} | {n / med[s]:.1f} | {work['sample_flops'] / med[s] / 1e9:.1f} "
              f"| {med[e]:.3f} / {best[e]:.3f} | {n / med[e]:.2f} | {work['epoch_flops'] / med[e] / 1e9:.1f} | {med[(trl, 'epoch')] / med[e]:.2f}x |")
    print(f"\nmodel work: {work['sample_flops'] / 1e9:.2f} GFLOP per sampling pass, {work['epoch_flops'] / 1e9:.2f} GFLOP per epoch; "
          f"this machine's float32 matmul (jnp.dot 2048x2048, best of 10): {work['sgemm_flops'] / 1e9:.1f} GFLOP/s")
    for label in labels:
        if not label.startswith("TRL"):
            print(f"\n{label} / {trl}: sampling {med[(trl, 'sample')] / med[(label, 'sample')]:.2f}x, "
                  f"epoch {med[(trl, 'epoch')] / med[(label, 'epoch')]:.2f}x (medians); best of rounds: "
                  f"sampling {best[(trl, 'sample')] / best[(label, 'sample')]:.2f}x, epoch {best[(trl, 'epoch')] / best[(label, 'epoch')]:.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        settings = json.loads(pathlib.Path(args.settings).read_text())
        (herd_worker if args.worker == "herd" else trl_worker)(settings, args.variant)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
