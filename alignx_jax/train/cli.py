"""`alignx train --config=CONFIG.py --config.workdir=W [--config.KEY=VALUE ...]`."""

from __future__ import annotations

import argparse

from alignx_jax.config import load_config
from alignx_jax.train.loop import run_training


def cli_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, getattr(args, "overrides", []) or [])
    return run_training(cfg)
