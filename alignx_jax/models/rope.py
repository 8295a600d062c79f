"""Rotary position embeddings as the Hugging Face families compute them: the inverse frequencies with the
config's scaling (default, linear, Llama 3's `llama3`, YaRN), YaRN's attention factor, and the rotation in
HF's rotate-half layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from alignx_jax.models.config import DecoderConfig, RopeScaling


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2] with the config's scaling (default, linear, llama3, yarn)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    rope = cfg.rope
    kind, scaling, old_ctx = rope.rope_type, rope.settings, rope.original_max_position_embeddings
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, blended, scaled)
    elif kind == "yarn":
        # YaRN (Qwen2.5/Qwen3 long context): dims turning fewer than beta_slow times over the old
        # context are interpolated (/ factor), more than beta_fast times kept, a linear ramp between.
        factor = _yarn_factor(cfg, rope)
        fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
        turns_dim = lambda turns: (
            dim * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        )
        low, high = turns_dim(fast), turns_dim(slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        inv = (inv / factor) * ramp + inv * (1 - ramp)
    return inv.astype(np.float32)


def _yarn_factor(cfg: DecoderConfig, rope: RopeScaling) -> float:
    """YaRN's `factor`; null: the ratio of max_position_embeddings to the original context (transformers)."""
    if rope.settings.get("factor") is not None:
        return float(rope.settings["factor"])
    return cfg.max_position_embeddings / rope.original_max_position_embeddings


def rope_attention_factor(cfg: DecoderConfig) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature (`attention_factor`, else
    0.1 ln(factor) + 1, or with mscale/mscale_all_dim their ratio), 1.0 for the other RoPE types."""
    rope = cfg.rope
    if rope.rope_type != "yarn":
        return 1.0
    scaling = rope.settings
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(cfg, rope)
    mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(float(m)) / mscale(float(m_all)) if m and m_all else mscale(1.0)


def rope_cos_sin(
    positions_BT: jax.Array, inv_freq: np.ndarray, dtype, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, H] of the positions, times `scale` (`rope_attention_factor`) in float32."""
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)  # HF's rotate-half layout
    if scale == 1.0:
        return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)
    return (jnp.cos(emb_BTH) * scale).astype(dtype), (jnp.sin(emb_BTH) * scale).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
