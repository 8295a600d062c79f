"""Llama / Mistral / Qwen2 / Qwen3 / Gemma / Gemma 2 decoder-only transformer in Flax NNX, with stacked
(scannable) layers.

The config (`DecoderConfig`, HF `config.json` in and out) lives in `models.config` and the
attention kernels and mask in `models.attention`; both are re-exported here. This module holds the
layers: pure functions over arrays (RMSNorm, the projections, `decoder_layer`; RoPE is `models.rope`) and the NNX
modules that store the weights (`Decoder`; its parts are `models.weights`). What a family needs is a config field the layer code
branches on: q/k/v(/o) biases, per-head q/k RMSNorm (`qk_norm`, Qwen3), Gemma's `(1 + w)` RMSNorm,
scaled embeddings, post-attention/-MLP norms (`sandwich_norms`), GELU-tanh MLP,
`query_pre_attn_scalar`, attention and final logit soft-capping, and a sliding attention window on
all or some layers (`sliding_window`, `sliding_layers`; applied in the mask).
`Decoder` stores every per-layer weight with a leading `layers` axis; the forward pass applies the
layers with `jax.lax.scan` (`scan_layers=True`, one compiled layer) or an unrolled loop, each
optionally rematerialised. Every `nnx.Param` carries logical axis names (flax's `out_sharding`
metadata, see `alignx_jax.sharding.annotated`).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax.errors import ConfigError
from alignx_jax.models import lora as lora_lib
from alignx_jax.models.attention import (  # noqa: F401  (re-exported: the decoder's public surface)
    ATTENTION_BLOCK_MIN,
    ATTENTION_BLOCKS_MAX,
    ATTENTION_CHUNK,
    MASK_MIN,
    AttentionMask,
    attention,
    cached_attention,
    cached_attention_allowed,
    causal_block_rows,
    kernel_mask,
    mask_bias,
    self_attention_allowed,
    splash_block,
)
from alignx_jax.models.compaction import TokenLayout
from alignx_jax.models.config import (  # noqa: F401  (re-exported: the decoder's public surface)
    ATTENTION_IMPLS,
    HIDDEN_ACTS,
    REMAT_POLICIES,
    ROPE_TYPES,
    SUPPORTED_MODEL_TYPES,
    DecoderConfig,
)
from alignx_jax.models.matmul import dense, dense_many
from alignx_jax.models.rope import (
    apply_rope,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
)
from alignx_jax.models.weights import DecoderLayers, Embedding, Proj, RMSNorm
from alignx_jax.sharding import constrain, target_platform

# k/v: [L, B, K, S, H] stacked, or (`init_cache(per_layer=True)`) tuples of L arrays [B, K, S, H]
Cache = dict[str, jax.Array | tuple[jax.Array, ...]]
# the blocks' params: one dict of [L, ...] arrays, or (`Decoder.layer_params(per_layer=True)`) L dicts
LayerParams = dict | tuple[dict, ...]


# ---- building blocks (pure functions over arrays) ----------------------------------------------


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
        kernel = p["kernel"]  # cast to x's dtype inside dense_many (its residuals keep the parameter)
        k_in, k_out = kernel.shape[:n_in], kernel.shape[n_in:]
        kernels.append(kernel.reshape(math.prod(k_in), math.prod(k_out)))
        shapes.append((n_in, k_out))
    n_in = shapes[0][0]
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape(math.prod(lead), -1)
    # LoRA: x @ A for every adapted projection rides in the same dense_many (one shared x^T on CPU)
    adapted = [i for i, p in enumerate(ps) if "lora_a" in p] if lora_scale else []
    downs = [ps[i]["lora_a"].reshape(x2.shape[1], -1) for i in adapted]
    ys = dense_many(x2, (*kernels, *downs))
    ys, xas = list(ys[: len(kernels)]), ys[len(kernels) :]
    for i, xa in zip(adapted, xas):  # + s * (x @ A) @ B, the scale on the small [N, r] side
        b = ps[i]["lora_b"]
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
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: AttentionMask,
    cache_kv,
    cache_index,
    layout: TokenLayout | None = None,
    *,
    cfg: DecoderConfig,
    lora_scale: float = 0.0,
):
    """One pre-norm block on one layer's params `p`. `mask` is the attention mask in the form
    `cfg.attention_impl` takes (`models.attention.kernel_mask`). With `cache_kv=(k_BKSH, v_BKSH)`
    (head-major) the new keys and values are written at `cache_index` and attention
    reads the whole cache; `cache_index=None` is a prefill into an empty cache (written from slot 0,
    attention causal over the new tokens alone, as without a cache).

    The residual stream `x` and RoPE's `cos`/`sin` are `[B, T, D]` / `[B, T, H]`, or with a
    `layout` (`models.compaction`) the kept tokens only, `[G, N, D]` / `[G, N, H]`: everything but
    attention runs on them, and q/k/v are laid out as the `[B, T]` rows of `mask` for attention only."""
    norm = partial(rms_norm, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
    with jax.named_scope("attention"):
        h = norm(x, p["input_norm"]["scale"])
        a = p["attn"]
        # [B, T, heads, H] (or [G, N, heads, H] under a layout until laid out as rows below)
        q, k, v = _linears(
            h,
            [a["q_proj"], a["k_proj"], a["v_proj"]],
            ["btd,dnh->btnh", "btd,dkh->btkh", "btd,dkh->btkh"],
            lora_scale,
        )
        if cfg.qk_norm:  # per head, over head_dim (Qwen3)
            q = norm(q, a["q_norm"]["scale"])
            k = norm(k, a["k_norm"]["scale"])
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if layout is None:
            q_BTNH, k_BTKH, v_BTKH = q, k, v
        else:
            B, T = mask.rows
            q_BTNH, k_BTKH, v_BTKH = (layout.rows(t, B, T) for t in (q, k, v))
        q_BTNH = constrain(q_BTNH, ("activation_batch", "activation_length", "activation_heads", None))
        new_kv = None
        if cache_kv is not None:  # head-major [B, K, S, H]: the new keys/values go in at their slots
            at = 0 if cache_index is None else cache_index
            new_kv = tuple(
                jax.lax.dynamic_update_slice(c, t.transpose(0, 2, 1, 3).astype(c.dtype), (0, 0, at, 0))
                for c, t in zip(cache_kv, (k_BTKH, v_BTKH))
            )
        if cache_index is None:  # no cache, or an empty one: the tokens attend (causally) to themselves
            o_BTNH = attention(
                q_BTNH,
                k_BTKH,
                v_BTKH,
                mask,
                cfg.attention_impl,
                causal=True,
                scale=cfg.attention_scale,
                cap=cfg.attn_logit_softcapping,
            )
        else:
            o_BTNH = cached_attention(
                q_BTNH,
                new_kv[0].astype(x.dtype),
                new_kv[1].astype(x.dtype),
                mask,
                cfg.attention_impl,
                scale=cfg.attention_scale,
                cap=cfg.attn_logit_softcapping,
            )
        o = o_BTNH if layout is None else layout.tokens(o_BTNH)  # back to x's token axes
        o = _linear(o, a["o_proj"], "btnh,nhd->btd", lora_scale)
        if cfg.sandwich_norms:
            o = norm(o, p["attn_out_norm"]["scale"])
        x = x + o
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    with jax.named_scope("mlp"):
        h = norm(x, p["post_attention_norm"]["scale"])
        m = p["mlp"]
        g, u = _linears(h, [m["gate_proj"], m["up_proj"]], ["btd,df->btf", "btd,df->btf"], lora_scale)
        gate = jax.nn.silu(g) if cfg.hidden_act == "silu" else jax.nn.gelu(g, approximate=True)
        act = constrain(gate * u, ("activation_batch", "activation_length", "activation_mlp"))
        m_out = _linear(act, m["down_proj"], "btf,fd->btd", lora_scale)
        if cfg.sandwich_norms:
            m_out = norm(m_out, p["mlp_out_norm"]["scale"])
        x = x + m_out
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, new_kv


def remat_policy(name: str):
    return {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


# ---- NNX modules (parameter storage with logical axis names) -------------------------------------


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
        layer_params: LayerParams | None = None,
    ):
        """Logits [B, T, V] in the compute dtype; `(logits, new_cache)` when a cache is given.
        `layer_params`: `self.layer_params(per_layer=True)` taken once outside a decode loop, with a
        per-layer cache (the layers then run unrolled, each reading its weights where they lie)."""
        h_BTD, new_cache = self._forward(
            input_ids_BT, attention_mask_BT, positions_BT, segment_ids_BT, cache, layer_params=layer_params
        )
        with jax.named_scope("lm_head"):
            logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, self.output_embedding().astype(h_BTD.dtype))
            logits_BTV = constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))
            logits_BTV = self.cap_logits(logits_BTV)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        """The config's final logit soft-capping (Gemma 2), identity otherwise: apply it to logits
        computed from `hidden_states() @ output_embedding()` to get `__call__`'s logits."""
        return softcap(logits, self.cfg.final_logit_softcapping)

    def prefill(
        self,
        input_ids_BT: jax.Array,
        attention_mask_BT: jax.Array,
        cache: Cache,
        layer_params: LayerParams | None = None,
    ) -> tuple[jax.Array, Cache]:
        """A prompt's final-normed hidden states [B, T, D] and the empty `cache` (`init_cache`) filled
        with it from slot 0 (generation scores only the last position against `output_embedding()`,
        not the prompt's [B, T, V] logits). Attention is the causal one over the prompt alone, not
        over the whole (still empty) cache."""
        return self._forward(
            input_ids_BT, attention_mask_BT, None, None, cache, layer_params=layer_params, fresh_cache=True
        )

    def layer_params(self, per_layer: bool = False) -> LayerParams:
        """The blocks' params as the forward pass reads them (LoRA adapters dropped while they are
        off): one dict of stacked [L, ...] arrays, or with `per_layer` a tuple of L dicts sliced out
        of it. A decode loop takes the per-layer form once, before the loop: the scan's per-layer
        slice of a stacked weight is a copy on XLA's CPU backend, made again at every step."""
        params = nnx.to_pure_dict(nnx.state(self.layers))
        if not self.cfg.lora_multiplier * float(self.lora_scale):  # the base model: no adapter compute
            params = lora_lib.strip(params)
        if not per_layer:
            return params
        return tuple(jax.tree.map(lambda a, i=i: a[i], params) for i in range(self.cfg.num_hidden_layers))

    def hidden_states(
        self,
        input_ids_BT: jax.Array,
        attention_mask_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        branch_ids_BT: jax.Array | None = None,
        tokens: TokenLayout | None = None,
        reference: Decoder | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Final-normed hidden states [B, T, D] (score only the tokens you need against
        `output_embedding()` instead of materialising [B, T, V]; then `cap_logits` for a config
        with final logit soft-capping).

        segment_ids_BT: packed sequences (1, 2, ... per sequence in a row): a token sees its own
        sequence only; positions, when not given, restart at each sequence.
        branch_ids_BT: a shared prefix with branches (0 = the prefix, k > 0 = branch k): a token of
        branch k sees the prefix and its own branch only, so one row holds a prompt and both of a
        pair's responses (`batching.share_prompt`) with the attention each has in a row of its own;
        positions, when not given, continue each branch from the prefix's end, as that layout's do.
        tokens: run the token-wise layers on these kept tokens only (`models.compaction`; the
        batch's real tokens, from `batching.compact_index`); positions not kept come back as zeros.
        reference: `(policy, reference)` hidden states (the reference's under stop_gradient) from one
        pass of the bottom `frozen_layers` blocks, which are this model's and the reference's (the same
        weights, never updated), so only the blocks above the cut run twice; `reference` is the same
        architecture (for LoRA the base with its adapters off, `lora.adapters_off`).
        """
        if reference is not None and not self.cfg.frozen_layers:
            raise ValueError("hidden_states(reference=) shares the frozen blocks: model.frozen_layers is 0")
        out = self._forward(
            input_ids_BT,
            attention_mask_BT,
            positions_BT,
            segment_ids_BT,
            None,
            branch_ids_BT=branch_ids_BT,
            layout=tokens,
            reference=reference,
        )
        return out[0] if reference is None else (out[0], out[2])

    def output_embedding(self) -> jax.Array:
        """The output projection [D, V] (the transposed input embedding when tied)."""
        if self.lm_head is None:
            w_VD = self.embed_tokens.embedding.get_value()
            # tied: the output layer is the frozen input embedding when blocks are frozen
            return (jax.lax.stop_gradient(w_VD) if self.cfg.frozen_layers else w_VD).T
        return self.lm_head.kernel.get_value()

    def init_cache(self, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> Cache:
        """An empty KV cache: k/v [L, B, K, S, H], key-validity mask [B, S], write index; with
        `per_layer`, k/v are tuples of L arrays [B, K, S, H] (for `layer_params(per_layer=True)`:
        each layer's slots are then updated in place, not sliced out of and back into a stack)."""
        cfg = self.cfg
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)  # head-major: what attention reads
        dtype = cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
        L = cfg.num_hidden_layers
        k, v = (
            (tuple(jnp.zeros(shape, dtype) for _ in range(L)) for _ in "kv")
            if per_layer
            else (jnp.zeros((L, *shape), dtype) for _ in "kv")
        )
        return {
            "k": k,
            "v": v,
            "mask": jnp.zeros((batch, max_len), jnp.bool_),
            "index": jnp.zeros((), jnp.int32),
        }

    @staticmethod
    def per_layer_cache(cache: Cache) -> Cache:
        """A stacked cache as `init_cache(per_layer=True)` holds it (a prefill scanned over the stacked
        layers, then decoding unrolled over `layer_params(per_layer=True)`)."""
        if isinstance(cache["k"], tuple):
            return cache
        return {**cache, "k": tuple(cache["k"]), "v": tuple(cache["v"])}

    # -- implementation --
    def _attention_impl(self, T: int, cached: bool, branches: bool) -> str:
        """The attention kernel this call runs: `auto` is splash on TPU where it applies (rows of a
        multiple of 128, no branches), cuDNN flash attention on a GPU where it applies (a bf16/fp16
        compute dtype, head_dim a multiple of 8 up to 128, no KV cache), else xla. Splash has no
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
        if impl == "auto" and target_platform() == "tpu" and not cached and not branches and T % 128 == 0:
            return "splash"
        if impl == "auto":
            # the cuDNN kernel is the faster one where it applies (BENCHMARKS.md §8)
            return "cudnn" if target_platform() == "gpu" and self._cudnn_applies(cached) else "xla"
        if impl == "cudnn" and target_platform() != "gpu":  # else jax's own error, a long traceback
            raise ConfigError(
                f"model.attention_impl=cudnn needs a GPU (these devices are {target_platform()}); "
                "use attention_impl=auto (cudnn where it applies) or xla"
            )
        if impl == "splash" and (cached or T % 128):
            return "xla"
        if impl == "splash" and branches:
            raise ConfigError(
                "model.attention_impl=splash cannot express data.share_prompt's branch mask; "
                "use attention_impl=xla (or auto) with share_prompt"
            )
        return impl

    def _cudnn_applies(self, cached: bool) -> bool:
        """Whether cuDNN's flash kernel takes this model's attention: half-precision inputs and a
        head_dim it tiles (multiples of 8 up to 128); KV-cache decoding stays on xla."""
        H = self.cfg.head_dim
        return not cached and self.cfg.dtype in ("bfloat16", "float16") and H % 8 == 0 and H <= 128

    def _forward(
        self,
        input_ids_BT,
        attention_mask_BT,
        positions_BT,
        segment_ids_BT,
        cache,
        branch_ids_BT=None,
        layout: TokenLayout | None = None,
        layer_params: LayerParams | None = None,
        fresh_cache: bool = False,
        reference: Decoder | None = None,
    ):
        cfg = self.cfg
        B, T = input_ids_BT.shape
        mask_BT = (
            jnp.ones((B, T), jnp.bool_)
            if attention_mask_BT is None
            else jnp.asarray(attention_mask_BT).astype(jnp.bool_)
        )
        per_layer = isinstance(layer_params, tuple)
        _check_call(cache, segment_ids_BT, layout, per_layer)
        seen = _visible_keys(mask_BT, positions_BT, segment_ids_BT, branch_ids_BT, cache, fresh_cache)
        positions_BT, allowed_BTS, back_BTS, kv_mask_BS, index = seen

        # with a layout, the residual stream holds the kept tokens only: [G, N, ...] for [B, T, ...]
        x = self._embed(input_ids_BT if layout is None else layout.tokens(input_ids_BT))
        pos = positions_BT if layout is None else layout.tokens(jnp.asarray(positions_BT))
        cos, sin = rope_cos_sin(pos, rope_inv_freq(cfg), cfg.compute_dtype, rope_attention_factor(cfg))

        impl = self._attention_impl(T, cache is not None and not fresh_cache, branch_ids_BT is not None)
        mask, window = self._layer_masks(impl, allowed_BTS, back_BTS, mask_BT, segment_ids_BT)
        params = self.layer_params() if layer_params is None else layer_params
        run = partial(
            self._run_layers,
            impl=impl,
            mask=mask,
            window=window,
            cos=cos,
            sin=sin,
            index=index,
            layout=layout,
        )
        sliding_L = np.asarray(cfg.layer_is_sliding)
        kv_stack = None if cache is None else (cache["k"], cache["v"])
        with jax.named_scope("layers"):
            F = cfg.frozen_layers if cache is None else 0
            if F:  # no gradient below block F: autodiff never differentiates the frozen blocks
                low = jax.tree.map(lambda a: jax.lax.stop_gradient(a[:F]), params)
                x = jax.lax.stop_gradient(run(jax.lax.stop_gradient(x), low, None, sliding_L[:F])[0])
                params = jax.tree.map(lambda a: a[F:], params)
            x_ref = None
            if reference is not None:  # the reference's own blocks above the cut, from the shared trunk
                with jax.named_scope("reference"):
                    top = jax.tree.map(lambda a: jax.lax.stop_gradient(a[F:]), reference.layer_params())
                    lora_scale = reference.cfg.lora_multiplier * float(reference.lora_scale)
                    x_ref = run(x, top, None, sliding_L[F:], lora_scale=lora_scale)[0]
            x, new_kv = run(x, params, kv_stack, sliding_L[F:])

        def final(module, x):
            h = rms_norm(x, module.norm.scale.get_value(), cfg.rms_norm_eps, cfg.norm_plus_one)
            return h if layout is None else layout.rows(h, B, T)

        with jax.named_scope("final_norm"):
            h_BTD = final(self, x)
        new_cache = None
        if cache is not None:
            start = 0 if fresh_cache else index
            new_cache = {"k": new_kv[0], "v": new_kv[1], "mask": kv_mask_BS, "index": start + T}
        if reference is None:
            return h_BTD, new_cache
        return h_BTD, new_cache, jax.lax.stop_gradient(final(reference, x_ref))

    def _embed(self, ids):
        """The residual stream's start: the token embeddings in the compute dtype."""
        cfg = self.cfg
        with jax.named_scope("embed"):
            x = jnp.take(self.embed_tokens.embedding.get_value(), ids, axis=0).astype(cfg.compute_dtype)
            if cfg.scale_embeddings:  # sqrt(D) rounded to the param dtype, as transformers' Gemma does
                x = x * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.params_dtype).astype(cfg.compute_dtype)
            return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def _layer_masks(self, impl, allowed_BTS, back_BTS, mask_BT, segment_ids_BT):
        """(mask, window): the attention mask in `impl`'s form, and the sliding layers' own where the
        window cuts into this call's keys (None when every layer shares `mask`)."""
        cfg = self.cfg
        window_BTS = None
        if cfg.window_cuts(allowed_BTS.shape[-1]):
            window_BTS = allowed_BTS & (back_BTS < cfg.sliding_window)
        mask = kernel_mask(impl, allowed_BTS, mask_BT, segment_ids_BT)
        # splash runs only where the window cuts nothing
        window = None if window_BTS is None or impl == "splash" else kernel_mask(impl, window_BTS, mask_BT)
        # every layer slides (Mistral) -> one mask; some do (Gemma 2) -> a flag per layer picks
        if window is not None and np.asarray(cfg.layer_is_sliding).all():
            mask, window = window, None
        return mask, window

    def _run_layers(
        self, x, params, kv, sliding, *, impl, mask, window, cos, sin, index, layout, lora_scale=None
    ):
        """The decoder layers over the residual stream x: unrolled over a per-layer tuple of params
        (decoding, each layer's cache updated in place), scanned over the stacked ones
        (`model.scan_layers`), else unrolled over slices of the stack. Returns (x, new k/v or None).
        `lora_scale`: the adapters' multiplier of the model whose `params` these are (default: this one's)."""
        cfg = self.cfg
        dt = cfg.compute_dtype
        layer = partial(
            decoder_layer,
            cfg=cfg if impl == cfg.attention_impl else cfg.replace(attention_impl=impl),
            lora_scale=cfg.lora_multiplier * float(self.lora_scale) if lora_scale is None else lora_scale,
        )
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
        # CPU, low precision, scanned: the carry travels as float32 holding the same bf16 values.
        # Autodiff stacks the carry per layer, and XLA's CPU backend updates a bf16 [L, ...] stack by
        # converting all of it for every layer (a cost growing as L^2); a float32 stack is updated in place.
        wide_carry = cfg.scan_layers and jnp.finfo(dt).bits < 32 and target_platform() == "cpu"

        def body(x, xs):
            p, kv, sliding = xs
            if window is None:
                layer_mask = mask
            elif isinstance(sliding, (bool, np.bool_)):  # unrolled: known per layer
                layer_mask = window if sliding else mask
            else:
                layer_mask = window.where(sliding, mask)
            x, new_kv = layer(p, x.astype(dt), cos, sin, layer_mask, kv, index, layout)
            return (x.astype(jnp.float32) if wide_carry else x), new_kv

        if isinstance(params, tuple):  # unrolled over separate arrays: no slice of a stack
            outs = []
            for i, p_i in enumerate(params):
                x, kv_i = body(x, (p_i, (kv[0][i], kv[1][i]), bool(sliding[i])))
                outs.append(kv_i)
            return x.astype(dt), (tuple(k for k, _ in outs), tuple(v for _, v in outs))
        if cfg.scan_layers:
            xs = (params, kv, None if window is None else jnp.asarray(sliding))
            x, new_kv = jax.lax.scan(body, x.astype(jnp.float32) if wide_carry else x, xs)
            return x.astype(dt), new_kv
        outs = []
        for i in range(jax.tree.leaves(params)[0].shape[0]):
            x, kv_i = body(x, (*jax.tree.map(lambda a, i=i: a[i], (params, kv)), bool(sliding[i])))
            outs.append(kv_i)
        return x, None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _check_call(cache, segment_ids_BT, layout, per_layer: bool) -> None:
    """The combinations a forward call cannot run, as errors."""
    if cache is not None and segment_ids_BT is not None:
        raise ValueError("segment_ids and a KV cache cannot be combined")
    if cache is not None and layout is not None:
        raise ValueError("token compaction and a KV cache cannot be combined")
    if cache is not None and per_layer != isinstance(cache["k"], tuple):
        raise ValueError("per-layer params go with a per-layer cache (init_cache(per_layer=True)) and back")
    if per_layer and cache is None:
        raise ValueError("per-layer params are for KV-cached decoding; pass a per-layer cache")


def _default_positions(mask_BT, segment_ids_BT, branch_ids_BT=None):
    """Positions counting real tokens only (left padding), restarting at each segment (a packed row
    holds several sequences, each numbered from 0 as in a row of its own); with branches, counting
    the prefix and the token's own branch only (`batching.share_prompt`: each response continues
    from the prompt's end)."""
    if branch_ids_BT is not None:
        # a token's position is the number of keys it sees before itself: the masks already skip
        # padding, other segments and other branches (the positions passed here only set back_BTS)
        allowed_BTS, _ = self_attention_allowed(
            mask_BT, jnp.zeros(mask_BT.shape, jnp.int32), segment_ids_BT, branch_ids_BT
        )
        return jnp.maximum(jnp.sum(allowed_BTS, axis=-1, dtype=jnp.int32) - 1, 0)
    count_BT = jnp.cumsum(mask_BT, axis=-1)
    if segment_ids_BT is not None:
        seg_BT = jnp.asarray(segment_ids_BT)
        first_BT = jnp.concatenate(
            [jnp.ones_like(seg_BT[:, :1], jnp.bool_), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1
        )
        # each token's segment start: the latest start at or before it
        start_BT = jax.lax.cummax(jnp.where(first_BT, jnp.arange(seg_BT.shape[1]), 0), axis=1)
        count_BT = count_BT - jnp.take_along_axis(count_BT - mask_BT.astype(count_BT.dtype), start_BT, axis=1)
    return jnp.maximum(count_BT - 1, 0)


def _visible_keys(mask_BT, positions_BT, segment_ids_BT, branch_ids_BT, cache, fresh_cache: bool):
    """Which keys each query sees: (positions_BT, allowed_BTS, back_BTS (how far back each key is),
    kv_mask_BS (the cache's key mask after this call; None without a cache), index (the cache slot this
    call writes from; None when it starts at 0)). Positions, when not given, count real tokens only
    (left padding), restarting at each segment (packed rows), each branch continuing from its prefix;
    with a cache, continuing from those in it."""
    kv_mask_BS, index = None, None
    if cache is None or fresh_cache:
        if positions_BT is None:
            positions_BT = _default_positions(mask_BT, segment_ids_BT, branch_ids_BT)
        allowed_BTS, back_BTS = self_attention_allowed(mask_BT, positions_BT, segment_ids_BT, branch_ids_BT)
        if fresh_cache:  # an empty cache written from slot 0
            kv_mask_BS = jax.lax.dynamic_update_slice(cache["mask"], mask_BT, (0, 0))
    else:
        index = cache["index"]
        kv_mask_BS = jax.lax.dynamic_update_slice(cache["mask"], mask_BT, (0, index))
        if positions_BT is None:
            seen_B = jnp.sum(cache["mask"], axis=-1)
            positions_BT = seen_B[:, None] + jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0)
        allowed_BTS, back_BTS = cached_attention_allowed(kv_mask_BS, index, T=mask_BT.shape[1])
    return positions_BT, allowed_BTS, back_BTS, kv_mask_BS, index


def param_count(model: Decoder) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
