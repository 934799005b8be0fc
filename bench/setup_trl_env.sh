#!/usr/bin/env bash
# Builds bench/.venv-trl: TRL 0.23.1 (the last release with DDPOTrainer) and the PyTorch stack it
# drives, isolated from herd-jax's environment. Used by bench/trl_compare.py.
#
#   bash bench/setup_trl_env.sh            # idempotent; prints the versions at the end
#
# torch is pinned to the CPU wheel herd-jax's own environment uses (2.13.0). pip must find that
# wheel locally (a --find-links folder, e.g. PIP_FIND_LINKS=/opt/wheels) or through an index you
# configure for CPU wheels (PIP_EXTRA_INDEX_URL); the script refuses a CUDA build instead of
# silently downloading gigabytes (set ALLOW_ANY_TORCH=1 to skip that check, e.g. on macOS). The
# other pins match herd-jax (diffusers, transformers) or are the newest that resolve with them
# (accelerate, datasets, peft: DefaultDDPOStableDiffusionPipeline calls load_lora_weights, which
# needs the PEFT backend even with use_lora=False).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${TRL_VENV:-$HERE/.venv-trl}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

PINS=(
  "torch==2.13.0"
  "diffusers==0.39.0"
  "transformers==4.57.6"
  "huggingface-hub>=0.34,<1.0"
  "trl==0.23.1"
  "accelerate==1.15.0"
  "datasets==5.0.1"
  "peft==0.21.2"
  "safetensors==0.8.0"
  "pillow==13.0.0"
  "numpy>=2.0,<3"
)

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
FIND_LINKS=()
[[ -d /opt/wheels ]] && FIND_LINKS=(--find-links /opt/wheels)

# torch first and alone, CPU build only: ask pip what it would install before it downloads anything.
REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
"${PIP[@]}" install --quiet --dry-run --no-deps --report "$REPORT" "${FIND_LINKS[@]}" --only-binary=:all: "${PINS[0]}"
"$VENV/bin/python" - "$REPORT" <<'PY'
import json, os, sys
wanted = [i["metadata"]["version"] for i in json.load(open(sys.argv[1])).get("install", [])]
if wanted and not wanted[0].endswith("+cpu") and sys.platform != "darwin" and not os.environ.get("ALLOW_ANY_TORCH"):
    sys.exit(f"error: pip would install torch {wanted[0]}, not the CPU build 2.13.0+cpu (gigabytes of CUDA); "
             "point pip at the CPU wheel (PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL) or set ALLOW_ANY_TORCH=1")
PY
"${PIP[@]}" install --quiet "${FIND_LINKS[@]}" --only-binary=:all: "${PINS[0]}"
"${PIP[@]}" install --quiet "${FIND_LINKS[@]}" "${PINS[@]}"

"$VENV/bin/python" - <<'PY'
import accelerate, diffusers, torch, transformers, trl
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401  (fails loudly if missing)
print(f"TRL env ready: trl {trl.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}")
PY
