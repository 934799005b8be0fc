"""Test setup shared by every test: offline hubs, CPU JAX, a persistent compile cache.

JAX compiles dominate test time on 2 cores, so the persistent compilation cache lives in
the repo's `.cache/` (ignored by git) and is shared by the test process and the
subprocesses it starts (through the environment variables set here).

The Hugging Face caches (hub, assets, modules, xet, datasets) point to a fresh directory under
`.cache/` for each test session, removed at its end, so no test reads or writes the user's hub
cache (`~/.cache/huggingface` or wherever their HF_HOME says); the legacy variables that would
override them (TRANSFORMERS_CACHE, HUGGINGFACE_HUB_CACHE, ...) are removed. This runs before
huggingface_hub, transformers or diffusers is imported: they read these variables at import.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

(REPO / ".cache").mkdir(exist_ok=True)
HF_HOME = pathlib.Path(tempfile.mkdtemp(prefix="hf-home-", dir=REPO / ".cache"))
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
for var in ("TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE", "HUGGINGFACE_HUB_CACHE",
            "HUGGINGFACE_ASSETS_CACHE", "DIFFUSERS_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(var, None)
os.environ["HF_HOME"] = str(HF_HOME)
for var, sub in [("HF_HUB_CACHE", "hub"), ("HF_ASSETS_CACHE", "assets"), ("HF_MODULES_CACHE", "modules"), ("HF_XET_CACHE", "xet"),
                 ("HF_DATASETS_CACHE", "datasets")]:
    os.environ[var] = str(HF_HOME / sub)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HERD_JAX_CACHE", str(REPO / ".cache" / "herd_jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
# Every program into the persistent cache, however quick its compile: a warm 2-epoch tiny run then
# skips ~40 sub-second compiles (16.0 -> 11.2 CPU-s per process, 2026-12-07, 2-core Xeon; the cold
# suite is unchanged, 21.0 vs 21.2 user CPU-min: it compiles most configs in one process only).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU compile options for the tiny models (tests and the processes they start): LLVM at -O0
# without its expensive passes, and one codegen module per program. Measured on 2 cores from a
# cold cache: -O1 (2026-12-02) took a 2-epoch tiny run from 85 to 65 CPU-s and the demo learning
# test from 113 to 95 s wall; skipping the expensive passes (2026-12-03) then 51 -> 45 CPU-s and
# 77 -> 70 CPU-s; -O0 (2026-12-07) a 2-epoch tiny run 39.7 -> 36.4 CPU-s (compiles ~17% faster,
# executes ~30% slower). Most tests compile far more than they execute, so the suite runs at -O0;
# the two that execute most (the demo's 45 epochs, test_fsdp's remat epochs: 77 -> 112 and 90 ->
# 128 CPU-s at -O0) run in processes of their own at -O1. Every comparison between processes
# (killed vs straight runs, 2 processes vs 1) has both sides at the same level. Tests that force
# a device count append to these flags.
_flags = os.environ.get("XLA_FLAGS", "").split()
_fast_compile = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in _fast_compile if f not in _flags])

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def executing_xla_flags() -> str:
    """XLA_FLAGS for a process that executes more than it compiles: the suite's, LLVM at -O1."""
    return os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "--xla_backend_optimization_level=1")


@pytest.fixture(scope="session")
def tiny_sd():
    """The embedded tiny SD, loaded once per test session through the real loader."""
    from herd_jax.models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def tiny_policy(tiny_sd):
    """A 4-step DDIM policy on the tiny model (fixed shapes shared by the rollout tests)."""
    from herd_jax.diffusion import make_policy

    return make_policy(tiny_sd, num_steps=4, eta=1.0, guidance_scale=5.0)


# Modules by CPU-s from a cold cache (fresh clone, 2-core Xeon, 2026-12-07); test_checkpoint's
# group also holds test_run_safety, test_evaluate_export and test_logging_integration.
HEAVIEST_FIRST = (
    "test_checkpoint",  # ~190 with its group
    "test_multihost",  # 105
    "test_update_paths",  # 105
    "test_fsdp",  # 86
    "test_demo",  # 79
    "test_resume",  # 77 (3 ungrouped runs)
    "test_models",  # 71
    "test_memory_plan",  # 68
    "test_imagereward",  # 68
    "test_herd_correction",  # 43
)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`), a test module whose tests share a module-scoped
    fixture (tiny runs, multi-process runs, compiled models) is one group, unless its tests name
    another (`xdist_group("tiny_runs")` spans modules): the fixture then runs once, on one worker,
    instead of once on every worker that gets one of its tests. Other tests spread one by one.

    The heaviest modules go first (xdist hands out groups in collection order), so that the last
    ones to start are short and both workers finish together: in collection order, test_resume's
    three ~25 CPU-s runs were handed out last and one worker idled 37 s at the end (2026-12-07)."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: the rest keep their order
    for item in items:
        if any(m.name == "xdist_group" for m in item.iter_markers()):
            continue
        definitions = getattr(item, "_fixtureinfo", None)
        scopes = {d.scope for defs in (definitions.name2fixturedefs.values() if definitions else ()) for d in defs}
        if "module" in scopes:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))



@pytest.fixture
def reuse_builds(monkeypatch):
    """`trainer.build` reuses the test process's earlier Setup of the same config (tests/builds.py)."""
    import builds

    from herd_jax import trainer

    monkeypatch.setattr(trainer, "build", builds.reusing(trainer.build))
