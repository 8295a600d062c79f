"""The trainer's config rules: the allowed values, `validate_config`, and the questions the other
modules ask of a config (`head_enabled`, `joint_head`, `two_stage_head`, `uses_predicted`).

Every check a key lookup cannot do lives here, so `alignx train`, `alignx plan` and the demos
refuse the same configs with the same one-line `ConfigError`.
"""

from __future__ import annotations

import ml_collections

from alignx_jax import losses, paths
from alignx_jax.data.batching import reserve
from alignx_jax.errors import ConfigError

METHODS = ("ica", "pba", "none")
# 'none': reference-free (TRL `reference_free=True`): no reference copy, no reference pass
REFERENCE_MODES = ("on_the_fly", "precomputed", "none")
PBA_MODES = ("joint", "two_stage")
# 'history': the profile built from the row's sampled history (the release's PBA training profile)
PBA_PREFERENCES = ("golden", "predicted", "mix", "history")
NAN_POLICIES = ("stop", "skip")


def head_enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run trains PBA's preference head (either mode)."""
    return cfg.data.method == "pba" and bool(cfg.pba.enabled)


def joint_head(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the head is trained inside the DPO step (persona ids then travel with every batch)."""
    return head_enabled(cfg) and cfg.pba.mode == "joint"


def two_stage_head(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the head is fit on the final policy after the last DPO step."""
    return head_enabled(cfg) and cfg.pba.mode == "two_stage"


def uses_predicted(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the policy's prompts render a first-stage head's predicted P~ (for some rows)."""
    return cfg.data.method == "pba" and cfg.pba.preference not in ("golden", "history")


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Consistency checks a key lookup cannot do; each failure is one ConfigError line. The sections
    are checked in this order (the first failure is the one reported)."""
    _check_inputs(cfg)
    _check_loss(cfg)
    _check_schedule(cfg)
    _check_eval(cfg)
    _check_layout(cfg)
    if cfg.data.method == "pba":
        _check_pba(cfg)


def _check_inputs(cfg: ml_collections.ConfigDict) -> None:
    """The workdir, length buckets, model and training data, and the method."""
    if not cfg.workdir:
        raise ConfigError("--config.workdir is required (the run's output folder)")
    buckets = cfg.data.buckets
    if (
        not isinstance(buckets, (tuple, list))
        or not buckets
        or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in buckets)
    ):
        raise ConfigError(
            f"data.buckets={buckets!r}: expected a tuple of positive integers, e.g. (1024, 2048)"
        )
    if not cfg.model.hf_path and not cfg.model.init.enabled:
        raise ConfigError("--config.model.hf_path is required (an HF folder or `alignx import` checkpoint)")
    if not cfg.data.train and cfg.data.synth_users <= 0:
        raise ConfigError("--config.data.train is required (parquet/JSONL/JSON file or folder)")
    if cfg.data.method not in METHODS:
        raise ConfigError(f"data.method={cfg.data.method!r}: expected one of {', '.join(METHODS)}")


def _check_loss(cfg: ml_collections.ConfigDict) -> None:
    """The `loss` section."""
    if cfg.loss.type not in losses.PREFERENCE_LOSS_TYPES:
        raise ConfigError(
            f"loss.type={cfg.loss.type!r}: expected one of {', '.join(losses.PREFERENCE_LOSS_TYPES)}"
        )
    if cfg.loss.reference not in REFERENCE_MODES:
        raise ConfigError(
            f"loss.reference={cfg.loss.reference!r}: expected one of {', '.join(REFERENCE_MODES)}"
        )
    if cfg.loss.beta <= 0:
        raise ConfigError(f"loss.beta must be positive, got {cfg.loss.beta}")
    if float(cfg.loss.get("gamma_beta_ratio", 0.25)) < 0:
        raise ConfigError(f"loss.gamma_beta_ratio must be >= 0, got {cfg.loss.gamma_beta_ratio}")
    if cfg.loss.type == "robust" and not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError("loss.label_smoothing must be in [0, 0.5) for the robust loss")
    if cfg.loss.sft_norm not in ("length", "sum"):
        raise ConfigError(f"loss.sft_norm={cfg.loss.sft_norm!r}: expected 'length' or 'sum'")
    if cfg.loss.get("nan_policy", "stop") not in NAN_POLICIES:
        raise ConfigError(
            f"loss.nan_policy={cfg.loss.nan_policy!r}: expected one of {', '.join(NAN_POLICIES)}"
        )
    if int(cfg.loss.get("max_skipped_steps", 10)) < 1:
        raise ConfigError(f"loss.max_skipped_steps must be at least 1, got {cfg.loss.max_skipped_steps}")


def _check_schedule(cfg: ml_collections.ConfigDict) -> None:
    """Batch sizes and the run length (`train`)."""
    gb, mb = cfg.train.global_batch, cfg.train.micro_batch or cfg.train.global_batch
    if gb <= 0 or mb <= 0 or gb % mb:
        raise ConfigError(f"train.global_batch={gb} must be a positive multiple of train.micro_batch={mb}")
    if cfg.train.steps == 0 or cfg.train.steps < -1 or (cfg.train.steps == -1 and cfg.train.epochs <= 0):
        raise ConfigError("train.steps must be positive, or -1 with train.epochs > 0")


def _check_eval(cfg: ml_collections.ConfigDict) -> None:
    """The held-out evaluation during training (`train.eval_every`, `data.eval`)."""
    every, path = int(cfg.train.get("eval_every", 0)), str(cfg.data.get("eval", ""))
    if every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0 = off), got {every}")
    if not every:
        return
    if not path:
        raise ConfigError(f"train.eval_every={every} needs --config.data.eval (a held-out rows file)")
    if not paths.path(path).exists():
        raise ConfigError(f"data.eval={path}: no such file or folder")
    # precomputed: the frozen copy is freed after the reference pass (LoRA keeps its base)
    lora = cfg.model.get("lora")
    if cfg.loss.reference == "precomputed" and not (lora and lora.rank) and _uses_reference(cfg):
        raise ConfigError(
            "train.eval_every needs loss.reference on_the_fly or none (precomputed frees the reference "
            "the held-out rows are scored against)"
        )
    if uses_predicted(cfg):
        raise ConfigError(
            f"train.eval_every: pba.preference={cfg.pba.preference} renders predicted profiles of "
            "training rows only; use golden or history"
        )


def _uses_reference(cfg: ml_collections.ConfigDict) -> bool:
    spec = losses.PREFERENCE_LOSSES.get(cfg.loss.type)
    return spec is None or spec.uses_reference


def _check_layout(cfg: ml_collections.ConfigDict) -> None:
    """The batch layout: row lengths, shared prompts / packing, kept tokens, the splash kernel."""
    if max(cfg.data.buckets) < cfg.data.max_length:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the largest of data.buckets "
            f"{tuple(cfg.data.buckets)}"
        )
    if cfg.data.get("packing", False) and not cfg.data.get("share_prompt", False):
        raise ConfigError("data.packing packs share_prompt rows: set data.share_prompt=true as well")
    if cfg.data.get("share_prompt", False) or cfg.data.get("packing", False):
        longest = int(cfg.data.max_length) + reserve(int(cfg.data.max_length))
        if max(cfg.data.buckets) < longest:
            raise ConfigError(
                f"data.share_prompt: rows hold a prompt and both responses, up to data.max_length + "
                f"{reserve(int(cfg.data.max_length))} = {longest} tokens, beyond the largest of "
                f"data.buckets {tuple(cfg.data.buckets)}"
            )
    if int(cfg.data.get("compact_tokens", 8)) < 0:
        raise ConfigError(
            f"data.compact_tokens={cfg.data.compact_tokens}: the number of kept-token sizes per "
            "row length, >= 1 (0 = off)"
        )
    if cfg.model.attention_impl == "splash":
        if cfg.data.get("share_prompt", False):
            raise ConfigError(
                "model.attention_impl=splash cannot express data.share_prompt's branch mask; "
                "use attention_impl=xla or auto with share_prompt"
            )
        odd = [int(b) for b in cfg.data.buckets if int(b) % 128]
        if odd:
            raise ConfigError(
                f"model.attention_impl=splash tiles rows by 128 tokens: data.buckets {odd} "
                "are not multiples of 128"
            )


def _check_pba(cfg: ml_collections.ConfigDict) -> None:
    """The `pba` section (data.method=pba)."""
    pba = cfg.pba
    if pba.preference not in PBA_PREFERENCES:
        raise ConfigError(f"pba.preference={pba.preference!r}: expected one of {', '.join(PBA_PREFERENCES)}")
    if pba.mode not in PBA_MODES:
        raise ConfigError(f"pba.mode={pba.mode!r}: expected one of {', '.join(PBA_MODES)}")
    if not 0.0 <= float(pba.mix_predicted) <= 1.0:
        raise ConfigError(f"pba.mix_predicted must be in [0, 1], got {pba.mix_predicted}")
    if float(pba.focal_gamma) < 0:
        raise ConfigError(f"pba.focal_gamma must be >= 0, got {pba.focal_gamma}")
    if float(pba.weight) < 0:
        raise ConfigError(f"pba.weight must be >= 0, got {pba.weight}")
    if float(pba.lr) <= 0:
        raise ConfigError(f"pba.lr must be positive, got {pba.lr}")
    if int(pba.max_persona_tokens) < 2:
        raise ConfigError(f"pba.max_persona_tokens must be at least 2, got {pba.max_persona_tokens}")
    if int(pba.head_steps) < 1 or int(pba.head_batch_size) < 1 or int(pba.head_rows) < 0:
        raise ConfigError("pba.head_steps and pba.head_batch_size must be positive, pba.head_rows >= 0")
    if joint_head(cfg) and int(pba.max_persona_tokens) > max(cfg.data.buckets):
        raise ConfigError(
            f"pba.max_persona_tokens={pba.max_persona_tokens} exceeds the largest of data.buckets "
            f"{tuple(cfg.data.buckets)} (persona ids are padded to a bucket)"
        )
