"""DPO loss family vs direct NumPy transcriptions of TRL's formulas; chunked log-probs vs log_softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignx_jax import losses


def _np_logsig(x):
    return -np.logaddexp(0.0, -x)


@pytest.fixture
def logps():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 8, size=16).astype(np.float64) for _ in range(4))
    return pc, pr, rc, rr


def _h(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_sigmoid_and_cdpo(logps, beta, ls):
    pc, pr, rc, rr = logps
    want = -(1 - ls) * _np_logsig(beta * _h(*logps)) - ls * _np_logsig(-beta * _h(*logps))
    got = losses.sigmoid_loss(*map(jnp.asarray, logps), beta, ls)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_robust(logps, ls):
    beta = 0.1
    z = beta * _h(*logps)
    want = (-(1 - ls) * _np_logsig(z) + ls * _np_logsig(-z)) / (1 - 2 * ls)
    got = losses.robust_loss(*map(jnp.asarray, logps), beta, ls)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    if ls:  # robust differs from cDPO once there is smoothing
        assert not np.allclose(
            np.asarray(got), np.asarray(losses.sigmoid_loss(*map(jnp.asarray, logps), beta, ls))
        )


def test_hinge(logps):
    beta = 0.1
    want = np.maximum(0.0, 1 - beta * _h(*logps))
    got = losses.hinge_loss(*map(jnp.asarray, logps), beta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert (want == 0).any() and (want > 0).any()  # both branches exercised


def test_ipo_length_averaged(logps):
    beta = 0.1
    nc = np.arange(1, 17, dtype=np.float64) * 3
    nr = np.arange(16, 0, -1, dtype=np.float64) * 2
    pc, pr, rc, rr = logps
    want = ((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * beta)) ** 2
    got = losses.dpo_per_pair(
        *map(jnp.asarray, logps),
        {"type": "ipo", "beta": beta},
        chosen_tokens=jnp.asarray(nc),
        rejected_tokens=jnp.asarray(nr),
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        losses.dpo_per_pair(*map(jnp.asarray, logps), {"type": "ipo", "beta": beta})


@pytest.mark.parametrize("norm", ["length", "sum"])
def test_sft_term_added(logps, norm):
    pc = logps[0]
    n = np.full(16, 7.0)
    base = losses.dpo_per_pair(*map(jnp.asarray, logps), {"type": "sigmoid", "beta": 0.1})
    got = losses.dpo_per_pair(
        *map(jnp.asarray, logps),
        {"type": "sigmoid", "beta": 0.1, "sft_weight": 0.5, "sft_norm": norm},
        chosen_tokens=jnp.asarray(n),
    )
    nll = -pc / n if norm == "length" else -pc
    np.testing.assert_allclose(np.asarray(got) - np.asarray(base), 0.5 * nll, rtol=1e-5)


def test_dpo_loss_metrics_masked(logps):
    pc, pr, rc, rr = logps
    mask = np.ones(16)
    mask[-3:] = 0
    beta = 0.1
    loss, m = losses.dpo_loss(
        *map(jnp.asarray, logps), {"type": "sigmoid", "beta": beta}, pair_mask=jnp.asarray(mask)
    )
    keep = mask == 1
    want = np.mean(-_np_logsig(beta * _h(*logps))[keep])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(float(m["reward_accuracy"]), np.mean((cr > rj)[keep]), rtol=1e-6)
    np.testing.assert_allclose(float(m["margin"]), np.mean((cr - rj)[keep]), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards_chosen"]), np.mean(cr[keep]), rtol=1e-5)
    np.testing.assert_allclose(float(m["logps_rejected"]), np.mean(pr[keep]), rtol=1e-5)


def test_equal_policy_and_reference_is_log2():
    x = jnp.asarray([-3.0, -10.0, -1.5])
    y = jnp.asarray([-4.0, -2.0, -7.0])
    loss, m = losses.dpo_loss(x, y, x, y, {"type": "sigmoid", "beta": 0.1})
    np.testing.assert_allclose(float(loss), np.log(2.0), atol=1e-6)
    assert float(m["reward_accuracy"]) == 0.0  # ties are not correct: strictly greater


def test_unknown_loss_type():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="unknown loss.type"):
        losses.dpo_per_pair(x, x, x, x, {"type": "kto"})


def _rand_problem(seed=0, b=3, t=13, d=8, v=37):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    h = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (d, v))
    ids = jax.random.randint(k[2], (b, t), 0, v)
    mask = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.int32)
    return h, w, ids, mask


@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 12, 64])
def test_sequence_logps_matches_log_softmax(chunk):
    h, w, ids, mask = _rand_problem()
    want = losses.token_logps_from_logits(h @ w, ids, mask)
    # direct NumPy transcription too, so the reference itself is checked
    lg = np.asarray(h @ w, np.float64)
    lp = (
        lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    )
    ids_np, m_np = np.asarray(ids), np.asarray(mask)
    ref = np.array(
        [
            sum(lp[b, t - 1, ids_np[b, t]] * m_np[b, t] for t in range(1, ids.shape[1]))
            for b in range(ids.shape[0])
        ]
    )
    np.testing.assert_allclose(np.asarray(want), ref, rtol=1e-5, atol=1e-4)
    got = losses.sequence_logps(h, w, ids, mask, chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)


def test_sequence_logps_gradients_match_reference():
    h, w, ids, mask = _rand_problem(1)

    def f_ref(h, w):
        return jnp.sum(losses.token_logps_from_logits(h @ w, ids, mask) * jnp.arange(1.0, 4.0))

    def f_chunk(h, w):
        return jnp.sum(losses.sequence_logps(h, w, ids, mask, chunk=5) * jnp.arange(1.0, 4.0))

    g_ref = jax.grad(f_ref, argnums=(0, 1))(h, w)
    g_got = jax.jit(jax.grad(f_chunk, argnums=(0, 1)))(h, w)
    for a, b in zip(g_ref, g_got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_sequence_logps_bf16_hidden_accumulates_in_f32():
    h, w, ids, mask = _rand_problem(2)
    got = losses.sequence_logps(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), ids, mask, chunk=4)
    assert got.dtype == jnp.float32
    want = losses.token_logps_from_logits(h @ w, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=5e-2, atol=0.5)


def _response_masks(b=4, t=40, seed=0):
    """Right-padded DPO-like rows: prompt, a contiguous response, padding; one row scores nothing."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, t), np.int32)
    for r in range(b - 1):
        start = int(rng.integers(1, t - 4))
        mask[r, start : start + int(rng.integers(1, t - start))] = 1
    mask[-1, -1] = 1  # a response that ends on the last position
    return mask


@pytest.mark.parametrize("chunk", [None, 3])
def test_window_logps_equals_full_sequence(chunk):
    h, w, ids, _ = _rand_problem(3, b=4, t=40)
    mask = _response_masks()
    idx = losses.scored_window(mask)
    R = idx.shape[-1]
    span = max(int(np.flatnonzero(m).max() - np.flatnonzero(m).min() + 1) for m in mask if m.any())
    T = ids.shape[1]
    step = 8 * -(-(-(-(T - 1) // 8)) // 8)  # noqa: B002 (ceiling division) T/8 rounded up to a multiple of 8
    assert span <= R and R in (max(16, step * -(-span // step)), T - 1)
    want = losses.sequence_logps(h, w, ids, jnp.asarray(mask))
    got = losses.window_logps(h, w, ids, jnp.asarray(mask), jnp.asarray(idx), chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    # gradients too: the window's gather must route them to the same positions
    g_full = jax.grad(
        lambda h: jnp.sum(losses.sequence_logps(h, w, ids, jnp.asarray(mask)) * jnp.arange(1.0, 5.0))
    )(h)
    g_win = jax.grad(
        lambda h: jnp.sum(
            losses.window_logps(h, w, ids, jnp.asarray(mask), jnp.asarray(idx)) * jnp.arange(1.0, 5.0)
        )
    )(h)
    np.testing.assert_allclose(np.asarray(g_win), np.asarray(g_full), rtol=1e-5, atol=1e-5)


def test_scored_window_shape_and_rows_without_scores():
    mask = np.zeros((2, 3, 100), np.int32)
    mask[0, 0, 10:30] = 1  # span 20 -> window 32
    idx = losses.scored_window(mask)
    assert idx.shape == (2, 3, 32)
    assert idx[0, 0, 0] == 9 and idx[0, 0, -1] == 9 + 31
    assert (idx[1, 2] == np.arange(32)).all()  # no scored token: a harmless window at 0
    assert losses.scored_window(np.ones((1, 8), np.int32)).shape == (1, 7)  # never past T-1
    # R in eighths of the row: a 3/4-row response at T=512 computes 384 positions, not 511
    m512 = np.zeros((1, 512), np.int32)
    m512[0, 128:] = 1
    assert losses.scored_window(m512).shape == (1, 384)
    assert (
        len(
            {
                losses.scored_window(m512[:, :k] * 0 + np.eye(1, k, k - s, dtype=np.int32).cumsum(-1)).shape[
                    -1
                ]
                for k in (512,)
                for s in range(1, 511)
            }
        )
        <= 8
    )
