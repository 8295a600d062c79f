"""DPO examples (token ids), length buckets and padded batches (docs/ARCHITECTURE.md "DPO batch").

Length rules:
  * responses are tokenized with no special tokens and closed by the tokenizer's EOS id; the
    response + EOS positions are the scored ones;
  * `reserve(L) = min(513, L // 2)` is the release's "max length - 513" margin, scaled down for
    small test lengths (it equals 513 for every L >= 1026);
  * eval_mode=True follows docs/method.md section 7 exactly: prompt ids and response ids (before EOS)
    are each left-truncated to L - reserve(L), so prompt + response may exceed L; with the `paper`
    format the prompt string's ids are truncated and the BOS is put back in front (BOS + L - reserve(L));
  * otherwise (training with `chat`/`paper`) the pair must fit L: responses (before EOS) are
    left-truncated to L - reserve(L) (section 7's evaluation rule, applied to training), then the
    prompt is left-truncated so that prompt + the longer response + EOS <= L (with `paper`, as in
    eval_mode, its BOS is kept in front: BOS + the left-truncated rest, the BOS counted in L); these
    cuts apply only to a pair that does not fit untruncated; overflow='drop' instead
    returns None for any pair that does not fit untruncated (stricter than the release, which drops
    a pair only for its prompt's length and cuts the response: the `release` format below);
  * prompt_format='release' (training) is the release's own rule (docs/method.md section 6b): each
    response is `rstrip("\n")` + " " + the EOS token string, tokenized with the text (so a space
    token precedes EOS); the pair is dropped (overflow='drop') only when the prompt alone reaches
    L - 2 tokens, otherwise each sequence is cut to L tokens keeping its head, as the tokenizer's
    right truncation does, with the last token set to EOS. overflow='truncate' left-truncates such a
    prompt to L - reserve(L) instead of dropping it.

PBA's profile for a row (`pba_preference`): 'golden' renders the `profile` argument or, without one,
`prompts.resolve_profile`'s choice (the row's golden P~, `prompts.golden_preference`: its
`Preference Direction`, else its `profile`, as `alignx eval --preference golden` takes it);
'history' renders the release's P~ of the *sampled* history (`persona.sampled_preference` over the
same sample ICA would show: the kinds the persona variant shows; the whole history when no rng is given),
falling back to the golden choice when no sampled item carries a direction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignx_jax.data import persona as persona_lib
from alignx_jax.data import prompts as prompts_lib
from alignx_jax.errors import ConfigError, DataError

DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192)
RELEASE_RESERVE = 513
# where a PBA training row's profile comes from when no explicit `profile` is given (module docstring)
PBA_PROFILE_SOURCES = ("golden", "history")
# a training pair over max_length (release format: a prompt that leaves no room for a response): cut its
# ids from the left to fit, or drop the pair (`_fit`)
OVERFLOW_POLICIES = ("truncate", "drop")


@dataclasses.dataclass
class DPOExample:
    """One preference pair as ids. `chosen_ids`/`rejected_ids` end with the EOS id."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    direction: np.ndarray | None = None  # float32 [90], the row's golden P~
    persona_ids: list[int] | None = None  # PBA head input (BOS + persona block ids)
    index: int = 0
    truncated: bool = False

    @property
    def length(self) -> int:
        """Longest of the two sequences (prompt + response + EOS)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def example_key(ex: DPOExample) -> bytes:
    """What a pair's log-probs depend on, as a digest: its prompt, chosen and rejected ids."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids):
        h.update(np.asarray(ids, np.int64).tobytes())
        h.update(b"|")  # where one part ends: [1, 2] + [3] is not [1] + [2, 3]
    return h.digest()


def reserve(max_length: int) -> int:
    return min(RELEASE_RESERVE, max_length // 2)


def response_bound(max_length: int) -> int:
    """The most scored tokens one response of a kept training pair holds (its ids + EOS): max_length - 1.

    Every training rule of `_fit` keeps prompt + the longer response + EOS <= max_length (chat/paper fit
    the pair, release cuts each sequence to max_length) and a prompt holds at least one token (its
    template or BOS); the reserve cuts only a pair that does not fit, so a one-token prompt and a
    response of max_length - 2 tokens + EOS that fit untruncated reach it in every format and overflow."""
    return max_length - 1


def shared_row_bound(max_length: int) -> int:
    """The most tokens a kept training pair takes as one `share_prompt` row (prompt + chosen + rejected,
    each response with its EOS): 2 * max_length - 1.

    With a p-token prompt the row is at most p + 2 (max_length - p) (`response_bound`'s rules): a
    one-token prompt and two responses of `response_bound` tokens reach it in every format."""
    return 1 + 2 * response_bound(max_length)


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """The response's ids with no special tokens, then the EOS id."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids] + [int(tokenizer.eos_token_id)]


def release_response_ids(tokenizer: Any, text: str) -> list[int]:
    """The release's training response (docs/method.md section 6b): `text.rstrip("\n") + " " + EOS
    string`, tokenized with no special tokens added, so it ends with a space token and the EOS id."""
    eos_id, eos = tokenizer.eos_token_id, tokenizer.eos_token
    if eos_id is None or not eos:
        raise DataError("the tokenizer has no EOS token")
    ids = [int(i) for i in tokenizer(text.rstrip("\n") + " " + eos, add_special_tokens=False)["input_ids"]]
    if not ids or ids[-1] != int(eos_id):  # a tokenizer that does not parse its EOS string in text
        ids = [int(i) for i in tokenizer(text.rstrip("\n") + " ", add_special_tokens=False)["input_ids"]]
        ids.append(int(eos_id))
    return ids


def _left(ids: list[int], n: int) -> list[int]:
    return ids[-n:] if n > 0 else []


def _left_after_bos(prompt: list[int], n: int) -> list[int]:
    """A `paper` prompt cut as the release cuts it: its BOS, then the last `n` ids of the rest."""
    return prompt[:1] + _left(prompt[1:], n)


def make_example(
    tokenizer: Any,
    row: dict,
    *,
    method: str,
    persona: str = "p",
    max_length: int,
    prompt_format: str = "chat",
    rng: np.random.Generator | None = None,
    profile: Any = None,
    overflow: str = "truncate",
    index: int = 0,
    eval_mode: bool = False,
    persona_length: int | None = None,
    pba_preference: str = "golden",
) -> DPOExample | None:
    """Token one row into a `DPOExample` (length rules in the module docstring).

    rng: ICA history sampling for training (`persona.row_rng(seed, (epoch, index))`), None = the
    whole history. persona_length: when set, also store `persona_ids` = BOS + the last
    `persona_length - 1` ids of the persona block (for the PBA preference head).
    pba_preference: where PBA's profile comes from when `profile` is None ('golden' | 'history',
    module docstring).
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if pba_preference not in PBA_PROFILE_SOURCES:
        raise ConfigError(
            f"pba_preference must be one of {', '.join(PBA_PROFILE_SOURCES)}, got {pba_preference!r}"
        )
    if max_length < 4:
        raise ConfigError(f"max_length must be at least 4, got {max_length}")
    view = _history_view(row, method, persona, rng)
    if method == "pba" and profile is None and pba_preference == "history":
        sampled = persona_lib.sampled_preference(
            view.get(persona_lib.UGC_FIELD) or [], view.get(persona_lib.PAIR_FIELD) or []
        )
        profile = None if sampled is None else sampled[1]
    prompt = prompts_lib.prompt_ids(
        tokenizer, view, method=method, persona=persona, profile=profile, fmt=prompt_format
    )
    eos = int(tokenizer.eos_token_id)
    respond = release_response_ids if prompt_format == "release" else response_ids
    fitted = _fit(
        prompt,
        respond(tokenizer, row["chosen"])[:-1],
        respond(tokenizer, row["rejected"])[:-1],
        max_length=max_length,
        prompt_format=prompt_format,
        overflow=overflow,
        eval_mode=eval_mode,
    )
    if fitted is None:
        return None
    prompt, chosen, rejected, truncated = fitted
    direction = row.get(persona_lib.DIRECTION_FIELD)
    persona_ids = None
    if persona_length is not None:
        persona_ids = _persona_ids(tokenizer, view, persona, persona_length, eos)
    return DPOExample(
        prompt_ids=list(prompt),
        chosen_ids=chosen + [eos],
        rejected_ids=rejected + [eos],
        direction=None if direction is None else np.asarray(direction, dtype=np.float32),
        persona_ids=persona_ids,
        index=int(index),
        truncated=truncated,
    )


def _history_view(row: dict, method: str, persona: str, rng: np.random.Generator | None) -> dict:
    """The row as the prompt and the head input see it: with `rng` (ICA/PBA training) its history
    replaced by one sample of the kinds persona variant `persona` shows (the others emptied), so both
    describe the same persona; else the row itself."""
    if rng is None or method not in ("ica", "pba"):
        return row
    ugc, pairs = persona_lib.sample_history(row, rng, persona)
    # prompts_lib re-samples from rng when given one; hand it the sample through a view row.
    view = dict(row)
    view[persona_lib.UGC_FIELD], view[persona_lib.PAIR_FIELD] = ugc, pairs
    return view


def _fit(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    prompt_format: str,
    overflow: str,
    eval_mode: bool,
) -> tuple[list[int], list[int], list[int], bool] | None:
    """(prompt, chosen, rejected, truncated) cut to the length rules (module docstring); the
    responses without their EOS. None: the row is over length and `overflow` is 'drop'."""
    budget = max_length - reserve(max_length)
    truncated = False
    if eval_mode:
        before = len(prompt), len(chosen), len(rejected)
        if prompt_format == "paper":  # the release truncates the prompt string's ids, then prepends BOS
            prompt = _left_after_bos(prompt, budget)
        else:
            prompt = _left(prompt, budget)
        chosen, rejected = _left(chosen, budget), _left(rejected, budget)
        # what was cut, not what is over the budget: a paper prompt's BOS is not counted in it
        truncated = (len(prompt), len(chosen), len(rejected)) != before
    elif prompt_format == "release":
        if len(prompt) >= max_length - 2:
            if overflow == "drop":
                return None
            truncated = True
            prompt = _left(prompt, budget)
        room = max_length - len(prompt) - 1  # response tokens before EOS that fit L
        truncated = truncated or max(len(chosen), len(rejected)) > room
        chosen, rejected = chosen[:room], rejected[:room]
    else:
        longest = max(len(chosen), len(rejected)) + 1
        if len(prompt) + longest > max_length:
            if overflow == "drop":
                return None
            truncated = True
            chosen, rejected = _left(chosen, budget), _left(rejected, budget)
            longest = max(len(chosen), len(rejected)) + 1
            room = max_length - longest  # >= reserve(L) - 1 >= 1: the BOS always fits
            if prompt_format == "paper":  # as eval: BOS in front, the rest cut (BOS counted in L)
                prompt = _left_after_bos(prompt, room - 1)
            else:
                prompt = _left(prompt, room)
    return prompt, chosen, rejected, truncated


def _persona_ids(tokenizer: Any, view: dict, persona: str, persona_length: int, eos: int) -> list[int]:
    """BOS (EOS when the tokenizer has none) + the last `persona_length - 1` ids of the persona
    block: the PBA preference head's input."""
    if persona_length < 2:
        raise ConfigError(f"persona_length must be at least 2, got {persona_length}")
    text = persona_lib.persona_text(view, persona)
    body = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return [int(bos)] + _left(body, persona_length - 1)


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= n (ConfigError when n exceeds the largest)."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ConfigError(
        f"a sequence of {n} tokens exceeds the largest length bucket {max(buckets)}; "
        "add a larger bucket or lower max_length"
    )


def collate(
    examples: Sequence[DPOExample],
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_id: int,
    num_pairs: int | None = None,
) -> dict[str, np.ndarray]:
    """Pad B pairs into the DPO batch layout: 2B rows, chosen first (0..B-1) then rejected.

    input_ids [2B,T] int32 right-padded with pad_id; attention_mask [2B,T] int32; loss_mask
    [2B,T] int32, 1 on the response + EOS positions; positions [2B,T] int32 (0.. on real tokens,
    0 on padding); pair_mask [B] int32; index [B] int32 (example index, -1 for dummies).
    `num_pairs` pads with dummy pairs (pair_mask 0, loss_mask 0) up to a fixed B; a dummy row holds
    one attended pad token so no attention row is empty (an all-masked softmax gives NaN, and
    NaN * 0 is still NaN in the loss). Optional: direction [B,90] float32 (dummies 0.5) when the
    examples carry one; persona_ids/persona_mask [B,P] when they carry persona ids.
    """
    n = len(examples)
    B = n if num_pairs is None else int(num_pairs)
    if n == 0 and B == 0:
        raise ValueError("collate needs at least one example or num_pairs > 0")
    if n > B:
        raise ValueError(f"{n} examples do not fit num_pairs={B}")
    seqs = [ex.prompt_ids + ex.chosen_ids for ex in examples] + [
        ex.prompt_ids + ex.rejected_ids for ex in examples
    ]
    T = bucket_length(max([len(s) for s in seqs] + [1]), buckets)
    ids = np.full((2 * B, T), pad_id, dtype=np.int32)
    attn = np.zeros((2 * B, T), dtype=np.int32)
    loss = np.zeros((2 * B, T), dtype=np.int32)
    for k, ex in enumerate(examples):
        for row, resp in ((k, ex.chosen_ids), (B + k, ex.rejected_ids)):
            p, r = len(ex.prompt_ids), len(resp)
            ids[row, :p] = ex.prompt_ids
            ids[row, p : p + r] = resp
            attn[row, : p + r] = 1
            loss[row, p : p + r] = 1
    dummy_rows = [*range(n, B), *range(B + n, 2 * B)]
    attn[dummy_rows, 0] = 1
    positions = np.where(attn == 1, np.arange(T, dtype=np.int32)[None, :], 0).astype(np.int32)
    pair_mask = np.zeros((B,), dtype=np.int32)
    pair_mask[:n] = 1
    index = np.full((B,), -1, dtype=np.int32)
    index[:n] = [ex.index for ex in examples]
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "positions": positions,
        "pair_mask": pair_mask,
        "index": index,
    }
    has_dir = [ex.direction is not None for ex in examples]
    if any(has_dir):
        if not all(has_dir):
            raise DataError("a batch mixes rows with and without a Preference Direction")
        direction = np.full((B, persona_lib.NUM_DIMS), 0.5, dtype=np.float32)
        direction[:n] = np.stack([np.asarray(ex.direction, dtype=np.float32) for ex in examples])
        batch["direction"] = direction
    has_persona = [ex.persona_ids is not None for ex in examples]
    if any(has_persona):
        if not all(has_persona):
            raise ValueError("a batch mixes examples with and without persona_ids")
        P = bucket_length(max(len(ex.persona_ids) for ex in examples), buckets)
        pids = np.full((B, P), pad_id, dtype=np.int32)
        pmask = np.zeros((B, P), dtype=np.int32)
        for k, ex in enumerate(examples):
            pids[k, : len(ex.persona_ids)] = ex.persona_ids
            pmask[k, : len(ex.persona_ids)] = 1
        pmask[n:, 0] = 1  # dummies: one attended token, as above
        batch["persona_ids"], batch["persona_mask"] = pids, pmask
    return batch


def with_dummy_head_inputs(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """A batch with no real pair (every row of its slice dropped, or a shorter shard's last one-pass
    batch) carries the PBA head's inputs as dummies: the other processes' batches have them, and the
    joint step (and its collectives) must see the same arrays everywhere."""
    if batch["pair_mask"].any() or "persona_ids" in batch:
        return batch
    B = batch["pair_mask"].shape[0]
    persona_mask = np.zeros((B, 1), dtype=np.int32)
    persona_mask[:, 0] = 1  # one attended token, as collate's dummies
    return {
        **batch,
        "direction": np.full((B, persona_lib.NUM_DIMS), 0.5, dtype=np.float32),
        "persona_ids": np.full((B, 1), pad_id, dtype=np.int32),
        "persona_mask": persona_mask,
    }


def padding_stats(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Real vs padded tokens in a collated batch (dummy pairs count as padding)."""
    B = batch["pair_mask"].shape[0]
    if "score_row" in batch:  # pack_pairs: rows hold several pairs; every row counts
        valid = np.ones((batch["input_ids"].shape[0],), bool)
    elif "branch_ids" in batch:  # share_prompt's layout: one row per pair
        valid = batch["pair_mask"].astype(bool)
    else:
        valid = np.concatenate([batch["pair_mask"], batch["pair_mask"]]).astype(bool)
    real = int(batch["attention_mask"][valid].sum())
    total = int(batch["input_ids"].size)
    return {
        "pairs": int(batch["pair_mask"].sum()),
        "padded_pairs": int(B - batch["pair_mask"].sum()),
        "real_tokens": real,
        "padded_tokens": total - real,
        "total_tokens": total,
        "padding_fraction": (total - real) / total if total else 0.0,
    }


def _group_positions(attention_mask: np.ndarray, groups: int) -> int:
    """R: the positions of one of G consecutive row groups of `attention_mask [M, rows, T]`."""
    _, rows, T = attention_mask.shape
    if rows % groups:
        raise ValueError(f"{rows} rows per microbatch do not split into {groups} token groups")
    return rows // groups * T


def kept_tokens(attention_mask: np.ndarray, groups: int, steps: int = 8) -> int:
    """The static kept-token count N per group for `compact_index`: the most real tokens any group
    of `attention_mask [M, rows, T]` holds, rounded up to a multiple of R/steps (R = rows/G*T
    positions; the step itself a multiple of 8), at most R: a row length meets at most `steps`
    compiled shapes (`data.compact_tokens`), and at most R/steps padding positions are computed."""
    R = _group_positions(attention_mask, groups)
    real = int((attention_mask.reshape(-1, groups, R) > 0).sum(-1).max(initial=1))
    step = 8 * -(-max(1, -(-R // max(1, int(steps)))) // 8)
    return min(R, max(1, step * -(-real // step)))


def compact_index(attention_mask: np.ndarray, groups: int, kept: int | None = None) -> dict[str, np.ndarray]:
    """Host side of `models.compaction`: `token_index [M, G, N]` and `token_slot [M, G, R]` for
    `attention_mask [M, rows, T]`, whose rows split into G consecutive groups (one per batch shard).

    A group's N slots hold its real tokens in order, then the first of its padding positions to
    fill N (`kept`, default `kept_tokens`); `token_slot` maps every position to its slot, or to N
    when it was not kept. Raises when a group has more than N real tokens.
    """
    M = attention_mask.shape[0]
    R = _group_positions(attention_mask, groups)
    N = kept_tokens(attention_mask, groups) if kept is None else int(kept)
    if not 0 < N <= R:
        raise ValueError(f"kept tokens {N} outside 1..{R}")
    real = attention_mask.reshape(M * groups, R) > 0
    # stable sort on "not real": real positions first in order, then padding positions in order
    order = np.argsort(~real, axis=-1, kind="stable")
    if int(real.sum(-1).max(initial=0)) > N:
        raise ValueError(f"a token group holds {int(real.sum(-1).max())} real tokens, more than the {N} kept")
    index = order[:, :N].astype(np.int32)
    slot = np.full((M * groups, R), N, np.int32)
    np.put_along_axis(slot, index, np.arange(N, dtype=np.int32)[None, :].repeat(M * groups, 0), axis=-1)
    return {"token_index": index.reshape(M, groups, N), "token_slot": slot.reshape(M, groups, R)}


def share_prompt(
    batch: dict[str, np.ndarray],
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_id: int,
    length: int | None = None,
    window: int | None = None,
) -> dict[str, np.ndarray]:
    """A collated batch (2B rows: chosen, then rejected) -> one row per pair: prompt, chosen, rejected.

    A pair's two rows repeat its prompt, and with a persona in the prompt (ICA) the prompt is most of
    the tokens: this layout runs it once. `branch_ids` (0 prompt, 1 chosen, 2 rejected) keep each
    response's attention to the prompt and itself, and both responses' positions continue from the
    prompt's end, so every scored log-prob equals the two-row layout's (tested).

    Returns input_ids/attention_mask/positions/branch_ids `[B, Ts]` (Ts = the bucket of the longest
    prompt + chosen + rejected, at least `length`), score_index/score_target/score_mask `[B, 2, R]`
    (the predicting position, target id and mask of each scored token of chosen (0) and rejected
    (1); R a power of two >= 16, at least `window`), and the batch's other keys unchanged.
    """
    ids2, loss2 = batch["input_ids"], batch["loss_mask"]
    B = ids2.shape[0] // 2
    spans = []
    for k in range(B):
        parts = []
        for row in (k, B + k):
            scored = np.flatnonzero(loss2[row])
            parts.append((int(scored[0]), int(scored[-1]) + 1) if scored.size else (1, 1))
        (pc, ec), (pr, er) = parts
        if pc != pr:
            raise ValueError(
                f"pair {k}: chosen and rejected rows have different prompts ({pc} vs {pr} tokens)"
            )
        spans.append((pc, ec - pc, er - pr))
    longest = max(p + c + r for p, c, r in spans)
    Ts = bucket_length(max(longest, int(length or 0)), buckets)
    R = max(16, int(window or 0), 1 << (max(max(c, r) for _, c, r in spans) - 1).bit_length())
    ids = np.full((B, Ts), pad_id, np.int32)
    attn = np.zeros((B, Ts), np.int32)
    pos = np.zeros((B, Ts), np.int32)
    branch = np.zeros((B, Ts), np.int32)
    sidx = np.zeros((B, 2, R), np.int32)
    stgt = np.zeros((B, 2, R), np.int32)
    smask = np.zeros((B, 2, R), np.int32)
    for k, (p, c, r) in enumerate(spans):
        chosen, rejected = ids2[k, p : p + c], ids2[B + k, p : p + r]
        ids[k, :p] = ids2[k, :p]
        ids[k, p : p + c] = chosen
        ids[k, p + c : p + c + r] = rejected
        attn[k, : p + c + r] = 1
        pos[k, : p + c] = np.arange(p + c)
        pos[k, p + c : p + c + r] = np.arange(p, p + r)
        branch[k, p : p + c], branch[k, p + c : p + c + r] = 1, 2
        # token j of a response is predicted at the position before it in its own branch: the
        # prompt's last position for j = 0, the response's previous token after that
        sidx[k, 0, :c] = np.arange(p - 1, p - 1 + c)
        if r:
            sidx[k, 1, :r] = np.concatenate([[p - 1], np.arange(p + c, p + c + r - 1)])
        stgt[k, 0, :c], stgt[k, 1, :r] = chosen, rejected
        smask[k, 0, :c], smask[k, 1, :r] = 1, 1
        if not attn[k].any():
            attn[k, 0] = 1  # a dummy pair: one attended token, as collate does
    return _relaid(
        batch,
        ("loss_mask",),
        input_ids=ids,
        attention_mask=attn,
        positions=pos,
        branch_ids=branch,
        score_index=sidx,
        score_target=stgt,
        score_mask=smask,
    )


def _relaid(
    batch: dict[str, np.ndarray], dropped: Sequence[str], **arrays: np.ndarray
) -> dict[str, np.ndarray]:
    """`batch` in a new row layout: its per-row arrays (`dropped` and those in `arrays`) replaced by
    `arrays`, every per-pair array (head inputs, pair ids, ...) kept as it was."""
    out = {key: v for key, v in batch.items() if key not in (*dropped, *arrays)}
    out.update(arrays)
    return out


def pack_pairs(
    shared: dict[str, np.ndarray], *, groups: int, length: int, pad_id: int, rows: int = 1
) -> dict[str, np.ndarray]:
    """Pack `share_prompt` rows (one pair each) several to a row of `length` tokens.

    The B pairs are cut into `groups` contiguous groups (one per microbatch and batch shard, so a
    pair and its row land on the same device); each group's pairs go, in order, into the first
    of its rows with room. Every group gets the same number of rows n (the most any group needs),
    so rows are `[groups * n, length]`. `segment_ids` (1, 2, ... per pair in a row, 0 on padding)
    keep attention within a pair; positions restart per pair; `score_row [B]` is each pair's row,
    and its score_index moves with the pair's offset in that row. Log-probs are the unpacked
    layout's (tested); the step runs `groups * n * length` tokens instead of `B * Ts`. `rows`: n at
    least this (the processes of a multi-process step agree on one n).
    """
    B = shared["pair_mask"].shape[0]
    if groups < 1 or B % groups:
        raise ValueError(f"{B} pairs do not split into {groups} packing groups")
    lens = shared["attention_mask"].sum(axis=1).astype(int)
    if int(lens.max(initial=0)) > length:
        raise ValueError(f"a pair of {int(lens.max())} tokens does not fit a packed row of {length}")
    per = B // groups
    placement = []  # per group: list of (pair, row, offset)
    n = max(1, int(rows))
    for g in range(groups):
        fill: list[int] = []
        place = []
        for k in range(g * per, (g + 1) * per):
            for r, used in enumerate(fill):  # noqa: B007 (r is the row found, read after the loop)
                if used + lens[k] <= length:
                    break
            else:
                r = len(fill)
                fill.append(0)
            place.append((k, r, fill[r]))
            fill[r] += int(lens[k])
        placement.append(place)
        n = max(n, len(fill))
    N = groups * n
    ids = np.full((N, length), pad_id, np.int32)
    attn = np.zeros((N, length), np.int32)
    pos = np.zeros((N, length), np.int32)
    branch = np.zeros((N, length), np.int32)
    seg = np.zeros((N, length), np.int32)
    sidx = shared["score_index"].copy()
    row_of = np.zeros((B,), np.int32)
    for g, place in enumerate(placement):
        seg_count: dict[int, int] = {}
        for k, r, off in place:
            row = g * n + r
            L = int(lens[k])
            for key, dst in (
                ("input_ids", ids),
                ("attention_mask", attn),
                ("positions", pos),
                ("branch_ids", branch),
            ):
                dst[row, off : off + L] = shared[key][k, :L]
            seg_count[row] = seg_count.get(row, 0) + 1
            seg[row, off : off + L] = seg_count[row]
            sidx[k] = shared["score_index"][k] + off
            row_of[k] = row
    for row in range(N):
        if not attn[row].any():
            attn[row, 0], seg[row, 0] = 1, 1  # an empty row: one attended token, as collate does
    return _relaid(
        shared,
        (),
        input_ids=ids,
        attention_mask=attn,
        positions=pos,
        branch_ids=branch,
        segment_ids=seg,
        score_index=sidx,
        score_row=row_of,
    )
