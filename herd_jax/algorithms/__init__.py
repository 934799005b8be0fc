"""RL algorithms: each a pure per-transition loss plus what it needs to build its batches."""
