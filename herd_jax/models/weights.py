"""Published weights <-> our params: PyTorch names and layouts mapped to ours and back.

Our parameter path `down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel`
is PyTorch's `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight`: list
containers (`_LISTS`) carry their index after an underscore, other path parts are the same,
and the leaf renames `kernel`/`scale`/`embedding` -> `weight`. Layouts: conv kernels
HWIO <- OIHW, dense kernels [in, out] <- [out, in], everything else as is. Two components
have other PyTorch names: the VAE attention's `query`/`key`/`value`/`proj_attn` are current
diffusers' `to_q`/`to_k`/`to_v`/`to_out.0` (`_ALIASES`; old files' names also accepted), and
transformers >= 5 saves a CLIP text encoder without its `text_model.` prefix (both accepted).

Reading needs no torch for `.safetensors` (`safetensors.numpy`); `.bin` imports torch lazily;
Flax `.msgpack` files hold our names already. Every file is checked against the abstract params
of the module the config builds: a missing, extra or mis-shaped tensor raises `WeightsError`
with one line naming the file and the tensor.
"""
from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

_LISTS = re.compile(r"(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net)_(\d+)")
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Per component: our name part -> the name current PyTorch files use instead; ours is accepted too.
_ALIASES = {"vae": {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}}
# PyTorch tensors in the file that no module of ours holds, on purpose (key predicate per component).
_SKIPPED: dict[str, Callable[[str], bool]] = {
    "unet": lambda key: False,
    "vae": lambda key: key.startswith(("encoder.", "quant_conv.")),  # we only decode
    "text_encoder": lambda key: key.endswith("position_ids"),  # a buffer in older files
    "clip_vision": lambda key: not key.startswith(("vision_model.", "visual_projection.")) or key.endswith("position_ids"),
}
# The same for Flax msgpack files, by top-level name.
_MSGPACK_SKIPPED: dict[str, Callable[[str], bool]] = {
    "unet": lambda top: False,
    "vae": lambda top: top in ("encoder", "quant_conv"),
    "text_encoder": lambda top: False,
    "clip_vision": lambda top: top not in ("vision_model", "visual_projection"),  # the text side of a full CLIP msgpack
}
_CONFIG_OF = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
              "clip_vision": "its config.json"}


class WeightsError(ValueError):
    """A weight file that cannot be read or does not match the module (message: one line)."""


def torch_names(path: tuple[str, ...], component: str) -> list[str]:
    """PyTorch names of our parameter `path`: the primary one first, then accepted alternatives."""
    parts = [_LISTS.sub(r"\1.\2", part) if _LISTS.fullmatch(part) else part for part in path[:-1]]
    leaf = _LEAVES.get(path[-1], path[-1])
    names = [".".join([*parts, leaf])]
    aliases = _ALIASES.get(component, {})
    if any(p in aliases for p in parts):
        names.insert(0, ".".join([*(aliases.get(p, p) for p in parts), leaf]))
    if component == "text_encoder" and parts[0] == "text_model":
        names.append(".".join([*parts[1:], leaf]))  # transformers >= 5 saves CLIPTextModel unprefixed
    return names


def to_ours(tensor: np.ndarray, leaf: str) -> np.ndarray:
    """A PyTorch tensor in our layout (conv OIHW -> HWIO, linear [out, in] -> [in, out])."""
    if leaf == "kernel" and tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if leaf == "kernel" and tensor.ndim == 2:
        return tensor.T
    return tensor


def to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of `to_ours`."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def torch_state_dict(params: Any, component: str) -> dict[str, np.ndarray]:
    """Our params -> {PyTorch name: contiguous float array}, as a diffusers/transformers model loads them."""
    return {
        torch_names(path, component)[0]: np.ascontiguousarray(to_torch(np.asarray(value), path[-1]))
        for path, value in flatten_dict(params).items()
    }


def read_state_dict(file: pathlib.Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict as numpy arrays (bfloat16 -> float32) from `.safetensors` or `.bin`.

    torch is imported only for `.bin` files and for safetensors holding bfloat16 (numpy has no
    bfloat16 for `safetensors.numpy` to return).
    """
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="numpy") as f:
                if all(f.get_slice(key).get_dtype() != "BF16" for key in f.keys()):
                    return {key: f.get_tensor(key) for key in f.keys()}
        import torch

        if file.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a flat PyTorch state dict")
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
    except Exception as e:
        raise WeightsError(f"cannot read {file}: {type(e).__name__}: {first_line(e)}") from e


def params_from_state_dict(state: Mapping[str, np.ndarray], shapes: Any, component: str, file: Any, dtype: Any) -> dict:
    """Our params shaped like `shapes` (ShapeDtypeStructs) from a PyTorch state dict; every tensor accounted for."""
    where = f"{file} does not fit {_CONFIG_OF.get(component, component)}"
    out, used = {}, set()
    for path, spec in flatten_dict(shapes).items():
        names = torch_names(path, component)
        name = next((n for n in names if n in state), None)
        if name is None:
            raise WeightsError(f"{where}: no tensor {names[0]} (shape {_torch_shape(spec.shape, path[-1])})")
        value = to_ours(np.asarray(state[name]), path[-1])
        if value.shape != tuple(spec.shape):
            raise WeightsError(
                f"{where}: tensor {name} has shape {_torch_shape(value.shape, path[-1])}, "
                f"the config implies {_torch_shape(spec.shape, path[-1])}"
            )
        out[path] = value.astype(dtype, copy=False)
        used.add(name)
    extra = sorted(k for k in state if k not in used and not _SKIPPED[component](k))
    if extra:
        raise WeightsError(f"{where}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return unflatten_dict(out)


def params_from_msgpack(file: pathlib.Path, shapes: Any, component: str, dtype: Any) -> dict:
    """Our params from a Flax msgpack written by diffusers/transformers (or flax.serialization), checked the same way."""
    from flax.serialization import msgpack_restore

    try:
        tree = msgpack_restore(file.read_bytes())
    except Exception as e:
        raise WeightsError(f"cannot read {file}: {type(e).__name__}: {first_line(e)}") from e
    tree = tree.get("params", tree) if isinstance(tree, dict) else tree
    got = {k: v for k, v in flatten_dict(dict(tree)).items() if not _MSGPACK_SKIPPED[component](k[0])}
    where = f"{file} does not fit {_CONFIG_OF.get(component, component)}"
    want = flatten_dict(shapes)
    for path, spec in want.items():
        if path not in got:
            raise WeightsError(f"{where}: no parameter {'/'.join(path)} (shape {tuple(spec.shape)})")
        if tuple(np.shape(got[path])) != tuple(spec.shape):
            raise WeightsError(f"{where}: parameter {'/'.join(path)} has shape {np.shape(got[path])}, the config implies {tuple(spec.shape)}")
    extra = sorted("/".join(k) for k in got if k not in want)
    if extra:
        raise WeightsError(f"{where}: unexpected parameter {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return unflatten_dict({k: np.asarray(got[k]).astype(dtype, copy=False) for k in want})


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """A shape of ours written as the PyTorch tensor's (what the file's reader sees)."""
    return tuple(to_torch(np.empty(shape, np.uint8), leaf).shape) if leaf == "kernel" else tuple(shape)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, at most 160 characters (for one-line errors)."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."
