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

The optional SFT term is the NLL of the chosen response, `-log pi(y_w) / n_tokens` ("length", the
default: comparable across lengths) or `-log pi(y_w)` ("sum"), added with weight `sft_weight`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from alignx_jax.models.matmul import dense

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "cdpo", "robust", "hinge", "ipo")


# ----------------------------------------------------------------------------- log-probs


def token_logps_from_logits(
    logits_BTV: jax.Array, input_ids_BT: jax.Array, loss_mask_BT: jax.Array
) -> jax.Array:
    """Reference implementation: full float32 log_softmax, shift, gather, masked sum -> `[B]`."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    tgt_BT = input_ids_BT[:, 1:]
    tok_BT = jnp.take_along_axis(logp_BTV, tgt_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(tok_BT * loss_mask_BT[:, 1:].astype(jnp.float32), axis=-1)


def _chunk_logps(h_BCD: jax.Array, w_DV: jax.Array, tgt_BC: jax.Array) -> jax.Array:
    """log p(tgt | h) for one time chunk; logits in float32 via the matmul's accumulator."""
    B, C, D = h_BCD.shape
    logits_BCV = dense(h_BCD.reshape(B * C, D), w_DV, jnp.float32).reshape(B, C, -1)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    tgt_logit_BC = jnp.take_along_axis(logits_BCV, tgt_BC[..., None], axis=-1)[..., 0]
    return tgt_logit_BC - lse_BC


def sequence_logps(
    hidden_BTD: jax.Array,
    out_embed_DV: jax.Array,
    input_ids_BT: jax.Array,
    loss_mask_BT: jax.Array,
    *,
    chunk: int | None = None,
) -> jax.Array:
    """Sum over scored positions t of log p(input_ids[t] | input_ids[<t]), from hidden[t-1] -> `[B]`.

    `loss_mask_BT[t]` = 1 marks token t as scored (position 0 can never be scored). `chunk` splits
    the T-1 predicting positions into pieces of that many steps, each rematerialised in the backward
    pass, so peak memory is `[B, chunk, V]` float32 rather than `[B, T, V]`.
    """
    with jax.named_scope("sequence_logps"):
        return _masked_logps(
            hidden_BTD[:, :-1],
            out_embed_DV,
            input_ids_BT[:, 1:].astype(jnp.int32),
            loss_mask_BT[:, 1:].astype(jnp.float32),
            chunk,
        )


def window_logps(
    hidden_BTD: jax.Array,
    out_embed_DV: jax.Array,
    input_ids_BT: jax.Array,
    loss_mask_BT: jax.Array,
    score_index_BR: jax.Array,
    *,
    chunk: int | None = None,
) -> jax.Array:
    """`sequence_logps` computed only at the predicting positions `score_index_BR`.

    The output layer is the costly part of a step at a small model or a large vocabulary, and a
    DPO row scores only its response: the prompt's positions never need logits. `score_index_BR`
    (from `scored_window`) must cover every scored token's predicting position; indices past the
    row's end count as unscored. Same value as `sequence_logps` on the same inputs.
    """
    with jax.named_scope("window_logps"):
        T = hidden_BTD.shape[1]
        idx_BR = score_index_BR.astype(jnp.int32)
        inside_BR = idx_BR < T - 1
        idx_BR = jnp.minimum(idx_BR, T - 2)
        h_BRD = jnp.take_along_axis(hidden_BTD, idx_BR[..., None], axis=1)
        tgt_BR = jnp.take_along_axis(input_ids_BT, idx_BR + 1, axis=1).astype(jnp.int32)
        mask_BR = jnp.take_along_axis(loss_mask_BT, idx_BR + 1, axis=1).astype(jnp.float32) * inside_BR
        return _masked_logps(h_BRD, out_embed_DV, tgt_BR, mask_BR, chunk)


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
        )[0]
        return jax.ops.segment_sum(tok_S, slot_S.astype(jnp.int32), num_segments=num_slots)


def _masked_tokens(
    h_BSD: jax.Array, out_embed_DV: jax.Array, tgt_BS: jax.Array, mask_BS: jax.Array, chunk: int | None
) -> jax.Array:
    """Per-token mask * log p(tgt | h) `[B, S]`, optionally in rematerialised chunks of S."""
    s = h_BSD.shape[1]
    if chunk is None:  # a given chunk always rematerialises, even when one chunk covers s
        return _chunk_logps(h_BSD, out_embed_DV, tgt_BS) * mask_BS
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
        return None, _chunk_logps(h_BCD, out_embed_DV, tgt_BC) * m_BC

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


def _masked_logps(
    h_BSD: jax.Array, out_embed_DV: jax.Array, tgt_BS: jax.Array, mask_BS: jax.Array, chunk: int | None
) -> jax.Array:
    """sum_s mask[s] * log p(tgt[s] | h[s]), optionally in rematerialised time chunks."""
    return jnp.sum(_masked_tokens(h_BSD, out_embed_DV, tgt_BS, mask_BS, chunk), axis=-1)


# ----------------------------------------------------------------------------- DPO family


def _logits(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)


def sigmoid_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0
) -> jax.Array:
    """DPO (Rafailov et al.); with label_smoothing > 0 it is conservative DPO (cDPO). Per pair `[B]`."""
    z = beta * _logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def robust_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0
) -> jax.Array:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate `label_smoothing` < 0.5."""
    z = beta * _logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)) / (
        1.0 - 2.0 * label_smoothing
    )


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> jax.Array:
    """SLiC-style hinge on the implicit reward margin."""
    return jax.nn.relu(1.0 - beta * _logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> jax.Array:
    """IPO (Azar et al.): squared distance of the log-ratio margin to 1/(2 beta)."""
    return (_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) - 1.0 / (2.0 * beta)) ** 2


def sft_term(policy_chosen, chosen_tokens, norm: str = "length") -> jax.Array:
    """NLL of the chosen response per pair: length-normalized (mean per token) or summed."""
    if norm == "length":
        return -policy_chosen / jnp.maximum(chosen_tokens, 1.0)
    if norm == "sum":
        return -policy_chosen
    raise ValueError(f"sft norm must be 'length' or 'sum', got {norm!r}")


def _get(cfg: Any, key: str, default: Any) -> Any:
    # dicts and ConfigDicts both have .get; plain objects (dataclasses) use attributes
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def dpo_per_pair(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    cfg: Any,
    *,
    chosen_tokens=None,
    rejected_tokens=None,
) -> jax.Array:
    """Per-pair loss `[B]` (DPO variant plus weighted SFT term) for a `loss` config section."""
    kind = _get(cfg, "type", "sigmoid")
    beta = float(_get(cfg, "beta", 0.1))
    ls = float(_get(cfg, "label_smoothing", 0.0))
    sft_weight = float(_get(cfg, "sft_weight", 0.0))
    pc, pr, rc, rr = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    if kind in ("sigmoid", "cdpo"):
        loss = sigmoid_loss(pc, pr, rc, rr, beta, ls)
    elif kind == "robust":
        loss = robust_loss(pc, pr, rc, rr, beta, ls)
    elif kind == "hinge":
        loss = hinge_loss(pc, pr, rc, rr, beta)
    elif kind == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "ipo needs chosen_tokens and rejected_tokens (it uses length-averaged log-probs)"
            )
        nc, nr = jnp.maximum(chosen_tokens, 1.0), jnp.maximum(rejected_tokens, 1.0)
        loss = ipo_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta)
    else:
        raise ValueError(f"unknown loss.type {kind!r}; expected one of {LOSS_TYPES}")
    if sft_weight:
        if chosen_tokens is None:
            chosen_tokens = jnp.ones_like(pc)
        loss = loss + sft_weight * sft_term(pc, chosen_tokens, _get(cfg, "sft_norm", "length"))
    return loss


def dpo_metrics(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, pair_mask=None
) -> dict[str, jax.Array]:
    """Masked-mean reward metrics (sums when reduce over microbatches is needed: see `dpo_sums`)."""
    sums = dpo_sums(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, pair_mask)
    n = jnp.maximum(sums.pop("pairs"), 1.0)
    return {k: v / n for k, v in sums.items()}


def dpo_sums(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, pair_mask=None
) -> dict[str, jax.Array]:
    """Masked sums of the reward metrics plus the pair count, to be added over microbatches."""
    m = jnp.ones_like(policy_chosen) if pair_mask is None else pair_mask.astype(jnp.float32)
    cr = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    return {
        "reward_accuracy": jnp.sum((cr > rr).astype(jnp.float32) * m),  # strict, as in the paper
        "rewards_chosen": jnp.sum(cr * m),
        "rewards_rejected": jnp.sum(rr * m),
        "margin": jnp.sum((cr - rr) * m),
        "logps_chosen": jnp.sum(policy_chosen * m),
        "logps_rejected": jnp.sum(policy_rejected * m),
        "pairs": jnp.sum(m),
    }


def dpo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    cfg: Any,
    *,
    pair_mask=None,
    chosen_tokens=None,
    rejected_tokens=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked-mean loss over pairs and its metrics: loss, reward_accuracy, rewards, margin, logps."""
    per_pair = dpo_per_pair(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        cfg,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    m = jnp.ones_like(per_pair) if pair_mask is None else pair_mask.astype(jnp.float32)
    loss = jnp.sum(per_pair * m) / jnp.maximum(jnp.sum(m), 1.0)
    metrics = dpo_metrics(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, float(_get(cfg, "beta", 0.1)), pair_mask
    )
    metrics["loss"] = loss
    return loss, metrics
