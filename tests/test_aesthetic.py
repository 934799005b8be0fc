"""The JAX aesthetic scorer against PyTorch (model parity) and CLIPImageProcessor (preprocessing).

Everything is built here: a tiny random PyTorch CLIP saved with save_pretrained, and random
LAION-shaped MLP heads saved as .pth with the published (and TRL/prefixed) key names.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from herd_jax.config import RewardConfig
from herd_jax.rewards import RewardError, make_reward
from herd_jax.models import CLIPVisionModel
from herd_jax.rewards.aesthetic import ClipPreprocess, clip_preprocess, load_aesthetic_head, load_clip_embedder

IMAGE_SIZE = 32  # the tiny CLIP's input; its processor resizes the shortest side to this
PROJECTION = 768  # as ViT-L/14, so the head has the published shape


class LaionMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (also TRL's and ddpo-pytorch's), as a reference."""

    def __init__(self, dims=(PROJECTION, 1024, 128, 64, 16, 1)):
        super().__init__()
        d = dims
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d[0], d[1]), torch.nn.Dropout(0.2),
            torch.nn.Linear(d[1], d[2]), torch.nn.Dropout(0.2),
            torch.nn.Linear(d[2], d[3]), torch.nn.Dropout(0.1),
            torch.nn.Linear(d[3], d[4]),
            torch.nn.Linear(d[4], d[5]),
        )

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(clip dir, head .pth, torch CLIPModel, torch head) — tiny and random, built once."""
    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=PROJECTION,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(root / "clip")
    head = LaionMLP().eval()
    with torch.no_grad():  # variance-preserving weights and a wide last layer spread the scores
        for layer in head.layers:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                torch.nn.init.normal_(layer.bias, std=0.01)
        head.layers[7].weight.mul_(100.0)
        head.layers[7].bias.fill_(5.0)
    torch.save(head.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    return root, clip, head


@pytest.fixture(scope="module")
def reward(assets):
    root, _, _ = assets
    cfg = RewardConfig(name="aesthetic", aesthetic_clip=str(root / "clip"),
                       aesthetic_head=str(root / "sac+logos+ava1-l14-linearMSE.pth"), batch_size=4)
    reward = make_reward(cfg)
    yield reward
    reward.close()


def images(batch=4, shape=(40, 48), seed=0):
    """Noise, with a black, a white and a gradient image first (CLIP embeds noise alike)."""
    x = np.random.default_rng(seed).integers(0, 256, (batch, *shape, 3), dtype=np.uint8)
    x[0], x[1] = 0, 255
    x[2] = np.linspace(0, 255, shape[1], dtype=np.uint8)[None, :, None]
    return x


def test_jax_scores_match_pytorch(assets, reward):
    _, clip, head = assets
    x = images()
    got = reward(x, ["p"] * len(x))
    assert got.dtype == np.float32 and got.shape == (4,)
    # Same pixels into both models (our preprocessing, converted), so only the models differ.
    pixels = np.asarray(clip_preprocess(jnp.asarray(x), reward.spec.preprocess))
    with torch.no_grad():
        embed = clip.get_image_features(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).pooler_output
        embed_jax = CLIPVisionModel(reward.spec.vision_config).apply({"params": reward.params["clip"]}, pixels)
        np.testing.assert_allclose(embed_jax, embed.numpy(), atol=1e-5, rtol=1e-4)
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        want = head(embed).squeeze(1).numpy()
    assert np.std(want) > 0.5  # the scores differ between images, so the match means something
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The jitted pure function is what the reward calls.
    np.testing.assert_allclose(reward.score_fn(reward.params, jnp.asarray(x)), got, atol=1e-6)


def test_chunking_pads_and_matches(reward):
    x = images(batch=6, seed=1)
    got = reward(x, ["p"] * 6)  # chunks of 4: [4, 2 + 2 padding]
    np.testing.assert_allclose(got[:4], reward(x[:4], ["p"] * 4), atol=1e-6)
    np.testing.assert_allclose(got[4:], reward(np.concatenate([x[4:], x[4:]]), ["p"] * 4)[:2], atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 32), (48, 64), (512, 512)])
def test_preprocessing_matches_clip_image_processor(shape):
    """Tolerance: <= 2 uint8 levels (PIL's fixed-point passes, 1 level each) on <= 1% of values."""
    processor = CLIPImageProcessor()  # ViT-L/14's: shortest edge 224, crop 224, bicubic
    pre = ClipPreprocess.from_processor(processor)
    assert pre == ClipPreprocess()
    rng = np.random.default_rng(2)
    coarse = rng.integers(0, 256, (1, shape[0] // 8, shape[1] // 8, 3), dtype=np.uint8)
    smooth = np.asarray(jax.image.resize(coarse.astype(np.float32), (1, *shape, 3), "linear")).round().astype(np.uint8)
    x = np.concatenate([smooth, rng.integers(0, 256, (1, *shape, 3), dtype=np.uint8)])
    want = processor(images=list(x), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(clip_preprocess, static_argnums=1)(jnp.asarray(x), pre))
    assert got.shape == want.shape == (2, 224, 224, 3)
    levels = np.abs(got - want) * np.asarray(pre.std) * 255
    assert levels.max() <= 2.0 + 1e-3
    assert np.mean(levels > 1e-3) <= 0.01


def test_head_key_variants(assets, tmp_path):
    root, _, head = assets
    features, in_dim, params = load_aesthetic_head(str(root / "sac+logos+ava1-l14-linearMSE.pth"))
    assert features == (1024, 128, 64, 16, 1) and in_dim == PROJECTION
    # TRL's aesthetic-model.pth is loaded by TRL with `self.mlp.load_state_dict`, so it has the
    # same `layers.N.*` keys; accept them also under a module prefix (a saved AestheticScorer).
    torch.save({f"mlp.{k}": v for k, v in head.state_dict().items()}, tmp_path / "aesthetic-model.pth")
    _, _, prefixed = load_aesthetic_head(str(tmp_path / "aesthetic-model.pth"))
    jax.tree.map(np.testing.assert_array_equal, prefixed, params)
    np.testing.assert_array_equal(params["layers_7"]["kernel"], head.layers[7].weight.detach().numpy().T)


def test_errors_are_one_line(assets, tmp_path):
    root, _, head = assets
    clip_dir = str(root / "clip")

    def fails(match, **kw):
        with pytest.raises(RewardError, match=match) as e:
            make_reward(RewardConfig(name="aesthetic", **kw))
        assert "\n" not in str(e.value)

    fails("needs reward.aesthetic_head", aesthetic_clip=clip_dir)
    fails("does not exist", aesthetic_clip=clip_dir, aesthetic_head=str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": torch.zeros(1, 2)}, tmp_path / "bad.pth")
    fails(r"expected weight\+bias for layers", aesthetic_clip=clip_dir, aesthetic_head=str(tmp_path / "bad.pth"))
    torch.save(LaionMLP((16, 8, 8, 8, 8, 1)).state_dict(), tmp_path / "small.pth")
    fails("takes 16-d embeddings but CLIP", aesthetic_clip=clip_dir, aesthetic_head=str(tmp_path / "small.pth"))
    head_path = str(root / "sac+logos+ava1-l14-linearMSE.pth")
    fails("cannot load CLIP 'herd-jax-tests/no-such-clip'", aesthetic_clip="herd-jax-tests/no-such-clip",
          aesthetic_head=head_path)


def test_bin_and_flax_msgpack_checkpoints_load_the_same(assets, reward, tmp_path):
    """The same CLIP as pytorch_model.bin, and as a Flax msgpack in FlaxCLIPModel's layout (text tower included)."""
    from flax.serialization import to_bytes

    root, clip, _ = assets
    bin_dir, flax_dir = tmp_path / "bin", tmp_path / "flax"
    for d in (bin_dir, flax_dir):
        d.mkdir()
        (d / "config.json").write_text((root / "clip" / "config.json").read_text())
    torch.save(clip.state_dict(), bin_dir / "pytorch_model.bin")
    text_side = {"text_model": {"final_layer_norm": {"scale": np.ones(16, np.float32)}},
                 "text_projection": {"kernel": np.zeros((16, PROJECTION), np.float32)}, "logit_scale": np.float32(2.6)}
    (flax_dir / "flax_model.msgpack").write_bytes(to_bytes({**jax.device_get(reward.params["clip"]), **text_side}))
    for d in (bin_dir, flax_dir):
        config, params, preprocess = load_clip_embedder(str(d))
        assert config.projection_dim == PROJECTION and preprocess == ClipPreprocess(IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE)
        jax.tree.map(np.testing.assert_array_equal, params, reward.params["clip"])


def test_clip_weights_that_do_not_fit_are_one_line(assets, tmp_path):
    root, clip, _ = assets
    (tmp_path / "config.json").write_text((root / "clip" / "config.json").read_text())
    state = {k: v for k, v in clip.state_dict().items() if k != "vision_model.post_layernorm.bias"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(RewardError, match="no tensor vision_model.post_layernorm.bias") as e:
        load_clip_embedder(str(tmp_path))
    assert "\n" not in str(e.value) and "pytorch_model.bin" in str(e.value)
