"""Export a checkpoint's fine-tuned UNet as a diffusers pipeline that PyTorch loads.

  python -m herd_jax.export --checkpoint runs/x --out exported/x
  # then, in PyTorch: diffusers.StableDiffusionPipeline.from_pretrained("exported/x")

The output is the run's base model directory (its `model` config value) with `unet/` replaced by
the checkpoint's params, converted Flax -> PyTorch with diffusers' own
`load_flax_weights_in_pytorch_model` and written as `unet/diffusion_pytorch_model.safetensors`.
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
import warnings
from typing import Any

import numpy as np

from herd_jax import checkpoint
from herd_jax import config as config_lib

_LINK_MIN_BYTES = 1 << 20  # hard-link files at least this big outside unet/ (weights), copy the rest


def flax_unet_to_torch(params: Any, unet_config: dict[str, Any]) -> Any:
    """A PyTorch `UNet2DConditionModel` built from `unet_config` holding the Flax `params`.

    Every PyTorch tensor must receive a Flax one and every Flax one must be used; otherwise a
    ValueError (diffusers' converter only warns).
    """
    import jax
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.modeling_pytorch_flax_utils import load_flax_weights_in_pytorch_model
    from flax.traverse_util import flatten_dict

    model = UNet2DConditionModel.from_config(unet_config)
    with torch.no_grad():  # NaN marks what the converter did not fill
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    params = jax.tree.map(lambda x: np.array(x, np.float32), params)  # writable copies for torch.from_numpy
    with warnings.catch_warnings():  # torch.from_numpy of read-only arrays: load_state_dict copies them anyway
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        model = load_flax_weights_in_pytorch_model(model, params)
    state = model.state_dict()
    unfilled = [k for k, v in state.items() if v.is_floating_point() and torch.isnan(v).any()]
    num_flax = len(flatten_dict(params))
    if unfilled or num_flax != len(state):
        raise ValueError(
            f"Flax -> PyTorch UNet conversion mismatch: {num_flax} Flax tensors, {len(state)} PyTorch tensors, "
            f"{len(unfilled)} left unset (e.g. {unfilled[:1]})"
        )
    return model.eval()


def _copy_pipeline(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies the pipeline directory except the UNet's weights; big files outside unet/ are hard-linked."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if rel.parts[0] == "unet":
            continue  # written by save_pretrained
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # hub snapshots hold symlinks into the blob cache
        if rel.parts[0] != "unet" and real.stat().st_size >= _LINK_MIN_BYTES:
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
    unet_config = json.loads((src / "unet" / "config.json").read_text())
    model = flax_unet_to_torch(params, unet_config)
    out.mkdir(parents=True, exist_ok=True)
    _copy_pipeline(src, out)
    model.save_pretrained(out / "unet", safe_serialization=True)
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
