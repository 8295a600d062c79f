"""DPO loss family vs direct NumPy transcriptions of TRL's formulas; chunked log-probs vs log_softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignx_jax import config_schema, losses
from alignx_jax.train.step import loss_options


def _loss_section(**kw):
    """The schema's `loss` section with `kw` set (what `train.step.loss_options` reads)."""
    c = config_schema.default_config().loss
    c.update(kw)
    return c


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
    got, _ = losses.preference_loss("robust", *map(jnp.asarray, logps), beta=beta, label_smoothing=ls)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    if ls:  # robust differs from cDPO once there is smoothing
        cdpo, _ = losses.preference_loss("cdpo", *map(jnp.asarray, logps), beta=beta, label_smoothing=ls)
        assert not np.allclose(np.asarray(got), np.asarray(cdpo))


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
    got, _ = losses.preference_loss(
        "ipo",
        *map(jnp.asarray, logps),
        beta=beta,
        chosen_tokens=jnp.asarray(nc),
        rejected_tokens=jnp.asarray(nr),
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        losses.preference_loss("ipo", *map(jnp.asarray, logps), beta=beta)


@pytest.mark.parametrize("norm", ["length", "sum"])
def test_sft_term_added(logps, norm):
    pc = logps[0]
    n = np.full(16, 7.0)
    base, _ = losses.preference_loss("sigmoid", *map(jnp.asarray, logps), beta=0.1)
    got, _ = losses.preference_loss(
        "sigmoid",
        *map(jnp.asarray, logps),
        beta=0.1,
        sft_weight=0.5,
        sft_norm=norm,
        chosen_tokens=jnp.asarray(n),
    )
    nll = -pc / n if norm == "length" else -pc
    np.testing.assert_allclose(np.asarray(got) - np.asarray(base), 0.5 * nll, rtol=1e-5)
    # the mean per token needs the token counts: without them it is an error, not the summed NLL
    no_tokens = lambda: losses.preference_loss(
        "sigmoid", *map(jnp.asarray, logps), beta=0.1, sft_weight=0.5, sft_norm=norm
    )
    if norm == "length":
        with pytest.raises(ValueError, match="sft_norm='length' needs chosen_tokens"):
            no_tokens()
    else:
        np.testing.assert_allclose(np.asarray(no_tokens()[0]) - np.asarray(base), 0.5 * nll, rtol=1e-5)


def test_metric_sums_masked(logps):
    pc, pr, rc, rr = logps
    mask = np.ones(16)
    mask[-3:] = 0
    beta = 0.1
    per, sums = losses.preference_loss(
        "sigmoid", *map(jnp.asarray, logps), beta=beta, pair_mask=jnp.asarray(mask)
    )
    keep = mask == 1
    # the per-pair loss is unmasked; the mask weighs the metric sums (and the step's mean)
    np.testing.assert_allclose(np.asarray(per), -_np_logsig(beta * _h(*logps)), rtol=1e-5)
    assert float(sums["pairs"]) == keep.sum()
    m = {k: float(v) / keep.sum() for k, v in sums.items()}  # the step's means over real pairs
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(m["reward_accuracy"], np.mean((cr > rj)[keep]), rtol=1e-6)
    np.testing.assert_allclose(m["margin"], np.mean((cr - rj)[keep]), rtol=1e-5)
    np.testing.assert_allclose(m["rewards_chosen"], np.mean(cr[keep]), rtol=1e-5)
    np.testing.assert_allclose(m["logps_rejected"], np.mean(pr[keep]), rtol=1e-5)


def test_equal_policy_and_reference_is_log2():
    x = jnp.asarray([-3.0, -10.0, -1.5])
    y = jnp.asarray([-4.0, -2.0, -7.0])
    per, sums = losses.preference_loss("sigmoid", x, y, x, y, beta=0.1)
    np.testing.assert_allclose(np.asarray(per), np.log(2.0), atol=1e-6)
    assert float(sums["reward_accuracy"]) == 0.0  # ties are not correct: strictly greater


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


# ----------------------------------------------------------------------------- the loss menu


def _np_mean(summed, n):
    return summed / np.maximum(n, 1.0)


def _np_log1m_exp(x):
    return np.log(-np.expm1(x))  # float64: accurate for every x < 0


def _np_orpo(pc, pr, nc, nr, beta, clip=-1e-6):
    mc, mr = np.minimum(_np_mean(pc, nc), clip), np.minimum(_np_mean(pr, nr), clip)
    odds = (mc - _np_log1m_exp(mc)) - (mr - _np_log1m_exp(mr))
    return -_np_mean(pc, nc) - beta * _np_logsig(odds)


def _np_simpo(pc, pr, nc, nr, beta, ratio, ls=0.0):
    z = beta * _np_mean(pc, nc) - beta * _np_mean(pr, nr) - ratio * beta
    return -(1 - ls) * _np_logsig(z) - ls * _np_logsig(-z)


@pytest.fixture
def extreme():
    """Summed log-probs and token counts: ordinary, per-token means near 0, very negative ones."""
    rng = np.random.default_rng(1)
    nc = rng.integers(1, 400, size=24).astype(np.float64)
    nr = rng.integers(1, 400, size=24).astype(np.float64)
    mean_c = -np.exp(rng.uniform(-11, 3, size=24))  # per-token means from -2e-5 to -20
    mean_r = -np.exp(rng.uniform(-11, 3, size=24))
    mean_c[:3] = [-1e-5, -3e-4, -25.0]
    mean_r[:3] = [-40.0, -2e-5, -1e-3]
    pc, pr = mean_c * nc, mean_r * nr
    rc, rr = pc + rng.normal(0, 5, 24), pr + rng.normal(0, 5, 24)
    # float32-representable, so NumPy (float64) and JAX (float32) see the same numbers; summed
    # log-probs reach -8000, where float32 differences carry ~5e-4 absolute error: hence rtol 1e-4
    # below wherever a loss is built from differences of summed log-probs
    return tuple(a.astype(np.float32).astype(np.float64) for a in (pc, pr, rc, rr, nc, nr))


def _finite_grads(fn, *args):
    grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args))))(*args)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def test_log1m_exp_matches_numpy_and_has_finite_gradient():
    x = np.array([-1e-7, -1e-5, -0.3, -np.log(2.0), -0.9, -5.0, -40.0, -800.0])
    got = losses.log1m_exp(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), _np_log1m_exp(x), rtol=2e-6, atol=1e-12)
    g = jax.grad(lambda v: jnp.sum(losses.log1m_exp(v)))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(g), -np.exp(x) / -np.expm1(x), rtol=1e-4)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_numpy(extreme, beta):
    pc, pr, _, _, nc, nr = extreme
    args = [jnp.asarray(a, jnp.float32) for a in (pc, pr, nc, nr)]
    got = losses.orpo_loss(*args, beta)
    np.testing.assert_allclose(np.asarray(got), _np_orpo(pc, pr, nc, nr, beta), rtol=2e-5, atol=1e-5)
    _finite_grads(lambda a, b: losses.orpo_loss(a, b, args[2], args[3], beta), args[0], args[1])


def test_orpo_hand_computed_pair():
    # chosen: log-prob -2 over 4 tokens -> m = -0.5; rejected: -6 over 3 tokens -> m = -2; lambda 0.1
    # log(1 - e^-0.5) = -0.93275213, log odds(y_w) = -0.5 + 0.93275213 = 0.43275213
    # log(1 - e^-2)   = -0.14541346, log odds(y_l) = -2 + 0.14541346 = -1.85458654
    # ratio 2.28733867, log s(2.28733867) = -0.09670586
    # loss = NLL 0.5 + 0.1 * 0.09670586 = 0.50967059
    got = losses.orpo_loss(
        jnp.asarray([-2.0]), jnp.asarray([-6.0]), jnp.asarray([4.0]), jnp.asarray([3.0]), 0.1
    )
    np.testing.assert_allclose(float(got[0]), 0.50967059, atol=1e-6)
    ratio = losses.orpo_log_odds_ratio(
        jnp.asarray([-2.0]), jnp.asarray([-6.0]), jnp.asarray([4.0]), jnp.asarray([3.0])
    )
    np.testing.assert_allclose(float(ratio[0]), 2.28733867, atol=1e-6)


def test_orpo_certain_or_empty_response_stays_finite():
    # mean log-prob exactly 0 (a saturated softmax) or no scored token: clipped, no inf/NaN
    pc, pr = jnp.asarray([0.0, 0.0, -3.0]), jnp.asarray([-5.0, 0.0, 0.0])
    nc, nr = jnp.asarray([7.0, 0.0, 2.0]), jnp.asarray([5.0, 0.0, 0.0])
    got = losses.orpo_loss(pc, pr, nc, nr, 0.1)
    want = _np_orpo(*(np.asarray(a, np.float64) for a in (pc, pr, nc, nr)), 0.1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    _finite_grads(lambda a, b: losses.orpo_loss(a, b, nc, nr, 0.1), pc, pr)


@pytest.mark.parametrize(("beta", "ratio", "ls"), [(2.0, 0.25, 0.0), (2.5, 0.5, 0.1)])
def test_simpo_matches_numpy(extreme, beta, ratio, ls):
    pc, pr, _, _, nc, nr = extreme
    args = [jnp.asarray(a, jnp.float32) for a in (pc, pr, nc, nr)]
    got = losses.simpo_loss(*args, beta, ratio, ls)
    np.testing.assert_allclose(
        np.asarray(got), _np_simpo(pc, pr, nc, nr, beta, ratio, ls), rtol=2e-5, atol=1e-5
    )
    _finite_grads(lambda a, b: losses.simpo_loss(a, b, args[2], args[3], beta, ratio, ls), args[0], args[1])
    # equal responses: loss = -log s(-gamma) = log(1 + e^gamma)
    x, n = jnp.asarray([-12.0]), jnp.asarray([6.0])
    np.testing.assert_allclose(
        float(losses.simpo_loss(x, x, n, n, 2.0, 0.25)[0]), np.log1p(np.exp(0.5)), rtol=1e-6
    )


def test_reference_free_dpo(extreme):
    pc, pr, rc, rr, _, _ = extreme
    beta = 0.1
    want = -0.9 * _np_logsig(beta * (pc - pr)) - 0.1 * _np_logsig(-beta * (pc - pr))
    got = losses.sigmoid_loss(jnp.asarray(pc), jnp.asarray(pr), None, None, beta, 0.1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    _finite_grads(lambda a, b: losses.sigmoid_loss(a, b, None, None, beta), jnp.asarray(pc), jnp.asarray(pr))
    # the dispatch with reference='none' ignores the reference log-probs it is given
    per, sums = losses.preference_loss(
        "sigmoid", *map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, label_smoothing=0.1, reference="none"
    )
    np.testing.assert_allclose(np.asarray(per), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(sums["rewards_chosen"]), beta * pc.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["margin"]), beta * (pc - pr).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["rewards_rejected"]), beta * pr.sum(), rtol=1e-5)
    # the same from a config section: its reference 'none' is the dispatch's
    cfg = _loss_section(beta=beta, label_smoothing=0.1, reference="none")
    per, _ = losses.preference_loss("sigmoid", *map(jnp.asarray, (pc, pr, rc, rr)), **loss_options(cfg))
    np.testing.assert_allclose(np.asarray(per), want, rtol=1e-5, atol=1e-6)


def test_ipo_sum_and_ipo_mean(extreme):
    pc, pr, rc, rr, nc, nr = extreme
    beta = 0.1
    j = [jnp.asarray(a) for a in (pc, pr, rc, rr)]
    want_sum = (((pc - pr) - (rc - rr)) - 1 / (2 * beta)) ** 2
    got, _ = losses.preference_loss("ipo_sum", *j, beta=beta)
    np.testing.assert_allclose(np.asarray(got), want_sum, rtol=1e-4, atol=1e-4)
    want_mean = ((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * beta)) ** 2
    got, sums = losses.preference_loss(
        "ipo", *j, beta=beta, chosen_tokens=jnp.asarray(nc), rejected_tokens=jnp.asarray(nr)
    )
    np.testing.assert_allclose(np.asarray(got), want_mean, rtol=1e-5, atol=1e-5)
    # TRL reports IPO's rewards on the averaged log-probs it compares
    np.testing.assert_allclose(float(sums["rewards_chosen"]), beta * np.sum((pc - rc) / nc), rtol=1e-5)
    for kind in ("ipo", "ipo_sum"):
        _finite_grads(
            lambda a, b, c, d, kind=kind: losses.preference_loss(
                kind, a, b, c, d, beta=beta, chosen_tokens=jnp.asarray(nc), rejected_tokens=jnp.asarray(nr)
            )[0],
            *j,
        )


def _np_rewards(kind, pc, pr, rc, rr, nc, nr, beta, reference):
    if kind in ("orpo", "simpo") or reference == "none":
        rc = rr = np.zeros_like(pc)
    if kind in ("ipo", "orpo", "simpo"):
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    return beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("kind", losses.PREFERENCE_LOSS_TYPES)
@pytest.mark.parametrize("reference", ["policy_ref", "none"])
def test_preference_loss_dispatch(extreme, kind, reference):
    pc, pr, rc, rr, nc, nr = extreme
    beta, ls, ratio = 0.3, 0.1, 0.4
    mask = np.ones(24)
    mask[-5:] = 0
    per, sums = losses.preference_loss(
        kind,
        *map(jnp.asarray, (pc, pr, rc, rr)),
        beta=beta,
        label_smoothing=ls,
        gamma_beta_ratio=ratio,
        chosen_tokens=jnp.asarray(nc),
        rejected_tokens=jnp.asarray(nr),
        reference=reference,
        pair_mask=jnp.asarray(mask),
    )
    r0 = np.zeros_like(pc) if reference == "none" else None
    h = (pc - pr) - ((rc - rr) if r0 is None else 0.0)
    hm = (pc / nc - pr / nr) - ((rc / nc - rr / nr) if r0 is None else 0.0)
    z = beta * h
    want = {
        "sigmoid": -(1 - ls) * _np_logsig(z) - ls * _np_logsig(-z),
        "cdpo": -(1 - ls) * _np_logsig(z) - ls * _np_logsig(-z),
        "robust": (-(1 - ls) * _np_logsig(z) + ls * _np_logsig(-z)) / (1 - 2 * ls),
        "hinge": np.maximum(0.0, 1 - z),
        "ipo": (hm - 1 / (2 * beta)) ** 2,
        "ipo_sum": (h - 1 / (2 * beta)) ** 2,
        "orpo": _np_orpo(pc, pr, nc, nr, beta),
        "simpo": _np_simpo(pc, pr, nc, nr, beta, ratio, ls),
    }[kind]
    np.testing.assert_allclose(np.asarray(per), want, rtol=1e-4, atol=1e-4)
    cr, rj = _np_rewards(kind, pc, pr, rc, rr, nc, nr, beta, reference)
    keep = mask == 1
    assert float(sums["pairs"]) == keep.sum()
    np.testing.assert_allclose(float(sums["rewards_chosen"]), cr[keep].sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(sums["rewards_rejected"]), rj[keep].sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(sums["margin"]), (cr - rj)[keep].sum(), rtol=1e-5, atol=1e-4)
    assert float(sums["reward_accuracy"]) == np.sum((cr > rj)[keep])
    np.testing.assert_allclose(float(sums["logps_chosen"]), pc[keep].sum(), rtol=1e-5)
    # a config section's options (`train.step.loss_options`, as the step passes them) give the same;
    # the config's reference 'on_the_fly' is the dispatch's 'policy_ref'
    cfg = _loss_section(
        type=kind,
        beta=beta,
        label_smoothing=ls,
        gamma_beta_ratio=ratio,
        reference="none" if reference == "none" else "on_the_fly",
    )
    per_cfg, sums_cfg = losses.preference_loss(
        kind,
        *map(jnp.asarray, (pc, pr, rc, rr)),
        chosen_tokens=jnp.asarray(nc),
        rejected_tokens=jnp.asarray(nr),
        pair_mask=jnp.asarray(mask),
        **loss_options(cfg),
    )
    np.testing.assert_allclose(np.asarray(per_cfg), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(sums_cfg["margin"]), (cr - rj)[keep].sum(), rtol=1e-5, atol=1e-4)


def test_preference_loss_input_checks():
    x = jnp.asarray([-3.0, -4.0])
    for kind in ("ipo", "orpo", "simpo"):
        with pytest.raises(ValueError, match="needs chosen_tokens"):
            losses.preference_loss(kind, x, x, x, x)
    with pytest.raises(ValueError, match="needs ref_chosen"):
        losses.preference_loss("sigmoid", x, x)
    with pytest.raises(ValueError, match="unknown reference"):
        losses.preference_loss("sigmoid", x, x, reference="precomputed")
    with pytest.raises(ValueError, match="unknown loss.type"):
        losses.preference_loss("kto", x, x, x, x)
    # reference-free kinds need no reference; beta defaults per kind (SimPO 2.0)
    n = jnp.asarray([2.0, 2.0])
    per, _ = losses.preference_loss("simpo", x, x - 2.0, chosen_tokens=n, rejected_tokens=n)
    np.testing.assert_allclose(np.asarray(per), np.log1p(np.exp(-(2.0 * 1.0 - 0.5))), rtol=1e-6)
