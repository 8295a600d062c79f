"""Token compaction (`data.compact_tokens`): the host's index maps, the gathers' custom VJPs, and the
decoder / train step giving the same numbers with the token-wise layers on real tokens only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignx_jax import train
from alignx_jax.data import batching
from alignx_jax.models import compaction
from alignx_jax.models.decoder import Decoder, DecoderConfig
from tests.test_train import _batch, _loss_cfg, _setup, _shared_prompt_batches


def _mask(M=2, rows=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    m = np.zeros((M, rows, T), np.int32)
    for i in range(M):
        for r in range(rows):
            n = int(rng.integers(1, T + 1))
            if r % 2:
                m[i, r, :n] = 1  # right padding
            else:
                m[i, r, T - n :] = 1  # left padding
    return m


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_compact_index_is_a_bijection_keeping_every_real_token(groups):
    m = _mask()
    M, rows, T = m.shape
    out = batching.compact_index(m, groups)
    idx, slot = out["token_index"], out["token_slot"]
    R = rows // groups * T
    N = idx.shape[-1]
    assert idx.shape == (M, groups, N) and slot.shape == (M, groups, R)
    real = m.reshape(M, groups, R) > 0
    assert real.sum(-1).max() <= N and (N == R or N % 8 == 0)
    for i in range(M):
        for g in range(groups):
            r = np.flatnonzero(real[i, g])
            np.testing.assert_array_equal(idx[i, g, : len(r)], r)  # real tokens first, in order
            assert len(set(idx[i, g].tolist())) == N  # distinct positions
            np.testing.assert_array_equal(slot[i, g, idx[i, g]], np.arange(N))  # slot is the inverse
            unkept = np.setdiff1d(np.arange(R), idx[i, g])
            assert (slot[i, g, unkept] == N).all()


def test_kept_tokens_rounds_up_to_steps_of_the_group_and_errors_name_the_problem():
    m = np.zeros((1, 4, 128), np.int32)  # R = 512 per group
    m[0, :, :100] = 1  # 400 real tokens
    assert batching.kept_tokens(m, 1) == 448  # the default 8 steps of 64
    assert batching.kept_tokens(m, 1, 16) == 416  # steps of 32
    assert batching.kept_tokens(m, 2, 16) == 208  # R = 256: steps of 16
    assert batching.kept_tokens(m, 1, 1) == 512  # one size: no saving
    m[0, :, :] = 1
    assert batching.kept_tokens(m, 1) == 512
    with pytest.raises(ValueError, match="more than the 100 kept"):
        batching.compact_index(m, 1, kept=100)
    with pytest.raises(ValueError, match="do not split into 3"):
        batching.compact_index(m, 3)


def test_compact_and_expand_are_each_others_transpose():
    m = _mask(M=1, rows=4, T=16, seed=3)[0][None]
    out = batching.compact_index(m, 2)
    idx, slot = jnp.asarray(out["token_index"][0]), jnp.asarray(out["token_slot"][0])
    G, N = idx.shape
    R = slot.shape[1]
    kx, ky, kgx, kgy = jax.random.split(jax.random.key(0), 4)
    x, gx = jax.random.normal(kx, (G, R, 5)), jax.random.normal(kgx, (G, N, 5))
    y, gy = jax.random.normal(ky, (G, N, 5)), jax.random.normal(kgy, (G, R, 5))

    def compact_ref(x):  # plain autodiff through a gather
        return jnp.take_along_axis(x, idx[..., None], axis=1)

    def expand_ref(y):  # plain autodiff through a scatter into zeros
        return jax.vmap(lambda z, i, v: z.at[i].set(v))(jnp.zeros((G, R, 5)), idx, y)

    for fn, ref, a, g in ((compaction.compact, compact_ref, x, gx), (compaction.expand, expand_ref, y, gy)):
        got, vjp = jax.vjp(lambda a: fn(a, idx, slot), a)  # noqa: B023 (called at once)
        want, vjp_ref = jax.vjp(ref, a)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]), rtol=0, atol=1e-7)


def _model(**kw):
    cfg = DecoderConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **kw,
    )
    return Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw", [{}, {"remat": "full"}, {"scan_layers": False, "qkv_bias": True}])
@pytest.mark.parametrize("groups", [1, 2])
def test_decoder_hidden_states_and_grads_match_with_left_and_right_padding(kw, groups):
    model = _model(**kw)
    m = np.zeros((4, 32), np.int32)  # rows 0, 2 left-padded, 1, 3 right-padded: 64 of 128 real
    for r, n in enumerate((5, 20, 9, 30)):
        m[r, :n] = 1 if r % 2 else 0
        m[r, 32 - n :] = 0 if r % 2 else 1
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 97, m.shape), jnp.int32)
    mask = jnp.asarray(m)
    out = batching.compact_index(m[None], groups)
    layout = compaction.TokenLayout(jnp.asarray(out["token_index"][0]), jnp.asarray(out["token_slot"][0]))
    w = jax.random.normal(jax.random.key(2), (*m.shape, 32)) * mask[..., None]  # loss on real tokens

    def loss(model, tokens):
        h = model.hidden_states(ids, mask, tokens=tokens)
        return jnp.sum(h * w), h

    (lp, hp), gp = nnx.value_and_grad(loss, has_aux=True)(model, None)
    (lc, hc), gc = nnx.value_and_grad(loss, has_aux=True)(model, layout)
    real = np.asarray(m, bool)
    np.testing.assert_allclose(np.asarray(hc)[real], np.asarray(hp)[real], rtol=1e-5, atol=1e-5)
    not_kept = (out["token_slot"][0] == out["token_index"].shape[-1]).reshape(m.shape)
    assert not_kept.any() and (np.asarray(hc)[not_kept] == 0).all()  # positions not kept read zero
    np.testing.assert_allclose(float(lc), float(lp), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(gp)), jax.tree.leaves(nnx.state(gc))):
        a, b = np.asarray(a), np.asarray(b)  # float32 summation-order noise, relative to the leaf's scale
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def test_decoder_compaction_refuses_a_kv_cache():
    model = _model()
    cache = model.init_cache(1, 8)
    layout = compaction.TokenLayout(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="compaction and a KV cache"):
        model._forward(jnp.ones((1, 8), jnp.int32), None, None, None, cache, layout=layout)


@pytest.mark.parametrize("layout", ["two_rows", "shared", "packed"])
def test_train_step_with_compaction_equals_the_plain_step(layout):
    codec, params, ref, tx = _setup()
    step = jax.jit(train.make_train_step(codec, tx, _loss_cfg(sft_weight=0.5), precomputed=False))
    if layout == "two_rows":
        batch = _batch(B=4, T=24, seed=21, dummies=1)
    else:
        _, batch = _shared_prompt_batches(B=8 if layout == "packed" else 4, dummies=1, seed=22)
        if layout == "packed":
            batch = batching.pack_pairs(batch, groups=2, length=48, pad_id=0)
    o = tx.init(params)
    params, o, _ = step(params, o, ref, train.to_microbatches(_batch(B=4, T=24, seed=20), 2))  # policy != ref
    plain = train.to_microbatches(batch, 2, window=0 if layout == "two_rows" else None)
    compact = train.add_token_layout(plain, 2 if layout == "two_rows" else 1)
    assert compact.layout == plain.layout == {"shared": "shared_prompt"}.get(layout, layout)
    assert compact.tokens is not None and plain.tokens is None
    kept = compact.tokens.token_index
    assert kept.shape[-1] * kept.shape[-2] < train.token_mask(plain)[0].size
    pa, _, ma = step(params, o, ref, plain)
    pb, _, mb = step(params, o, ref, compact)
    for k in ("loss", "rewards/margins", "grad_norm", "logps/chosen", "logps/rejected", "logits/chosen"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-4, atol=1e-5)
    # Adam's first updates are ~lr * sign(g): summation-order noise shows on near-zero gradients
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-4)


def test_to_microbatches_tokens_option_and_full_rows_keep_the_plain_layout():
    b = _batch(B=4, T=24, seed=5)
    out = train.to_microbatches(b, 2, tokens=(2, 0))
    M, rows, T = train.token_mask(out).shape
    assert out.tokens.token_index.shape[:2] == (2, 2) and out.tokens.token_slot.shape == (2, 2, rows // 2 * T)
    full = dict(b, attention_mask=np.ones_like(b["attention_mask"]))
    assert train.to_microbatches(full, 2, tokens=(2, 0)).tokens is None  # nothing to skip
