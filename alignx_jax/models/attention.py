"""Attention: the mask a call's queries see, and the four kernels that apply it.

The mask has one meaning per kernel, so it travels as an `AttentionMask` naming the form it is in:
`allowed_BTS` (a boolean [B, T, S] mask, `jax.nn.dot_product_attention`: "cudnn" / "auto"),
`bias_BTS` (its additive float32 form from `mask_bias`, built once per forward for the "xla" and
"chunked" kernels) or `segment_BT` (int32 segment ids [B, T], 0 = padding, for the causal "splash"
kernel). `self_attention_allowed` / `cached_attention_allowed` build the boolean mask (causal,
padding, packing, shared-prompt branches; the KV-cache form) with the distances a sliding window
reads, and `kernel_mask` turns it into the form a kernel takes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from alignx_jax.errors import ConfigError
from alignx_jax.sharding import active_spec, target_platform

# query rows per block of the "chunked" attention (peak scores [B, N, chunk, S] instead of [B, N, T, S])
ATTENTION_CHUNK = 1024

# a finite "minus infinity": fully masked (left-pad) query rows stay NaN-free (uniform weights)
MASK_MIN = float(np.finfo(np.float32).min)


def mask_bias(allowed_BTS: jax.Array) -> jax.Array:
    """Boolean attention mask -> additive float32 bias (0 where allowed, MASK_MIN elsewhere).
    Built once per forward and shared by every layer, instead of a `where` on each layer's scores."""
    return jnp.where(allowed_BTS, 0.0, MASK_MIN).astype(jnp.float32)


def _as_bias(mask_BTS: jax.Array) -> jax.Array:
    return mask_bias(mask_BTS) if mask_BTS.dtype == jnp.bool_ else mask_BTS.astype(jnp.float32)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["allowed_BTS", "bias_BTS", "segment_BT"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, in the one form the kernel that reads it takes (set exactly one):

    * `allowed_BTS`: boolean [B, T, S], True where the query may see the key (`jax.nn`, "cudnn");
    * `bias_BTS`: the additive float32 form of it (`mask_bias`: 0 or `MASK_MIN`; "xla", "chunked");
    * `segment_BT`: int32 segment ids [B, T], 0 = padding; the causal part is the kernel's own ("splash").
    """

    allowed_BTS: jax.Array | None = None
    bias_BTS: jax.Array | None = None
    segment_BT: jax.Array | None = None

    @property
    def rows(self) -> tuple[int, int]:
        """(B, T): the query rows the mask is laid out for."""
        a = next(x for x in (self.allowed_BTS, self.bias_BTS, self.segment_BT) if x is not None)
        return a.shape[0], a.shape[1]

    def where(self, pick: jax.Array, other: AttentionMask) -> AttentionMask:
        """This mask where `pick` (a traced bool) holds, else `other` (the same form)."""
        return jax.tree.map(lambda a, b: jnp.where(pick, a, b), self, other)


def self_attention_allowed(
    mask_BT: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    branch_ids_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The boolean mask `[B, T, T]` of self-attention without a cache: causal, keys that are real
    tokens (`mask_BT`), of the query's own packed segment, and, with `branch_ids_BT` (0 = a shared
    prefix, k > 0 = branch k), in the prefix or the query's own branch. Also the distance back
    `[B, T, T]` a sliding window reads: positions, so a branch token's distance to the prefix skips
    the other branch (padding keys are masked already)."""
    T = mask_BT.shape[1]
    t = jnp.arange(T)
    allowed_BTS = (t[None, :] <= t[:, None])[None] & mask_BT[:, None, :]
    if segment_ids_BT is not None:
        allowed_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    if branch_ids_BT is not None:  # keys in the shared prefix, or in the query's own branch
        key_B1S = branch_ids_BT[:, None, :]
        allowed_BTS &= (key_B1S == 0) | (key_B1S == branch_ids_BT[:, :, None])
    pos = jnp.asarray(positions_BT)
    back_BTS = pos[:, :, None] - pos[:, None, :]
    return allowed_BTS, back_BTS


def cached_attention_allowed(kv_mask_BS: jax.Array, index: jax.Array, T: int) -> tuple[jax.Array, jax.Array]:
    """The boolean mask `[B, T, S]` of T new tokens written at cache slot `index`: cache slots up to
    each query's own that hold real tokens (`kv_mask_BS`, the new ones included), and the distance
    back `[1, T, S]` in slots (real tokens sit in consecutive slots)."""
    S = kv_mask_BS.shape[1]
    slot_T = index + jnp.arange(T)
    allowed_BTS = (jnp.arange(S)[None, :] <= slot_T[:, None])[None] & kv_mask_BS[:, None, :]
    back_BTS = (slot_T[:, None] - jnp.arange(S)[None, :])[None]
    return allowed_BTS, back_BTS


def kernel_mask(
    impl: str, allowed_BTS: jax.Array, mask_BT: jax.Array, segment_ids_BT: jax.Array | None = None
) -> AttentionMask:
    """`allowed_BTS` in the form kernel `impl` takes: the additive bias for "xla"/"chunked" (built
    once per forward, outside the layer scan), segment ids for "splash" (which takes the causal mask
    as given and padding / packing as segments: `mask_BT` and `segment_ids_BT`), else as it is."""
    if impl == "splash":
        B, T = mask_BT.shape
        seg_BT = jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else jnp.asarray(segment_ids_BT)
        return AttentionMask(segment_BT=jnp.where(mask_BT, seg_BT.astype(jnp.int32), 0))
    if impl in ("xla", "chunked"):
        return AttentionMask(bias_BTS=mask_bias(allowed_BTS))
    return AttentionMask(allowed_BTS=allowed_BTS)


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


def _attention_xla(q_BTNH, k_BSKH, v_BSKH, bias_BTS, scale, causal: bool = False, cap: float | None = None):
    """Exact softmax attention with grouped KV heads. `bias_BTS` is the additive float bias from
    `mask_bias` (a boolean allowed-mask is turned into it); the custom VJP recomputes the probabilities. `causal`
    promises the mask allows no key after its query (T == S): blocks of query rows then skip the
    masked upper triangle. `cap`: soft-cap the scaled scores (`softcap`) before the mask."""
    # head-major [B, K, G, T, H]: transposing the [T, H] operands is cheap, the [T, S] scores are not
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    return _attention_xla_head_major(q_BTNH, k_BKSH, v_BKSH, bias_BTS, scale, causal, cap)


def _attention_xla_head_major(q_BTNH, k_BKSH, v_BKSH, bias_BTS, scale, causal=False, cap=None):
    """`_attention_xla` on keys and values already head-major (a KV cache kept as [B, K, S, H])."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    causal = causal and k_BKSH.shape[2] == T
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    o_BKGTH = _sdpa(q_BKGTH, k_BKSH, v_BKSH, _as_bias(bias_BTS), scale, causal, cap)
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _attention_chunked(
    q_BTNH, k_BSKH, v_BSKH, bias_BTS, scale, chunk: int = ATTENTION_CHUNK, cap: float | None = None
):
    """Exact attention one block of query rows at a time, each block rematerialised in the backward
    pass: memory O(chunk * S) per head instead of O(T * S), for long sequences without a flash kernel.
    `bias_BTS` as `_attention_xla` takes it."""
    B, T, N, H = q_BTNH.shape
    if chunk >= T or T % chunk:
        return _attention_xla(q_BTNH, k_BSKH, v_BSKH, bias_BTS, scale, cap=cap)
    n, S = T // chunk, bias_BTS.shape[-1]
    q_nBCNH = q_BTNH.reshape(B, n, chunk, N, H).swapaxes(0, 1)
    bias_nBCS = bias_BTS.reshape(B, n, chunk, S).swapaxes(0, 1)

    @jax.checkpoint
    def block(_, xs):
        q_BCNH, bias_BCS = xs
        return None, _attention_xla(q_BCNH, k_BSKH, v_BSKH, bias_BCS, scale, cap=cap)

    _, o_nBCNH = jax.lax.scan(block, None, (q_nBCNH, bias_nBCS))
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
    kernel = _splash_kernel(T, N // K, splash_block(T), target_platform() != "tpu")

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
    mask: AttentionMask,
    impl: str,
    causal: bool = False,
    scale: float | None = None,
    cap: float | None = None,
):
    """Attention with kernel `impl` ("xla", "chunked", "splash", "cudnn" or "auto"). `mask` in the
    form that kernel takes (`kernel_mask`): "splash" reads its segment ids, "xla"/"chunked" its
    additive bias (or a boolean mask turned into one), the others its boolean mask (or a bias
    read back as one). `causal`: the mask is a subset of the causal one (self-attention without
    a KV cache). `scale` defaults to 1/sqrt(head_dim); `cap` soft-caps the scores, which only the
    "xla" and "chunked" kernels do (`Decoder._attention_impl` picks xla for such a config)."""
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else scale
    if cap is not None and impl not in ("xla", "chunked"):
        raise ConfigError(f"attention_impl {impl!r} cannot soft-cap attention logits; use xla")
    if impl == "splash":
        return _attention_splash(q_BTNH, k_BSKH, v_BSKH, mask.segment_BT, scale)
    if impl in ("xla", "chunked"):
        bias_BTS = mask.bias_BTS if mask.bias_BTS is not None else mask.allowed_BTS
        if impl == "xla":
            return _attention_xla(q_BTNH, k_BSKH, v_BSKH, bias_BTS, scale, causal, cap)
        return _attention_chunked(q_BTNH, k_BSKH, v_BSKH, bias_BTS, scale, cap=cap)
    allowed_BTS = mask.allowed_BTS if mask.allowed_BTS is not None else mask.bias_BTS == 0.0
    return jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        mask=allowed_BTS[:, None, :, :],
        scale=scale,
        implementation="cudnn" if impl == "cudnn" else None,
    )


def cached_attention(
    q_BTNH,
    k_BKSH,
    v_BKSH,
    mask: AttentionMask,
    impl: str,
    scale: float | None = None,
    cap: float | None = None,
):
    """`attention` of T new queries over a KV cache kept head-major, [B, K, S, H]: the layout the xla
    kernel multiplies in, so a decode step copies no cache into it (a [B, S, K, H] cache costs a
    transposed copy of every layer's keys and values per step). Other kernels get [B, S, K, H]."""
    if impl == "xla":
        scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else scale
        bias_BTS = mask.bias_BTS if mask.bias_BTS is not None else mask.allowed_BTS
        return _attention_xla_head_major(q_BTNH, k_BKSH, v_BKSH, bias_BTS, scale, cap=cap)
    k_BSKH, v_BSKH = k_BKSH.transpose(0, 2, 1, 3), v_BKSH.transpose(0, 2, 1, 3)
    return attention(q_BTNH, k_BSKH, v_BSKH, mask, impl, scale=scale, cap=cap)
