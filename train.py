#!/usr/bin/env python
"""herd-jax training: `python train.py --help` (the code is herd_jax/cli.py; installed as `herd-train`)."""
import sys

from herd_jax.cli import enable_compile_cache, main, parser, resolve_run  # noqa: F401  (tests import these from here)

if __name__ == "__main__":
    sys.exit(main())
