"""Bytes per device: what a tree of sharded abstract arrays holds, and the back-of-envelope budget
`alignx plan` prints beside XLA's compiled numbers."""

from __future__ import annotations

from typing import Any


def shard_bytes(sds: Any) -> int:
    """The bytes one device holds of `sds` (its shard of each leaf; the whole leaf where unsharded)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(sds):
        shape = (
            leaf.sharding.shard_shape(leaf.shape)
            if getattr(leaf, "sharding", None) is not None
            else leaf.shape
        )
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def analytic_bytes(dcfg, *, seqs_per_device: int, seq_len: int, shard: int, chunk: int) -> dict[str, int]:
    """A back-of-envelope per-device budget (the compiled numbers are the authority).

    shard: how many ways params are split (fsdp * tensor). Activations assume per-layer remat when
    `dcfg.remat != 'none'` (only the layer inputs are kept); attention scores are [T, T] per head
    for the XLA attention, [ATTENTION_CHUNK, T] for the chunked one (and the flash stand-in).
    """
    D, F, L, V = dcfg.hidden_size, dcfg.intermediate_size, dcfg.num_hidden_layers, dcfg.vocab_size
    N, K, H = dcfg.num_attention_heads, dcfg.num_key_value_heads, dcfg.head_dim
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F + 2 * D
    P = L * per_layer + V * D * (1 if dcfg.tie_word_embeddings else 2) + D
    pb = int(dcfg.params_dtype.itemsize)
    cb = int(dcfg.compute_dtype.itemsize)
    s, T = seqs_per_device, seq_len
    params = P * pb // shard
    opt = 2 * P * 4 // shard  # Adam mu and nu in float32
    ref = P * cb // shard
    grads = 2 * P * 4 // shard  # accumulator + this microbatch's gradients
    r, A = int(getattr(dcfg, "lora_rank", 0) or 0), P  # A: the trained params' count
    if r:  # LoRA: float32 adapters train; the frozen base (param_dtype) is the reference too
        io = {"q_proj": (D, N * H), "k_proj": (D, K * H), "v_proj": (D, K * H), "o_proj": (N * H, D)}
        io.update(gate_proj=(D, F), up_proj=(D, F), down_proj=(F, D))
        A = L * sum(r * (i + o) for t, (i, o) in io.items() if t in dcfg.lora_targets)
        ref, params = params, A * 4 // shard
        opt = grads = 2 * A * 4 // shard
        P += A
    gathered = (
        2 * per_layer * cb + 2 * V * D * cb
    )  # one layer (double-buffered) + embedding/head, all-gathered
    act_layer_in = s * T * D * cb
    from alignx_jax.models.decoder import ATTENTION_CHUNK

    blocked = ("chunked", "cudnn", "splash")  # kernels that hold at most [chunk, T] scores per head
    rows = min(T, ATTENTION_CHUNK) if dcfg.attention_impl in blocked and T % ATTENTION_CHUNK == 0 else T
    attn = s * N * rows * T * (4 + cb + 4)  # f32 scores, probs, f32 score gradients
    layer_work = s * T * (6 * D + 3 * F) * cb + attn
    if dcfg.remat != "none":
        acts = L * act_layer_in + layer_work
    else:
        acts = L * (s * T * (6 * D + 3 * F) * cb + attn // 2)
    c = min(chunk or T, T)
    logits = 2 * s * c * V * 4
    temps = grads + gathered + acts + logits
    return {
        "params": params,
        "optimizer": opt,
        "reference": ref,
        "temporaries": temps,
        "total": params + opt + ref + temps,
        "param_count": P,
        "trainable_count": A,
    }
