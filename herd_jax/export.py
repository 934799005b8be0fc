"""Export a checkpoint's fine-tuned UNet as a diffusers pipeline that PyTorch loads.

  python -m herd_jax.export --checkpoint runs/x --out exported/x
  # then, in PyTorch: diffusers.StableDiffusionPipeline.from_pretrained("exported/x")

The output is the run's base model directory (its `model` config value) with `unet/` replaced by
the checkpoint's params, mapped to PyTorch names and layouts by the inverse of the loader's
mapping (`herd_jax.models.weights.torch_state_dict`) and written with `safetensors.numpy` as
`unet/diffusion_pytorch_model.safetensors` (no torch needed), next to the base's unet/config.json.
The other components are unchanged: their weight files are hard-linked where the filesystem
allows (they are never written to) and copied otherwise; every other file is copied.
`herd_jax_export.json` records which checkpoint the UNet came from.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
from typing import Any

import numpy as np

from herd_jax import checkpoint
from herd_jax import config as config_lib

_LINK_MIN_BYTES = 1 << 20  # hard-link files at least this big outside unet/ (weights), copy the rest


def write_weights(params: Any, component: str, file: pathlib.Path) -> None:
    """Writes a component's (`unet`, `text_encoder`, ...) params under their PyTorch names as float32 safetensors."""
    from safetensors.numpy import save_file

    from herd_jax.models.weights import torch_state_dict

    state = {k: v.astype(np.float32) for k, v in torch_state_dict(params, component).items()}
    save_file(state, str(file), metadata={"format": "pt"})


def write_unet(params: Any, unet_config_file: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Writes `params` as diffusers' `diffusion_pytorch_model.safetensors` plus a copy of `unet_config_file`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weights(params, "unet", out_dir / "diffusion_pytorch_model.safetensors")
    shutil.copyfile(unet_config_file, out_dir / "config.json")


def copy_pipeline(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies the pipeline directory except the UNet's weights; big files outside unet/ are hard-linked."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if rel.parts[0] == "unet":
            continue  # written by write_unet
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # hub snapshots hold symlinks into the blob cache
        if real.stat().st_size >= _LINK_MIN_BYTES:
            try:
                os.link(real, target)
                continue
            except OSError:
                pass
        shutil.copyfile(real, target)


def export(checkpoint_path: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
    """Writes the diffusers pipeline of `checkpoint_path`'s newest checkpoint to `out` (new or empty).

    Raises:
      CheckpointError, ModelNotFoundError, FileExistsError: one-line messages.
    """
    from herd_jax.evaluate import load_checkpoint, unet_params
    from herd_jax.models import load_pipeline, resolve_model_path

    from herd_jax.evaluate import writable_dir

    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory")
    writable_dir(out)  # fail before converting, not after
    step_dir, trained = load_checkpoint(str(checkpoint_path))
    cfg = config_lib.load_config([checkpoint.saved_config(checkpoint.find(step_dir))])
    params = unet_params(cfg, trained, lambda: load_pipeline(cfg.model).params["unet"])  # LoRA: merged into the base
    src = resolve_model_path(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    copy_pipeline(src, out)
    write_unet(params, (src / "unet" / "config.json").resolve(), out / "unet")
    provenance = {"checkpoint": str(step_dir), "step": int(step_dir.name), "base_model": cfg.model, "base_path": str(src)}
    (out / "herd_jax_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    from herd_jax.errors import ArgumentParser, quiet_libraries, report

    quiet_libraries()
    summary_line, _, details = __doc__.partition("\n\n")
    p = ArgumentParser(prog="python -m herd_jax.export", description=summary_line, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run, checkpoints/ or step directory (newest checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty directory for the diffusers pipeline")
    args = p.parse_args(argv)

    def run() -> None:
        out = export(args.checkpoint, args.out)
        print(f"wrote {out} (load with diffusers.StableDiffusionPipeline.from_pretrained({str(out)!r}))")

    return report(run)


if __name__ == "__main__":
    sys.exit(main())
