"""The step's batch layout: one owner for what a batch holds, from the loader's collated rows to the
sharded arrays the jitted step reads. `alignx train`, `alignx plan`, `alignx eval` and the benchmarks
all build their batches here (`BatchBuilder` for a run config; `to_microbatches` below it).

A collated batch (`data.batching.collate`: 2B rows, chosen first, a dict of NumPy arrays) becomes one
typed pytree per layout (`flax.struct` dataclasses; every array `[M, ...]`, M microbatches, axis 1
split over the batch mesh axes by `batch_shardings`; a part the run does not use is None):

  `TwoRowBatch` (default): chosen and rejected rows side by side `[M, b, 2, T]`; with
    `loss.logits_on_responses` also the response window `losses.window_logps` scores.
  `SharedPromptBatch` (`data.share_prompt`, `batching.share_prompt`; `data.packing` packs several
    pairs per row, `batching.pack_pairs`, and adds segment_ids): one row per pair (or several pairs
    per row) `[M, rows, T]`, the scored tokens as one flat list per microbatch `[M, S]`
    (`flat_scores`).
  both: pair_mask (0 = a dummy pair padding the batch), and
    `tokens`: `KeptTokens` (`data.compact_tokens`, `add_token_layout`: the token-wise layers run on N
      kept tokens per group of rows; None when nothing is skipped),
    `head`: `HeadInputs` (the joint PBA head's persona and direction, per pair),
    ref_logps (`loss.reference=precomputed`: added by the loop),
    slot (the precompute pass's global pair ids).

Each field's shape is documented once, on its class. `StepBatch` is either layout; `.microbatch(m)`
is one microbatch (the leading axis dropped), `.model_inputs()` what the decoder's log-prob pass
reads (`train.step.pair_logps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from alignx_jax import losses
from alignx_jax import sharding as shd
from alignx_jax.data import batching
from alignx_jax.errors import DataError, MeshError
from alignx_jax.models.compaction import TokenLayout

Array = Any  # a NumPy array on the host, a jax.Array (or ShapeDtypeStruct) once put on devices


@struct.dataclass(kw_only=True)
class _Batch:
    """What both layouts hold and give their callers; each layout adds its rows' fields."""

    pair_mask: Array  # [M, b] 0 = a dummy pair padding the batch
    tokens: KeptTokens | None = None
    head: HeadInputs | None = None
    ref_logps: Array | None = None  # [M, b, 2] float32 `loss.reference=precomputed`
    slot: Array | None = None  # [M, b] the precompute pass's global pair ids

    @property
    def num_micro(self) -> int:
        """M, the leading axis of every array (of a whole batch, not of a `microbatch`)."""
        return int(self.pair_mask.shape[0])

    def microbatch(self, m: int):
        """Microbatch m: the same struct with every array's leading axis dropped."""
        return jax.tree.map(lambda x: x[m], self)

    def model_inputs(self):
        """What the decoder's log-prob pass reads (`train.step.pair_logps`): no head, reference
        log-probs or slots."""
        return self.replace(head=None, ref_logps=None, slot=None)


@struct.dataclass
class KeptTokens:
    """`data.compact_tokens` (`add_token_layout`, `batching.compact_index`): the token-wise layers run
    on N kept tokens per group of rows (G groups, one per batch shard; `models.compaction`)."""

    token_index: Array  # [M, G, N] slot -> position in the group's flattened rows
    token_slot: Array  # [M, G, R] position -> slot (N: not kept); R = rows per group * T

    def layout(self) -> TokenLayout:
        """The `models.compaction.TokenLayout` of one microbatch's arrays `[G, N]`, `[G, R]`."""
        return TokenLayout(self.token_index, self.token_slot)


@struct.dataclass
class HeadInputs:
    """The joint PBA head's input and target, per pair (`models.preference_head.joint_head_term`)."""

    persona_ids: Array  # [M, b, P] the persona's tokens (widened to the step's P)
    persona_mask: Array  # [M, b, P]
    direction: Array  # [M, b, 90] float32 preference direction


@struct.dataclass
class TwoRowBatch(_Batch):
    """The default layout: a pair's chosen (index 0) and rejected (1) rows side by side."""

    input_ids: Array  # [M, b, 2, T]
    attention_mask: Array  # [M, b, 2, T]
    positions: Array  # [M, b, 2, T]
    loss_mask: Array  # [M, b, 2, T] 1 on the scored response tokens
    score_index: Array | None = None  # [M, b, 2, R] `loss.logits_on_responses`: the scored window

    @property
    def layout(self) -> str:
        return "two_rows"


@struct.dataclass
class SharedPromptBatch(_Batch):
    """`data.share_prompt`: one row per pair (prompt, chosen, rejected; `batching.share_prompt`), or
    with `data.packing` several pairs per row (`batching.pack_pairs`); the scored tokens as one flat
    list per microbatch (`flat_scores`)."""

    input_ids: Array  # [M, rows, T]
    attention_mask: Array  # [M, rows, T]
    positions: Array  # [M, rows, T]
    branch_ids: Array  # [M, rows, T] 0 prompt, 1 chosen, 2 rejected
    score_flat: Array  # [M, S] row * T + position of each scored token
    score_target: Array  # [M, S] its target token
    score_slot: Array  # [M, S] 2 * pair + branch
    score_valid: Array  # [M, S] 0 = padding of the list
    score_count: Array  # [M, b, 2] scored tokens per response
    segment_ids: Array | None = None  # [M, rows, T] `data.packing`: which pair a token belongs to

    @property
    def layout(self) -> str:
        return "shared_prompt" if self.segment_ids is None else "packed"


StepBatch = TwoRowBatch | SharedPromptBatch  # what the jitted step reads


def agree_max(value: int) -> int:
    """The largest of every process's `value` (a static length all processes must share); the value
    itself on one process."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def process_shards(mesh, rules=None) -> tuple[int, ...]:
    """The batch shards (of the mesh's data*fsdp, in pair-axis order) this process's devices hold,
    ascending; () on one process. A TPU pod's topology-ordered mesh interleaves the hosts, so they need not
    be one block: `jax.make_array_from_process_local_data` lays a process's rows over them in this order."""
    if jax.process_count() == 1:
        return ()
    ways = int(mesh.shape["data"] * mesh.shape["fsdp"])
    shape = (1, ways)
    spans = pair_sharding(shape, mesh, rules).addressable_devices_indices_map(shape)
    return tuple(sorted({idx[1].start or 0 for idx in spans.values()}))


def to_global(local: np.ndarray, n_local: int, shards: tuple[int, ...]) -> np.ndarray:
    """This process's indices along a pair or row axis of `n_local` -> the global batch's: its part is
    `len(shards)` equal runs, one per batch shard in `shards` (`process_shards`; () = one process)."""
    if not shards:
        return local
    per = n_local // len(shards)
    return np.asarray(shards)[local // per] * per + local % per


def flat_scores(
    batch: dict[str, np.ndarray],
    num_micro: int,
    T: int,
    *,
    minimum: int | None = None,
    shards: tuple[int, ...] = (),
) -> dict[str, np.ndarray]:
    """The per-pair scoring plan of a shared/packed batch (`score_index/target/mask [B, 2, R]`,
    optional `score_row [B]`) as one dense list of scored tokens per microbatch.

    Padding every pair's responses to the batch's longest (R) would run the output layer on
    B * 2 * R positions; a long-tailed response length makes most of them padding. Returns
    `score_flat` (row * T + position within the microbatch's rows), `score_target`, `score_slot`
    (2 * pair + branch within the microbatch) and `score_valid`, each `[M, S]` with S the largest
    microbatch's count rounded up to a power of two (at least `minimum`, 64), and `score_count [M, b, 2]`.

    shards: this process's batch shards (`process_shards`): in a multi-process step the rows and pairs of
    a microbatch are every process's, so `score_flat` and `score_slot` name global rows and pairs
    (`to_global`).
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
        rows = to_global(row[k_glob] % n_rows, n_rows, shards)
        per.append((rows * T + idx[k_glob, js, rs], tgt[k_glob, js, rs], 2 * to_global(ks, b, shards) + js))
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
    shards: tuple[int, ...] = (),
) -> StepBatch:
    """A collated DPO batch (2B rows, chosen first; or `batching.share_prompt`'s one row per pair,
    then a `SharedPromptBatch`) -> the step layout, M = num_micro microbatches of B/M pairs.

    head=True also carries the PBA head's `HeadInputs` (persona widened to P). window: also carry the
    two-row layout's `score_index` (R at least `window`, 0 = the data's own). scored: the shared
    layout's scored-token list length S at least this. tokens=(G, N): also carry `KeptTokens` (N 0 =
    the data's own). shards: `flat_scores`.
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

    def widen(x: np.ndarray, to: int | None) -> np.ndarray:  # to the step's common length (mask 0)
        return np.pad(x, ((0, 0), (0, to - x.shape[1]))) if to is not None and x.shape[1] < to else x

    common: dict[str, Any] = {"pair_mask": batch["pair_mask"].reshape(num_micro, b)}
    if head:  # PBA joint: the head's input and target, per pair
        ids, mask = (widen(batch[k], P) for k in ("persona_ids", "persona_mask"))
        common["head"] = HeadInputs(
            persona_ids=ids.reshape(num_micro, b, ids.shape[1]),
            persona_mask=mask.reshape(num_micro, b, mask.shape[1]),
            direction=np.asarray(batch["direction"], np.float32).reshape(num_micro, b, -1),
        )
    out: StepBatch
    if "branch_ids" in batch:  # batching.share_prompt's layout: rows are pairs already
        n_rows = batch["input_ids"].shape[0] // num_micro
        rows = {
            k: widen(batch[k], T).reshape(num_micro, n_rows, -1)
            for k in ("input_ids", "attention_mask", "positions", "branch_ids", "segment_ids")
            if k in batch
        }
        scores = flat_scores(batch, num_micro, rows["input_ids"].shape[-1], minimum=scored, shards=shards)
        out = SharedPromptBatch(**rows, **scores, **common)
    else:
        pairs = {}
        for k in ("input_ids", "attention_mask", "positions", "loss_mask"):
            x = widen(batch[k], T)
            pairs[k] = np.stack([x[:B], x[B:]], axis=1).reshape(num_micro, b, 2, x.shape[1])
        if window is not None:
            pairs["score_index"] = losses.scored_window(pairs["loss_mask"], minimum=max(16, int(window)))
        out = TwoRowBatch(**pairs, **common)
    if tokens is not None:
        out = add_token_layout(out, int(tokens[0]), int(tokens[1]) or None)
    return out


def token_mask(out: StepBatch) -> np.ndarray:
    """The step layout's attention mask as `[M, rows, T]` (rows in the order the decoder sees them)."""
    mask = out.attention_mask
    return mask.reshape(mask.shape[0], -1, mask.shape[-1])


def add_token_layout(out: StepBatch, groups: int, kept: int | None = None) -> StepBatch:
    """`out` with its `KeptTokens` (`batching.compact_index`, N = `kept`, default the data's own),
    unless every position would be kept (then the plain layout is as cheap and `out` is returned)."""
    mask = token_mask(out)
    N = batching.kept_tokens(mask, groups) if kept is None else int(kept)
    if mask.shape[1] // groups * mask.shape[2] > N:
        out = out.replace(tokens=KeptTokens(**batching.compact_index(mask, groups, kept=N)))
    return out


def batch_shardings(batch: StepBatch, mesh, rules) -> StepBatch:
    """The batch's shardings (the same struct, a `NamedSharding` per array): pairs (axis 1) over the
    batch mesh axes; everything else replicated."""

    def one(v):
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        return pair_sharding(tuple(gshape), mesh, rules)

    return jax.tree.map(one, batch)


def pair_sharding(gshape: tuple[int, ...], mesh, rules=None) -> NamedSharding:
    """An array of global shape `gshape` with its pair axis (axis 1) over the batch mesh axes."""
    axes = (None, "activation_batch") + (None,) * (len(gshape) - 2)
    return shd.logical_sharding(axes, mesh, rules, gshape)


def check_pair_split(sharding: NamedSharding, gshape: tuple[int, ...]) -> None:
    """MeshError unless this process's devices hold exactly its share of the global pair axis (axis 1),
    in whole batch shards (one block or several: `process_shards`): a pair axis the batch shards do not
    divide is replicated (`logical_to_spec`), which one process can do with its own pairs and several cannot."""
    n = jax.process_count()
    if n == 1:
        return
    ways = int(sharding.mesh.shape["data"] * sharding.mesh.shape["fsdp"])
    if ways % n:
        raise MeshError(
            f"the mesh's data*fsdp={ways} batch shards do not split over {n} processes: make "
            f"mesh.data*mesh.fsdp a multiple of {n} (mesh.tensor must not span processes)"
        )
    spans = {
        (idx[1].start or 0, gshape[1] if idx[1].stop is None else idx[1].stop)
        for idx in sharding.addressable_devices_indices_map(gshape).values()
    }
    held = sum(stop - start for start, stop in spans)
    if gshape[1] % ways:
        raise MeshError(
            f"a microbatch's {gshape[1]} pairs (rows) do not split over the mesh's data*fsdp={ways} batch "
            f"shards of {n} processes; make train.micro_batch a multiple of {ways}"
        )
    if held != gshape[1] // n:  # a process's devices span more batch shards than its share
        raise MeshError(
            f"this process's devices hold {held} of a microbatch's {gshape[1]} pairs, not 1/{n} of them: "
            "mesh.tensor must not span processes"
        )


def check_microbatch_split(pairs: int, mesh, rules=None) -> None:
    """`check_pair_split` for a microbatch of `pairs` pairs, before any batch exists (a run's start-up)."""
    check_pair_split(pair_sharding((1, pairs), mesh, rules), (1, pairs))


def put_batch(batch: StepBatch, shardings: StepBatch) -> StepBatch:
    """Each process contributes its own pairs; together they form the global batch."""

    def one(v, sharding: NamedSharding):
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        check_pair_split(sharding, tuple(gshape))
        return jax.make_array_from_process_local_data(sharding, v, tuple(gshape))

    return jax.tree.map(one, batch, shardings)


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
    process_shards: tuple[int, ...] = ()  # this process's batch shards (`process_shards`)

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
            response_logits=bool(cfg.loss.logits_on_responses),
            share=bool(cfg.data.share_prompt),
            packing=bool(cfg.data.packing),
            pack_length=int(cfg.data.pack_length) or max(buckets),
            compact=int(cfg.data.compact_tokens),
            process_count=jax.process_count(),
            # share_prompt's scoring plan names global rows and pairs
            process_shards=process_shards(mesh, rules) if cfg.data.share_prompt else (),
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

    def _compact(self, out: StepBatch) -> StepBatch:
        """data.compact_tokens: kept tokens per group of rows, one group per local batch shard."""
        local_shards = max(1, self.batch_shards // self.process_count)
        G = local_shards if out.input_ids.shape[1] % local_shards == 0 else 1  # axis 1 is the sharded one
        N = batching.kept_tokens(token_mask(out), G, self.compact)
        return add_token_layout(out, G, agree_max(N))  # every process must agree on the kept-token count

    def __call__(self, coll: dict[str, np.ndarray]) -> tuple[StepBatch, dict[str, float]]:
        """(step batch, padding stats) of one collated batch of this process's pairs."""
        stats = batching.padding_stats(coll)
        if self.share:
            coll = self._shared_rows(coll)
            stats = batching.padding_stats(coll)
        if self.head:
            coll = batching.with_dummy_head_inputs(coll, self.pad_id)
        # every process must agree on the step's lengths
        T = agree_max(coll["input_ids"].shape[1])
        if coll["input_ids"].shape[1] < T:  # widened to another process's length: padding is counted in it
            total = coll["input_ids"].shape[0] * T
            stats["padding_fraction"] = (total - stats["real_tokens"]) / total
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
            coll, self.num_micro, T, head=self.head, P=P, window=R, scored=S, shards=self.process_shards
        )
        if self.compact:
            out = self._compact(out)
        # the share of padded positions the token-wise layers still compute (0 when all are skipped)
        mask = token_mask(out)
        kept = out.tokens
        computed = (
            kept.token_index.shape[-1] * kept.token_index.shape[-2] * mask.shape[0]
            if kept is not None
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
    persona_tokens: int | None = None,
    response: int | None = None,
) -> dict[str, np.ndarray]:
    """A collated batch of `pairs` pairs at the largest step shapes a run of these settings keeps: a
    one-token prompt and two responses of `batching.response_bound` tokens (with EOS), every pair real,
    a direction and a `persona_tokens`-long persona when given. What `alignx plan` compiles the step for.
    `response`: responses of that many tokens instead (the prompt fills the rest of max_length).

    Each of the step's data-dependent lengths is at its bound at once: rows of max_length (two-row
    layout) or `batching.shared_row_bound` (`share_prompt`, and so the most packed rows), the longest
    scored response (the two-row layout's logits window, the shared layout's scored-token list), and
    every position real (a kept-token layout never holds more than all positions)."""
    r = batching.response_bound(max_length) if response is None else min(int(response), max_length - 1)
    ex = batching.DPOExample(
        prompt_ids=[1] * (max_length - r),
        chosen_ids=[2] * r,
        rejected_ids=[2] * r,
        direction=None if persona_tokens is None else np.full((90,), 0.5, np.float32),
        persona_ids=None if persona_tokens is None else [1] * int(persona_tokens),
    )
    return batching.collate([ex] * int(pairs), buckets=buckets, pad_id=pad_id)
