"""Scoring pairs: the log-probs of chosen and rejected responses, batched (`score_batches`), from
the model (`SequenceScorer`) or from an earlier run's per-example file (`StoredScores`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from alignx_jax import paths
from alignx_jax.errors import DataError
from alignx_jax.evaluate.results import KEY_FIELDS, missing_logps, moved_row, parse_per_example

# Upper bound on the float32 logits one chunk of `sequence_logps` may hold (elements).
_LOGITS_BUDGET: int = 1 << 27


class StoredScores:
    """`--reference-scores FILE`: the reference model's log-probs from an earlier `alignx eval
    --per-example FILE` of that model on the same benchmark, prompts and persona, so a reference
    scored once serves every policy trained from it. Read only; a row must carry the same token
    ids as this run's example and its dtype and matmul precision (`SAME_SETTINGS`)."""

    def __init__(self, path: str):
        if not paths.is_file(path):  # a bucket's file too: `eval --per-example gs://...` writes one
            raise DataError("--reference-scores: no such file", file=path)
        self.path = path
        lines = paths.path(path).read_bytes().split(b"\n")
        self.rows, _, cut = parse_per_example(lines, path, (*KEY_FIELDS, "logp_chosen"))
        if cut is not None:  # a cut last line: the rows before it stand
            print(f"alignx: warning: {path}: line {cut} is cut short; ignored", file=sys.stderr)

    def scorer(
        self,
        benchmark: str,
        persona: str | None,
        examples: Sequence[Any],
        scored_with: dict[str, Any] | None = None,
        places: Sequence[tuple[str, int]] | None = None,
    ) -> Callable:
        """A scorer (batch -> float64 [2B], as SequenceScorer) that looks the batch's examples up. Every
        example's row is checked first, before anything is scored: it must exist, hold the example's token ids
        and have been scored at the `scored_with` values of `SAME_SETTINGS` it records (this run's). `places`:
        each index's benchmark file and row there now, named where a row of other ids recorded another."""
        found = {
            int(ex.index): self._row(
                benchmark, persona, ex, scored_with or {}, None if places is None else places[int(ex.index)]
            )
            for ex in examples
        }

        def score(batch: dict[str, np.ndarray]) -> np.ndarray:
            B = batch["pair_mask"].shape[0]
            out = np.zeros((2 * B,), np.float64)
            for k, i in enumerate(int(x) for x in batch["index"]):
                if i < 0:  # a dummy pair
                    continue
                row = found[i]
                out[k], out[B + k] = row["logp_chosen"], row["logp_rejected"]
            return out

        return score

    def _row(
        self,
        benchmark: str,
        persona: str | None,
        ex: Any,
        scored_with: dict[str, Any],
        place: tuple[str, int] | None = None,
    ) -> dict:
        """The row of one example, refused where it cannot stand for the reference on this run's pair."""
        i = int(ex.index)
        row = self.rows.get((benchmark, persona, i))
        if row is None:
            raise DataError(
                f"no reference row for benchmark {benchmark!r}, persona {persona!r}, example {i}",
                file=self.path,
            )
        # the ids are the cut ones: another --max-length, prompt format, method or persona shows here
        if (row.get("prompt_ids"), row.get("chosen_ids"), row.get("rejected_ids")) != (
            list(ex.prompt_ids),
            list(ex.chosen_ids),
            list(ex.rejected_ids),
        ):
            moved = moved_row(row, place)
            if moved:  # a file added to or removed from the folder, not other settings
                raise DataError(
                    f"example {i} {moved}; score the reference on the folder as it is now", file=self.path
                )
            raise DataError(
                f"example {i} was scored on other token ids (prompt format, method, tokenizer "
                "or max length differ)",
                file=self.path,
            )
        missing = missing_logps(row, with_reference=False)
        if missing:
            raise DataError(f"example {i} has no {missing[0]}", file=self.path)
        for key in SAME_SETTINGS:  # rows of older files name none: taken as they are, as a resume takes them
            if key in row and key in scored_with and row[key] != scored_with[key]:
                raise DataError(
                    f"example {i} was scored with another {key} ({row[key]}, now {scored_with[key]}); score "
                    "the reference with this run's settings",
                    file=self.path,
                )
        return row


# What a --reference-scores row must share with this run besides its token ids: the same ids give other
# log-probs at another compute dtype or matmul precision (`--reference DIR` loads at this run's), so the
# reward's difference would carry rounding, not training. Its model and its own reference may differ.
SAME_SETTINGS: tuple[str, ...] = ("dtype", "matmul_precision")


# ----------------------------------------------------------------------------- scoring


class SequenceScorer:
    """Summed response log-probs of the sequences of a DPO batch, jitted once per batch shape.

    `model` is an NNX `Decoder`; its parameters should already sit on `mesh` (hf.load_pretrained
    with mesh= or sharding.shard_model). Batches are placed on the mesh's data axes.
    share_prompt: score each pair as one row (prompt, chosen, rejected; `batching.share_prompt`),
    the prompt computed once, as training's `data.share_prompt` does; the same log-probs.
    """

    def __init__(self, model: Any, mesh: Any, rules: Any = None, *, share_prompt: bool = False):
        import jax
        from flax import nnx

        self.graphdef, self.state = nnx.split(model)
        self.mesh, self.rules = mesh, rules
        self.share_prompt = share_prompt
        self.vocab_size = int(model.cfg.vocab_size)
        self.max_positions = int(model.cfg.max_position_embeddings or 0)  # 0: no limit known
        self.shapes: set[tuple[int, int]] = set()  # compiled (rows, length) shapes, for tests/logs
        options = model.cfg.compiler_options() or None  # model.cpu_matmul
        self._fn = jax.jit(self._logps, static_argnames=("chunk",), compiler_options=options)
        self._pair_fn = jax.jit(self._pair_logps, static_argnames=("chunk",), compiler_options=options)

    def _logps(
        self, state, input_ids_BT, attention_mask_BT, positions_BT, loss_mask_BT, score_index_BR, *, chunk
    ):
        import jax
        from flax import nnx

        from alignx_jax.losses import window_logps

        model = nnx.merge(self.graphdef, state)
        with jax.named_scope("eval_sequence_logps"):
            h_BTD = model.hidden_states(input_ids_BT, attention_mask_BT, positions_BT)
            # logits only on the response window: prompt positions are never scored
            return window_logps(
                h_BTD,
                model.output_embedding(),
                input_ids_BT,
                loss_mask_BT,
                score_index_BR,
                chunk=chunk,
                softcap=model.cfg.final_logit_softcapping,  # Gemma 2: as `Decoder.cap_logits`
            )

    def _pair_logps(self, state, mb, *, chunk):
        from flax import nnx

        from alignx_jax.train.step import model_pair_logps

        return model_pair_logps(nnx.merge(self.graphdef, state), mb, chunk)

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """float64 `[2B]` log-probs (row order of the batch)."""
        if self.share_prompt:
            return self._score_shared(batch)
        import jax

        from alignx_jax.losses import scored_window
        from alignx_jax.sharding import logical_sharding, use_mesh

        rows, T = batch["input_ids"].shape
        score_index = scored_window(batch["loss_mask"])
        R = score_index.shape[-1]
        # Bound the float32 logits of one time chunk; short batches take a single chunk.
        per_step = rows * self.vocab_size
        chunk = None if per_step * R <= _LOGITS_BUDGET else max(16, _LOGITS_BUDGET // per_step)
        names = ("input_ids", "attention_mask", "positions", "loss_mask")
        sharding = logical_sharding(
            ("activation_batch", "activation_length"), self.mesh, self.rules, (rows, T)
        )
        args = [jax.device_put(np.asarray(batch[k], dtype=np.int32), sharding) for k in names]
        args.append(
            jax.device_put(
                score_index, logical_sharding(("activation_batch", None), self.mesh, self.rules, (rows, R))
            )
        )
        with use_mesh(self.mesh, self.rules):
            out = self._fn(self.state, *args, chunk=chunk)
        self.shapes.add((rows, T))
        return _fetch(out)

    def _score_shared(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import jax

        from alignx_jax.batch import to_microbatches
        from alignx_jax.data.batching import share_prompt
        from alignx_jax.sharding import logical_sharding, use_mesh

        B = batch["pair_mask"].shape[0]
        lengths = batch["attention_mask"][:B].sum(-1) + batch["loss_mask"][B:].sum(-1)
        # pad id 0: padding is masked out of attention and scoring, its value is never read
        shared = share_prompt(batch, buckets=length_buckets(int(lengths.max())), pad_id=0)
        mb = to_microbatches(shared, 1).microbatch(0)  # one microbatch: drop its axis
        rows, T = mb.input_ids.shape
        S = mb.score_flat.shape[0]
        chunk = None if S * self.vocab_size <= _LOGITS_BUDGET else max(16, _LOGITS_BUDGET // self.vocab_size)
        row_sharding = logical_sharding(
            ("activation_batch", "activation_length"), self.mesh, self.rules, (rows, T)
        )
        args = jax.tree.map(
            lambda v: jax.device_put(
                np.asarray(v, np.int32),
                row_sharding
                if v.shape == (rows, T)
                else logical_sharding((None,) * v.ndim, self.mesh, self.rules, v.shape),
            ),
            mb,
        )
        with use_mesh(self.mesh, self.rules):
            out_B2 = self._pair_fn(self.state, args, chunk=chunk)
        self.shapes.add((rows, T))
        lp_B2 = _fetch(out_B2)
        return np.concatenate([lp_B2[:, 0], lp_B2[:, 1]])


def _fetch(out: Any) -> np.ndarray:
    """A scoring program's output as float64 numpy on every process: on a mesh of several processes the
    output is sharded over devices of them all (fetched as it is, a RuntimeError), so each gathers it."""
    import jax

    if isinstance(out, jax.Array) and not out.is_fully_addressable:  # the same on every process
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(jax.device_get(out), dtype=np.float64)


def scorer_on(scorer: Callable, examples_by_index: dict[int, Any], *, pad_id: int) -> Callable:
    """A scorer that scores, for each pair of the batch it is given, `examples_by_index[index]`
    instead (the same pairs with another prompt: `--reference-prompt ica`), in the batch's row order."""
    from alignx_jax.data.batching import collate

    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        B = batch["pair_mask"].shape[0]
        chunk = [examples_by_index[int(i)] for i in batch["index"] if int(i) >= 0]  # dummies come last
        longest = max([ex.length for ex in chunk] + [1])
        return scorer(collate(chunk, buckets=length_buckets(longest), pad_id=pad_id, num_pairs=B))

    return score


def length_buckets(longest: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two and their 1.5x midpoints from `smallest` up to the first >= `longest`:
    at most two compilations per doubling of length, at most 33% padding from the bucket."""
    out = []
    b = smallest
    while True:
        for size in (b, b + b // 2):
            out.append(size)
            if size >= longest:
                return tuple(out)
        b *= 2


def data_parallel_size(mesh: Any) -> int:
    """How many ways a batch is split (the data and fsdp axes, as the training batch is)."""
    return int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1))


def score_batches(
    examples: Sequence[Any],
    scorers: Sequence[SequenceScorer],
    *,
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
    multiple: int = 1,
) -> Iterator[tuple[list[Any], list[np.ndarray]]]:
    """Yield (examples of the batch, per scorer float64 [n, 2] (chosen, rejected) log-probs).

    Examples go longest first (a batch that does not fit memory fails at once, and the progress
    bar's rate is conservative); the number of pairs per batch is padded up to a multiple of
    `multiple` (the data-parallel size) with dummy pairs that are dropped again.
    """
    from alignx_jax.data.batching import collate

    order = sorted(range(len(examples)), key=lambda i: -examples[i].length)
    num_pairs = -(-batch_size // multiple) * multiple
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = collate(chunk, buckets=buckets, pad_id=pad_id, num_pairs=num_pairs)
        n = len(chunk)
        outs = []
        for scorer in scorers:
            lp = scorer(batch)
            outs.append(np.stack([lp[:n], lp[num_pairs : num_pairs + n]], axis=-1))
        yield chunk, outs
