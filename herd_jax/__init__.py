"""herd-jax: RL fine-tuning of Stable Diffusion in JAX/Flax (DDPO, ddpg, DPOK, HERD)."""

__version__ = "0.1.0"
