"""The training command line (`python train.py`, or `herd-train` once installed): parse flags,
build the config, run, map errors to exit codes (herd_jax/errors.py).

Examples:
  python train.py --config configs/tiny.toml                      # embedded tiny model, offline
  python train.py --model ./sd-v1-5 --reward_model jpeg_compressibility train.learning_rate=3e-5
  python train.py --run_dir runs/x --resume                        # continue runs/x from its newest checkpoint
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parser() -> argparse.ArgumentParser:
    from herd_jax import config as config_lib
    from herd_jax.errors import ArgumentParser
    from herd_jax.metrics import LOGGERS
    from herd_jax.prompts import builtin_sets
    from herd_jax.rewards import reward_names
    from herd_jax import algorithms

    p = ArgumentParser(
        prog="train.py",
        description="Fine-tune Stable Diffusion v1.x with reinforcement learning (JAX/Flax).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "overrides:\n"
            "  Any config key can be set as SECTION.KEY=VALUE after the flags, e.g.\n"
            "    sample.batch_size=8 sample.num_steps=20 train.learning_rate=3e-5 num_epochs=50\n"
            "  Sections: sample, train, model_options, parallel, reward, algorithm, ddpg, herd, dpok, grpo, eval, logging, checkpoint\n"
            "  (configs/base.toml lists every key with its default).\n"
            "  Precedence: built-in defaults < --config files < flags < overrides.\n\n"
            "algorithms:\n"
            "  herd   (default) DDPO updates fed by a replay buffer with hindsight relabeling: each trajectory\n"
            "         is stored again under another prompt (herd.goal_strategy best|random|sentence) with its\n"
            "         reward re-scored; herd.copies, herd.keep_epochs, herd.replay_ratio, herd.correction.\n"
            "  ddpg   the original HERD code's name for off-policy DDPO with an epsilon-greedy behaviour policy\n"
            "         (NOT actor-critic DDPG): with probability ddpg.epsilon an epoch samples from the frozen\n"
            "         pretrained UNet; the clipped ratio uses the behaviour log-probs. epsilon=0 is ddpo.\n"
            "  ddpo   DDPO (Black et al. 2023): per-prompt normalised advantages, clipped importance\n"
            "         ratio (train.estimator=is) or score function (train.estimator=sf).\n"
            "  dpok   DPOK (Fan et al. 2023): value baseline A = r - V(x_t, c, t), clamped ratio, KL to the\n"
            "         pretrained UNet (dpok.reward_weight, dpok.kl_weight), FIFO of dpok.buffer_epochs epochs.\n"
            "  grpo   group-relative (Flow-GRPO / DanceGRPO): grpo.group_size samples per prompt, advantages\n"
            "         normalised within each group, DDPO's clipped ratio, optional KL (grpo.kl_weight).\n\n"
            "multi-host:\n"
            "  Run the same command on every host with --coordinator_address HOST:PORT --num_processes N\n"
            "  --process_id I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; on TPU pods and\n"
            "  SLURM set HERD_JAX_DISTRIBUTED=auto). Batch sizes are global; process 0 logs.\n\n"
            "examples:\n"
            "  python train.py --config configs/tiny.toml          # embedded tiny model, offline, minutes on CPU\n"
            "  python train.py --model /models/sd-v1-5 --reward_model jpeg_compressibility --log_with tensorboard\n"
        ),
    )
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="TOML config file; repeatable, later files win (e.g. configs/tiny.toml)")
    p.add_argument("--model", help=f"diffusers-format SD v1.x directory, hub id, or 'tiny' for the embedded tiny random model (default: {config_lib.DEFAULT_MODEL})")
    p.add_argument("--reward_model", choices=reward_names(), help="reward that scores the images (config reward.name)")
    p.add_argument("--algorithm", choices=algorithms.names(), help="RL algorithm (config algorithm.name; see below)")
    p.add_argument("--log_with", choices=LOGGERS, help="wandb (offline without login or network), tensorboard, or none (config logging.log_with)")
    p.add_argument("--prompts", help=f"built-in prompt set ({', '.join(builtin_sets())}) or a text file with one prompt per line")
    p.add_argument("--run_dir", help="where logs go (default runs/<date-time>)")
    p.add_argument("--num_epochs", type=int, help="epochs to train (config num_epochs)")
    p.add_argument("--seed", type=int, help="random seed (config seed)")
    p.add_argument(
        "--resume", nargs="?", const="", metavar="PATH",
        help="continue the run in --run_dir from its newest checkpoint (from scratch if it has none yet), or from PATH "
        "(a run, checkpoints/ or step directory); the checkpoint's saved config is the base under --config files, "
        "flags and overrides (order: herd_jax/checkpoint.py)",
    )
    p.add_argument("--overwrite", action="store_true", help="start from scratch in a --run_dir that already holds checkpoints, deleting them (without it such a run is refused)")
    p.add_argument("--coordinator_address", default="", metavar="HOST:PORT", help="multi-host: jax.distributed coordinator (process 0's address)")
    p.add_argument("--num_processes", type=int, default=0, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=-1, help="multi-host: this process's index")
    p.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides (see below)")
    return p


def resolve_run(args: argparse.Namespace):
    """The config and, with --resume, the checkpoints to continue from (None: start from scratch)."""
    from herd_jax import checkpoint
    from herd_jax import config as config_lib

    flags = {
        "model": args.model,
        "reward.name": args.reward_model,
        "algorithm.name": args.algorithm,
        "logging.log_with": args.log_with,
        "prompts": args.prompts,
        "run_dir": args.run_dir,
        "num_epochs": args.num_epochs,
        "seed": args.seed,
    }
    flag_overrides = [config_lib.nested({k: v}) for k, v in flags.items() if v is not None]
    resume = getattr(args, "resume", None)
    overrides = list(args.overrides)
    if resume and "=" in resume and not os.path.exists(resume):  # `--resume key=value`: an override, not a PATH
        resume, overrides = "", [resume, *overrides]
    cfg = config_lib.load_config(args.config, flag_overrides + overrides)
    checkpoints = None
    if resume is not None:
        if not resume and not cfg.run_dir:
            raise checkpoint.CheckpointError("--resume without a PATH continues the run in --run_dir; give --run_dir or a PATH")
        checkpoints = checkpoint.find(resume or cfg.run_dir, must_exist=bool(resume))
        if checkpoints.steps:  # the checkpoint's config, under everything given on this command line
            cfg = config_lib.load_config([checkpoint.saved_config(checkpoints), *args.config], flag_overrides + overrides)
        else:
            print(f"no checkpoint in {cfg.run_dir} yet; starting from scratch", flush=True)
            checkpoints = None
    if not cfg.run_dir:
        cfg.run_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return cfg, checkpoints


def enable_compile_cache() -> None:
    """Persistent JAX compilation cache: a second run of the same shapes skips most compiling."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        default = os.path.join(os.path.expanduser("~"), ".cache", "herd_jax", "jax")
        jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", default))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    """Parses, resolves the config, trains; returns the exit code (herd_jax/errors.py lists them)."""
    from herd_jax.errors import quiet_libraries, report

    quiet_libraries()
    args = parser().parse_intermixed_args(argv)
    enable_compile_cache()

    def run() -> None:
        from herd_jax import config as config_lib
        from herd_jax import parallel
        from herd_jax.trainer import train_and_evaluate

        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)  # before anything touches the devices
        cfg, resume = resolve_run(args)
        if args.print_config:
            print(config_lib.to_toml(cfg), end="", flush=True)
            return
        train_and_evaluate(cfg, resume=resume, overwrite=args.overwrite)

    return report(run)
