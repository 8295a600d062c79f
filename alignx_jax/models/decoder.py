"""Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 decoder-only transformer in Flax NNX, with stacked
(scannable) layers.

`DecoderConfig` maps to and from a Hugging Face `config.json` (model_type `llama`, `mistral`,
`qwen2`, `qwen3` or `gemma2`) and adds run options HF does not have (compute/param dtype, remat
policy, scan, attention kernel). What a family needs is a config field the layer code branches on:
q/k/v(/o) biases, per-head q/k RMSNorm (`qk_norm`, Qwen3), Gemma's `(1 + w)` RMSNorm, scaled
embeddings, post-attention/-MLP norms (`sandwich_norms`), GELU-tanh MLP, `query_pre_attn_scalar`,
attention and final logit soft-capping, and a sliding attention window on all or some layers
(`sliding_window`, `sliding_layers`; applied in the mask).
`Decoder` stores every per-layer weight with a leading `layers` axis; the forward pass applies the
layers with `jax.lax.scan` (`scan_layers=True`, one compiled layer) or an unrolled loop, each
optionally rematerialised. Every `nnx.Param` carries logical axis names (metadata key
`logical_axes`, see `alignx_jax.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.models import lora as lora_lib
from alignx_jax.models.compaction import TokenLayout
from alignx_jax.models.matmul import dense, dense_many
from alignx_jax.sharding import LOGICAL_AXES_KEY, active_spec, constrain

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
# config.json conventions per family: which keys its configs spell out (for a faithful `to_hf`)
_WRITES_HEAD_DIM = {"llama", "mistral", "qwen3", "gemma2"}  # qwen2 derives it (written if it differs)
_WRITES_ATTENTION_BIAS = {"llama", "qwen3", "gemma2"}
_ACT_KEY = {"gemma2": "hidden_activation"}  # the others: hidden_act
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto", "chunked")
# query rows per block of the "chunked" attention (peak scores [B, N, chunk, S] instead of [B, N, T, S])
ATTENTION_CHUNK = 1024

# HF keys DecoderConfig models itself; everything else in config.json is carried through untouched.
_MODELED_KEYS = {
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "hidden_act",
}

Cache = dict[str, jax.Array]


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
        if hf.get(act_key, "silu") not in HIDDEN_ACTS:
            raise CheckpointError(
                f"unsupported {act_key} {hf.get(act_key)!r} (supported: {', '.join(HIDDEN_ACTS)})"
            )
        if hf.get("mlp_bias"):
            raise CheckpointError("unsupported mlp_bias=true")
        if hf.get("use_sliding_window"):
            raise CheckpointError("unsupported use_sliding_window=true")
        if hf.get("use_bidirectional_attention"):
            raise CheckpointError("unsupported use_bidirectional_attention=true")
        modeled = _MODELED_KEYS if act_key == "hidden_act" else _MODELED_KEYS - {"hidden_act"}
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            rope_params = hf.get("rope_parameters")
            style = "rope_parameters" if isinstance(rope_params, dict) else "rope_scaling"
            if style == "rope_parameters":
                scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
                theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
            else:
                scaling = dict(hf.get("rope_scaling") or {})
                theta = float(hf.get("rope_theta", 10000.0))
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise CheckpointError(
                    f"unsupported rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
                )
            bias = bool(hf.get("attention_bias", False))
            eos = hf.get("eos_token_id")
            extra = {k: v for k, v in hf.items() if k not in modeled}
            gemma = model_type == "gemma2"
            layers = int(hf["num_hidden_layers"])
            # qwen2/qwen3 configs carry a sliding_window they do not use (use_sliding_window=false)
            window = None if model_type in ("llama", "qwen2", "qwen3") else hf.get("sliding_window", 4096)
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
                max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=_freeze(scaling) if scaling else None,
                # Qwen2 always has q/k/v biases and no o bias; the others' attention_bias covers all four
                qkv_bias=True if model_type == "qwen2" else bias,
                o_bias=False if model_type == "qwen2" else bias,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type in ("qwen2", "gemma2"))),
                hidden_act=hf.get(act_key, "silu"),
                qk_norm=model_type == "qwen3",
                norm_plus_one=gemma,
                sandwich_norms=gemma,
                scale_embeddings=gemma,
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


# ---- building blocks (pure functions over arrays) ----------------------------------------------


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2] with the config's scaling (default, linear, llama3)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = cfg.rope_scaling_dict or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, blended, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions_BT: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)  # HF's rotate-half layout
    return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    # variance in float32 whatever the compute dtype, as HF does
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:  # Gemma: y * (1 + w) in float32, then cast (Llama casts y first)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping `cap * tanh(x / cap)` (identity for cap None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


# a finite "minus infinity": fully masked (left-pad) query rows stay NaN-free (uniform weights)
MASK_MIN = float(np.finfo(np.float32).min)


def mask_bias(allowed_BTS: jax.Array) -> jax.Array:
    """Boolean attention mask -> additive float32 bias (0 where allowed, MASK_MIN elsewhere).
    Built once per forward and shared by every layer, instead of a `where` on each layer's scores."""
    return jnp.where(allowed_BTS, 0.0, MASK_MIN).astype(jnp.float32)


def _as_bias(mask_BTS: jax.Array) -> jax.Array:
    return mask_bias(mask_BTS) if mask_BTS.dtype == jnp.bool_ else mask_BTS.astype(jnp.float32)


# Causal self-attention is computed one block of query rows at a time, each block against the
# key prefix it can see: the masked upper triangle is never computed ((n+1)/2n of the full score
# work for n blocks) and each block's [rows, prefix] scores are small enough to stay in cache.
ATTENTION_BLOCK_MIN = 64
ATTENTION_BLOCKS_MAX = 16


def causal_block_rows(T: int) -> int:
    """Query rows per block of the causal attention: 64, or T/16 for long sequences (at most 16
    blocks, so the unrolled fwd/bwd stays a small graph)."""
    return max(ATTENTION_BLOCK_MIN, -(-T // ATTENTION_BLOCKS_MAX))


def _row_blocks(T: int, S: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first row, end row, end key) per query block; a non-causal call is one block of all keys."""
    if not causal:
        return [(0, T, S)]
    C = causal_block_rows(T)
    return [(a, min(T, a + C), min(T, a + C)) for a in range(0, T, C)]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sdpa(q_BKGTH, k_BKSH, v_BKSH, bias_BTS, scale, causal, cap=None):
    return _sdpa_fwd(q_BKGTH, k_BKSH, v_BKSH, bias_BTS, scale, causal, cap)[0]


def _block_scores(q_BKGCH, k_BKSH, bias_BCS, scale, cap=None, with_slope=False):
    """Scores `softcap(q.k * scale, cap) + bias`; with `with_slope` also d(scores)/d(q.k * scale)
    (1 - tanh^2 with soft-capping, else None)."""
    # head-major operands: the dot writes [b, k, g, rows, keys] directly, no transpose of the scores
    s = jnp.einsum("bkgch,bksh->bkgcs", q_BKGCH, k_BKSH, preferred_element_type=jnp.float32) * scale
    slope = None
    if cap is not None:
        t = jnp.tanh(s / cap)
        s = cap * t
        slope = 1.0 - t * t if with_slope else None
    s = s + bias_BCS[:, None, None, :, :]
    return (s, slope) if with_slope else s


def _sdpa_fwd(q_BKGTH, k_BKSH, v_BKSH, bias_BTS, scale, causal, cap=None):
    T, S = q_BKGTH.shape[3], k_BKSH.shape[2]
    outs, maxes, inv_sums = [], [], []
    for a, b, e in _row_blocks(T, S, causal):
        s = _block_scores(q_BKGTH[:, :, :, a:b], k_BKSH[:, :, :e], bias_BTS[:, a:b, :e], scale, cap)
        m_BKGC = jnp.max(s, axis=-1)
        p = jnp.exp(s - m_BKGC[..., None])
        inv_l_BKGC = 1.0 / jnp.sum(p, axis=-1)
        # normalise the [rows, H] output rather than the [rows, keys] weights: one pass fewer
        o = jnp.einsum(
            "bkgcs,bksh->bkgch", p.astype(v_BKSH.dtype), v_BKSH[:, :, :e], preferred_element_type=jnp.float32
        )
        outs.append((o * inv_l_BKGC[..., None]).astype(q_BKGTH.dtype))
        maxes.append(m_BKGC)
        inv_sums.append(inv_l_BKGC)
    cat = (lambda xs: xs[0]) if len(outs) == 1 else (lambda xs: jnp.concatenate(xs, axis=3))
    o_BKGTH, m_BKGT, inv_l_BKGT = cat(outs), cat(maxes), cat(inv_sums)
    # Residuals are the inputs, the output and two row statistics; the probabilities are
    # recomputed in the backward pass (one QK^T matmul) instead of being stored for every layer
    # (a scan over layers would stack them: L * B * N * T * S floats written, zero-filled, read back).
    return o_BKGTH, (q_BKGTH, k_BKSH, v_BKSH, bias_BTS, o_BKGTH, m_BKGT, inv_l_BKGT)


def _sdpa_bwd(scale, causal, cap, res, do_BKGTH):
    q, k, v, bias, o, m_BKGT, inv_l_BKGT = res
    T, S = q.shape[3], k.shape[2]
    do_BKGTH = do_BKGTH.astype(v.dtype)
    # softmax backward: ds = p * (dp - sum_s p dp), and sum_s p dp == sum_h o * do (one [T, H] pass)
    delta_BKGT = jnp.sum(o.astype(jnp.float32) * do_BKGTH.astype(jnp.float32), axis=-1)
    # a fully masked (left-pad) query row sees its scores through the constant bias only: no
    # gradient to q or k, as with a `where` mask (its uniform weights still reach v)
    row_scale_BKGT = jnp.where(m_BKGT > 0.5 * MASK_MIN, scale, 0.0)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for a, b, e in _row_blocks(T, S, causal):
        q_c, do_c, k_e, v_e = q[:, :, :, a:b], do_BKGTH[:, :, :, a:b], k[:, :, :e], v[:, :, :e]
        # p = exp(s - m) / l, as in the forward (exact for fully masked rows, where s - m == 0)
        s, slope = _block_scores(q_c, k_e, bias[:, a:b, :e], scale, cap, with_slope=True)
        p = jnp.exp(s - m_BKGT[:, :, :, a:b, None]) * inv_l_BKGT[:, :, :, a:b, None]
        dv = dv.at[:, :, :e].add(
            jnp.einsum("bkgcs,bkgch->bksh", p.astype(v.dtype), do_c, preferred_element_type=jnp.float32)
        )
        dp = jnp.einsum("bkgch,bksh->bkgcs", do_c, v_e, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_BKGT[:, :, :, a:b, None]) * row_scale_BKGT[:, :, :, a:b, None]
        if slope is not None:  # through the soft-cap's tanh
            ds = ds * slope
        ds = ds.astype(q.dtype)
        dqs.append(jnp.einsum("bkgcs,bksh->bkgch", ds, k_e, preferred_element_type=jnp.float32))
        dk = dk.at[:, :, :e].add(jnp.einsum("bkgcs,bkgch->bksh", ds, q_c, preferred_element_type=jnp.float32))
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(bias)


_sdpa.defvjp(_sdpa_fwd, _sdpa_bwd)


def _attention_xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, causal: bool = False, cap: float | None = None):
    """Exact softmax attention with grouped KV heads. `mask_BTS` is a boolean allowed-mask or an
    additive float bias from `mask_bias`; the custom VJP recomputes the probabilities. `causal`
    promises the mask allows no key after its query (T == S): blocks of query rows then skip the
    masked upper triangle. `cap`: soft-cap the scaled scores (`softcap`) before the mask."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    causal = causal and k_BSKH.shape[1] == T
    # head-major [B, K, G, T, H]: transposing the [T, H] operands is cheap, the [T, S] scores are not
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    o_BKGTH = _sdpa(q_BKGTH, k_BKSH, v_BKSH, _as_bias(mask_BTS), scale, causal, cap)
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _attention_chunked(
    q_BTNH, k_BSKH, v_BSKH, allowed_BTS, scale, chunk: int = ATTENTION_CHUNK, cap: float | None = None
):
    """Exact attention one block of query rows at a time, each block rematerialised in the backward
    pass: memory O(chunk * S) per head instead of O(T * S), for long sequences without a flash kernel."""
    B, T, N, H = q_BTNH.shape
    if chunk >= T or T % chunk:
        return _attention_xla(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, scale, cap=cap)
    n, S = T // chunk, allowed_BTS.shape[-1]
    q_nBCNH = q_BTNH.reshape(B, n, chunk, N, H).swapaxes(0, 1)
    allowed_nBCS = allowed_BTS.reshape(B, n, chunk, S).swapaxes(0, 1)

    @jax.checkpoint
    def block(_, xs):
        q_BCNH, allowed_BCS = xs
        return None, _attention_xla(q_BCNH, k_BSKH, v_BSKH, allowed_BCS, scale, cap=cap)

    _, o_nBCNH = jax.lax.scan(block, None, (q_nBCNH, allowed_nBCS))
    return o_nBCNH.swapaxes(0, 1).reshape(B, T, N, H)


def splash_block(T: int) -> int:
    """The splash kernel's query/key block for rows of T: the largest of 512, 256, 128 dividing T
    (the kernel tiles by 128 lanes, in interpret mode too)."""
    for b in (512, 256, 128):
        if T % b == 0:
            return b
    raise ConfigError(
        f"model.attention_impl=splash needs rows of a multiple of 128 tokens, got {T} "
        "(set data.buckets to multiples of 128)"
    )


@functools.lru_cache(maxsize=32)
def _splash_kernel(T: int, G: int, block: int, interpret: bool):
    """A causal splash kernel for one KV head and its G query heads (MQA form), segment-masked."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(G)])
    with jax.ensure_compile_time_eval():  # the block tables are constants, cached across traces
        return sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)


def _attention_splash(q_BTNH, k_BSKH, v_BSKH, segment_BT, scale):
    """Causal attention through the Pallas splash kernel (TPU; interpret mode elsewhere, for tests).

    `segment_BT` names each token's sequence (0 = padding): a query sees earlier keys of its own
    segment only, which is the padding / packing mask (a padding query sees padding keys, so no
    row is empty; its output is never used). One kernel call per (example, KV head) with that
    head's G query heads, vmapped; under a mesh it runs per shard in `shard_map`, batch over the
    batch axes and heads over the head axis, as the activations are sharded."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    kernel = _splash_kernel(T, N // K, splash_block(T), jax.default_backend() != "tpu")

    def local(q_BTNH, k_BSKH, v_BSKH, seg_BT):
        b, _, n, _ = q_BTNH.shape
        kh = k_BSKH.shape[2]
        q_BKGTH = (q_BTNH * scale).reshape(b, T, kh, n // kh, H).transpose(0, 2, 3, 1, 4)
        k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
        seg = sk.SegmentIds(q=seg_BT, kv=seg_BT)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over the KV heads of one example
        o_BKGTH = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(q_BKGTH, k_BKSH, v_BKSH, seg)
        return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, T, n, H)

    seg_BT = segment_BT.astype(jnp.int32)
    placed = active_spec(("activation_batch", None, "activation_heads", None), q_BTNH.shape)
    if placed is None or placed[0].size == 1:
        return local(q_BTNH, k_BSKH, v_BSKH, seg_BT)
    mesh, q_spec = placed
    _, kv_spec = active_spec(("activation_batch", None, "activation_kv_heads", None), k_BSKH.shape)
    if q_spec[2] != kv_spec[2]:  # query and KV heads must split alike to stay grouped: keep both whole
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        kv_spec = PartitionSpec(kv_spec[0], None, None, None)
    seg_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
    )(q_BTNH, k_BSKH, v_BSKH, seg_BT)


def attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    allowed_BTS,
    impl: str,
    causal: bool = False,
    scale: float | None = None,
    cap: float | None = None,
):
    """`causal`: the mask is a subset of the causal one (self-attention without a KV cache).
    With impl "splash", `allowed_BTS` is the segment ids `[B, T]` instead (see `_attention_splash`).
    `scale` defaults to 1/sqrt(head_dim); `cap` soft-caps the scores, which only the "xla" and
    "chunked" kernels do (`Decoder._attention_impl` picks xla for such a config)."""
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else scale
    if cap is not None and impl not in ("xla", "chunked"):
        raise ConfigError(f"attention_impl {impl!r} cannot soft-cap attention logits; use xla")
    if impl == "splash":
        return _attention_splash(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, scale)
    if impl == "xla":
        return _attention_xla(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, scale, causal, cap)
    if impl == "chunked":
        return _attention_chunked(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, scale, cap=cap)
    if allowed_BTS.dtype != jnp.bool_:
        allowed_BTS = allowed_BTS == 0.0
    return jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        mask=allowed_BTS[:, None, :, :],
        scale=scale,
        implementation="cudnn" if impl == "cudnn" else None,
    )


def _linear(x, p, spec: str, lora_scale: float = 0.0):
    """`einsum(spec, x, kernel) (+ bias)` as one 2-D matmul over flattened tokens.

    The weight gradient then contracts a single token axis: with the (b, t) pair XLA's CPU layout
    assignment writes the [F, B*T] activation gradient transposed (a strided, cache-hostile copy
    per projection) before the dot. The kernel's input axes are the ones it shares with `x`."""
    return _linears(x, [p], [spec], lora_scale)[0]


def _linears(x, ps: list, specs: list[str], lora_scale: float = 0.0) -> list:
    """`_linear` for several projections of the same `x` (q/k/v, gate/up): one flattened input,
    one transposed copy of it for all their weight gradients (`models.matmul.dense_many`).
    A projection with `lora_a`/`lora_b` adds `lora_scale * (x @ A) @ B` (`models.lora`; 0 = off)."""
    kernels, shapes = [], []
    for p, spec in zip(ps, specs):
        ins = spec.split("->")[0]
        xs, ks = ins.split(",")
        n_in = sum(1 for c in ks if c in xs)
        kernel = p["kernel"].astype(x.dtype)
        k_in, k_out = kernel.shape[:n_in], kernel.shape[n_in:]
        kernels.append(kernel.reshape(math.prod(k_in), math.prod(k_out)))
        shapes.append((n_in, k_out))
    n_in = shapes[0][0]
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape(math.prod(lead), -1)
    # LoRA: x @ A for every adapted projection rides in the same dense_many (one shared x^T on CPU)
    adapted = [i for i, p in enumerate(ps) if "lora_a" in p] if lora_scale else []
    downs = [ps[i]["lora_a"].astype(x.dtype).reshape(x2.shape[1], -1) for i in adapted]
    ys = dense_many(x2, (*kernels, *downs))
    ys, xas = list(ys[: len(kernels)]), ys[len(kernels) :]
    for i, xa in zip(adapted, xas):  # + s * (x @ A) @ B, the scale on the small [N, r] side
        b = ps[i]["lora_b"].astype(x.dtype)
        ys[i] = ys[i] + dense(xa * jnp.asarray(lora_scale, x.dtype), b.reshape(b.shape[0], -1))
    out = []
    for y, p, (_, k_out) in zip(ys, ps, shapes):
        y = y.reshape(*lead, *k_out)
        if "bias" in p:
            y = y + p["bias"].astype(x.dtype)
        out.append(y)
    return out


def decoder_layer(
    p: dict,
    x_BTD: jax.Array,
    cos_BTH,
    sin_BTH,
    allowed_BTS,
    cache_kv,
    cache_index,
    layout: TokenLayout | None = None,
    *,
    cfg: DecoderConfig,
    lora_scale: float = 0.0,
):
    """One pre-norm block on one layer's params `p`. `allowed_BTS` is the boolean attention mask or
    its additive `mask_bias`. With `cache_kv=(k_BSKH, v_BSKH)` the new keys and
    values are written at `cache_index` and attention reads the whole cache.

    With a `layout` (`models.compaction`), `x_BTD`, `cos_BTH` and `sin_BTH` hold only the kept
    tokens (`(B, T)` read `(G, N)`): everything but attention runs on them, and q/k/v are laid
    out as the `[B, T]` rows of `allowed_BTS` for attention only."""
    norm = partial(rms_norm, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
    with jax.named_scope("attention"):
        h = norm(x_BTD, p["input_norm"]["scale"])
        a = p["attn"]
        q_BTNH, k_BTKH, v_BTKH = _linears(
            h,
            [a["q_proj"], a["k_proj"], a["v_proj"]],
            ["btd,dnh->btnh", "btd,dkh->btkh", "btd,dkh->btkh"],
            lora_scale,
        )
        if cfg.qk_norm:  # per head, over head_dim (Qwen3)
            q_BTNH = norm(q_BTNH, a["q_norm"]["scale"])
            k_BTKH = norm(k_BTKH, a["k_norm"]["scale"])
        q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
        if layout is not None:
            B, T = allowed_BTS.shape[:2]
            q_BTNH, k_BTKH, v_BTKH = (layout.rows(t, B, T) for t in (q_BTNH, k_BTKH, v_BTKH))
        q_BTNH = constrain(q_BTNH, ("activation_batch", "activation_length", "activation_heads", None))
        if cache_kv is None:
            k_all, v_all, new_kv = k_BTKH, v_BTKH, None
        else:
            ck, cv = cache_kv
            k_all = jax.lax.dynamic_update_slice(ck, k_BTKH.astype(ck.dtype), (0, cache_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cv, v_BTKH.astype(cv.dtype), (0, cache_index, 0, 0))
            new_kv = (k_all, v_all)
            k_all, v_all = k_all.astype(x_BTD.dtype), v_all.astype(x_BTD.dtype)
        o_BTNH = attention(
            q_BTNH,
            k_all,
            v_all,
            allowed_BTS,
            cfg.attention_impl,
            causal=cache_kv is None,
            scale=cfg.attention_scale,
            cap=cfg.attn_logit_softcapping,
        )
        if layout is not None:
            o_BTNH = layout.tokens(o_BTNH)
        o_BTD = _linear(o_BTNH, a["o_proj"], "btnh,nhd->btd", lora_scale)
        if cfg.sandwich_norms:
            o_BTD = norm(o_BTD, p["attn_out_norm"]["scale"])
        x_BTD = x_BTD + o_BTD
        x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    with jax.named_scope("mlp"):
        h = norm(x_BTD, p["post_attention_norm"]["scale"])
        m = p["mlp"]
        g_BTF, u_BTF = _linears(h, [m["gate_proj"], m["up_proj"]], ["btd,df->btf", "btd,df->btf"], lora_scale)
        gate_BTF = jax.nn.silu(g_BTF) if cfg.hidden_act == "silu" else jax.nn.gelu(g_BTF, approximate=True)
        act_BTF = constrain(gate_BTF * u_BTF, ("activation_batch", "activation_length", "activation_mlp"))
        m_BTD = _linear(act_BTF, m["down_proj"], "btf,fd->btd", lora_scale)
        if cfg.sandwich_norms:
            m_BTD = norm(m_BTD, p["mlp_out_norm"]["scale"])
        x_BTD = x_BTD + m_BTD
        x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BTD, new_kv


def remat_policy(name: str):
    return {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


# ---- NNX modules (parameter storage with logical axis names) -------------------------------------


def _init_value(key: jax.Array | None, shape, dtype, init: str) -> jax.Array:
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    if isinstance(key, jax.core.Tracer):  # under jit / eval_shape: part of one fused program
        return (0.02 * jax.random.normal(key, shape, dtype=jnp.float32)).astype(dtype)
    # Eagerly, jax.random would compile one XLA program per weight shape (seconds each on a busy
    # CPU); a NumPy generator seeded from the nnx key is instant and still deterministic.
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist()
    value = 0.02 * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(value.astype(jnp.dtype(dtype)))


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    value = _init_value(rngs.params() if init == "normal" else None, shape, dtype, init)
    return nnx.Param(value, **{LOGICAL_AXES_KEY: tuple(axes)})


class Proj(nnx.Module):
    """A weight `kernel` (plus optional `bias`); the einsum lives in the pure layer function."""

    def __init__(self, shape, axes, bias_shape=None, bias_axes=None, *, dtype, rngs: nnx.Rngs):
        self.kernel = _param(rngs, shape, axes, dtype)
        self.bias = None if bias_shape is None else _param(rngs, bias_shape, bias_axes, dtype, "zeros")


class RMSNorm(nnx.Module):
    """`plus_one`: the weight is stored as an offset from 1 (Gemma), so its identity init is 0."""

    def __init__(self, shape, axes, *, dtype, plus_one: bool = False):
        self.scale = _param(None, shape, axes, dtype, "zeros" if plus_one else "ones")


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, L: int, *, rngs: nnx.Rngs):
        D, N, K, H, dt = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.params_dtype,
        )
        qb = cfg.qkv_bias
        self.q_proj = Proj(
            (L, D, N, H),
            ("layers", "embed", "heads", "head_dim"),
            (L, N, H) if qb else None,
            ("layers", "heads", "head_dim"),
            dtype=dt,
            rngs=rngs,
        )
        self.k_proj = Proj(
            (L, D, K, H),
            ("layers", "embed", "kv_heads", "head_dim"),
            (L, K, H) if qb else None,
            ("layers", "kv_heads", "head_dim"),
            dtype=dt,
            rngs=rngs,
        )
        self.v_proj = Proj(
            (L, D, K, H),
            ("layers", "embed", "kv_heads", "head_dim"),
            (L, K, H) if qb else None,
            ("layers", "kv_heads", "head_dim"),
            dtype=dt,
            rngs=rngs,
        )
        self.o_proj = Proj(
            (L, N, H, D),
            ("layers", "heads", "head_dim", "embed"),
            (L, D) if cfg.o_bias else None,
            ("layers", "embed"),
            dtype=dt,
            rngs=rngs,
        )
        qk = partial(RMSNorm, (L, H), ("layers", "norm"), dtype=dt, plus_one=cfg.norm_plus_one)
        self.q_norm = qk() if cfg.qk_norm else None
        self.k_norm = qk() if cfg.qk_norm else None


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, L: int, *, rngs: nnx.Rngs):
        D, F, dt = cfg.hidden_size, cfg.intermediate_size, cfg.params_dtype
        self.gate_proj = Proj((L, D, F), ("layers", "embed", "mlp"), dtype=dt, rngs=rngs)
        self.up_proj = Proj((L, D, F), ("layers", "embed", "mlp"), dtype=dt, rngs=rngs)
        self.down_proj = Proj((L, F, D), ("layers", "mlp", "embed"), dtype=dt, rngs=rngs)


class DecoderLayers(nnx.Module):
    """All decoder blocks, each weight stacked on a leading `layers` axis."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        L, D = cfg.num_hidden_layers, cfg.hidden_size
        self.attn = Attention(cfg, L, rngs=rngs)
        self.mlp = MLP(cfg, L, rngs=rngs)
        norm = partial(
            RMSNorm, (L, D), ("layers", "norm"), dtype=cfg.params_dtype, plus_one=cfg.norm_plus_one
        )
        self.input_norm = norm()
        self.post_attention_norm = norm()  # before the MLP (Gemma 2's pre_feedforward_layernorm)
        self.attn_out_norm = norm() if cfg.sandwich_norms else None  # Gemma 2's post_attention_layernorm
        self.mlp_out_norm = norm() if cfg.sandwich_norms else None


class Embedding(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.params_dtype)


class Decoder(nnx.Module):
    """Causal LM: token embedding, stacked pre-norm blocks, final RMSNorm, (tied) output head."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # the adapters' multiplier on alpha / rank (models.lora): 0.0 = the base model (adapters off)
        self.lora_scale = 1.0
        self.embed_tokens = Embedding(cfg, rngs=rngs)
        self.layers = DecoderLayers(cfg, rngs=rngs)
        self.norm = RMSNorm((cfg.hidden_size,), ("norm",), dtype=cfg.params_dtype, plus_one=cfg.norm_plus_one)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Proj(
                (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype=cfg.params_dtype, rngs=rngs
            )
        )
        if cfg.lora_rank:  # one key drawn after every base weight: the base is the same as without LoRA
            lora_lib.add_adapters(self.layers, cfg, rngs.params())

    # -- public API --
    def __call__(
        self,
        input_ids_BT: jax.Array,
        attention_mask_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: Cache | None = None,
    ):
        """Logits [B, T, V] in the compute dtype; `(logits, new_cache)` when a cache is given."""
        h_BTD, new_cache = self._forward(input_ids_BT, attention_mask_BT, positions_BT, segment_ids_BT, cache)
        with jax.named_scope("lm_head"):
            logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, self.output_embedding().astype(h_BTD.dtype))
            logits_BTV = constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))
            logits_BTV = self.cap_logits(logits_BTV)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        """The config's final logit soft-capping (Gemma 2), identity otherwise: apply it to logits
        computed from `hidden_states() @ output_embedding()` to get `__call__`'s logits."""
        return softcap(logits, self.cfg.final_logit_softcapping)

    def hidden_states(
        self,
        input_ids_BT: jax.Array,
        attention_mask_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        branch_ids_BT: jax.Array | None = None,
        tokens: TokenLayout | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] (score only the tokens you need against
        `output_embedding()` instead of materialising [B, T, V]; then `cap_logits` for a config
        with final logit soft-capping).

        branch_ids_BT: a shared prefix with branches (0 = the prefix, k > 0 = branch k): a token of
        branch k sees the prefix and its own branch only, so one row holds a prompt and both of a
        pair's responses (`batching.share_prompt`) with the attention each has in a row of its own.
        tokens: run the token-wise layers on these kept tokens only (`models.compaction`; the
        batch's real tokens, from `batching.compact_index`); positions not kept come back as zeros.
        """
        return self._forward(
            input_ids_BT,
            attention_mask_BT,
            positions_BT,
            segment_ids_BT,
            None,
            branch_ids_BT=branch_ids_BT,
            layout=tokens,
        )[0]

    def output_embedding(self) -> jax.Array:
        """The output projection [D, V] (the transposed input embedding when tied)."""
        if self.lm_head is None:
            w_VD = self.embed_tokens.embedding.get_value()
            # tied: the output layer is the frozen input embedding when blocks are frozen
            return (jax.lax.stop_gradient(w_VD) if self.cfg.frozen_layers else w_VD).T
        return self.lm_head.kernel.get_value()

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """An empty KV cache: k/v [L, B, S, K, H], key-validity mask [B, S], write index."""
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        dtype = cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, max_len), jnp.bool_),
            "index": jnp.zeros((), jnp.int32),
        }

    # -- implementation --
    def _attention_impl(self, T: int, cached: bool, branches: bool) -> str:
        """The attention kernel this call runs: `auto` is splash on TPU where it applies (rows of a
        multiple of 128, no branches), else `jax.nn.dot_product_attention`'s choice. Splash has no
        KV-cache decode step and tiles rows by 128: decoding and odd lengths (a persona row, a
        generation prompt) run the XLA kernel; a branch mask it cannot express is an error.
        Attention logit soft-capping (Gemma 2) is done by the XLA/chunked kernels only (neither splash
        nor `jax.nn.dot_product_attention` take a cap): such a config runs xla in place of the others.
        A sliding window shorter than the keys is in the mask; splash has no such mask (auto: xla)."""
        impl = self.cfg.attention_impl
        if self.cfg.attn_logit_softcapping is not None and impl not in ("xla", "chunked"):
            return "xla"
        if impl == "auto" and self.cfg.window_cuts(T) and not cached:
            return "xla"
        if impl == "splash" and self.cfg.window_cuts(T) and not cached and T % 128 == 0:
            raise ConfigError(
                f"model.attention_impl=splash cannot express sliding_window={self.cfg.sliding_window} "
                f"on rows of {T} tokens; use attention_impl=xla (or auto)"
            )
        if impl == "auto" and jax.default_backend() == "tpu" and not cached and not branches and T % 128 == 0:
            return "splash"
        if impl == "splash" and (cached or T % 128):
            return "xla"
        if impl == "splash" and branches:
            raise ConfigError(
                "model.attention_impl=splash cannot express data.share_prompt's branch mask; "
                "use attention_impl=xla (or auto) with share_prompt"
            )
        return impl

    def _forward(
        self,
        input_ids_BT,
        attention_mask_BT,
        positions_BT,
        segment_ids_BT,
        cache,
        branch_ids_BT=None,
        layout: TokenLayout | None = None,
    ):
        cfg = self.cfg
        dt = cfg.compute_dtype
        B, T = input_ids_BT.shape
        mask_BT = (
            jnp.ones((B, T), jnp.bool_)
            if attention_mask_BT is None
            else jnp.asarray(attention_mask_BT).astype(jnp.bool_)
        )
        if cache is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids and a KV cache cannot be combined")
        if cache is not None and layout is not None:
            raise ValueError("token compaction and a KV cache cannot be combined")

        if cache is None:
            if positions_BT is None:  # left padding: count only real tokens
                positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0)
            t = jnp.arange(T)
            allowed_BTS = (t[None, :] <= t[:, None])[None] & mask_BT[:, None, :]
            if segment_ids_BT is not None:
                allowed_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
            if branch_ids_BT is not None:  # keys in the shared prefix, or in the query's own branch
                key_B1S = branch_ids_BT[:, None, :]
                allowed_BTS &= (key_B1S == 0) | (key_B1S == branch_ids_BT[:, :, None])
            index = None
            # the window counts positions back (a branch token's distance to the prefix skips the
            # other branch); padding keys are masked already
            pos = jnp.asarray(positions_BT)
            back_BTS = pos[:, :, None] - pos[:, None, :]
        else:
            index = cache["index"]
            S = cache["mask"].shape[1]
            kv_mask_BS = jax.lax.dynamic_update_slice(cache["mask"], mask_BT, (0, index))
            if positions_BT is None:  # continue counting real tokens already in the cache
                seen_B = jnp.sum(cache["mask"], axis=-1)
                positions_BT = seen_B[:, None] + jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0)
            slot_T = index + jnp.arange(T)
            allowed_BTS = (jnp.arange(S)[None, :] <= slot_T[:, None])[None] & kv_mask_BS[:, None, :]
            back_BTS = (slot_T[:, None] - jnp.arange(S)[None, :])[
                None
            ]  # real tokens sit in consecutive slots
        # the sliding layers' mask, where the window cuts into this call's keys (else all layers share one)
        window_BTS = None
        if cfg.window_cuts(allowed_BTS.shape[-1]):
            window_BTS = allowed_BTS & (back_BTS < cfg.sliding_window)

        # with a layout, the residual stream holds the kept tokens only: (B, T) below read (G, N)
        ids_BT = input_ids_BT if layout is None else layout.tokens(input_ids_BT)
        with jax.named_scope("embed"):
            x_BTD = jnp.take(self.embed_tokens.embedding.get_value(), ids_BT, axis=0).astype(dt)
            if cfg.scale_embeddings:  # sqrt(D) rounded to the param dtype, as transformers' Gemma does
                x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.params_dtype).astype(dt)
            x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
        pos_BT = positions_BT if layout is None else layout.tokens(jnp.asarray(positions_BT))
        cos_BTH, sin_BTH = rope_cos_sin(pos_BT, rope_inv_freq(cfg), dt)

        impl = self._attention_impl(T, cache is not None, branch_ids_BT is not None)
        if impl == "splash":  # the kernel takes the causal mask as given and padding/packing as segments
            seg_BT = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else jnp.asarray(segment_ids_BT)
            mask_BTS = jnp.where(mask_BT, seg_BT.astype(jnp.int32), 0)
            window_BTS = None  # splash runs only where the window cuts nothing
        elif impl in ("xla", "chunked"):  # the additive bias, built once outside the layer scan
            mask_BTS = mask_bias(allowed_BTS)
            window_BTS = None if window_BTS is None else mask_bias(window_BTS)
        else:
            mask_BTS = allowed_BTS
        # per-layer masks: every layer slides (Mistral) -> one mask; some do (Gemma 2) -> a flag per layer
        sliding_L = np.asarray(cfg.layer_is_sliding)
        if window_BTS is not None and sliding_L.all():
            mask_BTS, window_BTS = window_BTS, None

        params = nnx.to_pure_dict(nnx.state(self.layers))
        lora_scale = cfg.lora_multiplier * float(self.lora_scale)
        if not lora_scale:  # adapters off (or none): the base model, no adapter compute
            params = lora_lib.strip(params)
        layer = partial(
            decoder_layer,
            cfg=cfg if impl == cfg.attention_impl else cfg.replace(attention_impl=impl),
            lora_scale=lora_scale,
        )
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)

        def body(x, xs):
            p, kv, sliding = xs
            if window_BTS is None:
                mask = mask_BTS
            elif isinstance(sliding, (bool, np.bool_)):  # unrolled: known per layer
                mask = window_BTS if sliding else mask_BTS
            else:
                mask = jnp.where(sliding, window_BTS, mask_BTS)
            x, new_kv = layer(p, x, cos_BTH, sin_BTH, mask, kv, index, layout)
            return x, new_kv

        kv_stack = None if cache is None else (cache["k"], cache["v"])

        def run_layers(x, p, kv, sliding):
            if cfg.scan_layers:
                return jax.lax.scan(body, x, (p, kv, None if window_BTS is None else jnp.asarray(sliding)))
            outs = []
            for i in range(jax.tree.leaves(p)[0].shape[0]):
                x, kv_i = body(x, (*jax.tree.map(lambda a, i=i: a[i], (p, kv)), bool(sliding[i])))
                outs.append(kv_i)
            return x, None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        with jax.named_scope("layers"):
            F = cfg.frozen_layers if cache is None else 0
            if F:  # no gradient below block F: autodiff never differentiates the frozen blocks
                low = jax.tree.map(lambda a: jax.lax.stop_gradient(a[:F]), params)
                x_BTD = jax.lax.stop_gradient(
                    run_layers(jax.lax.stop_gradient(x_BTD), low, None, sliding_L[:F])[0]
                )
                params = jax.tree.map(lambda a: a[F:], params)
            x_BTD, new_kv = run_layers(x_BTD, params, kv_stack, sliding_L[F:])
        with jax.named_scope("final_norm"):
            h_BTD = rms_norm(x_BTD, self.norm.scale.get_value(), cfg.rms_norm_eps, cfg.norm_plus_one)
            if layout is not None:
                h_BTD = layout.rows(h_BTD, B, T)
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "mask": kv_mask_BS, "index": index + T}
        return h_BTD, new_cache


def param_count(model: Decoder) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
