"""The decoder's weights: the NNX modules that store them (`Proj`, `RMSNorm`, `Attention`, `MLP`,
`DecoderLayers`, `Embedding`; `models.decoder.Decoder` holds them), each `nnx.Param` with its logical axis
names (`alignx_jax.sharding.annotated`) and its initial value."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax.models.config import DecoderConfig
from alignx_jax.sharding import annotated


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
    return annotated(nnx.Param, value, axes)


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
        # q/k/v: [L, D, heads, H] (+ bias [L, heads, H]); drawn in this order (q, k, v, o)
        for name, heads, axis in (
            ("q_proj", N, "heads"),
            ("k_proj", K, "kv_heads"),
            ("v_proj", K, "kv_heads"),
        ):
            proj = Proj(
                (L, D, heads, H),
                ("layers", "embed", axis, "head_dim"),
                (L, heads, H) if cfg.qkv_bias else None,
                ("layers", axis, "head_dim"),
                dtype=dt,
                rngs=rngs,
            )
            setattr(self, name, proj)
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
