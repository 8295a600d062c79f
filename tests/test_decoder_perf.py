"""The decoder's fast attention path: additive mask bias and the recomputing custom VJP agree with
plain autodiff of the textbook masked softmax, fully masked (left-pad) query rows included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
    np.testing.assert_allclose(dec._attention_xla(q, k, v, allowed, 0.35), want, atol=1e-5)
    np.testing.assert_allclose(dec._attention_xla(q, k, v, dec.mask_bias(allowed), 0.35), want, atol=1e-5)
    # fully masked query rows get uniform weights (no NaN), as the where-based softmax does
    assert bool(jnp.all(jnp.isfinite(want)))


def test_custom_vjp_matches_autodiff():
    q, k, v, w, allowed = _inputs()

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, allowed, 0.35)) * w)

    got = jax.jit(jax.grad(loss(dec._attention_xla), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)
        assert float(jnp.max(jnp.abs(g))) > 1e-3  # not trivially zero


def test_layer_scan_saves_no_attention_probabilities():
    """The scanned step keeps no [L, B, K, G, T, S] residual (the probabilities are recomputed)."""
    from flax import nnx

    T = 32
    cfg = dec.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.ones((2, T), jnp.int32)

    def f(state):
        return jnp.sum(nnx.merge(graphdef, state).hidden_states(ids))

    hlo = jax.jit(jax.grad(f)).lower(state).as_text()
    assert f"3x2x2x2x{T}x{T}x" not in hlo and f"3x2x4x{T}x{T}x" not in hlo
