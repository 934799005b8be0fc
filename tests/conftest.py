"""Test setup shared by every test: offline hubs, CPU JAX, a persistent compile cache.

JAX compiles dominate test time on 2 cores, so the persistent compilation cache lives in
the repo's `.cache/` (ignored by git) and is shared by the test process and the
subprocesses it starts (through the environment variables set here).
"""
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HERD_JAX_CACHE", str(REPO / ".cache" / "herd_jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
