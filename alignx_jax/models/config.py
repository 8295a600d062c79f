"""`DecoderConfig`: the decoder's Hugging Face `config.json` schema (model_type `llama`, `mistral`,
`qwen2`, `qwen3`, `gemma` or `gemma2`), read and written faithfully (`from_hf` / `to_hf`), plus the run
options HF does not have (compute/param dtype, remat policy, scan, attention kernel, frozen blocks,
LoRA). What a model family needs is a field the layer code (`models.decoder`) branches on."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax.numpy as jnp

from alignx_jax import hardware
from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.models import lora as lora_lib

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
# config.json conventions per family: which keys its configs spell out (for a faithful `to_hf`)
_WRITES_HEAD_DIM = {
    "llama",
    "mistral",
    "qwen3",
    "gemma",
    "gemma2",
}  # qwen2 derives it (written if it differs)
_WRITES_ATTENTION_BIAS = {"llama", "qwen3", "gemma", "gemma2"}
_ACT_KEY = {"gemma2": "hidden_activation"}  # the others: hidden_act
# the activation transformers' config class assumes where config.json omits the key (the others: silu)
_ACT_DEFAULT = {"gemma": "gelu_pytorch_tanh", "gemma2": "gelu_pytorch_tanh"}
# Gemma's releases say hidden_act "gelu" and mean the tanh approximation (GemmaConfig rewrites it so)
_ACT_ALIASES = {"gemma": {"gelu": "gelu_pytorch_tanh"}}
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# the rope_scaling keys each type cannot do without (original_max_position_embeddings defaults, as in
# transformers, to max_position_embeddings; YaRN's factor null is derived from that pair)
_ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto", "chunked")
# the config.json keys that fix a decoder's architecture (with vocab_size): all a randomly initialised
# one needs (`train.state.init_hf_config`)
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
)
# HF keys DecoderConfig models itself; everything else in config.json is carried through untouched.
_MODELED_KEYS = {
    *ARCHITECTURE_KEYS,
    "architectures",
    "vocab_size",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
}


@functools.cache
def _transformers_config(model_type: str) -> Any:
    from transformers import AutoConfig  # heavy (it may import torch): only for a key config.json omits

    return AutoConfig.for_model(model_type)


def transformers_default(model_type: str, key: str) -> Any:
    """The value transformers' config class of `model_type` gives `key` where config.json omits it
    (LlamaConfig's max_position_embeddings 2048, Qwen2Config's 32768): the model transformers loads."""
    return getattr(_transformers_config(model_type), key)


def transformers_config_name(model_type: str) -> str:
    return type(_transformers_config(model_type)).__name__


def _refuse_unmodeled(hf: dict[str, Any]) -> None:
    """CheckpointError for a config.json feature the layer code does not model (loaded, it would be wrong)."""
    quant = hf.get("quantization_config")
    if quant:  # packed/int8 tensors and scales: read as plain weights they are silent garbage
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise CheckpointError(
            f"unsupported quantized checkpoint (quantization_config.quant_method={method!r}); "
            "use the unquantized model"
        )
    for key in ("mlp_bias", "use_sliding_window", "use_bidirectional_attention"):
        if hf.get(key):
            raise CheckpointError(f"unsupported {key}=true")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """HF's RoPE scaling settings (`rope_scaling`, or `rope_parameters` less the theta), parsed here only:
    the type, the context the model was pretrained at, and all the settings as config.json gave them
    (the type's own keys: factor, low_freq_factor, beta_fast, attention_factor, ...)."""

    rope_type: str
    original_max_position_embeddings: float
    settings: dict[str, Any]  # built afresh on each `DecoderConfig.rope` read (never hashed nor shared)

    @staticmethod
    def type_of(scaling: dict[str, Any]) -> str:
        return scaling.get("rope_type", scaling.get("type", "default"))  # older configs spell it `type`

    @classmethod
    def parse(cls, scaling: dict[str, Any] | None, max_position_embeddings: int) -> RopeScaling:
        scaling = dict(scaling or {})
        # transformers' default for the context the model was pretrained at: max_position_embeddings
        old_ctx = float(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        return cls(cls.type_of(scaling), old_ctx, scaling)


def _rope_of(hf: dict[str, Any]) -> tuple[str, dict[str, Any], float]:
    """(the key config.json spells RoPE under, its scaling settings less the theta, the theta), checked
    for a type the decoder computes and the keys that type needs (transformers 5's `rope_parameters`, or
    the older `rope_scaling` beside a top-level `rope_theta`)."""
    rope_params = hf.get("rope_parameters")
    style = "rope_parameters" if isinstance(rope_params, dict) else "rope_scaling"
    if style == "rope_parameters":
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    else:
        scaling = dict(hf.get("rope_scaling") or {})
        theta = float(hf.get("rope_theta", 10000.0))
    rope_type = RopeScaling.type_of(scaling)
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"unsupported rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    for key in _ROPE_KEYS.get(rope_type, ()):
        if scaling.get(key) is None:
            raise CheckpointError(f"{style} of rope type {rope_type!r} lacks {key!r}")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:  # we rotate whole heads
        raise CheckpointError(
            f"unsupported partial_rotary_factor={scaling['partial_rotary_factor']} in {style}"
        )
    return style, scaling, theta


def _freeze(x: Any) -> Any:
    """Dicts/lists -> sorted tuples so the config stays hashable (it is static under jit)."""
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, list):
        return tuple(_freeze(v) for v in x)
    return x


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope_scaling without rope_theta, as sorted (key, value) pairs; None = plain RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # ---- family features (read from config.json; the source keys are exported as they came) ----
    hidden_act: str = "silu"  # gated MLP activation: silu, or gelu_pytorch_tanh (Gemma 2)
    qk_norm: bool = False  # RMSNorm over head_dim on each q and k head before RoPE (Qwen3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), computed in float32 (Gemma)
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma 2)
    scale_embeddings: bool = False  # input embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this), else 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    sliding_window: int | None = None  # a query sees the keys less than this many positions back
    sliding_layers: tuple[bool, ...] | None = None  # which layers use the window; None = all
    # how config.json spelled RoPE ("rope_parameters" in transformers 5, else "rope_scaling")
    hf_rope_style: str = "rope_parameters"
    hf_extra_json: str = "{}"  # unmodeled config.json keys, for a faithful export
    # ---- run options (not in HF) ----
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention_impl: str = "xla"
    cpu_matmul: str = "auto"  # the library XLA's CPU backend calls for products (hardware.CPU_MATMULS)
    # the bottom `frozen_layers` blocks and the input embedding take no gradient (training only):
    # the backward pass stops at the first trainable block
    frozen_layers: int = 0
    # LoRA adapters (models.lora): rank 0 = off; alpha 0 = 2 * rank; the projections adapted
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = lora_lib.LORA_TARGETS

    def __post_init__(self):
        lora_lib.check_options(self.lora_rank, self.lora_alpha, tuple(self.lora_targets))
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat policy {self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention_impl {self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}"
            )
        if self.cpu_matmul not in hardware.CPU_MATMULS:
            raise ConfigError(
                f"cpu_matmul {self.cpu_matmul!r} is not one of {', '.join(hardware.CPU_MATMULS)}"
            )
        if not 0 <= self.frozen_layers < self.num_hidden_layers:
            raise ConfigError(
                f"frozen_layers={self.frozen_layers} must be in [0, num_hidden_layers="
                f"{self.num_hidden_layers})"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise CheckpointError(
                f"unsupported hidden_act {self.hidden_act!r} (supported: {', '.join(HIDDEN_ACTS)})"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise CheckpointError(f"sliding_window={self.sliding_window} must be a positive integer or null")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_hidden_layers:
            raise CheckpointError(
                f"layer_types names {len(self.sliding_layers)} layers, num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        for f in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, f))
            except TypeError:
                raise ConfigError(f"{f}={getattr(self, f)!r} is not a dtype") from None

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def lora_multiplier(self) -> float:
        """`alpha / rank` of the adapters (0.0 with LoRA off)."""
        return lora_lib.multiplier(self.lora_rank, self.lora_alpha)

    def lora_on(self, name: str) -> bool:
        return bool(self.lora_rank) and name in self.lora_targets

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    def window_cuts(self, keys: int) -> bool:
        """Whether the sliding window masks anything in attention over `keys` key slots."""
        return self.sliding_window is not None and self.sliding_window < keys and any(self.layer_is_sliding)

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        if self.sliding_window is None:
            return (False,) * self.num_hidden_layers
        return self.sliding_layers or (True,) * self.num_hidden_layers

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope(self) -> RopeScaling:
        return RopeScaling.parse(self.rope_scaling_dict, self.max_position_embeddings)

    def compiler_options(self, decode: bool = False) -> dict[str, Any]:
        """The XLA options every program of this model is compiled with (`jax.jit(..., compiler_options=)`):
        the CPU matmul library of `cpu_matmul` (`hardware.cpu_matmul_library`; `decode`: a generation
        program); {} off the CPU."""
        library = hardware.cpu_matmul_library(
            self.cpu_matmul, str(self.compute_dtype), self.hidden_size, decode=decode
        )
        if library is None:
            raise ConfigError(f"model.cpu_matmul=onednn: {hardware.onednn_refusal()}; use auto or ynnpack")
        return hardware.compiler_options(library)

    def compiler_options_key(self, decode: bool = False) -> tuple[tuple[str, Any], ...]:
        """`compiler_options()` as sorted (name, value) pairs: hashable, for a cache of jitted functions."""
        return tuple(sorted(self.compiler_options(decode).items()))

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **run_options: Any) -> DecoderConfig:
        """Build from a config.json dict; `run_options` set dtype/param_dtype/remat/scan_layers/..."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for arch in hf.get("architectures") or []:
            if arch != SUPPORTED_MODEL_TYPES[model_type]:
                raise CheckpointError(f"unsupported architecture {arch!r} for model_type {model_type!r}")
        act_key = _ACT_KEY.get(model_type, "hidden_act")
        act = hf.get(act_key, _ACT_DEFAULT.get(model_type, "silu"))
        act = _ACT_ALIASES.get(model_type, {}).get(act, act)
        if act not in HIDDEN_ACTS:
            raise CheckpointError(
                f"unsupported {act_key} {hf.get(act_key)!r} (supported: {', '.join(HIDDEN_ACTS)})"
            )
        _refuse_unmodeled(hf)
        modeled = _MODELED_KEYS if act_key == "hidden_act" else _MODELED_KEYS - {"hidden_act"}
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            style, scaling, theta = _rope_of(hf)
            bias = bool(hf.get("attention_bias", False))
            eos = hf.get("eos_token_id")
            extra = {k: v for k, v in hf.items() if k not in modeled}
            gemma = model_type == "gemma2"
            gemma_like = model_type in ("gemma", "gemma2")  # (1 + w) norms, scaled embeddings
            layers = int(hf["num_hidden_layers"])
            # qwen2/qwen3 configs carry a sliding_window they do not use (use_sliding_window=false)
            window = (
                None if model_type in ("llama", "qwen2", "qwen3", "gemma") else hf.get("sliding_window", 4096)
            )
            sliding = None
            if window is not None and model_type != "mistral":  # Mistral slides on every layer
                types = hf.get("layer_types") or [
                    "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
                ]
                sliding = tuple(t == "sliding_attention" for t in types)
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                max_position_embeddings=int(
                    hf["max_position_embeddings"]
                    if "max_position_embeddings" in hf
                    else transformers_default(model_type, "max_position_embeddings")
                ),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=_freeze(scaling) if scaling else None,
                # Qwen2 always has q/k/v biases and no o bias; the others' attention_bias covers all four
                qkv_bias=True if model_type == "qwen2" else bias,
                o_bias=False if model_type == "qwen2" else bias,
                # absent: transformers' default for the family (the Gemma configs tie, Qwen2Config does not)
                tie_word_embeddings=bool(
                    hf["tie_word_embeddings"]
                    if "tie_word_embeddings" in hf
                    else transformers_default(model_type, "tie_word_embeddings")
                ),
                hidden_act=act,
                qk_norm=model_type == "qwen3",
                norm_plus_one=gemma_like,
                sandwich_norms=gemma,
                scale_embeddings=gemma_like,
                # transformers' Gemma2Config defaults where a key is absent
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma else None,
                attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0) if gemma else None,
                final_logit_softcapping=hf.get("final_logit_softcapping", 30.0) if gemma else None,
                sliding_window=None if window is None else int(window),
                sliding_layers=sliding,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=hf.get("pad_token_id"),
                hf_rope_style=style,
                hf_extra_json=json.dumps(extra, sort_keys=True),
                **run_options,
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"malformed config.json: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict (unmodeled keys from the source config are kept as they were)."""
        out: dict[str, Any] = json.loads(self.hf_extra_json)
        scaling = self.rope_scaling_dict or {}
        out.update(
            {
                "architectures": [SUPPORTED_MODEL_TYPES[self.model_type]],
                "model_type": self.model_type,
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id,
                "pad_token_id": self.pad_token_id,
            }
        )
        out[_ACT_KEY.get(self.model_type, "hidden_act")] = self.hidden_act
        if self.model_type in _WRITES_ATTENTION_BIAS:
            out["attention_bias"] = self.qkv_bias
        if (
            self.model_type in _WRITES_HEAD_DIM
            or self.head_dim != self.hidden_size // self.num_attention_heads
        ):
            out["head_dim"] = self.head_dim  # Qwen2 configs derive it and carry no such key
        if self.hf_rope_style == "rope_parameters":
            out["rope_parameters"] = {"rope_type": "default", **scaling, "rope_theta": self.rope_theta}
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = scaling or None
        return out
