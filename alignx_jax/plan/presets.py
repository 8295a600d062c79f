"""Built-in HF config.json descriptions (public model cards) and the DecoderConfig a config trains,
so that `alignx plan` needs no weights."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from alignx_jax import hub
from alignx_jax.errors import ConfigError
from alignx_jax.hardware import resolve_dtype

# one HF config.json a row: model type, then these sizes
_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
)
_SIZES = {
    "llama3-8b": ("llama", 128256, 4096, 14336, 32, 32, 8, 131072, 1e-5, 500000.0),  # Llama-3.1-8B(-Instruct)
    "qwen2.5-7b": ("qwen2", 152064, 3584, 18944, 28, 28, 4, 32768, 1e-6, 1000000.0),  # Qwen2.5-7B(-Instruct)
    # SmolLM2-135M-Instruct, the shipped real model (alignx_jax.real_model; as its GGUF states it)
    "smollm2": ("llama", 49152, 576, 1536, 30, 9, 3, 8192, 1e-5, 100000.0),
}
_TOKENS = {  # tie_word_embeddings, bos_token_id, eos_token_id
    "llama3-8b": (False, 128000, [128001, 128008, 128009]),
    "qwen2.5-7b": (False, 151643, 151645),
    "smollm2": (True, 1, 2),
}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_ONLY_SOME = {  # the keys only some cards state
    "llama3-8b": dict(head_dim=128, rope_scaling=_LLAMA3_ROPE, attention_bias=False),
    "qwen2.5-7b": {},
    "smollm2": dict(head_dim=64, attention_bias=False, pad_token_id=2),
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _card(name: str) -> dict[str, Any]:
    model_type, *sizes = _SIZES[name]
    tied, bos, eos = _TOKENS[name]
    return dict(
        model_type=model_type,
        architectures=[_ARCHITECTURES[model_type]],
        **dict(zip(_SIZE_KEYS, sizes, strict=True)),
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_id=eos,
        hidden_act="silu",
        **_ONLY_SOME[name],
    )


# Built-in HF config.json descriptions (public model cards), for planning without weights.
PRESETS: dict[str, dict[str, Any]] = {name: _card(name) for name in _SIZES}
PRESETS["llama3.1-8b"] = PRESETS["llama3-8b"]
# Llama-3.1-70B(-Instruct): the 8B's card (vocabulary, RoPE, tokens) at these sizes
PRESETS["llama3-70b"] = dict(
    PRESETS["llama3-8b"],
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
)
PRESETS["llama3.1-70b"] = PRESETS["llama3-70b"]


def decoder_config_for(cfg: ml_collections.ConfigDict, platform: str | None = None):
    """The DecoderConfig a run of `cfg` trains, without loading weights. `platform` (tpu | gpu | cpu; None or
    'local': this machine's) is the one model.dtype=auto is made concrete for."""
    from alignx_jax.models.decoder import DecoderConfig
    from alignx_jax.train.state import init_hf_config, load_tokenizer_for, run_options

    dtype = resolve_dtype(str(cfg.model.dtype), backend=None if platform in (None, "local") else platform)
    opts = dict(run_options(cfg), dtype=dtype, param_dtype=str(cfg.model.param_dtype))
    if platform not in (None, "local", "cpu"):  # this host's CPU matmul library is no part of a TPU/GPU plan
        opts["cpu_matmul"] = "ynnpack"
    key = "model.hf_path" if cfg.model.hf_path else "model.preset"  # the one named in an error
    path = str(cfg.model.hf_path) or str(cfg.model.preset)
    if path:
        if path.lower() in PRESETS:
            return DecoderConfig.from_hf(dict(PRESETS[path.lower()]), **opts)
        if path.lower().endswith(".gguf") and os.path.isfile(path):  # as train takes it: its metadata
            from alignx_jax.errors import CheckpointError
            from alignx_jax.models.gguf import GGUFFile

            src = GGUFFile(path)  # the header alone: no tensor is read, nothing converted
            try:
                return DecoderConfig.from_hf(dict(src.hf_config), **opts)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
        if hub.parse_hub_id(path) is not None:  # as train resolves it, but config.json alone: no weights
            from alignx_jax.models import hf

            return hf.load_decoder_config(hub.resolve_hub_id(path, model=True, config_only=True), **opts)
        if os.path.isdir(path):
            from alignx_jax.models import hf

            folder = path
            workdir = os.path.isdir(os.path.join(path, "checkpoints"))
            if workdir or not os.path.isfile(
                os.path.join(path, "config.json")
            ):  # a training workdir (its config.json is the run's): the model is W/reference's
                folder = os.path.join(path, "reference")
            if not os.path.isdir(folder):  # named as the user gave it, not as the reference/ looked for
                held = (
                    "a training workdir without reference/" if workdir else "no config.json and no reference/"
                )
                raise ConfigError(
                    f"{key}={path!r}: {held} (an HF model folder holds config.json, a training workdir its "
                    "model in reference/)"
                )
            return hf.load_decoder_config(folder, **opts)
        raise ConfigError(f"{key}={path!r} is neither a folder nor a preset ({', '.join(sorted(PRESETS))})")
    if not cfg.model.init.enabled:
        raise ConfigError(
            "model.hf_path is '': pass an HF folder or a preset, e.g. "
            "--config.model.hf_path=llama3-8b (or set model.preset)"
        )
    init = cfg.model.init
    vocab = int(init.vocab_size)
    if vocab == -1:
        tok, _ = load_tokenizer_for(cfg)
        vocab = len(tok)
    return DecoderConfig.from_hf(init_hf_config(init, vocab), **opts)
