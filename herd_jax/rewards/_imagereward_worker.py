"""ImageReward scorer for the sidecar host, run in the environment of install_image_reward.sh.

Imports only the stdlib and that environment's packages (torch, torchvision, image-reward 1.5,
transformers...), never herd_jax. ``sidecar.py`` loads this file and calls ``load(args)``.

What it reproduces from the package (ImageReward 1.5, ``ImageReward/utils.py: load`` and
``ImageReward.py``): the checkpoint is a state dict (``ImageReward.pt``) for
``ImageReward(med_config)`` = BLIP ViT visual encoder + BERT text encoder with cross-attention
(``med_config.json``) + MLP head; a score is ``(mlp(text_cls) - 0.16717362830052426) /
1.0333394966054072`` on a 224 px bicubic resize + center crop with CLIP normalisation, prompts
padded/truncated to 35 tokens.
Scoring a batch calls the package's own batched ``ImageReward.score_gard``.

Patches applied at import time (never by editing site-packages):
- transformers >= 4.4x moved ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices``
  and ``prune_linear_layer`` from ``transformers.modeling_utils`` to ``transformers.pytorch_utils``;
  BLIP's ``med.py`` still imports them from the former, so they are put back there.
- The torchvision wheel beside a CPU-only torch is a CUDA build whose C ops cannot load; its
  ``import`` then fails registering fake kernels for them. ImageReward only needs
  ``torchvision.transforms`` (pure Python), so that registration module is skipped.
- BLIP builds its tokenizer with ``BertTokenizer.from_pretrained('bert-base-uncased')``; with
  ``--bert DIR`` that name is read from a local directory instead (offline use).
- ``ImageReward(...)`` always builds ViT-large; the ViT is sized from the checkpoint instead (so
  the published ViT-L/16 checkpoint gets exactly the package's ViT-large; tests use a tiny one).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import math
import os
import sys
import types
import warnings
from typing import Any, Callable

HUB_MED_CONFIG = "https://huggingface.co/THUDM/ImageReward/blob/main/med_config.json"
PROMPT_TOKENS = 35  # ImageReward.score: padding="max_length", truncation=True, max_length=35
IMAGE_SIZE = 224  # ImageReward.__init__: BLIP_Pretrain(image_size=224), _transform(224)
VIT_HEAD_DIM = 64  # BLIP's create_vit: base 768/12, large 1024/16
PUBLISHED_VIT = dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16)  # create_vit("large")


def _patch_transformers() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in (
        "apply_chunking_to_forward",
        "find_pruneable_heads_and_indices",
        "prune_linear_layer",
    ):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))


def _patch_torchvision() -> None:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or "torchvision" in sys.modules:
        return
    libs = [
        p for d in spec.submodule_search_locations for p in glob.glob(os.path.join(d, "_C*.so"))
    ]
    try:
        for lib in libs:
            torch.ops.load_library(lib)
    except OSError:
        name = "torchvision._meta_registrations"
        sys.modules[name] = types.ModuleType(name)
        print(
            "imagereward worker: torchvision C ops unavailable (CUDA build beside CPU torch); "
            "using its pure-Python transforms only",
            file=sys.stderr,
        )


def _patch_bert_tokenizer(bert_dir: str) -> None:
    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    base = blip.BertTokenizer

    class LocalBertTokenizer(base):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):  # 'bert-base-uncased' -> local directory
            return base.from_pretrained(bert_dir, *args, **kwargs)

    blip.BertTokenizer = LocalBertTokenizer


def import_image_reward(bert_dir: str = "") -> types.ModuleType:
    """Imports the ``ImageReward`` package with the patches above; returns the package."""
    _patch_torchvision()  # first: importing transformers imports torchvision
    _patch_transformers()
    with warnings.catch_warnings():  # clip (imported by the package) uses pkg_resources
        warnings.filterwarnings(
            "ignore", message="pkg_resources is deprecated", category=UserWarning
        )
        import ImageReward

    if bert_dir:
        _patch_bert_tokenizer(bert_dir)
    return ImageReward


def vit_shape(state_dict: dict[str, Any], prefix: str = "blip.visual_encoder.") -> dict[str, int]:
    """BLIP ``VisionTransformer`` arguments read off a checkpoint's visual-encoder weights."""
    try:
        width = int(state_dict[prefix + "pos_embed"].shape[-1])
        patches = int(state_dict[prefix + "pos_embed"].shape[1]) - 1
        patch = int(state_dict[prefix + "patch_embed.proj.weight"].shape[-1])
    except KeyError as exc:
        raise ValueError(f"checkpoint has no ImageReward visual encoder (missing {exc})") from None
    depth = 1 + max(
        int(k[len(prefix) :].split(".")[1]) for k in state_dict if k.startswith(prefix + "blocks.")
    )
    side = math.isqrt(patches)
    if side * side != patches or side * patch != IMAGE_SIZE:
        raise ValueError(
            f"checkpoint ViT sees {patches} patches of {patch} px; ImageReward needs {IMAGE_SIZE} px images"
        )
    return dict(
        embed_dim=width, depth=depth, num_heads=max(1, width // VIT_HEAD_DIM), patch_size=patch
    )


def build_model(
    package: types.ModuleType, state_dict: dict[str, Any], med_config: str, device: str
):
    """``ImageReward(med_config)`` with its ViT sized from ``state_dict``, weights loaded, in eval mode."""
    shape = vit_shape(state_dict)
    blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    create_vit = blip_pretrain.create_vit

    def sized_vit(name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        if shape == PUBLISHED_VIT:
            return create_vit(name, image_size, use_grad_checkpointing, ckpt_layer, drop_path_rate)
        encoder = vit.VisionTransformer(img_size=image_size, **shape, drop_path_rate=drop_path_rate)
        return encoder, shape["embed_dim"]

    blip_pretrain.create_vit = sized_vit
    try:
        model = importlib.import_module("ImageReward.ImageReward").ImageReward(
            med_config=med_config, device=device
        )
    finally:
        blip_pretrain.create_vit = create_vit
    result = model.load_state_dict(state_dict, strict=False)
    needed = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
    missing = [
        k for k in result.missing_keys if k.startswith(needed) and not k.endswith("position_ids")
    ]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} ImageReward weights, e.g. {missing[:3]}")
    return model.to(device).eval()


def _resolve(
    package: types.ModuleType, checkpoint: str, med_config: str, download_root: str
) -> tuple[str, str]:
    """Local files as given, else the package's own hub download (``ImageReward-v1.0``)."""
    root = download_root or os.path.expanduser("~/.cache/ImageReward")
    if os.path.isfile(checkpoint):
        path = checkpoint
        beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "med_config.json")
        if not med_config and os.path.isfile(beside):
            med_config = beside
    elif checkpoint in package.available_models():
        path = _download(package, package.utils._MODELS[checkpoint], root, checkpoint)
    else:
        raise FileNotFoundError(
            f"ImageReward checkpoint {checkpoint!r} is neither a file nor one of {package.available_models()}"
        )
    if not med_config:
        med_config = _download(package, HUB_MED_CONFIG, root, "med_config.json")
    elif not os.path.isfile(med_config):
        raise FileNotFoundError(f"med_config {med_config!r} does not exist")
    return path, med_config


def _download(package: types.ModuleType, url: str, root: str, what: str) -> str:
    try:
        return package.ImageReward_download(url, root)
    except Exception as exc:
        raise RuntimeError(
            f"{what} is not local and the hub download failed ({type(exc).__name__}; offline?): "
            "give a local ImageReward.pt, its med_config.json and a BERT vocab directory "
            "(reward.imagereward_checkpoint, reward.imagereward_med_config, reward.imagereward_bert)"
        ) from None


def score_batch(model, images, prompts: list[str]):
    """``uint8[B,H,W,3]`` numpy images + B prompts -> float32[B] numpy, as ``ImageReward.score`` per image."""
    import numpy as np
    import torch
    from PIL import Image

    with torch.no_grad():
        pixels = torch.stack(
            [model.preprocess(Image.fromarray(np.ascontiguousarray(im))) for im in images]
        )
        text = model.blip.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=PROMPT_TOKENS,
            return_tensors="pt",
        )
        device = model.device
        rewards = model.score_gard(
            text.input_ids.to(device), text.attention_mask.to(device), pixels.to(device)
        )
    return rewards.reshape(-1).float().cpu().numpy()


def load(args: list[str]) -> Callable[[Any, list[str]], Any]:
    """Sidecar entry point: parse ``args``, load the model, return the batch scorer."""
    parser = argparse.ArgumentParser(prog="imagereward worker")
    parser.add_argument(
        "--checkpoint", default="ImageReward-v1.0", help="ImageReward.pt or a hub model name"
    )
    parser.add_argument(
        "--med-config", default="", help="med_config.json (default: beside the checkpoint, or hub)"
    )
    parser.add_argument(
        "--bert", default="", help="local BERT tokenizer directory (default: bert-base-uncased)"
    )
    parser.add_argument(
        "--download-root", default="", help="hub download directory (default ~/.cache/ImageReward)"
    )
    parser.add_argument(
        "--device", default="", help="torch device (default: cuda if available, else cpu)"
    )
    opts = parser.parse_args(args)

    package = import_image_reward(opts.bert)
    import torch

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint, med_config = _resolve(package, opts.checkpoint, opts.med_config, opts.download_root)
    try:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read ImageReward checkpoint {checkpoint}: {exc}") from None
    try:
        model = build_model(package, state_dict, med_config, device)
    except OSError as exc:  # the tokenizer: from_pretrained('bert-base-uncased') offline
        raise RuntimeError(
            f"cannot load BLIP's BERT tokenizer ({exc}); pass a local BERT vocab directory"
        ) from None
    print(
        f"imagereward worker: {checkpoint} ({med_config}) on {device}, ViT {vit_shape(state_dict)}",
        file=sys.stderr,
    )
    return lambda images, prompts: score_batch(model, images, prompts)
