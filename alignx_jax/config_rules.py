"""`validate_config`: a run config checked against its schema (`config_schema.check_types`), then the
cross-key rules a key lookup cannot do, one `ConfigError` line for the first failure. `alignx train`
runs it before anything is written, `alignx plan` before anything compiles (`inputs=False`)."""

# no `from __future__ import annotations`, as in config_schema

import math

import ml_collections

from alignx_jax import losses, paths
from alignx_jax.config_schema import check_types, joint_head, uses_predicted
from alignx_jax.data.batching import shared_row_bound
from alignx_jax.errors import CheckpointError, ConfigError, DataError
from alignx_jax.metrics import has_wandb, wandb_missing
from alignx_jax.models import lora as lora_lib
from alignx_jax.models.config import SUPPORTED_MODEL_TYPES


def validate_config(cfg: ml_collections.ConfigDict, *, inputs: bool = True) -> None:
    """The schema (`check_types`), then the consistency checks a key lookup cannot do; each failure is
    one ConfigError line. The sections are checked in this order (the first failure is the one
    reported). `inputs=False` (`alignx plan`): the workdir, weights and data a run needs are not asked."""
    check_types(cfg)
    if inputs:
        _check_inputs(cfg)
    else:
        _check_buckets(cfg)
    _check_loss(cfg)
    _check_schedule(cfg)
    _check_model(cfg)
    _check_eval(cfg, inputs)
    _check_layout(cfg)
    _check_sharding(cfg)
    if cfg.data.method == "pba":
        _check_pba(cfg)


def _check_sharding(cfg: ml_collections.ConfigDict) -> None:
    """`sharding.rules` name known logical axes and mesh axes: a misspelt one would leave its arrays
    replicated on every device, silently."""
    from alignx_jax.sharding import LOGICAL_AXES, MESH_AXES

    for name, axes in cfg.sharding.rules:
        if name not in LOGICAL_AXES:
            raise ConfigError(
                f"sharding.rules: unknown logical axis {name!r} (known: {', '.join(LOGICAL_AXES)})"
            )
        for ax in () if axes is None else ((axes,) if isinstance(axes, str) else axes):
            if ax not in MESH_AXES:
                raise ConfigError(
                    f"sharding.rules: {name!r} -> unknown mesh axis {ax!r} (mesh axes: {', '.join(MESH_AXES)})"
                )


def _check_inputs(cfg: ml_collections.ConfigDict) -> None:
    """The workdir, length buckets, model and training data."""
    if not cfg.workdir:
        raise ConfigError("--config.workdir is required (the run's output folder)")
    _check_buckets(cfg)
    if not cfg.model.hf_path and not cfg.model.init.enabled:
        raise ConfigError("--config.model.hf_path is required (an HF folder or `alignx import` checkpoint)")
    if not cfg.data.train:  # synthetic users, written into W/data: checked before that
        _check_synth(cfg)
    if cfg.train.wandb_project and not has_wandb():  # before any file is written
        raise ConfigError(wandb_missing(cfg.train.wandb_project))


def _check_synth(cfg: ml_collections.ConfigDict) -> None:
    """`data.train` '': the synthetic users' sizes (as `alignx synth` takes them) and one global batch."""
    if cfg.data.synth_users <= 0:
        raise ConfigError("--config.data.train is required (parquet/JSONL/JSON file or folder)")
    if cfg.data.synth_users == 1:  # `alignx synth --users` needs two
        raise ConfigError("data.synth_users must be at least 2 (data.train '' makes synthetic users), got 1")
    if cfg.data.synth_pairs_per_user < 1:
        raise ConfigError(
            f"data.synth_pairs_per_user must be at least 1 (data.train '' makes synthetic users), "
            f"got {cfg.data.synth_pairs_per_user}"
        )
    if cfg.data.twins:  # the loader's twins check refused the synthetic rows once W held them
        raise ConfigError(
            "data.twins needs a file of twins (`alignx data contrast --twins`) as data.train; "
            "data.train '' makes synthetic users, whose rows are no twins"
        )
    synth_rows = int(cfg.data.synth_users) * int(cfg.data.synth_pairs_per_user)
    if synth_rows < int(cfg.train.global_batch):
        raise ConfigError(
            f"data.synth_users x data.synth_pairs_per_user = {synth_rows} synthetic rows make no full batch "
            f"of train.global_batch={cfg.train.global_batch} pairs; raise them or lower train.global_batch"
        )


def check_input_paths(cfg: ml_collections.ConfigDict) -> None:
    """A data.train, model.hf_path or model.tokenizer that names nothing, or a model.hf_path folder that
    holds no model (no config.json, no weights): the same line the loaders give, before the workdir is
    taken (it was left holding only its lock). A hub id, the shipped model's name,
    a URL or a .gguf file is resolved here (downloaded, prepared, copied or converted once; its loader
    resolves it again from the cache). `alignx train` asks it right after `validate_config`."""
    from alignx_jax.models.checkpoint import check_model_folder
    from alignx_jax.models.presets import resolve_model_path

    if cfg.data.train and not paths.exists(cfg.data.train):
        raise DataError("no such file or folder", file=cfg.data.train)
    for key in ("hf_path", "tokenizer"):
        path = str(cfg.model[key])
        # a hub id, smollm2, a URL or a .gguf file gives its own one-line refusal; a file is no folder either
        folder = resolve_model_path(path, model=key == "hf_path") if path else ""
        if path and not paths.is_dir(folder):
            raise CheckpointError(f"model.{key}: folder not found: {path}")
        if path and key == "hf_path":  # tokenizer files alone are no model: its loader's line, now
            _check_frozen_depth(cfg, check_model_folder(folder))


def _check_frozen_depth(cfg: ml_collections.ConfigDict, hf_config: dict) -> None:
    """`model.frozen_layers` below the depth of the model.hf_path model (its config.json, read before the
    workdir is taken): the model build refused it after, leaving W holding its lock and data."""
    frozen, layers = cfg.model.frozen_layers, hf_config.get("num_hidden_layers")
    if isinstance(layers, int) and frozen >= layers:  # a malformed config.json is its loader's to refuse
        raise ConfigError(
            f"model.frozen_layers={frozen} must be below the num_hidden_layers={layers} of "
            f"model.hf_path={cfg.model.hf_path}"
        )


def _check_buckets(cfg: ml_collections.ConfigDict) -> None:
    buckets = cfg.data.buckets
    if not buckets or any(b <= 0 for b in buckets):
        raise ConfigError(
            f"data.buckets={buckets!r}: expected a tuple of positive integers, e.g. (1024, 2048)"
        )


def _check_loss(cfg: ml_collections.ConfigDict) -> None:
    """The `loss` section (its allowed values are checked by `check_types`)."""
    if not cfg.loss.beta > 0 or not math.isfinite(cfg.loss.beta):  # `not >`: NaN fails too
        raise ConfigError(f"loss.beta must be positive, got {cfg.loss.beta}")
    if not 0 <= cfg.loss.gamma_beta_ratio < math.inf:  # `not <=`: a NaN or inf margin made every loss NaN
        raise ConfigError(f"loss.gamma_beta_ratio must be >= 0 and finite, got {cfg.loss.gamma_beta_ratio}")
    if cfg.loss.type == "robust" and not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError("loss.label_smoothing must be in [0, 0.5) for the robust loss")
    if not 0 <= cfg.loss.label_smoothing <= 0.5:  # a flipped-label fraction; past 0.5 it trains backwards
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5], got {cfg.loss.label_smoothing}")
    if not 0 <= cfg.loss.sft_weight < math.inf:
        raise ConfigError(f"loss.sft_weight must be >= 0 and finite (0 = none), got {cfg.loss.sft_weight}")
    if cfg.loss.logps_chunk < 0:
        raise ConfigError(f"loss.logps_chunk must be >= 0 (0 = one chunk), got {cfg.loss.logps_chunk}")
    if cfg.loss.max_skipped_steps < 1:
        raise ConfigError(f"loss.max_skipped_steps must be at least 1, got {cfg.loss.max_skipped_steps}")


def _check_schedule(cfg: ml_collections.ConfigDict) -> None:
    """Batch sizes, the run length, the learning rate, logging and saving."""
    gb, mb = cfg.train.global_batch, cfg.train.micro_batch or cfg.train.global_batch
    if gb <= 0 or mb <= 0 or gb % mb:
        raise ConfigError(f"train.global_batch={gb} must be a positive multiple of train.micro_batch={mb}")
    if cfg.train.steps == 0 or cfg.train.steps < -1 or (cfg.train.steps == -1 and cfg.train.epochs <= 0):
        raise ConfigError("train.steps must be positive, or -1 with train.epochs > 0")
    for key in ("every_steps", "keep"):
        if cfg.checkpoint[key] < 1:
            raise ConfigError(f"checkpoint.{key} must be at least 1, got {cfg.checkpoint[key]}")
    for section, key in (("train", "seed"), ("data", "synth_seed"), ("pba", "seed")):
        if cfg[section][key] < 0:  # numpy's seeds are non-negative: a traceback at the first batch
            raise ConfigError(f"{section}.{key} must be >= 0, got {cfg[section][key]}")
    if cfg.model.init.get("seed") is not None and cfg.model.init.seed < 0:
        raise ConfigError(f"model.init.seed must be >= 0, got {cfg.model.init.seed}")
    if cfg.train.log_every < 1:
        raise ConfigError(f"train.log_every must be at least 1, got {cfg.train.log_every}")
    _check_optim(cfg.optim)


def _check_optim(optim: ml_collections.ConfigDict) -> None:
    """The rest of the optimizer: a NaN or out-of-range value here would train on a NaN or negative
    learning rate, or fail deep in the schedule with a traceback (`not <=`: NaN fails every check)."""
    ranges = {
        "lr": ("positive", lambda v: 0 < v < math.inf),
        "warmup_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
        "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
        "b1": ("in [0, 1)", lambda v: 0 <= v < 1),
        "b2": ("in [0, 1)", lambda v: 0 <= v < 1),
        "eps": ("positive and finite", lambda v: 0 < v < math.inf),
        "weight_decay": (">= 0 and finite", lambda v: 0 <= v < math.inf),
        "clip": (">= 0 and finite (0 = no clipping)", lambda v: 0 <= v < math.inf),
    }
    for key, (what, ok) in ranges.items():
        if not ok(optim[key]):
            raise ConfigError(f"optim.{key} must be {what}, got {optim[key]}")


def _check_model(cfg: ml_collections.ConfigDict) -> None:
    """`model.lora`, `model.frozen_layers` and a random-init model's shape (`model.init`): values that make
    no decoder are one line, not a traceback, and refused before the workdir is taken (the model build
    refused them after it, leaving W holding its lock and data)."""
    lora = cfg.model.lora
    targets = (lora.targets,) if isinstance(lora.targets, str) else tuple(lora.targets)
    lora_lib.check_options(lora.rank, lora.alpha, targets)
    frozen = cfg.model.frozen_layers
    if frozen < 0:
        raise ConfigError(f"model.frozen_layers must be >= 0 (0 = every block trains), got {frozen}")
    init = cfg.model.init
    if init.enabled:
        if init.model_type not in SUPPORTED_MODEL_TYPES:  # the model build refused it after the workdir
            raise ConfigError(
                f"model.init.model_type={init.model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        sizes = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
        for key in (*sizes, "head_dim", "max_position_embeddings"):
            if key in init and init[key] is not None and init[key] < 1:
                raise ConfigError(f"model.init.{key} must be positive, got {init[key]}")
        # `not <`: NaN fails too; a zero or NaN one made NaN activations, silently
        for key in ("rope_theta", "rms_norm_eps"):
            if key in init and not 0 < init[key] < math.inf:
                raise ConfigError(f"model.init.{key} must be positive and finite, got {init[key]}")
        if init.get("head_dim") is not None and init.head_dim % 2:  # rotary embeddings turn pairs of dims
            raise ConfigError(f"model.init.head_dim must be even (rotary embeddings), got {init.head_dim}")
        heads, kv = init.get("num_attention_heads"), init.get("num_key_value_heads")
        if heads is not None and kv is not None and heads % kv:
            raise ConfigError(
                f"model.init.num_attention_heads={heads} must be a multiple of model.init.num_key_value_heads={kv}"
            )
        if "vocab_size" in init and init.vocab_size != -1 and init.vocab_size < 1:
            raise ConfigError(
                f"model.init.vocab_size must be positive (or -1: the tokenizer's), got {init.vocab_size}"
            )
        # the random-init stack's depth is known here; a loaded model's only once its config.json is read
        if not cfg.model.hf_path and not cfg.model.preset and frozen >= init.num_hidden_layers:
            raise ConfigError(
                f"model.frozen_layers={frozen} must be below model.init.num_hidden_layers="
                f"{init.num_hidden_layers}"
            )


def _check_eval(cfg: ml_collections.ConfigDict, inputs: bool = True) -> None:
    """The held-out evaluation during training (`train.eval_every`, `data.eval`; `inputs`: that it exists)."""
    every, path = cfg.train.eval_every, cfg.data.eval
    if every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0 = off), got {every}")
    if not every:
        return
    if not path:
        raise ConfigError(f"train.eval_every={every} needs --config.data.eval (a held-out rows file)")
    if inputs and not paths.path(path).exists():
        raise ConfigError(f"data.eval={path}: no such file or folder")
    # precomputed: the frozen copy is freed after the reference pass (LoRA keeps its base)
    if cfg.loss.reference == "precomputed" and not cfg.model.lora.rank and _uses_reference(cfg):
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
    return losses.PREFERENCE_LOSSES[cfg.loss.type].uses_reference


def _check_layout(cfg: ml_collections.ConfigDict) -> None:
    """The batch layout: row lengths, shared prompts / packing, kept tokens, the splash kernel."""
    data = cfg.data
    if data.max_length < 4:  # a prompt token, a response token and the specials (batching.py)
        raise ConfigError(f"data.max_length must be at least 4, got {data.max_length}")
    if data.length_groups < 0:
        raise ConfigError(f"data.length_groups={data.length_groups}: expected 0 (off) or a number of batches")
    if data.length_groups and not data.shuffle:  # the loader groups shuffled shards only
        raise ConfigError(
            "data.length_groups regroups the shuffled order: it needs data.shuffle=true (or set it 0)"
        )
    if max(data.buckets) < data.max_length:
        raise ConfigError(
            f"data.max_length={data.max_length} exceeds the largest of data.buckets {tuple(data.buckets)}"
        )
    if data.packing and not data.share_prompt:
        raise ConfigError("data.packing packs share_prompt rows: set data.share_prompt=true as well")
    if data.pack_length and not data.pack_length >= max(data.buckets):
        # a shared row may take the largest bucket: found in a batch, a longer pair stopped the run there
        raise ConfigError(
            f"data.pack_length={data.pack_length}: 0 (the largest bucket) or at least the largest of "
            f"data.buckets, {max(data.buckets)}, which a shared row may fill"
        )
    if data.share_prompt:
        # a kept pair with a short prompt and two long responses: found past the largest bucket, it
        # stopped the run partway
        longest = shared_row_bound(data.max_length)
        if max(data.buckets) < longest:
            raise ConfigError(
                f"data.share_prompt: rows hold a prompt and both responses, up to 2 x data.max_length - 1 = "
                f"{longest} tokens, beyond the largest of data.buckets {tuple(data.buckets)}: add a bucket "
                f"of at least {longest} or lower data.max_length"
            )
    if data.compact_tokens < 0:
        raise ConfigError(
            f"data.compact_tokens={data.compact_tokens}: the number of kept-token sizes per "
            "row length, >= 1 (0 = off)"
        )
    if cfg.model.attention_impl == "splash":
        if data.share_prompt:
            raise ConfigError(
                "model.attention_impl=splash cannot express data.share_prompt's branch mask; "
                "use attention_impl=xla or auto with share_prompt"
            )
        odd = [b for b in data.buckets if b % 128]
        if odd:
            raise ConfigError(
                f"model.attention_impl=splash tiles rows by 128 tokens: data.buckets {odd} "
                "are not multiples of 128"
            )


def _check_pba(cfg: ml_collections.ConfigDict) -> None:
    """The `pba` section (data.method=pba; its allowed values are checked by `check_types`)."""
    pba = cfg.pba
    if not 0.0 <= pba.mix_predicted <= 1.0:
        raise ConfigError(f"pba.mix_predicted must be in [0, 1], got {pba.mix_predicted}")
    if not 0 <= pba.focal_gamma < math.inf:  # NaN made the head's loss NaN
        raise ConfigError(f"pba.focal_gamma must be >= 0 and finite, got {pba.focal_gamma}")
    if not 0 <= pba.weight < math.inf:  # `not <=`: NaN fails too
        raise ConfigError(f"pba.weight must be >= 0 and finite, got {pba.weight}")
    if joint_head(cfg) and pba.weight == 0:  # the joint head's only gradient is pba.weight x its CE
        raise ConfigError(
            "pba.weight=0 with pba.mode=joint leaves the preference head untrained; "
            "set pba.weight > 0, pba.mode=two_stage or pba.enabled=false"
        )
    if not 0 < pba.lr < math.inf:  # `not <`: NaN fails too
        raise ConfigError(f"pba.lr must be positive and finite, got {pba.lr}")
    if not 0 <= pba.weight_decay < math.inf:
        raise ConfigError(f"pba.weight_decay must be >= 0 and finite, got {pba.weight_decay}")
    weights = tuple(pba.class_weights)
    # a negative weight ascends that class's CE, all zeros leave the head untrained: both silently
    if not all(0 <= w < math.inf for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(
            f"pba.class_weights must be finite and >= 0 with one above 0, got {weights} "
            "(for the classes 0, 0.5, 1)"
        )
    if pba.hidden < 1:  # the head's build refused it once the workdir was taken (its lock, data, reference)
        raise ConfigError(f"pba.hidden must be at least 1 (the head's hidden width), got {pba.hidden}")
    if pba.max_persona_tokens < 2:
        raise ConfigError(f"pba.max_persona_tokens must be at least 2, got {pba.max_persona_tokens}")
    if pba.head_steps < 1 or pba.head_batch_size < 1 or pba.head_rows < 0:
        raise ConfigError("pba.head_steps and pba.head_batch_size must be positive, pba.head_rows >= 0")
    if joint_head(cfg) and pba.max_persona_tokens > max(cfg.data.buckets):
        raise ConfigError(
            f"pba.max_persona_tokens={pba.max_persona_tokens} exceeds the largest of data.buckets "
            f"{tuple(cfg.data.buckets)} (persona ids are padded to a bucket)"
        )
