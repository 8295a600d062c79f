"""`alignx train --config=CONFIG.py --config.workdir=W [--config.KEY=VALUE ...]`."""

from __future__ import annotations

import argparse

from alignx_jax.compile_cache import use_compile_cache
from alignx_jax.config import load_config
from alignx_jax.config_schema import check_keys_present
from alignx_jax.train.loop import run_training


def cli_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, getattr(args, "overrides", []) or [], check=check_keys_present)
    # W/.jax_cache (the user cache for a URL workdir); a no-op when `alignx` already set it from the
    # command line's --config.workdir, or JAX has a cache; before anything compiles
    use_compile_cache(cfg.workdir or None)
    return run_training(cfg)
