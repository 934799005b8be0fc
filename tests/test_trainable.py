"""Trainable subsets: what LoRA merges into the UNet, and where it starts (a `filter` run changing
only its targets through real epochs: tests/test_resume.py)."""
import flax.traverse_util
import jax
import numpy as np

from herd_jax.trainable import Trainable


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(params)).items()}


def test_lora_merge_changes_only_the_targets(tiny_sd):
    """The UNet a LoRA run samples and differentiates (`unet_params`) with nonzero adapters, as after
    training: every target kernel differs from the base, every other param is the base's bit for
    bit. (That an epoch moves the adapters is checked by tests/test_resume.py's ddpg-lora-bf16 run;
    that a `filter` epoch changes only its targets, bit for bit, by its dpok-filter run.)"""
    lora = Trainable("lora", rank=2)
    base = tiny_sd.params["unet"]
    trained = jax.tree.map(lambda x: x + 0.01, lora.init(base, jax.random.PRNGKey(0)))
    merged, original = flat(lora.unet_params(trained, base)), flat(base)
    targets = set(lora.targets(base))
    assert targets and targets < set(original) and set(merged) == set(original)
    assert {k for k in original if not np.array_equal(merged[k], original[k])} == targets


def test_lora_starts_at_the_pretrained_model(tiny_sd):
    lora = Trainable("lora", rank=2)
    adapters = lora.init(tiny_sd.params["unet"], jax.random.PRNGKey(0))
    merged = flat(lora.unet_params(adapters, tiny_sd.params["unet"]))
    base = flat(tiny_sd.params["unet"])
    assert all(np.array_equal(merged[k], base[k]) for k in base)
    n = lora.num_trainable(adapters, tiny_sd.params["unet"])
    assert 0 < n < sum(v.size for v in base.values()) / 10
