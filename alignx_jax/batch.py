"""The step's batch layout: one owner for what a batch holds, from the loader's collated rows to the
sharded arrays the jitted step reads. `alignx train`, `alignx plan`, `alignx eval` and the benchmarks
all build their batches here (`BatchBuilder` for a run config; `to_microbatches` below it).

A collated batch (`data.batching.collate`: 2B rows, chosen first) becomes a dict of NumPy arrays
`[M, ...]` (M microbatches, axis 1 split over the batch mesh axes by `batch_shardings`):

  two-row layout (default): input_ids / attention_mask / positions / loss_mask `[M, b, 2, T]`
    (chosen, rejected side by side); with `loss.logits_on_responses` also score_index `[M, b, 2, R]`
    (the response window `losses.window_logps` scores).
  shared-prompt layout (`data.share_prompt`, `batching.share_prompt`; `data.packing` packs several
    pairs per row, `batching.pack_pairs`): input_ids / attention_mask / positions / branch_ids
    (and segment_ids when packed) `[M, rows, T]`; the scored tokens as one flat list per microbatch,
    score_flat / score_target / score_slot / score_valid `[M, S]`, and score_count `[M, b, 2]`
    (`flat_scores`).
  always: pair_mask `[M, b]` (0 = a dummy pair padding the batch).
  `data.compact_tokens`: token_index `[M, G, N]` / token_slot `[M, G, R]` (`add_token_layout`:
    the token-wise layers run on N kept tokens per group of rows; absent when nothing is skipped).
  joint PBA head: persona_ids / persona_mask `[M, b, P]`, direction `[M, b, 90]`.
  `loss.reference=precomputed`: ref_logps `[M, b, 2]` (added by the loop), slot `[M, b]` (the
    precompute pass).

`MODEL_INPUTS` names what the decoder's log-prob pass reads (`train.step.pair_logps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from alignx_jax import losses
from alignx_jax import sharding as shd
from alignx_jax.data import batching
from alignx_jax.errors import DataError

# what `pair_logps` reads from a microbatch (either layout)
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "positions",
    "loss_mask",
    "score_index",
    "branch_ids",
    "segment_ids",
    "score_flat",
    "score_target",
    "score_slot",
    "score_valid",
    "pair_mask",
    "token_index",
    "token_slot",
)


def agree_max(value: int) -> int:
    """The largest of every process's `value` (a static length all processes must share); the value
    itself on one process."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def process_block(mesh, rules=None) -> int:
    """This process's place k along the global pair axis (axis 1 of `batch_shardings`): its pairs and
    rows are the k-th equal block of every process's (0 on one process)."""
    n = jax.process_count()
    if n == 1:
        return 0
    local = int(mesh.shape["data"] * mesh.shape["fsdp"])  # any multiple of the batch shards
    shape = (1, n * local)
    sharding = shd.logical_sharding((None, "activation_batch"), mesh, rules, shape)
    spans = sharding.addressable_devices_indices_map(shape)
    starts = [idx[1].start or 0 for idx in spans.values()]
    stops = [shape[1] if idx[1].stop is None else idx[1].stop for idx in spans.values()]
    if max(stops) - min(starts) != local:
        raise ValueError("this process's batch shards are not one contiguous block of the pair axis")
    return min(starts) // local


def flat_scores(
    batch: dict[str, np.ndarray], num_micro: int, T: int, *, minimum: int | None = None, block: int = 0
) -> dict[str, np.ndarray]:
    """The per-pair scoring plan of a shared/packed batch (`score_index/target/mask [B, 2, R]`,
    optional `score_row [B]`) as one dense list of scored tokens per microbatch.

    Padding every pair's responses to the batch's longest (R) would run the output layer on
    B * 2 * R positions; a long-tailed response length makes most of them padding. Returns
    `score_flat` (row * T + position within the microbatch's rows), `score_target`, `score_slot`
    (2 * pair + branch within the microbatch) and `score_valid`, each `[M, S]` with S the largest
    microbatch's count rounded up to a power of two (at least `minimum`, 64), and `score_count [M, b, 2]`.

    block: this process's place along the global pair axis (`process_block`): in a multi-process step
    the rows and pairs of a microbatch are every process's, so `score_flat` and `score_slot` name global
    rows and pairs (process k's rows follow k * rows and its pairs k * pairs).
    """
    B = batch["pair_mask"].shape[0]
    b = B // num_micro
    n_rows = batch["input_ids"].shape[0] // num_micro
    idx, tgt, mask = batch["score_index"], batch["score_target"], batch["score_mask"].astype(bool)
    row = batch["score_row"] if "score_row" in batch else np.arange(B)
    per = []
    for m in range(num_micro):
        ks, js, rs = np.nonzero(mask[m * b : (m + 1) * b])
        k_glob = ks + m * b
        rows = row[k_glob] % n_rows + block * n_rows
        per.append((rows * T + idx[k_glob, js, rs], tgt[k_glob, js, rs], 2 * (ks + block * b) + js))
    longest = max([len(f) for f, _, _ in per] + [1])
    S = max(64, int(minimum or 0), 1 << (longest - 1).bit_length())
    flat = np.zeros((num_micro, S), np.int32)
    target = np.zeros((num_micro, S), np.int32)
    slot = np.zeros((num_micro, S), np.int32)
    valid = np.zeros((num_micro, S), np.int32)
    for m, (f, t, sl) in enumerate(per):
        n = len(f)
        flat[m, :n], target[m, :n], slot[m, :n], valid[m, :n] = f, t, sl, 1
    count = mask.sum(-1).astype(np.int32).reshape(num_micro, b, 2)
    return {
        "score_flat": flat,
        "score_target": target,
        "score_slot": slot,
        "score_valid": valid,
        "score_count": count,
    }


def to_microbatches(
    batch: dict[str, np.ndarray],
    num_micro: int,
    T: int | None = None,
    *,
    head: bool = False,
    P: int | None = None,
    window: int | None = None,
    scored: int | None = None,
    tokens: tuple[int, int] | None = None,
    block: int = 0,
) -> dict[str, np.ndarray]:
    """A collated DPO batch (2B rows, chosen first) -> the step layout `[M, B/M, 2, T]`.

    head=True also carries the PBA head's persona_ids/persona_mask `[M, B/M, P]` (widened to P)
    and direction `[M, B/M, 90]`. window: also carry `score_index [M, B/M, 2, R]` (the response
    window `losses.window_logps` scores; R at least `window`, 0 = the data's own). tokens=(G, N):
    also carry `token_index [M, G, N]` / `token_slot [M, G, R]` (`batching.compact_index`: the
    token-wise layers run on N kept tokens per group of rows; N 0 = the data's own).
    """
    if head:
        missing = [k for k in ("persona_ids", "persona_mask", "direction") if k not in batch]
        if missing:
            raise DataError(
                f"joint PBA head training needs {', '.join(missing)} in every batch (rows need a "
                "`Preference Direction`; use pba.mode=two_stage or pba.enabled=false otherwise)"
            )
    B = batch["pair_mask"].shape[0]
    b = B // num_micro
    out: dict[str, np.ndarray] = {}
    shared = "branch_ids" in batch  # batching.share_prompt's layout: rows are pairs already
    n_rows = batch["input_ids"].shape[0] // num_micro
    for k in ("input_ids", "attention_mask", "positions", "branch_ids", "segment_ids") if shared else ():
        if k not in batch:
            continue
        x = batch[k]
        if T is not None and x.shape[1] < T:
            x = np.pad(x, ((0, 0), (0, T - x.shape[1])))
        out[k] = x.reshape(num_micro, n_rows, x.shape[1])
    if shared:
        out.update(flat_scores(batch, num_micro, out["input_ids"].shape[-1], minimum=scored, block=block))
    for k in () if shared else ("input_ids", "attention_mask", "positions", "loss_mask"):
        x = batch[k]
        if T is not None and x.shape[1] < T:  # widen to the step's common length (mask 0)
            x = np.pad(x, ((0, 0), (0, T - x.shape[1])))
        out[k] = np.stack([x[:B], x[B:]], axis=1).reshape(num_micro, b, 2, x.shape[1])
    if window is not None and not shared:
        out["score_index"] = losses.scored_window(out["loss_mask"], minimum=max(16, int(window)))
    out["pair_mask"] = batch["pair_mask"].reshape(num_micro, b)
    if tokens is not None:
        add_token_layout(out, int(tokens[0]), int(tokens[1]) or None)
    if "ref_logps" in batch:
        out["ref_logps"] = np.asarray(batch["ref_logps"], np.float32).reshape(num_micro, b, 2)
    if head:  # PBA joint: the head's input and target, per pair
        for k in ("persona_ids", "persona_mask"):
            x = batch[k]
            if P is not None and x.shape[1] < P:
                x = np.pad(x, ((0, 0), (0, P - x.shape[1])))
            out[k] = x.reshape(num_micro, b, x.shape[1])
        out["direction"] = np.asarray(batch["direction"], np.float32).reshape(num_micro, b, -1)
    return out


def token_mask(out: dict[str, np.ndarray]) -> np.ndarray:
    """The step layout's attention mask as `[M, rows, T]` (rows in the order the decoder sees them)."""
    mask = out["attention_mask"]
    return mask.reshape(mask.shape[0], -1, mask.shape[-1])


def add_token_layout(
    out: dict[str, np.ndarray], groups: int, kept: int | None = None
) -> dict[str, np.ndarray]:
    """Add `token_index`/`token_slot` (`batching.compact_index`) to a step batch, in place, unless
    every position would be kept (then the plain layout is as cheap)."""
    mask = token_mask(out)
    N = batching.kept_tokens(mask, groups) if kept is None else int(kept)
    if mask.shape[1] // groups * mask.shape[2] > N:
        out.update(batching.compact_index(mask, groups, kept=N))
    return out


def batch_shardings(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, NamedSharding]:
    """Pairs (axis 1) over the batch mesh axes; everything else replicated."""
    out = {}
    for k, v in batch.items():
        axes = (None, "activation_batch") + (None,) * (v.ndim - 2)
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        out[k] = shd.logical_sharding(axes, mesh, rules, gshape)
    return out


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Each process contributes its own pairs; together they form the global batch."""
    out = {}
    for k, v in batch.items():
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, tuple(gshape))
    return out


@dataclasses.dataclass(frozen=True)
class BatchBuilder:
    """A run's host-side batch building: collated rows -> the step layout, plus padding statistics.

    `from_config` reads the layout keys (`data.share_prompt`, `data.packing`, `data.pack_length`,
    `data.compact_tokens`, `loss.logits_on_responses`, `train.*_batch`); `alignx train` calls it on
    every loader batch and `alignx plan` on a worst-case batch (`worst_case_collated`), so both
    compile the same step inputs.
    """

    num_micro: int
    buckets: tuple[int, ...]
    pad_id: int
    batch_shards: int  # the mesh's data * fsdp ways
    head: bool = False  # joint PBA: persona ids and directions travel with the pairs
    response_logits: bool = True
    share: bool = False
    packing: bool = False
    pack_length: int = 0
    compact: int = 0  # kept-token sizes per row length; 0 = off
    process_count: int = 1
    process_block: int = 0  # this process's place along the global pair axis (`process_block`)

    @classmethod
    def from_config(cls, cfg: Any, mesh, pad_id: int, *, head: bool, rules=None) -> BatchBuilder:
        gb = int(cfg.train.global_batch)
        buckets = tuple(int(b) for b in cfg.data.buckets)
        return cls(
            num_micro=gb // int(cfg.train.micro_batch or gb),
            buckets=buckets,
            pad_id=int(pad_id),
            batch_shards=int(mesh.shape["data"] * mesh.shape["fsdp"]),
            head=bool(head),
            response_logits=bool(cfg.loss.get("logits_on_responses", True)),
            share=bool(cfg.data.get("share_prompt", False)),
            packing=bool(cfg.data.get("packing", False)),
            pack_length=int(cfg.data.get("pack_length", 0)) or max(buckets),
            compact=int(cfg.data.get("compact_tokens", 8)),
            process_count=jax.process_count(),
            # share_prompt's scoring plan names global rows and pairs
            process_block=process_block(mesh, rules) if cfg.data.get("share_prompt", False) else 0,
        )

    def _shared_rows(self, two_rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """share_prompt's one row per pair (then packed with data.packing), the same lengths on every process."""
        coll = batching.share_prompt(two_rows, buckets=self.buckets, pad_id=self.pad_id)
        if self.process_count > 1:  # every process must agree on the row length and the scored window
            Ts, Rs = agree_max(coll["input_ids"].shape[1]), agree_max(coll["score_index"].shape[-1])
            coll = batching.share_prompt(
                two_rows, buckets=self.buckets, pad_id=self.pad_id, length=Ts, window=Rs
            )
        if self.packing:  # several pairs per row of pack_length tokens, packed per microbatch and batch shard
            per_micro = coll["pair_mask"].shape[0] // self.num_micro
            shards = max(1, self.batch_shards // self.process_count)  # this process's batch shards
            groups = self.num_micro * (shards if per_micro % shards == 0 else 1)
            shared = coll
            coll = batching.pack_pairs(shared, groups=groups, length=self.pack_length, pad_id=self.pad_id)
            if self.process_count > 1:  # every process must agree on the rows per group
                n = coll["input_ids"].shape[0] // groups
                agreed = agree_max(n)
                if agreed != n:
                    coll = batching.pack_pairs(
                        shared, groups=groups, length=self.pack_length, pad_id=self.pad_id, rows=agreed
                    )
        return coll

    def _compact(self, out: dict[str, np.ndarray]) -> None:
        """data.compact_tokens: kept tokens per group of rows, one group per local batch shard."""
        local_shards = max(1, self.batch_shards // self.process_count)
        G = local_shards if out["input_ids"].shape[1] % local_shards == 0 else 1  # axis 1 is the sharded one
        N = batching.kept_tokens(token_mask(out), G, self.compact)
        add_token_layout(out, G, agree_max(N))  # every process must agree on the kept-token count

    def __call__(self, coll: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """(step batch, padding stats) of one collated batch of this process's pairs."""
        stats = batching.padding_stats(coll)
        if self.share:
            coll = self._shared_rows(coll)
            stats = batching.padding_stats(coll)
        # every process must agree on the step's lengths
        T = agree_max(coll["input_ids"].shape[1])
        P = agree_max(coll["persona_ids"].shape[1]) if self.head and "persona_ids" in coll else None
        R = (
            agree_max(losses.scored_window(coll["loss_mask"]).shape[-1])
            if self.response_logits and not self.share
            else None
        )
        S = None
        if self.share and self.process_count > 1:  # the scored-token list length, too
            S = agree_max(flat_scores(coll, self.num_micro, T)["score_flat"].shape[-1])
        out = to_microbatches(
            coll, self.num_micro, T, head=self.head, P=P, window=R, scored=S, block=self.process_block
        )
        if self.compact:
            self._compact(out)
        # the share of padded positions the token-wise layers still compute (0 when all are skipped)
        mask = token_mask(out)
        computed = (
            out["token_index"].shape[-1] * out["token_index"].shape[-2] * mask.shape[0]
            if "token_index" in out
            else mask.size
        )
        stats["computed_padding_fraction"] = float(computed - (mask > 0).sum()) / float(computed)
        return out, stats


def worst_case_collated(
    pairs: int,
    *,
    max_length: int,
    buckets: Sequence[int],
    pad_id: int,
    share: bool = False,
    persona_tokens: int | None = None,
) -> dict[str, np.ndarray]:
    """A collated batch of `pairs` pairs at the longest rows a run of these settings keeps: a prompt and
    both responses filling `max_length` (responses of `batching.reserve` + EOS tokens; with `share`,
    short enough that prompt + both fit the largest bucket), every pair real, a direction and a
    `persona_tokens`-long persona when given. What `alignx plan` compiles the step for."""
    r = min(max_length - 1, batching.reserve(max_length) + 1)
    if share:
        r = max(1, min(r, max(buckets) - max_length))
    ex = batching.DPOExample(
        prompt_ids=[1] * (max_length - r),
        chosen_ids=[2] * r,
        rejected_ids=[2] * r,
        direction=None if persona_tokens is None else np.full((90,), 0.5, np.float32),
        persona_ids=None if persona_tokens is None else [1] * int(persona_tokens),
    )
    return batching.collate([ex] * int(pairs), buckets=buckets, pad_id=pad_id)
