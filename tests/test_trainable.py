"""Trainable subsets: frozen UNet params stay bit-identical through real training epochs."""
import flax.traverse_util
import jax
import numpy as np
import pytest

from herd_jax import config as config_lib
from herd_jax import trainer
from herd_jax.trainable import Trainable


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(params)).items()}


def one_epoch(tmp_path, mode):
    cfg = config_lib.load_config(
        ["configs/tiny.toml", "tests/fast.toml"],
        [
            f'run_dir="{tmp_path}"', 'logging.log_with="none"', "checkpoint.save_every=0", 'algorithm.name="ddpo"',
            f'train.trainable="{mode}"', "train.clip_range=0.2",
        ],
    )
    setup, state = trainer.build(cfg)
    before = flat(setup.trainable.unet_params(state.params, setup.frozen.base))
    state, _, _ = trainer.run_epoch(setup, state)
    after = flat(setup.trainable.unet_params(state.params, setup.frozen.base))
    return setup, before, after


@pytest.mark.parametrize("mode", ["filter", "lora"])
def test_only_targets_change(tmp_path, mode):
    setup, before, after = one_epoch(tmp_path, mode)
    targets = set(setup.trainable.targets(jax.device_get(setup.frozen.base) if mode == "lora" else before_tree(before)))
    assert targets and targets < set(before)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert changed <= targets
    frozen = set(before) - targets
    for k in frozen:
        assert np.array_equal(before[k], after[k]), k  # bit-identical


def before_tree(flat_params):
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat_params.items()})


def test_lora_starts_at_the_pretrained_model(tiny_sd):
    lora = Trainable("lora", rank=2)
    adapters = lora.init(tiny_sd.params["unet"], jax.random.PRNGKey(0))
    merged = flat(lora.unet_params(adapters, tiny_sd.params["unet"]))
    base = flat(tiny_sd.params["unet"])
    assert all(np.array_equal(merged[k], base[k]) for k in base)
    n = lora.num_trainable(adapters, tiny_sd.params["unet"])
    assert 0 < n < sum(v.size for v in base.values()) / 10
