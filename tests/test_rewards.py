"""Registry, batch checks, JPEG (DDPO) rewards and the ``color`` reward."""
import concurrent.futures
import io

import numpy as np
import pytest
from PIL import Image

from herd_jax.config import RewardConfig
from herd_jax.rewards import REWARDS, Reward, RewardError, check_batch, check_finite, make_reward, reward_names
from herd_jax.rewards.color import COLORS, OBJECTS, color_prompts, color_scores, parse_color

RNG = np.random.default_rng(0)


def solid(rgb, size=32, batch=1):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (batch, size, size, 3)).copy()


# ----------------------------------------------------------------------------- registry / base


def test_registry_names_and_objects():
    assert reward_names() == list(REWARDS)
    assert {"jpeg_compressibility", "jpeg_incompressibility", "color", "aesthetic"} <= set(reward_names())
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "color"):
        reward = make_reward(RewardConfig(name=name))
        assert reward.name == name and isinstance(reward, Reward)
        reward.close()


def test_unknown_reward_lists_valid_names():
    with pytest.raises(RewardError) as e:
        make_reward(RewardConfig(name="nope"))
    msg = str(e.value)
    assert "'nope'" in msg and "\n" not in msg
    assert all(name in msg for name in reward_names())


def test_check_finite():
    prompts = ["a", "b", "c"]
    out = check_finite([1, 2.5, -3], prompts)
    assert out.dtype == np.float32 and out.tolist() == [1, 2.5, -3]
    with pytest.raises(RewardError, match=r"nan for prompt 'b' \(index 1; 2 of 3"):
        check_finite(np.array([0.0, np.nan, np.inf]), prompts)
    with pytest.raises(RewardError, match="inf for prompt 'c'"):
        check_finite(np.array([0.0, 1.0, -np.inf]), prompts)
    with pytest.raises(RewardError, match="2 rewards for 3 prompts"):
        check_finite(np.zeros(2), prompts)


def test_check_batch():
    images = solid((1, 2, 3), batch=2)
    assert check_batch(images, ["a", "b"]) is not None
    with pytest.raises(RewardError, match="uint8"):
        check_batch(images.astype(np.float32), ["a", "b"])
    with pytest.raises(RewardError, match="uint8"):
        check_batch(images[..., :1], ["a", "b"])
    with pytest.raises(RewardError, match="2 images but 3 prompts"):
        check_batch(images, ["a", "b", "c"])
    with pytest.raises(RewardError, match="single string"):
        check_batch(images, "ab")


# ----------------------------------------------------------------------------- jpeg


def ddpo_jpeg_kb(image, quality=95):
    """DDPO's definition, written out (kvablack/ddpo-pytorch rewards.py jpeg_incompressibility):
    the image saved by PIL as a quality-95 JPEG, its length in bytes / 1000."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def jpeg_test_images():
    """Flat, smooth, noisy and half-noisy images at the tiny model's 32 px and at 64 px."""
    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    smooth = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1).astype(np.uint8)
    noisy = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    half = noisy[3].copy()
    half[:16] = 128
    small = [solid((120, 130, 140))[0], smooth, noisy[0], half]
    large = [solid((10, 200, 30), size=64)[0], RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    return np.stack(small), np.stack(large)


def test_jpeg_rewards_are_ddpo_jpeg_sizes():
    comp_fn = make_reward(RewardConfig(name="jpeg_compressibility"))
    incomp_fn = make_reward(RewardConfig(name="jpeg_incompressibility"))
    for images in jpeg_test_images():
        prompts = [f"prompt {i}" for i in range(len(images))]
        expected = np.asarray([ddpo_jpeg_kb(image) for image in images], np.float32)
        incomp, comp = incomp_fn(images, prompts), comp_fn(images, prompts)
        assert incomp.dtype == comp.dtype == np.float32 and incomp.shape == (len(images),)
        np.testing.assert_array_equal(incomp, expected)  # exact: an integer byte count / 1000
        np.testing.assert_array_equal(comp, -expected)
        # The prompt is ignored, and each image is scored on its own (not as part of a batch).
        np.testing.assert_array_equal(incomp_fn(images, ["other"] * len(images)), expected)
        np.testing.assert_array_equal(np.concatenate([incomp_fn(images[i : i + 1], ["x"]) for i in range(len(images))]), expected)
        # The comparison can tell DDPO's quality 95 from another (e.g. PIL's default 75).
        assert all(ddpo_jpeg_kb(image, quality=75) != e for image, e in zip(images, expected))
    small, large = jpeg_test_images()
    sizes = incomp_fn(small, ["x"] * len(small))
    assert sizes[0] < sizes[1] < sizes[3] < sizes[2]  # flat < smooth < half noise < noise
    assert comp_fn(large, ["x", "y"])[0] > comp_fn(large, ["x", "y"])[1]  # the flat image is more compressible


# ----------------------------------------------------------------------------- color


def test_color_prompts_and_parse():
    prompts = color_prompts()
    assert len(prompts) == len(COLORS) * len(OBJECTS) == len(set(prompts))
    assert 6 <= len(COLORS) <= 10 and 4 <= len(OBJECTS) <= 8
    assert [parse_color(p) for p in prompts] == [c for c in COLORS for _ in OBJECTS]
    assert parse_color("A RED Car") == "red"
    assert parse_color("a car, blue sky and a red ball") == "blue"  # the first one named
    assert parse_color("a reddish car") is None
    assert parse_color("a car") is None


def test_color_unknown_colour_raises():
    reward = make_reward(RewardConfig(name="color"))
    with pytest.raises(RewardError, match="'a mauve car' names no known colour"):
        reward(solid((1, 2, 3), batch=2), ["a red car", "a mauve car"])


def test_color_pure_colours_score_highest_for_their_name():
    reward = make_reward(RewardConfig(name="color"))
    names = list(COLORS)
    images = np.concatenate([solid(rgb) for rgb in COLORS.values()])
    table = np.stack([reward(images, [f"a {c} ball"] * len(names)) for c in names], axis=1)  # [image, colour]
    assert np.all(np.argmax(table, axis=1) == np.arange(len(names)))  # each image: its own colour wins
    assert np.all(np.argmax(table, axis=0) == np.arange(len(names)))  # each colour: its own image wins
    assert table[names.index("red"), names.index("red")] > 0.8
    assert np.all((table >= 0) & (table <= 1))


def test_color_depends_on_prompt_is_smooth_and_finite():
    reward = make_reward(RewardConfig(name="color"))
    images = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    red = reward(images, ["a red car"] * 4)
    blue = reward(images, ["a blue car"] * 4)
    assert np.all(np.isfinite(red)) and np.all((red >= 0) & (red <= 1))
    assert np.all(np.abs(red - blue) > 1e-3)
    # Pushing a grey image towards red raises the red reward strictly, step by small step.
    steps = np.stack([solid((128 + k, 128 - k, 128 - k))[0] for k in range(0, 40, 2)])
    r = reward(steps, ["a red bird"] * len(steps))
    assert np.all(np.diff(r) > 0) and r[0] == pytest.approx(1 / len(COLORS), abs=0.05)
    assert np.all(np.diff(r) < 0.1)  # no jumps


def test_color_scores_rows_are_distributions_and_thread_safe():
    images = RNG.integers(0, 256, (3, 40, 24, 3), dtype=np.uint8)
    scores = color_scores(images)
    assert scores.shape == (3, len(COLORS)) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    reward = make_reward(RewardConfig(name="color"))
    prompts = ["a green house", "a white chair", "a black flower"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        threaded = pool.submit(reward, images, prompts).result()
    np.testing.assert_array_equal(threaded, reward(images, prompts))
    names = list(COLORS)
    np.testing.assert_array_equal(threaded, scores[np.arange(3), [names.index(parse_color(p)) for p in prompts]])


def test_color_success_is_the_thresholded_named_colour_share():
    """Sparse twin of `color`: success iff the named colour's share exceeds the threshold.

    Known outcomes, not the reward's own helper: a pure blue image succeeds for blue and fails for
    orange (its opposite hue), and vice versa; a grey image tinted red step by step fails, then
    succeeds from some tint on (a single step, no flicker), and a higher threshold needs more tint.
    """
    reward = make_reward(RewardConfig(name="color_success"))
    assert "color_success" in reward_names()
    images = np.concatenate([solid(COLORS["blue"]), solid(COLORS["orange"])])
    assert reward(images, ["a blue ball"] * 2).tolist() == [1.0, 0.0]
    assert reward(images, ["an orange ball"] * 2).tolist() == [0.0, 1.0]
    tints = np.stack([solid((128 + k, 128 - k, 128 - k))[0] for k in range(0, 64, 2)])

    def first_success(threshold):
        success = make_reward(RewardConfig(name="color_success", success_threshold=threshold))(tints, ["a red bird"] * len(tints))
        assert set(success.tolist()) == {0.0, 1.0} and np.all(np.diff(success) >= 0)  # 0 ... 0 1 ... 1
        return int(np.argmax(success))

    assert first_success(0.3) < first_success(0.5) < first_success(0.7)
    with pytest.raises(RewardError, match="names no known colour"):
        reward(images[:1], ["a ball"])
