"""Sequence log-probabilities and the DPO loss family.

`sequence_logps` scores only target tokens from the final hidden states and the output embedding,
chunked over time so the full `[B, T, V]` float32 log-softmax is never materialised (at V=128k and
T=8192 that tensor alone is 4 GiB per sequence). The DPO variants follow TRL's definitions
(`DPOTrainer.dpo_loss`), written from the formulas:

    h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))
    sigmoid (release; cDPO when label_smoothing > 0):
        -(1 - e) log s(beta h) - e log s(-beta h)
    robust (Chowdhury et al. 2024):
        (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2 e)
    hinge:   relu(1 - beta h)
    ipo:     (h - 1 / (2 beta))^2   with length-averaged log-probs (as TRL does for IPO)
    ipo_sum: (h - 1 / (2 beta))^2   with summed log-probs (as OpenRLHF does)

With no reference (`reference='none'`, TRL's `reference_free=True`) the reference log-probs are 0.
Two losses never use a reference; with m(y) = log pi(y) / n_tokens(y) the mean log-prob per token:

    orpo (Hong et al. 2024):   -m(y_w) - beta log s(log odds(y_w) - log odds(y_l)),
                               log odds(y) = m(y) - log(1 - exp(m(y)))
    simpo (Meng et al. 2024):  -log s(beta m(y_w) - beta m(y_l) - gamma),  gamma = gamma_beta_ratio * beta

`preference_loss(kind, ...)` is the single dispatch point (kinds and their inputs: `PREFERENCE_LOSSES`).
Its options are plain keyword arguments: this module reads no config (`train.step.loss_options` turns
the run's `loss` section into them).
The optional SFT term is the NLL of the chosen response, `-log pi(y_w) / n_tokens` ("length", the
default: comparable across lengths) or `-log pi(y_w)` ("sum"), added with weight `sft_weight`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from alignx_jax.models.matmul import dense

# ----------------------------------------------------------------------------- log-probs


def token_logps_from_logits(
    logits_BTV: jax.Array, input_ids_BT: jax.Array, loss_mask_BT: jax.Array
) -> jax.Array:
    """Reference implementation: full float32 log_softmax, shift, gather, masked sum -> `[B]`."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    tgt_BT = input_ids_BT[:, 1:]
    tok_BT = jnp.take_along_axis(logp_BTV, tgt_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(tok_BT * loss_mask_BT[:, 1:].astype(jnp.float32), axis=-1)


def _chunk_logps(
    h_BCD: jax.Array, w_DV: jax.Array, tgt_BC: jax.Array, softcap: float | None = None
) -> jax.Array:
    """log p(tgt | h) for one time chunk; logits in float32 via the matmul's accumulator, soft-capped
    to `softcap * tanh(logits / softcap)` first when `softcap` is given (Gemma 2's final logits)."""
    B, C, D = h_BCD.shape
    logits_BCV = dense(h_BCD.reshape(B * C, D), w_DV, jnp.float32).reshape(B, C, -1)
    if softcap:
        logits_BCV = softcap * jnp.tanh(logits_BCV / softcap)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    tgt_logit_BC = jnp.take_along_axis(logits_BCV, tgt_BC[..., None], axis=-1)[..., 0]
    return tgt_logit_BC - lse_BC


def sequence_logps(
    hidden_BTD: jax.Array,
    out_embed_DV: jax.Array,
    input_ids_BT: jax.Array,
    loss_mask_BT: jax.Array,
    score_index_BR: jax.Array | None = None,
    *,
    chunk: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Sum over scored positions t of log p(input_ids[t] | input_ids[<t]), from hidden[t-1] -> `[B]`.

    `loss_mask_BT[t]` = 1 marks token t as scored (position 0 can never be scored). `chunk` splits
    the predicting positions into pieces of that many steps, each rematerialised in the backward
    pass, so peak memory is `[B, chunk, V]` float32 rather than `[B, T, V]`. `softcap`: the model's
    final logit soft-capping (`Decoder.cfg.final_logit_softcapping`, Gemma 2), applied before the
    log-softmax as `Decoder.cap_logits` does (None: none). The same for every `*_logps` here.

    `score_index_BR` (`window_logps`): compute only at these predicting positions, the same value.
    The output layer is the costly part of a step at a small model or a large vocabulary, and a
    DPO row scores only its response: the prompt's positions never need logits. The window (from
    `scored_window`) must cover every scored token's predicting position; indices past the row's
    end count as unscored.
    """
    with jax.named_scope("sequence_logps" if score_index_BR is None else "window_logps"):
        if score_index_BR is None:
            h_BSD, tgt_BS, mask_BS = hidden_BTD[:, :-1], input_ids_BT[:, 1:], loss_mask_BT[:, 1:]
        else:
            T = hidden_BTD.shape[1]
            idx_BS = score_index_BR.astype(jnp.int32)
            inside_BS = idx_BS < T - 1
            idx_BS = jnp.minimum(idx_BS, T - 2)
            h_BSD = jnp.take_along_axis(hidden_BTD, idx_BS[..., None], axis=1)
            tgt_BS = jnp.take_along_axis(input_ids_BT, idx_BS + 1, axis=1)
            mask_BS = jnp.take_along_axis(loss_mask_BT, idx_BS + 1, axis=1).astype(jnp.float32) * inside_BS
        tok_BS = _masked_tokens(
            h_BSD, out_embed_DV, tgt_BS.astype(jnp.int32), mask_BS.astype(jnp.float32), chunk, softcap
        )
        return jnp.sum(tok_BS, axis=-1)


# `sequence_logps` at the response window `score_index_BR` (its fifth argument, required here)
window_logps = sequence_logps


def flat_logps(
    hidden_NTD: jax.Array,
    out_embed_DV: jax.Array,
    flat_S: jax.Array,
    target_S: jax.Array,
    slot_S: jax.Array,
    valid_S: jax.Array,
    *,
    num_slots: int,
    chunk: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Per-slot sums of log p(target | hidden) over a dense list of S scored tokens -> `[num_slots]`.

    flat_S indexes the rows' tokens flattened to `[N * T]`; slot_S names the sequence each token
    belongs to (`train.flat_scores`: 2 * pair + branch); invalid (padding) entries add nothing.
    The output layer runs on S positions: the batch's scored tokens, not B * 2 * (longest response).
    """
    with jax.named_scope("flat_logps"):
        N, T, D = hidden_NTD.shape
        h_SD = jnp.take(hidden_NTD.reshape(N * T, D), flat_S.astype(jnp.int32), axis=0)
        tok_S = _masked_tokens(
            h_SD[None],
            out_embed_DV,
            target_S.astype(jnp.int32)[None],
            valid_S.astype(jnp.float32)[None],
            chunk,
            softcap,
        )[0]
        return jax.ops.segment_sum(tok_S, slot_S.astype(jnp.int32), num_segments=num_slots)


def _masked_tokens(
    h_BSD: jax.Array,
    out_embed_DV: jax.Array,
    tgt_BS: jax.Array,
    mask_BS: jax.Array,
    chunk: int | None,
    softcap: float | None = None,
) -> jax.Array:
    """Per-token mask * log p(tgt | h) `[B, S]`, optionally in rematerialised chunks of S."""
    s = h_BSD.shape[1]
    if chunk is None:  # a given chunk always rematerialises, even when one chunk covers s
        return _chunk_logps(h_BSD, out_embed_DV, tgt_BS, softcap) * mask_BS
    chunk = min(chunk, s)
    n = -(-s // chunk)
    pad = n * chunk - s
    if pad:  # padded steps carry mask 0, so they add nothing
        h_BSD = jnp.pad(h_BSD, ((0, 0), (0, pad), (0, 0)))
        tgt_BS = jnp.pad(tgt_BS, ((0, 0), (0, pad)))
        mask_BS = jnp.pad(mask_BS, ((0, 0), (0, pad)))
    b, d = h_BSD.shape[0], h_BSD.shape[2]

    @jax.checkpoint  # no per-chunk logits kept for the backward pass
    def body(_, xs):
        h_BCD, tgt_BC, m_BC = xs
        return None, _chunk_logps(h_BCD, out_embed_DV, tgt_BC, softcap) * m_BC

    _, tok_NBC = jax.lax.scan(
        body,
        None,
        (
            h_BSD.reshape(b, n, chunk, d).swapaxes(0, 1),
            tgt_BS.reshape(b, n, chunk).swapaxes(0, 1),
            mask_BS.reshape(b, n, chunk).swapaxes(0, 1),
        ),
    )
    return tok_NBC.swapaxes(0, 1).reshape(b, n * chunk)[:, :s]


def scored_window(loss_mask_BT: Any, minimum: int = 16) -> Any:
    """Host side of `window_logps`: `score_index [..., R]` int32 for a NumPy loss mask `[..., T]`.

    Row b's window starts one before its first scored token (0 for a row with none) and runs R
    steps; R = the longest scored span rounded up to a multiple of T/8 (itself rounded up to a
    multiple of 8; at least `minimum`, at most T-1): at most eight window shapes per row length
    reach the compiler, and a response of 3/4 of the row computes 3/4 of the logits.
    """
    import numpy as np

    m = np.asarray(loss_mask_BT) > 0
    T = m.shape[-1]
    flat = m.reshape(-1, T)
    any_ = flat.any(axis=-1)
    first = np.where(any_, flat.argmax(axis=-1), 1)
    last = np.where(any_, T - 1 - flat[:, ::-1].argmax(axis=-1), 0)
    span = int(np.max(last - first + 1, initial=1))
    eighth = max(1, -(-(T - 1) // 8))  # an eighth of the row, rounded up
    step = 8 * -(-eighth // 8)  # ... to a multiple of 8
    window = max(int(minimum), step * -(-span // step))
    window = max(1, min(window, T - 1))
    start = (first - 1).astype(np.int32).reshape(m.shape[:-1])
    return (start[..., None] + np.arange(window, dtype=np.int32)).astype(np.int32)


# ----------------------------------------------------------------------------- DPO family


def _logits(pc, pr, rc=None, rr=None):
    """h = (pc - pr) - (rc - rr); a missing reference (None) counts as log-probs of 0."""
    h = pc - pr
    if rc is not None or rr is not None:
        h = h - (_zero_if_none(rc, pc) - _zero_if_none(rr, pr))
    return h


def _zero_if_none(x, like):
    return jnp.zeros_like(like) if x is None else x


def _smoothed_log_sigmoid(z, label_smoothing: float, robust: bool = False) -> jax.Array:
    """-(1 - e) log s(z) - e log s(-z) (e the label-flip rate); robust: (-(1 - e) log s(z) +
    e log s(-z)) / (1 - 2 e), unbiased under that flip rate (Chowdhury et al. 2024)."""
    if robust:
        return (
            -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)
        ) / (1.0 - 2.0 * label_smoothing)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def sigmoid_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen=None,
    ref_rejected=None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    robust: bool = False,
) -> jax.Array:
    """DPO (Rafailov et al.); with label_smoothing > 0 it is conservative DPO (cDPO). Per pair `[B]`.

    `ref_chosen = ref_rejected = None` is reference-free DPO (TRL `reference_free=True`): the
    reference log-probs are taken as 0, so h = log pi(y_w) - log pi(y_l). `robust`: robust DPO
    (Chowdhury et al. 2024, unbiased under label-flip rate `label_smoothing` < 0.5) instead of cDPO.
    """
    z = beta * _logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return _smoothed_log_sigmoid(z, label_smoothing, robust)


def hinge_loss(
    policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, beta: float = 0.1
) -> jax.Array:
    """SLiC-style hinge on the implicit reward margin: relu(1 - beta h)."""
    return jax.nn.relu(1.0 - beta * _logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(
    policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, beta: float = 0.1
) -> jax.Array:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, beta playing the paper's tau.

    The formula only: it takes whichever log-probs it is given. `preference_loss` feeds it
    length-averaged log-probs for kind 'ipo' (as TRL's DPOTrainer does) and summed ones for
    'ipo_sum' (as OpenRLHF's DPOLoss does, whose trainer sums the log-probs).
    """
    return (_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) - 1.0 / (2.0 * beta)) ** 2


def sft_term(policy_chosen, chosen_tokens, norm: str = "length") -> jax.Array:
    """NLL of the chosen response per pair: length-normalized (mean per token) or summed."""
    if norm == "length":
        return -policy_chosen / jnp.maximum(chosen_tokens, 1.0)
    if norm == "sum":
        return -policy_chosen
    raise ValueError(f"sft norm must be 'length' or 'sum', got {norm!r}")


# ----------------------------------------------------------------------------- reference-free losses

# Mean log-probs are clipped to at most this before log(1 - exp(.)): a response the policy is sure
# of (mean log-prob 0, or a response with no scored token) would give log 0 = -inf.
MAX_MEAN_LOGP = -1e-6


def mean_logps(summed_logps, tokens) -> jax.Array:
    """Length-averaged log-prob per sequence: summed log-prob / number of response tokens (>= 1)."""
    return summed_logps / jnp.maximum(tokens, 1.0)


def log1m_exp(x) -> jax.Array:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -log 2, log1p(-exp(x)) below. Both branches are
    finite for x < 0, so the gradient through `jnp.where` is too."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_log_odds_ratio(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens) -> jax.Array:
    """log odds(y_w) - log odds(y_l) per pair, with log odds(y) = m(y) - log(1 - exp(m(y))) and m the
    mean log-prob per token, clipped to <= MAX_MEAN_LOGP (Hong et al. 2024)."""
    mc = jnp.minimum(mean_logps(policy_chosen, chosen_tokens), MAX_MEAN_LOGP)
    mr = jnp.minimum(mean_logps(policy_rejected, rejected_tokens), MAX_MEAN_LOGP)
    return (mc - log1m_exp(mc)) - (mr - log1m_exp(mr))


def orpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float = 0.1) -> jax.Array:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):

        -m(y_w) + beta * -log s(log odds(y_w) - log odds(y_l))

    per pair `[B]`, m = summed log-prob / tokens (the chosen NLL per token), odds(y) = P / (1 - P)
    with P = exp(m(y)); beta is the paper's lambda (TRL `ORPOConfig.beta`, default 0.1). TRL averages
    the NLL over all chosen tokens of the batch; here it is each pair's own mean. No reference.
    """
    nll = -mean_logps(policy_chosen, chosen_tokens)
    ratio = orpo_log_odds_ratio(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens)
    return nll - beta * jax.nn.log_sigmoid(ratio)


def simpo_loss(
    policy_chosen,
    policy_rejected,
    chosen_tokens,
    rejected_tokens,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):

        z = beta m(y_w) - beta m(y_l) - gamma,   gamma = gamma_beta_ratio * beta
        -(1 - e) log s(z) - e log s(-z)           (e = label_smoothing; 0 is the paper's loss)

    per pair `[B]`, m = summed log-prob / tokens. Defaults are the authors' (beta 2.0, gamma/beta
    0.25); TRL's CPOTrainer(loss_type="simpo", cpo_alpha=0) takes gamma itself as `simpo_gamma`.
    """
    mc = mean_logps(policy_chosen, chosen_tokens)
    mr = mean_logps(policy_rejected, rejected_tokens)
    z = beta * (mc - mr) - gamma_beta_ratio * beta
    return _smoothed_log_sigmoid(z, label_smoothing)


# ----------------------------------------------------------------------------- dispatch


class LossSpec(NamedTuple):
    """What a `preference_loss` kind needs: a reference's log-probs, the response token counts."""

    uses_reference: bool  # False: ref log-probs are ignored (may be None); no reference pass needed
    needs_tokens: bool  # True: chosen_tokens and rejected_tokens are required
    default_beta: float
    rewards: str  # what the reported rewards are: 'sum' beta (pi - ref) | 'mean' beta (m(pi) - m(ref))


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(True, False, 0.1, "sum"),
    "cdpo": LossSpec(True, False, 0.1, "sum"),  # = sigmoid; label_smoothing is the flip rate
    "robust": LossSpec(True, False, 0.1, "sum"),
    "hinge": LossSpec(True, False, 0.1, "sum"),
    "ipo": LossSpec(True, True, 0.1, "mean"),  # TRL: length-averaged log-probs
    "ipo_sum": LossSpec(True, False, 0.1, "sum"),  # OpenRLHF: summed log-probs
    "orpo": LossSpec(False, True, 0.1, "mean"),
    "simpo": LossSpec(False, True, 2.0, "mean"),
}
PREFERENCE_LOSS_TYPES: tuple[str, ...] = tuple(PREFERENCE_LOSSES)
# `reference` of `preference_loss`: the frozen reference's log-probs, or none (taken as 0)
REFERENCE_INPUTS: tuple[str, ...] = ("policy_ref", "none")


def _pair_terms(
    kind, pc, pr, rc, rr, beta, label_smoothing, gamma_beta_ratio, chosen_tokens, rejected_tokens, reference
):
    """(loss per pair, chosen reward, rejected reward) for one kind; inputs already checked."""
    spec = PREFERENCE_LOSSES[kind]
    if not spec.uses_reference or reference == "none":
        rc = rr = None
    if spec.rewards == "mean":
        pc_r, pr_r = mean_logps(pc, chosen_tokens), mean_logps(pr, rejected_tokens)
        rc_r = None if rc is None else mean_logps(rc, chosen_tokens)
        rr_r = None if rr is None else mean_logps(rr, rejected_tokens)
    else:
        pc_r, pr_r, rc_r, rr_r = pc, pr, rc, rr
    if kind in ("sigmoid", "cdpo", "robust"):
        loss = sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing, robust=kind == "robust")
    elif kind == "hinge":
        loss = hinge_loss(pc, pr, rc, rr, beta)
    elif kind in ("ipo", "ipo_sum"):
        loss = ipo_loss(pc_r, pr_r, rc_r, rr_r, beta)
    elif kind == "orpo":
        loss = orpo_loss(pc, pr, chosen_tokens, rejected_tokens, beta)
    else:  # simpo
        loss = simpo_loss(pc, pr, chosen_tokens, rejected_tokens, beta, gamma_beta_ratio, label_smoothing)
    cr = beta * (pc_r - _zero_if_none(rc_r, pc_r))
    rj = beta * (pr_r - _zero_if_none(rr_r, pr_r))
    return loss, cr, rj


def _reward_sums(cr, rj, policy_chosen, policy_rejected, pair_mask) -> dict[str, jax.Array]:
    m = jnp.ones_like(policy_chosen) if pair_mask is None else pair_mask.astype(jnp.float32)
    return {
        "reward_accuracy": jnp.sum((cr > rj).astype(jnp.float32) * m),  # strict, as in the paper
        "rewards_chosen": jnp.sum(cr * m),
        "rewards_rejected": jnp.sum(rj * m),
        "margin": jnp.sum((cr - rj) * m),
        "logps_chosen": jnp.sum(policy_chosen * m),
        "logps_rejected": jnp.sum(policy_rejected * m),
        "pairs": jnp.sum(m),
    }


def preference_loss(
    kind: str,
    policy_chosen,
    policy_rejected,
    ref_chosen=None,
    ref_rejected=None,
    *,
    beta: float | None = None,
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.25,
    sft_weight: float = 0.0,
    sft_norm: str = "length",
    chosen_tokens=None,
    rejected_tokens=None,
    reference: str = "policy_ref",
    pair_mask=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The one entry point of the loss menu: `(loss per pair [B], metric sums)`.

    Inputs are per-pair summed response log-probs `[B]`; `chosen_tokens` / `rejected_tokens` `[B]`
    count the scored tokens (required by 'ipo', 'orpo', 'simpo'; see `PREFERENCE_LOSSES`).
    `reference='policy_ref'` uses `ref_chosen` / `ref_rejected` (required by the DPO kinds);
    'none' takes them as 0 (reference-free). 'orpo' and 'simpo' never read them. `beta=None` is
    the kind's default (2.0 for simpo, else 0.1). A weighted SFT term (`sft_term`) is added when
    `sft_weight` is non-zero, for every kind (ORPO already holds its own NLL term); `sft_norm='length'`
    needs `chosen_tokens`.

    The metric sums (`reward_accuracy`, `rewards_chosen`, `rewards_rejected`, `margin`, `logps_chosen`,
    `logps_rejected` and `pairs`, to be added over microbatches and divided by `pairs`): rewards
    are beta * (log pi - log ref) on the log-probs the loss itself compares, i.e. summed for
    sigmoid/cdpo/robust/hinge/ipo_sum, per-token means for ipo (as TRL), and beta * mean log pi for
    orpo and simpo (as TRL's ORPO/CPO trainers; no reference); margin = chosen - rejected reward,
    reward_accuracy = strict chosen > rejected; logps_* are the summed policy log-probs.
    """
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown loss.type {kind!r}; expected one of {PREFERENCE_LOSS_TYPES}")
    if reference not in REFERENCE_INPUTS:
        raise ValueError(f"unknown reference {reference!r}; expected one of {REFERENCE_INPUTS}")
    spec = PREFERENCE_LOSSES[kind]
    if spec.needs_tokens and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(
            f"{kind} needs chosen_tokens and rejected_tokens (it uses length-averaged log-probs)"
        )
    if spec.uses_reference and reference == "policy_ref" and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"{kind} with reference='policy_ref' needs ref_chosen and ref_rejected")
    beta = spec.default_beta if beta is None else float(beta)
    pc, pr = policy_chosen, policy_rejected
    loss, cr, rj = _pair_terms(
        kind,
        pc,
        pr,
        ref_chosen,
        ref_rejected,
        beta,
        float(label_smoothing),
        float(gamma_beta_ratio),
        chosen_tokens,
        rejected_tokens,
        reference,
    )
    if sft_weight:
        if sft_norm == "length" and chosen_tokens is None:  # not silently the summed NLL
            raise ValueError("sft_norm='length' needs chosen_tokens (the NLL is a mean per chosen token)")
        loss = loss + sft_weight * sft_term(pc, chosen_tokens, sft_norm)
    return loss, _reward_sums(cr, rj, pc, pr, pair_mask)
