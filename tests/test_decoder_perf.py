"""The decoder's fast attention path: additive mask bias and the recomputing custom VJP agree with
plain autodiff of the textbook masked softmax, fully masked (left-pad) query rows included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignx_jax.models import attention as attn
from alignx_jax.models import decoder as dec


def _reference(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, scale):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    k_BSNH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSNH = jnp.repeat(v_BSKH, N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) * scale
    s = jnp.where(allowed_BTS[:, None], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v_BSNH)


def _inputs(B=2, T=12, N=4, K=2, H=8):
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, N, H))
    k = jax.random.normal(kk, (B, T, K, H))
    v = jax.random.normal(kv, (B, T, K, H))
    w = jax.random.normal(kw, (B, T, N, H))  # a random cotangent direction
    t = jnp.arange(T)
    # row 0 left-padded by 3 (its first 3 query rows see no key at all), row 1 right-padded
    mask = np.ones((B, T), bool)
    mask[0, :3] = False
    mask[1, 9:] = False
    allowed = (t[None, :] <= t[:, None])[None] & jnp.asarray(mask)[:, None, :]
    return q, k, v, w, allowed


def test_forward_matches_reference_bool_and_bias():
    q, k, v, _, allowed = _inputs()
    want = _reference(q, k, v, allowed, 0.35)
    np.testing.assert_allclose(attn._attention_xla(q, k, v, allowed, 0.35), want, atol=1e-5)
    np.testing.assert_allclose(attn._attention_xla(q, k, v, attn.mask_bias(allowed), 0.35), want, atol=1e-5)
    # fully masked query rows get uniform weights (no NaN), as the where-based softmax does
    assert bool(jnp.all(jnp.isfinite(want)))


def test_custom_vjp_matches_autodiff():
    q, k, v, w, allowed = _inputs()

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, allowed, 0.35)) * w)

    got = jax.jit(jax.grad(loss(attn._attention_xla), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)
        assert float(jnp.max(jnp.abs(g))) > 1e-3  # not trivially zero


def _masks(B, T, rng):
    """Left padding, right padding, two packed segments, and a shared prompt with two branches."""
    t = np.arange(T)
    causal = t[None, :] <= t[:, None]
    allowed = np.broadcast_to(causal, (B, T, T)).copy()
    allowed[0] &= (t >= 37)[None, :]  # left-padded: the first 37 query rows see nothing
    allowed[1] &= (t < 101)[None, :]  # right-padded
    seg = (t >= 70).astype(int)  # two packed sequences
    allowed[2] &= seg[:, None] == seg[None, :]
    branch = np.where(t < 40, 0, np.where(t < 95, 1, 2))  # prompt, chosen, rejected
    allowed[3] &= (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
    return jnp.asarray(allowed)


def test_causal_blocks_match_reference_forward_and_grads():
    """Blocks of query rows against their key prefixes (ragged last block) == the full masked softmax,
    values and gradients, for every mask the decoder builds (all are inside the causal one)."""
    B, T, N, K, H = 4, 150, 4, 2, 8
    assert [b - a for a, b, _ in attn._row_blocks(T, T, True)] == [64, 64, 22]
    kq, kk, kv, kw = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (B, T, N, H))
    k = jax.random.normal(kk, (B, T, K, H))
    v = jax.random.normal(kv, (B, T, K, H))
    w = jax.random.normal(kw, (B, T, N, H))
    allowed = _masks(B, T, np.random.default_rng(0))
    real = jnp.any(allowed, axis=-1)[..., None, None]  # rows with at least one key

    def loss(f, causal):
        return lambda q, k, v: jnp.sum(
            jnp.where(real, jnp.sin(f(q, k, v, attn.mask_bias(allowed), 0.35, causal)), 0) * w
        )

    want_o = _reference(q, k, v, allowed, 0.35)
    got_o = jax.jit(lambda q, k, v: attn._attention_xla(q, k, v, dec.mask_bias(allowed), 0.35, True))(q, k, v)
    np.testing.assert_allclose(np.where(real, got_o, 0), np.where(real, want_o, 0), atol=1e-5)
    ref = lambda q, k, v, m, s, c: _reference(q, k, v, allowed, s)
    want = jax.grad(loss(ref, False), argnums=(0, 1, 2))(q, k, v)
    for causal in (True, False):
        got = jax.jit(jax.grad(loss(attn._attention_xla, causal), argnums=(0, 1, 2)))(q, k, v)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, atol=3e-5, rtol=1e-5)
            assert float(jnp.max(jnp.abs(g))) > 1e-3


def test_causal_blocks_skip_the_upper_triangle():
    """No [T, T] score matrix is built: the largest block is [64 rows, T keys] and the total score
    work is (n+1)/2n of the full one."""
    B, T, N, K, H = 1, 256, 2, 1, 8
    q = jnp.ones((B, T, N, H))
    kv = jnp.ones((B, T, K, H))
    bias = attn.mask_bias(jnp.tril(jnp.ones((T, T), bool))[None])
    f = jax.jit(lambda q, k, v: attn._attention_xla(q, k, v, bias, 0.5, True))
    hlo = f.lower(q, kv, kv).compile().as_text()
    assert f"{T},{T}]" not in hlo and f"64,{T}]" in hlo
    flops = f.lower(q, kv, kv).compile().cost_analysis()["flops"]
    full = jax.jit(lambda q, k, v: attn._attention_xla(q, k, v, bias, 0.5, False)).lower(q, kv, kv).compile()
    assert flops < 0.75 * full.cost_analysis()["flops"]


def test_dense_weight_gradient_equals_autodiff():
    """models.matmul.dense: same value and gradients as jnp.dot, in float32 and for a float32
    output from bfloat16 operands (the output layer's logits)."""
    from alignx_jax.models.matmul import dense

    kx, kw, kg = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (48, 24))
    w = jax.random.normal(kw, (24, 40))
    g = jax.random.normal(kg, (48, 40))
    f = lambda d: lambda x, w: jnp.sum(d(x, w) * g)
    got = jax.jit(jax.grad(f(dense), argnums=(0, 1)))(x, w)
    want = jax.grad(f(jnp.dot), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(f(dense), argnums=(0, 1)))(x, w))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = dense(xb, wb, jnp.float32)
    assert out.dtype == jnp.float32
    gx, gw = jax.grad(lambda x, w: jnp.sum(dense(x, w, jnp.float32) * g), argnums=(0, 1))(xb, wb)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(want[1]), rtol=0.05, atol=0.3)


def test_dense_bf16_products_stay_bf16_on_cpu():
    """bf16 in, bf16 out: the same values and gradients as a plain bf16 `jnp.dot`, and every dot of
    the forward and backward pass takes bf16 operands (XLA's CPU backend upcasts a bf16 -> bf16 dot,
    or one with a transposed-layout operand, to a float32 dot: 3-4x slower on AVX-512-BF16/AMX)."""
    import re

    from alignx_jax.models.matmul import dense

    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (64, 32), jnp.bfloat16)
    w = jax.random.normal(kw, (32, 48), jnp.bfloat16)
    g = jax.random.normal(kg, (64, 48), jnp.bfloat16)
    f = lambda d: lambda x, w: jnp.sum((d(x, w) * g).astype(jnp.float32))
    out = jax.jit(dense)(x, w)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(jnp.dot(x, w), np.float32))
    grad = jax.jit(jax.grad(f(dense), argnums=(0, 1)))
    got, want = grad(x, w), jax.grad(f(jnp.dot), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.02, atol=0.1)
    if jax.default_backend() == "cpu":
        hlo = grad.lower(x, w).compile().as_text()
        dots = re.findall(r"= f32\[[0-9,]*\]\{[0-9,]*\} dot\(([^)]*)\)", hlo)
        fused = re.findall(
            r"\((param_[0-9.]+): (\w+)\[[0-9,]+\], (param_[0-9.]+): (\w+)\[[0-9,]+\]\) -> f32", hlo
        )
        assert dots, hlo[-2000:]
        assert all(a == b == "bf16" for _, a, _, b in fused), fused


def test_layer_scan_saves_no_attention_probabilities():
    """The scanned step keeps no [L, B, K, G, T, S] residual (the probabilities are recomputed)."""
    from flax import nnx

    T = 32
    cfg = dec.DecoderConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.ones((2, T), jnp.int32)

    def f(state):
        return jnp.sum(nnx.merge(graphdef, state).hidden_states(ids))

    hlo = jax.jit(jax.grad(f)).lower(state).as_text()
    assert f"3x2x2x2x{T}x{T}x" not in hlo and f"3x2x4x{T}x{T}x" not in hlo


def test_dense_takes_float32_kernels_of_a_bf16_model():
    """A float32 kernel with bf16 activations: the product of the bf16-rounded kernel (as a cast
    before the call gave), and the kernel's gradient in float32, close to autodiff through the cast."""
    from alignx_jax.models.matmul import dense

    kx, kw, kg = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, (64, 32), jnp.bfloat16)
    w = jax.random.normal(kw, (32, 48), jnp.float32)
    g = jax.random.normal(kg, (64, 48), jnp.float32)
    out = jax.jit(dense)(x, w)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(out, np.float32), np.asarray(jax.jit(dense)(x, w.astype(jnp.bfloat16)), np.float32)
    )
    f = lambda d: lambda x, w: jnp.sum(d(x, w).astype(jnp.float32) * g)
    got = jax.jit(jax.grad(f(dense), argnums=(0, 1)))(x, w)
    want = jax.grad(f(lambda x, w: jnp.dot(x, w.astype(x.dtype))), argnums=(0, 1))(x, w)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.02, atol=0.1)


def test_bf16_layer_scan_keeps_no_bf16_kernel_or_carry_stack():
    """bf16 compute over float32 parameters, scanned layers, on CPU: the backward's per-layer stacks
    hold no bf16 copy of a kernel and the carry stacks as float32 (XLA's CPU backend updates a bf16
    [L, ...] stack by converting all of it for every layer; `model.remat=full` keeps the carry alone)."""
    import re

    from flax import nnx

    if jax.default_backend() != "cpu":
        return
    L, B, T, D, F = 3, 2, 16, 32, 64
    cfg = dec.DecoderConfig(
        vocab_size=64,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        dtype="bfloat16",
        param_dtype="float32",
    )
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.ones((B, T), jnp.int32)

    def f(state):
        return jnp.sum(nnx.merge(graphdef, state).hidden_states(ids).astype(jnp.float32))

    hlo = jax.jit(jax.grad(f)).lower(state).compile().as_text()
    stacks = set(re.findall(r"(bf16|f32)\[(" + str(L) + r",[0-9,]+)\]", hlo))
    for shape in (f"{L},{D},{F}", f"{L},{F},{D}", f"{L},{D},{D}"):
        assert ("bf16", shape) not in stacks, (shape, sorted(stacks))
    assert ("f32", f"{L},{B},{T},{D}") in stacks, sorted(stacks)  # the carry
    # the values: the same gradient as the unscanned (unrolled) stack, which stacks nothing
    unrolled = dec.Decoder(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0))
    g_un, s_un = nnx.split(unrolled)
    want = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(g_un, s).hidden_states(ids).astype(jnp.float32))))(
        s_un
    )
    got = jax.jit(jax.grad(f))(state)
    pairs = [
        (np.asarray(a, np.float32), np.asarray(b, np.float32))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ]
    scale = max(np.linalg.norm(b) for _, b in pairs)  # bf16 rounding: relative to the largest gradient
    for a, b in pairs:
        assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(b) + 1e-3 * scale, (
            a.shape,
            np.linalg.norm(a - b),
        )
