"""Pretrain the tiny model to be text-conditional in colour: a research script, not a model we ship.

Why: the goal-conditional tasks (`bench/learning.py --tasks color2`) cannot show whether hindsight
relabeling helps while the random tiny UNet is prompt-blind in colour (README, "Goal-conditional
task: a negative result"). SD is text-conditional before RL starts; this script tries to give the
tiny model the same head start, as the HERD issue suggests, and measures whether it got it.

How:
1. Colour latents: for each palette colour of the `color` reward, `--latents_per_color` latents
   (4x8x8, in the UNet's scaled latent space, norm held near N(0, I)'s) found by gradient descent
   through the tiny VAE decoder towards a solid image of that colour. The random tiny VAE has no
   encoder that inverts its decoder, so the data is built in latent space.
2. Denoising pretraining: captions "a/an {colour} {object}" over the reward's palette and objects;
   with probability `--label_noise` the latent is of a random colour instead (so the pretrained
   policy is right only part of the time and RL has something to learn); 10% empty captions
   (classifier-free guidance); epsilon-MSE at uniform timesteps, `--ddim_focus` of them drawn
   from the 4-step DDIM schedule the learning preset samples with, optionally min-SNR weighted.
   Adam on the UNet, and on the text encoder with `--train_text_encoder` (SD's is pretrained; RL
   then trains the UNet only).
3. Evaluation: the learning preset's policy (DDIM, eta 1, guidance 1) at 4 and 20 steps, 32 samples
   per "a/an {colour} ball" prompt: the named colour's `color` score and success rate
   (`color_success`), and the decoded training latents' own scores (the target).

`--out DIR` writes the result as a diffusers pipeline (the tiny model's files with the trained
UNet and text encoder) that `--model DIR` trains from; the written weights are read back through
the loader and compared.

  python bench/conditional_pretrain.py --steps 1500 --label_noise 0.2 --train_text_encoder
  python bench/conditional_pretrain.py --colors orange blue --steps 1500 --lr 3e-3 --ddim_focus 1 \
      --min_snr_gamma 1 --train_text_encoder --out DIR   # color2's two goals; then --set model=DIR

Measured results are in the README (goal-conditional task). On a CPU the UNet does not fit the
data in the steps a session can afford; on an accelerator, run it with many more steps.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from herd_jax.config import RewardConfig  # noqa: E402
from herd_jax.diffusion import alphas_cumprod, make_policy  # noqa: E402
from herd_jax.models import load_pipeline, tiny_model_path  # noqa: E402
from herd_jax.rewards.color import COLORS, OBJECTS, color_scores  # noqa: E402

PALETTE = list(COLORS)
SUCCESS = RewardConfig().success_threshold  # color_success's default threshold


def per_color(scores: np.ndarray, colors: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """{colour: (mean score, success rate, mean score under the other colours' prompts)} of the colour
    scores [K, samples, len(PALETTE)] of K prompts (row k: samples for colours[k]). The third number
    is what a prompt-blind model gets under its own prompt too: the gap between the first and the
    third measures how much the caption matters."""
    out = {}
    for k, c in enumerate(colors):
        own = scores[k, :, PALETTE.index(c)]
        others = np.delete(scores, k, axis=0)[..., PALETTE.index(c)]
        out[c] = (float(own.mean()), float((own > SUCCESS).mean()), float(others.mean()) if others.size else float("nan"))
    return out


def caption(color: str, obj: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {obj}"


def color_latents(sd: Any, colors: Sequence[str], count: int, steps: int, key: jax.Array) -> jax.Array:
    """f32[K, count, C, h, w]: latents whose decoded images approach each of the K colours."""
    k = len(colors)
    target = jnp.asarray([COLORS[c] for c in colors], jnp.float32) / 127.5 - 1.0
    target = jnp.repeat(target, count, axis=0)[:, :, None, None]
    z = jax.random.normal(key, (k * count, sd.latent_channels, sd.latent_size, sd.latent_size))
    opt = optax.adam(0.05)

    def loss(z):
        images = sd.vae.apply({"params": sd.params["vae"]}, z / sd.scaling_factor)
        norm = jnp.mean(z**2, axis=(1, 2, 3))  # keep each latent's scale near a standard normal's
        return jnp.mean((images - target) ** 2) + 1e-2 * jnp.mean((norm - 1.0) ** 2)

    @jax.jit
    def step(z, state):
        value, grad = jax.value_and_grad(loss)(z)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(z, updates), state, value

    state = opt.init(z)
    for _ in range(steps):
        z, state, _ = step(z, state)
    return z.reshape(k, count, *z.shape[1:])


def pretrain(sd: Any, latents: jax.Array, args: argparse.Namespace, key: jax.Array) -> tuple[dict, list[float]]:
    """Denoising pretraining; returns {"unet", "text_encoder"} params and the loss every 100 steps."""
    captions = [caption(c, o) for c in args.colors for o in OBJECTS] + [""]
    ids = jnp.asarray(sd.tokenize(captions))
    caption_color = jnp.repeat(jnp.arange(len(args.colors)), len(OBJECTS))
    n_captions = len(captions) - 1
    alphas = jnp.asarray(alphas_cumprod(sd.scheduler))
    ddim_ts = make_policy(sd, num_steps=4, eta=1.0, guidance_scale=1.0).schedule.timesteps[: args.focus_steps]  # noisiest first
    frozen_text = sd.encode_text(sd.params["text_encoder"], ids)
    params = {"unet": sd.params["unet"], "text_encoder": sd.params["text_encoder"]}
    opt = optax.multi_transform(
        {"train": optax.adam(args.lr), "freeze": optax.set_to_zero()},
        {"unet": "train", "text_encoder": "train" if args.train_text_encoder else "freeze"},
    )
    num_t = alphas.shape[0]
    # Min-SNR-gamma weights for epsilon-prediction (Hang et al. 2023): min(SNR, gamma) / SNR. Low-noise
    # steps (huge SNR) otherwise dominate the gradient, and only high-noise steps need the caption.
    snr = alphas / (1 - alphas)
    weight = jnp.minimum(snr, args.min_snr_gamma) / snr if args.min_snr_gamma > 0 else jnp.ones_like(snr)

    @jax.jit
    def step(params, state, key):
        keys = jax.random.split(key, 8)
        b = args.batch
        cap = jax.random.randint(keys[0], (b,), 0, n_captions)
        noisy = jax.random.uniform(keys[1], (b,)) < args.label_noise
        color = jnp.where(noisy, jax.random.randint(keys[2], (b,), 0, len(args.colors)), caption_color[cap])
        x0 = latents[color, jax.random.randint(keys[3], (b,), 0, latents.shape[1])]
        t = jnp.where(
            jax.random.uniform(keys[4], (b,)) < args.ddim_focus,
            ddim_ts[jax.random.randint(keys[5], (b,), 0, ddim_ts.shape[0])],
            jax.random.randint(keys[6], (b,), 0, num_t),
        )
        eps = jax.random.normal(keys[7], x0.shape)
        a = alphas[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
        drop = jax.random.uniform(jax.random.fold_in(key, 8), (b,)) < 0.1

        def loss(p):
            text = sd.encode_text(p["text_encoder"], ids) if args.train_text_encoder else frozen_text
            cond = jnp.where(drop[:, None, None], text[-1][None], text[cap])
            per_row = jnp.mean((sd.unet.apply({"params": p["unet"]}, x_t, t, cond) - eps) ** 2, axis=(1, 2, 3))
            return jnp.mean(weight[t] * per_row)

        value, grad = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grad, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    losses, window = [], []
    for i in range(args.steps):
        params, state, value = step(params, state, jax.random.fold_in(key, i))
        window.append(value)
        if (i + 1) % 100 == 0 or i + 1 == args.steps:
            losses.append(float(np.mean(jax.device_get(window))))
            window = []
            print(f"  step {i + 1}: denoising loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return params, losses


def evaluate(sd: Any, params: dict, colors: Sequence[str], num_steps: int, samples: int, key: jax.Array) -> dict[str, tuple[float, float, float]]:
    """`per_color` of the preset's policy on "a/an {colour} ball"."""
    policy = make_policy(sd, num_steps=num_steps, eta=1.0, guidance_scale=1.0)
    prompts = [caption(c, "ball") for c in colors]
    cond = sd.encode_text(params["text_encoder"], jnp.asarray(sd.tokenize([p for p in prompts for _ in range(samples)])))
    uncond = sd.encode_text(params["text_encoder"], jnp.asarray(sd.tokenize([""])))
    traj = jax.jit(policy.rollout)(params["unet"], sd.params["vae"], cond, uncond, key)
    return per_color(color_scores(np.asarray(traj.images)).reshape(len(colors), samples, len(PALETTE)), colors)


def data_scores(sd: Any, latents: jax.Array, colors: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """The same numbers for the decoded training latents themselves (what a perfect fit would give)."""
    flat = latents.reshape(-1, *latents.shape[2:])
    policy = make_policy(sd, num_steps=4, eta=1.0, guidance_scale=1.0)
    return per_color(color_scores(np.asarray(policy.decode(sd.params["vae"], flat))).reshape(*latents.shape[:2], len(PALETTE)), colors)


def write_pipeline(params: dict, out: pathlib.Path) -> None:
    """The tiny model's files with the trained UNet and text encoder, checked by reading them back."""
    from herd_jax.export import copy_pipeline, write_unet, write_weights

    src = tiny_model_path()
    copy_pipeline(src, out)
    write_unet(params["unet"], src / "unet" / "config.json", out / "unet")
    for old in (out / "text_encoder").glob("model*.safetensors"):
        old.unlink()  # a hard link to the base's file: replace it, never write through it
    write_weights(params["text_encoder"], "text_encoder", out / "text_encoder" / "model.safetensors")
    back = load_pipeline(out)
    for name in ("unet", "text_encoder"):
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params[name], back.params[name])
        if max(jax.tree.leaves(diff)) != 0.0:
            raise AssertionError(f"{name} weights read back from {out} differ from the trained ones")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="Adam steps of denoising pretraining")
    p.add_argument("--batch", type=int, default=64, help="latents per pretraining step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--label_noise", type=float, default=0.2, help="share of latents of a random colour instead of the caption's")
    p.add_argument("--ddim_focus", type=float, default=0.5, help="share of timesteps drawn from the 4-step DDIM schedule")
    p.add_argument("--focus_steps", type=int, default=4, choices=range(1, 5), metavar="{1..4}",
                   help="the focused timesteps are the noisiest N of the 4 DDIM steps (1: t = 751 only)")
    p.add_argument("--min_snr_gamma", type=float, default=0.0, help="weight each timestep's loss by min(SNR, gamma)/SNR (0: unweighted)")
    p.add_argument("--train_text_encoder", action="store_true", help="train the text encoder with the UNet")
    p.add_argument("--colors", nargs="+", choices=PALETTE, default=PALETTE, metavar="COLOR",
                   help=f"the colours to pretrain and evaluate (default: the whole palette, {' '.join(PALETTE)})")
    p.add_argument("--latents_per_color", type=int, default=4, help="decoder-inverted latents per palette colour")
    p.add_argument("--inversion_steps", type=int, default=400, help="Adam steps of decoder inversion")
    p.add_argument("--samples", type=int, default=32, help="evaluation samples per colour")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, help="write the pretrained pipeline here (a new directory)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.exists():
        p.error(f"--out {args.out} exists")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    key = jax.random.PRNGKey(args.seed)
    sd = load_pipeline("tiny")
    start = time.time()
    latents = color_latents(sd, args.colors, args.latents_per_color, args.inversion_steps, jax.random.fold_in(key, 0))
    params, losses = pretrain(sd, latents, args, jax.random.fold_in(key, 1))
    minutes = (time.time() - start) / 60
    before = {"unet": sd.params["unet"], "text_encoder": sd.params["text_encoder"]}
    columns = {
        "data (target)": data_scores(sd, latents, args.colors),
        "untrained, 4 steps": evaluate(sd, before, args.colors, 4, args.samples, jax.random.fold_in(key, 2)),
        "pretrained, 4 steps": evaluate(sd, params, args.colors, 4, args.samples, jax.random.fold_in(key, 2)),
        "pretrained, 20 steps": evaluate(sd, params, args.colors, 20, args.samples, jax.random.fold_in(key, 2)),
    }
    print(f"{args.steps} steps, label noise {args.label_noise}, lr {args.lr}, DDIM focus {args.ddim_focus}, "
          f"min-SNR gamma {args.min_snr_gamma}, text encoder "
          f"{'trained' if args.train_text_encoder else 'frozen'}: final loss {losses[-1]:.4f}, {minutes:.1f} min\n")
    print("| prompt | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for c in args.colors:
        cells = [f"{col[c][0]:.3f} ({col[c][1]:.0%}; others {col[c][2]:.3f})" for col in columns.values()]
        print(f"| {caption(c, 'ball')} | " + " | ".join(cells) + " |")
    print(f"\ncell: mean `color` score of the named colour (success rate, score > {SUCCESS:g}; "
          "the colour's mean score in the samples of the other prompts)")
    if args.out is not None:
        write_pipeline(params, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
