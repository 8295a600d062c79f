"""Shared defaults for every run config: the release's DPO recipe (docs/method.md section 6).

Other config files call `get_config()` from here (via `runpy`, since configs are loaded by path)
and change only what differs. Every key a run can set exists here, so a misspelt override is a
ConfigError rather than a silently ignored value. The keys, their types, defaults, allowed values and
meanings are defined once, in `alignx_jax.config_schema` (its section dataclasses).
"""

from __future__ import annotations

import ml_collections

from alignx_jax.config_schema import default_config


def get_config() -> ml_collections.ConfigDict:
    return default_config()


def release_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The release's full-scale recipe (docs/method.md section 6) for a real 7-8B model, in place.

    The model and data paths stay '' so that a run without `--config.model.hf_path` and
    `--config.data.train` fails with a clear ConfigError instead of training something else.
    """
    c.model.hf_path = ""
    c.model.dtype, c.model.param_dtype = "bfloat16", "float32"  # bf16 compute, fp32 master weights
    c.model.remat = "full"  # gradient checkpointing
    c.model.scan_layers = True  # one compiled layer: an 8B model compiles in reasonable time
    c.data.train = ""
    c.data.persona = "p"
    c.data.prompt_format = "release"  # the release's training input (docs/method.md section 6b)
    c.data.max_length = 8192
    c.data.buckets = (1024, 2048, 4096, 8192)
    c.data.overflow = "drop"  # the release drops a pair whose prompt alone reaches max_length - 2
    c.pba.preference = "history"  # PBA's profile: the release's P~ of the sampled history (used when pba)
    c.loss.type, c.loss.beta, c.loss.reference = "sigmoid", 0.1, "on_the_fly"
    c.loss.logps_chunk = 1024
    c.optim.lr = 5e-7
    c.optim.warmup_ratio, c.optim.min_lr_ratio = 0.1, 0.1
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay, c.optim.clip = 0.0, 1.0
    c.train.steps, c.train.epochs = -1, 1
    c.train.global_batch = 128
    c.train.seed = 42
    c.checkpoint.every_steps, c.checkpoint.keep = 200, 3
    return c
