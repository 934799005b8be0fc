#!/usr/bin/env bash
# Builds the Python environment the `imagereward` reward runs in (as a sidecar process).
#
#   ./install_image_reward.sh [ENV_DIR]      default ENV_DIR: .venv-imagereward beside this script
#
# Why a separate environment: image-reward 1.5 pins timm 0.6.13 / fairscale 0.4.13 and its
# `clip` needs setuptools < 81, and a PyPI torchvision next to the main environment's torch
# breaks transformers/diffusers imports there. Everything below is pinned; the last line printed
# is the environment's python (pass it as reward.imagereward_python, or leave that empty to use
# .venv-imagereward). Idempotent: a second run with the same pins returns at once.
#
# torch/torchvision pair (IMAGE_REWARD_TORCH=auto|cpu|cuda, default auto = cuda if nvidia-smi
# lists a GPU, else cpu):
#   cpu:  torch 2.13.0+cpu (the machine's local wheel) + torchvision 0.28.0 (its pair; a CUDA
#         build whose C ops cannot load beside a CPU torch, so the worker imports only its pure-
#         Python transforms). About 1.5 GB, ~1 min.
#   cuda: torch 2.14.1 + torchvision 0.29.1 (CUDA 13 builds with their nvidia-* wheels). About
#         6 GB, ~2.5 min.
# Python: $PYTHON, else python3.11, else python3 (must be 3.11: the pinned wheels are cp311).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_DIR="$(realpath -m "${1:-$REPO/.venv-imagereward}")"
VARIANT="${IMAGE_REWARD_TORCH:-auto}"
if [[ "$VARIANT" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    VARIANT=cuda
  else
    VARIANT=cpu
  fi
fi
case "$VARIANT" in
  cpu) TORCH_PINS=("torch==2.13.0+cpu" "torchvision==0.28.0") ;;
  cuda) TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1") ;;
  *) echo "install_image_reward.sh: IMAGE_REWARD_TORCH must be auto, cpu or cuda, got '$VARIANT'" >&2; exit 2 ;;
esac

# image-reward and everything it pulls in, pinned (resolved together on 2026-11-25; torch's own
# small dependencies -- sympy, networkx, jinja2, filelock... -- come with the torch pair).
PINS=(
  image-reward==1.5 timm==0.6.13 fairscale==0.4.13 clip-anytorch==2.6.0 setuptools==80.9.0
  transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 hf-xet==1.8.0 safetensors==0.8.0
  diffusers==0.39.0 accelerate==1.15.0 datasets==5.0.1 numpy==2.4.6 pillow==13.0.0 ftfy==6.3.1
  wcwidth==0.9.4 regex==2026.11.19 tqdm==4.70.1 pyyaml==6.0.4 requests==2.34.2 urllib3==2.8.0
  idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.2 httpx==0.28.1 httpcore==1.0.9
  h11==0.16.0 anyio==4.16.0 pandas==3.1.1 python-dateutil==4.0.0 tzdata==2026.6 pyarrow==26.0.1
  fsspec==2026.6.0 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0
  frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 dill==0.4.1 multiprocess==0.70.19
  xxhash==4.1.0 psutil==7.2.2 packaging==26.3 importlib-metadata==10.2.0 zipp==4.1.2
  lazy-importer==0.1.0
)

STAMP="$ENV_DIR/.herd_jax_pins"
WANT="$(printf '%s\n' "$VARIANT" "${TORCH_PINS[@]}" "${PINS[@]}")"
if [[ -x "$ENV_DIR/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "$ENV_DIR/bin/python"
  exit 0
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "install_image_reward.sh: need Python 3.11 (set PYTHON=...), got $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi

start=$SECONDS
echo "install_image_reward.sh: building $ENV_DIR ($VARIANT torch) with $PYTHON" >&2
rm -f "$STAMP"
"$PYTHON" -m venv "$ENV_DIR"
pip_install() {
  # The machine's pip config lists local file:// indexes; their "is ignored" notes are noise.
  "$ENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# torch first, alone: later resolutions then keep this build instead of fetching another.
pip_install "${TORCH_PINS[@]}"
pip_install "${TORCH_PINS[@]}" "${PINS[@]}"
"$ENV_DIR/bin/python" -m pip check >&2
# Smoke test: the imports the worker needs, with its import-time patches.
"$ENV_DIR/bin/python" -I -c '
import importlib.util, sys
spec = importlib.util.spec_from_file_location("w", sys.argv[1]); w = importlib.util.module_from_spec(spec)
spec.loader.exec_module(w); w.import_image_reward()
import torch, timm, ImageReward; print("image-reward ready: torch", torch.__version__, file=sys.stderr)
' "$REPO/herd_jax/rewards/_imagereward_worker.py"
printf '%s' "$WANT" > "$STAMP"
echo "install_image_reward.sh: done in $((SECONDS - start)) s" >&2
echo "$ENV_DIR/bin/python"
