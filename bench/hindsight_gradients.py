"""Do hindsight copies add to their originals' policy gradient, or cancel it? A diagnostic for
the goal-conditional benchmark (README, "Goal-conditional task on a text-conditional tiny model").

herd's update gets, for a trajectory x sampled under goal c and its copy relabeled to c′,
A·∇log π(x | c) + w·A′·∇log π(x | c′) (w: the truncated weight, 1 under `recompute`). If the two
gradients point the same way (a weak caption pathway: the policy barely tells c from c′) while
A′ has the opposite sign of A (on two colours, an image that is more orange is less blue), the
copy undoes its original. This samples a batch from a model, relabels each trajectory to a random
other goal, scores every image under its own goal and its copy's,
takes per-trajectory gradients of Σ_t log π (summed over steps and latent dimensions) with respect
to the LoRA adapters the benchmark trains (and, for comparison, the full UNet), and prints:

  - corr(A, A′): the advantages of originals and copies (per-goal normalised, as herd does);
  - the per-trajectory cosine between ∇log π(x|c) and ∇log π(x|c′);
  - for the batch sums G = Σ A·∇log π(x|c) (the originals) and G′ = Σ A′·∇log π(x|c′) (the
    copies, w = 1): cos(G, G′), |G′| / |G|, and cos(G + G′, G), how much of the originals'
    direction the update keeps once the copies are added (1: all of it; 0 or below: none).

    python bench/hindsight_gradients.py --model /work/cond/ob1500 --samples 32 --seeds 0 1
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="SD directory in the diffusers layout, or 'tiny' (default)")
    p.add_argument("--prompts", nargs="+", default=["an orange ball", "a blue ball"], help="the goals (color2's two by default); each trajectory's copy gets a uniformly random other goal, as herd.goal_strategy=random")
    p.add_argument("--samples", type=int, default=32, help="trajectories per prompt (default 32)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one batch per seed (default 0)")
    p.add_argument("--num_steps", type=int, default=4, help="DDIM steps (the learning preset's 4)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance_scale", type=float, default=1.0, help="the learning preset's 1.0")
    p.add_argument("--lora_rank", type=int, default=4)
    return p.parse_args(argv)


def normalised(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(r − mean) / std within each group: herd's per-goal advantage with a full window."""
    out = np.zeros_like(rewards)
    for g in np.unique(groups):
        sel = groups == g
        out[sel] = (rewards[sel] - rewards[sel].mean()) / (rewards[sel].std() + 1e-6)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if len(args.prompts) < 2:
        raise SystemExit("hindsight_gradients.py: error: --prompts needs at least two goals")
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from herd_jax.diffusion import make_policy
    from herd_jax.models import load_pipeline
    from herd_jax.rewards.color import ColorReward
    from herd_jax.trainable import Trainable
    from herd_jax.trainer import encode_prompts

    sd = load_pipeline(args.model)
    policy = make_policy(sd, num_steps=args.num_steps, eta=args.eta, guidance_scale=args.guidance_scale)
    embeds, uncond = encode_prompts(sd, args.prompts, "")
    unet = sd.params["unet"]
    reward = ColorReward()
    rollout = jax.jit(policy.rollout)

    def log_prob_sum(unet_params, latents, cond):
        return jnp.sum(policy.trajectory_log_probs(unet_params, latents[None], cond[None], uncond))

    flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float64)
    spaces = {"lora": Trainable("lora", rank=args.lora_rank, alpha=float(args.lora_rank)), "full UNet": Trainable("all")}
    grads = {}
    for name, trainable in spaces.items():
        params = trainable.init(unet, jax.random.PRNGKey(2))
        fn = lambda p, latents, cond, t=trainable: log_prob_sum(t.unet_params(p, unet), latents, cond)
        grads[name] = (params, jax.jit(jax.grad(fn)))

    print(f"model {args.model}, goals {args.prompts}, {args.samples} trajectories per goal, copies to a random other goal, {args.num_steps} steps, eta {args.eta}")
    print("| seed | space | r(x,c) | r(x,c') | corr(A, A') | per-trajectory cos(g, g'): mean (min, max) | cos(G, G') | abs(G') / abs(G) | cos(G + G', G) |")
    print("|---|---|---|---|---|---|---|---|---|")
    num_goals = len(args.prompts)
    for seed in args.seeds:
        ids = np.repeat(np.arange(num_goals), args.samples)
        traj = rollout(unet, sd.params["vae"], embeds[ids], uncond, jax.random.PRNGKey(seed))
        images = np.asarray(traj.images)
        other = (ids + np.random.default_rng(seed).integers(1, num_goals, len(ids))) % num_goals
        r_own = np.asarray(reward(images, [args.prompts[i] for i in ids]))
        r_other = np.asarray(reward(images, [args.prompts[i] for i in other]))
        a_own, a_other = normalised(r_own, ids), normalised(r_other, other)
        corr = float(np.corrcoef(a_own, a_other)[0, 1])
        for name, (params, grad) in grads.items():
            g_own = np.stack([flat(grad(params, traj.latents[i], embeds[ids[i]])) for i in range(len(ids))])
            g_other = np.stack([flat(grad(params, traj.latents[i], embeds[other[i]])) for i in range(len(ids))])
            cos = np.array([cosine(a, b) for a, b in zip(g_own, g_other)])
            total_own, total_other = a_own @ g_own, a_other @ g_other
            ratio = np.linalg.norm(total_other) / np.linalg.norm(total_own)
            print(f"| {seed} | {name} | {r_own.mean():.3f} | {r_other.mean():.3f} | {corr:+.3f} | {cos.mean():.3f} ({cos.min():.3f}, {cos.max():.3f}) "
                  f"| {cosine(total_own, total_other):+.3f} | {ratio:.2f} | {cosine(total_own + total_other, total_own):+.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
