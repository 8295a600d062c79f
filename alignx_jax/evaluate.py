"""Alignment accuracy on the AlignX benchmarks (docs/method.md section 7) and `alignx eval`.

For each pair, r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), the log-probs summed over the
response tokens plus the closing EOS; the pair is correct iff r(chosen) > r(rejected) strictly.
With no reference the policy's own log-probs are compared.

Scoring is batched: the chosen and rejected sequences of several pairs go through one forward pass
in the DPO batch layout of `data/batching.collate` (right padding, so a causal mask keeps padding
out of every real token's context and a sequence's log-prob does not depend on its neighbours).
Pairs are sorted by length and cut into batches; each batch is padded to a length bucket, so there
is one compilation per bucket shape. Batches are sharded over all devices on the `data` axis with
the training code's mesh and rules.

Choices made here (docs/method.md leaves them open):
  * the release scores one unpadded sequence per forward pass; this module pads, which changes the
    result only by float rounding (tests/test_evaluate.py checks it against transformers);
  * persona variants: `alignx` reports ugc/pair/demo/p separately (default all four); the other
    benchmarks render whichever persona fields a row has (`p`) unless --persona says otherwise.
    When the prompt does not depend on the persona (--method none, or pba with the golden P~) each
    benchmark is scored once and reported without a persona level;
  * a benchmark NAME given twice (e.g. two UF-P-4 files) is reported per file as `NAME:FILE` plus
    the pooled `NAME`;
  * `--flip` reports, besides the overall accuracy, the accuracy on the pairs whose P~ is
    non-neutral on at least one flipped dimension (`involved`) and on the others (`rest`);
  * PBA's P~ (`--preference`): `golden` = the row's `Preference Direction` (else its `profile`),
    `profile` = the row's `profile` text as the release's PBA evaluation uses it, `predicted` = the
    model folder's preference head;
  * `--reference-prompt`: `same` (default) scores the reference on the policy's prompt; `ica` scores
    it on the ICA prompt of the same row (whole history, persona `p` unless a persona variant is being
    scored), as the release's only reference script does, also for a PBA policy;
  * `--prompt-format` defaults to the one the model was trained with when its folder records it
    (`trained_prompt_format`; a `release`-trained model is evaluated with `paper`, the release's
    evaluation input), else `chat`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from alignx_jax import paths
from alignx_jax.errors import AlignXError, CheckpointError, ConfigError, DataError

BENCHMARKS: tuple[str, ...] = ("alignx", "p-soups", "uf-p-4", "prism")
PERSONA_VARIANTS: tuple[str, ...] = ("ugc", "pair", "demo", "p")
PREFERENCES: tuple[str, ...] = ("golden", "predicted", "profile")
REFERENCE_PROMPTS: tuple[str, ...] = ("same", "ica")
# Per-example rows are matched on these fields when an evaluation resumes.
KEY_FIELDS: tuple[str, ...] = ("benchmark", "persona", "index")
# accuracy is reported per persona group (benchmarks.persona_group) when a file has 2..this many
MAX_PERSONA_GROUPS = 16
WILSON_Z95: float = 1.959963984540054
# Upper bound on the float32 logits one chunk of `sequence_logps` may hold (elements).
_LOGITS_BUDGET: int = 1 << 27


# ----------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = WILSON_Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials ((0, 1) when n == 0)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact at the ends (the formula gives 0 / 1 there up to rounding)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def accuracy_stats(correct: Sequence[bool]) -> dict[str, Any]:
    """`{"accuracy", "n", "ci95"}` for a list of per-pair outcomes (accuracy None when empty)."""
    n = len(correct)
    k = int(sum(bool(c) for c in correct))
    lo, hi = wilson_interval(k, n)
    return {"accuracy": (k / n if n else None), "n": n, "ci95": [lo, hi]}


def reward(logp: float, ref_logp: float | None, beta: float) -> float:
    """r(y) = beta * (log pi(y|x) - log pi_ref(y|x)); with no reference, the policy's own log-prob."""
    return float(logp) if ref_logp is None else beta * (float(logp) - float(ref_logp))


def is_correct(
    logp_chosen: float,
    logp_rejected: float,
    ref_logp_chosen: float | None,
    ref_logp_rejected: float | None,
    beta: float,
) -> bool:
    """r(chosen) > r(rejected), strictly: a tie counts as wrong."""
    if (ref_logp_chosen is None) != (ref_logp_rejected is None):
        raise ValueError("both reference log-probs or neither")
    return reward(logp_chosen, ref_logp_chosen, beta) > reward(logp_rejected, ref_logp_rejected, beta)


# ----------------------------------------------------------------------------- arguments


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """One `--benchmark NAME=PATH`: `key` names it in the results and the per-example file."""

    name: str
    path: str
    key: str


def parse_benchmark_specs(specs: Sequence[str]) -> list[BenchmarkSpec]:
    """`NAME=PATH` strings -> specs; a bad name, a missing `=PATH` or a missing path is a DataError."""
    from alignx_jax.data.benchmarks import parse_benchmark_arg

    pairs = []
    for spec in specs:
        name, path = parse_benchmark_arg(spec)
        if not os.path.exists(path):
            raise DataError(f"--benchmark {name}: no such file or folder", file=path)
        pairs.append((name, path))
    counts: dict[str, int] = {}
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
    out, used = [], set()
    for name, path in pairs:
        key = name
        if counts[name] > 1:  # same benchmark from several files: name each by its file
            stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
            key = f"{name}:{stem}"
            k = 2
            while key in used:
                key, k = f"{name}:{stem}.{k}", k + 1
        if key in used:
            raise DataError(f"--benchmark {name} given twice with the same path", file=path)
        used.add(key)
        out.append(BenchmarkSpec(name, path, key))
    return out


def trained_prompt_format(model_dir: str) -> str | None:
    """The `data.prompt_format` the model in `model_dir` was trained with, None when not recorded.

    Looked up, in order: the export manifest's `prompt_format` key (`alignx_export.json`); the run
    config `config.json` of `model_dir` itself (a training workdir) or of the manifest's `source`
    (the workdir the export came from), when it holds `data.prompt_format`."""
    from alignx_jax.data.prompts import PROMPT_FORMATS

    def read(path: str) -> Any:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    manifest = read(os.path.join(model_dir, "alignx_export.json"))
    manifest = manifest if isinstance(manifest, dict) else {}
    if manifest.get("prompt_format") in PROMPT_FORMATS:
        return str(manifest["prompt_format"])
    for folder in (model_dir, manifest.get("source")):
        if not isinstance(folder, str) or not folder:
            continue
        cfg = read(os.path.join(folder, "config.json"))
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if isinstance(data, dict) and data.get("prompt_format") in PROMPT_FORMATS:
            return str(data["prompt_format"])
    return None


def default_prompt_format(model_dir: str, explicit: str | None, *, fallback: str = "chat") -> str:
    """`explicit` if given, else the trained format (`release` -> `paper`, the release's evaluation
    input), else `fallback`. One warning line on stderr when `explicit` differs from the trained one."""
    from alignx_jax.real_model import resolve_model_path

    try:
        trained = trained_prompt_format(resolve_model_path(model_dir))
    except AlignXError:
        trained = None
    if explicit is None:
        return fallback if trained is None else ("paper" if trained == "release" else trained)
    compatible = {"release": ("release", "paper")}.get(trained or "", (trained,))
    if trained is not None and explicit not in compatible:
        print(
            f"alignx: warning: --prompt-format {explicit} differs from the format {model_dir} was trained "
            f"with ({trained})",
            file=sys.stderr,
        )
    return explicit


def persona_dependent(method: str, preference: str) -> bool:
    """Whether the scored prompt depends on the persona (ICA, or PBA with a predicted P~)."""
    return method == "ica" or (method == "pba" and preference == "predicted")


def resolve_personas(value: str | None, benchmark: str, *, method: str, preference: str) -> list[str | None]:
    """The persona variants to score for one benchmark ([None] when the prompt ignores the persona)."""
    if not persona_dependent(method, preference):
        return [None]
    if value is None:
        return list(PERSONA_VARIANTS) if benchmark == "alignx" else ["p"]
    variants = [v.strip().lower() for v in value.split(",") if v.strip()]
    if not variants:
        raise ConfigError("--persona: empty list")
    for v in variants:
        if v not in PERSONA_VARIANTS:
            raise ConfigError(f"--persona: unknown variant {v!r}; expected {', '.join(PERSONA_VARIANTS)}")
    return list(dict.fromkeys(variants))


def parse_flip(value: str | None) -> tuple[int, ...]:
    """`--flip` -> sorted dimension indices. Items are indices (0..89) or labels (either side of a
    dimension, case-insensitive); labels may themselves contain ", " so pieces are re-joined."""
    if value is None or not value.strip():
        return ()
    from alignx_jax.data.persona import NUM_DIMS, load_preference_space

    labels: dict[str, int] = {}
    for d in load_preference_space():
        labels[d["positive_label"].lower()] = d["index"]
        labels[d["negative_label"].lower()] = d["index"]
    parts = [p.strip() for p in value.split(",")]
    dims: set[int] = set()
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):  # longest run of pieces that forms one item
            item = ", ".join(parts[i:j]).lower()
            if j == i + 1 and item.lstrip("-").isdigit():
                dim = int(item)
                if not 0 <= dim < NUM_DIMS:
                    raise ConfigError(f"--flip: dimension {dim} is out of range 0..{NUM_DIMS - 1}")
                dims.add(dim)
                break
            if item in labels:
                dims.add(labels[item])
                break
        else:
            raise ConfigError(f"--flip: {parts[i]!r} is neither a dimension index nor a preference label")
        i = j
    return tuple(sorted(dims))


def flip_direction(direction: Any, dims: Sequence[int]) -> np.ndarray:
    """Reverse the listed dimensions of a direction (1 <-> 0; neutral stays neutral)."""
    out = np.asarray(direction, dtype=np.float32).copy()
    idx = list(dims)
    out[idx] = 1.0 - out[idx]
    return out


def involves(direction: Any, dims: Sequence[int]) -> bool:
    """Whether a direction is non-neutral on any of `dims`."""
    arr = np.asarray(direction, dtype=np.float32)
    return bool(len(dims)) and bool(np.any(arr[list(dims)] != 0.5))


# ----------------------------------------------------------------------------- per-example file


class PerExampleLog:
    """The `--per-example` JSONL file: rows already there are reused (resume); new rows are appended
    and flushed batch by batch, so an interrupted evaluation loses at most one batch.

    write=False (the other processes of a multi-process run): read the rows, never write the file.
    A URL (gs://...) goes through etils.epath; such a file cannot be appended to, so it is rewritten
    whole after each batch."""

    def __init__(self, path: str | None, *, write: bool = True):
        self.path = None if path is None else paths.absolute(path)
        self.rows: dict[tuple, dict] = {}
        self._f = None
        self._write = write
        if path is None:
            return
        p = paths.path(path)
        if p.is_dir():
            raise DataError("--per-example must be a file, got a folder", file=path)
        if p.exists():
            self._read()
        if not write:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        if not paths.is_url(self.path):
            self._f = open(self.path, "a", encoding="utf-8")

    def _read(self) -> None:
        if paths.is_url(self.path):
            self._read_url()
            return
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        good_bytes = 0
        for lineno, raw in enumerate(lines, start=1):
            last = lineno == len(lines)
            if not raw.strip():
                good_bytes += len(raw) + (0 if last else 1)
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict) or any(k not in row for k in KEY_FIELDS):
                    raise ValueError("not a per-example row")
            except ValueError as e:
                # Only the final line may be cut short (killed mid-write): drop it and go on.
                if last or all(not r.strip() for r in lines[lineno:]):
                    if self._write:
                        with open(self.path, "r+b") as f:
                            f.truncate(good_bytes)
                    break
                raise DataError(f"line {lineno}: not a per-example row ({e})", file=self.path) from None
            good_bytes += len(raw) + (0 if last else 1)
            self.rows[key_of(row)] = row
        if good_bytes and not data[:good_bytes].endswith(b"\n") and self._write:
            with open(self.path, "ab") as f:  # a complete last row without newline: end it
                f.write(b"\n")

    def _read_url(self) -> None:
        lines = paths.path(self.path).read_bytes().split(b"\n")
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict) or any(k not in row for k in KEY_FIELDS):
                    raise ValueError("not a per-example row")
            except ValueError as e:
                if all(not r.strip() for r in lines[lineno:]):  # a cut last line: dropped
                    break
                raise DataError(f"line {lineno}: not a per-example row ({e})", file=self.path) from None
            self.rows[key_of(row)] = row

    def get(self, key: tuple) -> dict | None:
        return self.rows.get(key)

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        for row in rows:
            self.rows[key_of(row)] = row
        if self.path is not None and self._write and paths.is_url(self.path):
            text = "".join(json.dumps(r) + "\n" for r in self.rows.values())
            paths.path(self.path).write_text(text, encoding="utf-8")
            return
        if self._f is None:
            return
        for row in rows:
            self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def key_of(row: dict) -> tuple:
    return (row["benchmark"], row["persona"], int(row["index"]))


class StoredScores:
    """`--reference-scores FILE`: the reference model's log-probs from an earlier `alignx eval
    --per-example FILE` of that model on the same benchmark, prompts and persona, so a reference
    scored once serves every policy trained from it. Read only; a row must carry the same token
    ids as this run's example."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise DataError("--reference-scores: no such file", file=path)
        self.path = path
        self.rows: dict[tuple, dict] = {}
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict) or any(k not in row for k in (*KEY_FIELDS, "logp_chosen")):
                    raise ValueError("not a per-example row")
            except ValueError as e:
                if all(not r.strip() for r in lines[lineno:]):  # a cut last line: the rows before it stand
                    print(f"alignx: warning: {path}: line {lineno} is cut short; ignored", file=sys.stderr)
                    break
                raise DataError(f"line {lineno}: not a per-example row ({e})", file=path) from None
            self.rows[key_of(row)] = row

    def scorer(self, benchmark: str, persona: str | None, examples: Sequence[Any]) -> Callable:
        """A scorer (batch -> float64 [2B], as SequenceScorer) that looks the batch's examples up."""
        by_index = {int(ex.index): ex for ex in examples}

        def score(batch: dict[str, np.ndarray]) -> np.ndarray:
            B = batch["pair_mask"].shape[0]
            out = np.zeros((2 * B,), np.float64)
            for k, i in enumerate(int(x) for x in batch["index"]):
                if i < 0:  # a dummy pair
                    continue
                row = self.rows.get((benchmark, persona, i))
                if row is None:
                    raise DataError(
                        f"no reference row for benchmark {benchmark!r}, persona {persona!r}, example {i}",
                        file=self.path,
                    )
                ex = by_index[i]
                if (row.get("prompt_ids"), row.get("chosen_ids"), row.get("rejected_ids")) != (
                    list(ex.prompt_ids),
                    list(ex.chosen_ids),
                    list(ex.rejected_ids),
                ):
                    raise DataError(
                        f"example {i} was scored on other token ids (prompt format, method, tokenizer "
                        "or max length differ)",
                        file=self.path,
                    )
                out[k], out[B + k] = row["logp_chosen"], row["logp_rejected"]
            return out

        return score


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
        self.shapes: set[tuple[int, int]] = set()  # compiled (rows, length) shapes, for tests/logs
        self._fn = jax.jit(self._logps, static_argnames=("chunk",))
        self._pair_fn = jax.jit(self._pair_logps, static_argnames=("chunk",))

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
        return np.asarray(jax.device_get(out), dtype=np.float64)

    def _score_shared(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import jax

        from alignx_jax.batch import to_microbatches
        from alignx_jax.data.batching import share_prompt
        from alignx_jax.sharding import logical_sharding, use_mesh

        B = batch["pair_mask"].shape[0]
        lengths = batch["attention_mask"][:B].sum(-1) + batch["loss_mask"][B:].sum(-1)
        # pad id 0: padding is masked out of attention and scoring, its value is never read
        shared = share_prompt(batch, buckets=length_buckets(int(lengths.max())), pad_id=0)
        mb = {k: v[0] for k, v in to_microbatches(shared, 1).items()}  # one microbatch: drop its axis
        rows, T = mb["input_ids"].shape
        S = mb["score_flat"].shape[0]
        chunk = None if S * self.vocab_size <= _LOGITS_BUDGET else max(16, _LOGITS_BUDGET // self.vocab_size)
        row_sharding = logical_sharding(
            ("activation_batch", "activation_length"), self.mesh, self.rules, (rows, T)
        )
        args = {
            k: jax.device_put(
                np.asarray(v, np.int32),
                row_sharding
                if v.shape == (rows, T)
                else logical_sharding((None,) * v.ndim, self.mesh, self.rules, v.shape),
            )
            for k, v in mb.items()
        }
        with use_mesh(self.mesh, self.rules):
            out_B2 = self._pair_fn(self.state, args, chunk=chunk)
        self.shapes.add((rows, T))
        lp_B2 = np.asarray(jax.device_get(out_B2), dtype=np.float64)
        return np.concatenate([lp_B2[:, 0], lp_B2[:, 1]])


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


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalSettings:
    method: str = "ica"
    persona: str | None = None
    preference: str = "golden"
    flip: tuple[int, ...] = ()
    prompt_format: str = "chat"
    limit: int | None = None
    batch_size: int = 8
    max_length: int = 8192
    beta: float = 0.1
    share_prompt: bool = True  # one row per pair (SequenceScorer): the prompt's compute once
    reference_prompt: str = "same"  # 'same' | 'ica': the prompt the reference is scored on

    def check(self) -> None:
        from alignx_jax.data.prompts import PROMPT_FORMATS

        if self.method not in ("none", "ica", "pba"):
            raise ConfigError(f"--method must be none, ica or pba, got {self.method!r}")
        if self.preference not in PREFERENCES:
            raise ConfigError(
                f"--preference must be one of {', '.join(PREFERENCES)}, got {self.preference!r}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(
                f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}"
            )
        if self.reference_prompt not in REFERENCE_PROMPTS:
            raise ConfigError(
                f"--reference-prompt must be one of {', '.join(REFERENCE_PROMPTS)}, got {self.reference_prompt!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be positive, got {self.limit}")
        if self.max_length < 4:
            raise ConfigError(f"--max-length must be at least 4, got {self.max_length}")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if self.flip and self.method != "pba":
            raise ConfigError("--flip reverses dimensions of P~ and needs --method pba")


def golden_direction(row: dict) -> np.ndarray | None:
    """The row's golden P~: its `Preference Direction`, else its `profile` parsed back; None if neither."""
    from alignx_jax.data import persona as persona_lib

    d = row.get(persona_lib.DIRECTION_FIELD)
    if d is not None:
        return np.asarray(d, dtype=np.float32)
    if isinstance(row.get("profile"), str):
        return persona_lib.parse_profile(row["profile"])
    return None


def file_profile(row: dict, flip: Sequence[int], *, file: str, index: int) -> tuple[str, np.ndarray | None]:
    """`--preference profile`: the row's `profile` text as the release's PBA evaluation renders it
    (flipped through its parsed direction if asked), and that direction when it parses."""
    from alignx_jax.data import persona as persona_lib

    text = row.get("profile")
    if not isinstance(text, str):
        raise DataError("--preference profile needs a `profile` field in every row", file=file, row=index)
    if not flip:
        try:
            return text, persona_lib.parse_profile(text)
        except DataError:  # free text: rendered as is, no direction to report on
            return text, None
    direction = flip_direction(persona_lib.parse_profile(text), flip)
    return persona_lib.profile_text(direction), direction


def golden_profile(row: dict, flip: Sequence[int], *, file: str, index: int) -> tuple[str, np.ndarray | None]:
    """PBA's golden profile text (flipped if asked) and the direction it renders (None if only text)."""
    from alignx_jax.data import persona as persona_lib

    if row.get(persona_lib.DIRECTION_FIELD) is not None:
        direction = np.asarray(row[persona_lib.DIRECTION_FIELD], dtype=np.float32)
    elif isinstance(row.get("profile"), str):
        if not flip:  # the release's exact string (P-SOUPS) when nothing is changed
            return row["profile"], golden_direction(row)
        direction = persona_lib.parse_profile(row["profile"])
    else:
        raise DataError(
            "--preference golden needs a `Preference Direction` or a `profile`", file=file, row=index
        )
    if flip:
        direction = flip_direction(direction, flip)
    return persona_lib.profile_text(direction), direction


class PredictedPreferences:
    """P~ from the model folder's preference head (PBA with `--preference predicted`).

    The head reads the policy's pooled hidden states of the persona-only prompt; here the persona
    variant is the one being evaluated (the paper infers P~ from each persona representation), the
    pooling and token budget are the head's own. Against rows with a golden direction the head's
    agreement is collected for the results' `preference_head` block.
    """

    def __init__(self, model_dir: str, model: Any, tokenizer: Any, *, batch_size: int = 8):
        from alignx_jax.models import preference_head as ph
        from alignx_jax.pba import predict

        if not os.path.isfile(os.path.join(model_dir, ph.HEAD_WEIGHTS_FILE)):
            raise CheckpointError(
                f"{model_dir}: --preference predicted needs {ph.HEAD_WEIGHTS_FILE} "
                "(export a PBA run with its head, or use --preference golden)"
            )
        self._ph, self._predict = ph, predict
        self.head, self.cfg = ph.load_head(model_dir)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.metrics: dict[str, dict[str, float]] = {}
        self._pooled: list[tuple[np.ndarray, np.ndarray, list[dict]]] = []

    def directions(self, rows: Sequence[dict], persona: str, key: str) -> np.ndarray:
        """float32 [N, 90] predicted directions for `rows` under one persona variant."""
        ph = self._ph
        feats = self._predict.persona_features(
            self.model,
            self.tokenizer,
            rows,
            pooling=self.cfg.pooling,
            variant=persona,
            max_tokens=self.cfg.max_persona_tokens,
            batch_size=self.batch_size,
        )
        pred = ph.predict_direction(ph.head_probs(self.head, feats)).astype(np.float32)
        gold = [i for i, r in enumerate(rows) if r.get("Preference Direction") is not None]
        if gold:
            gold_rows = [rows[i] for i in gold]
            gold_dirs = np.asarray([r["Preference Direction"] for r in gold_rows], dtype=np.float32)
            # the release's averaging rule on the same rows, so the head is judged against the baseline
            self.metrics[key] = _finite(
                {**ph.head_metrics(pred[gold], gold_dirs), **self._predict.heuristic_metrics(gold_rows)}
            )
            self._pooled.append((pred[gold], gold_dirs, gold_rows))
        return pred

    def describe(self) -> dict[str, Any]:
        """`accuracy`/`macro_f1` of the head and `heuristic_*` of the release rule, pooled over every
        benchmark/persona scored (rows with a golden direction), plus the per-benchmark breakdown."""
        out: dict[str, Any] = {"config": self.cfg.to_json()}
        if self._pooled:
            pred = np.concatenate([p for p, _, _ in self._pooled])
            gold = np.concatenate([g for _, g, _ in self._pooled])
            rows = [r for _, _, rs in self._pooled for r in rs]
            out.update(
                _finite({**self._ph.head_metrics(pred, gold), **self._predict.heuristic_metrics(rows)})
            )
            out["n"] = int(len(rows))
        out["agreement_with_golden"] = self.metrics
        return out


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (a class absent from gold and prediction) -> None, so the results stay valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _prepare(
    rows: Sequence[dict],
    spec: BenchmarkSpec,
    persona: str | None,
    settings: EvalSettings,
    tokenizer: Any,
    predicted: PredictedPreferences | None,
) -> tuple[list[Any], list[bool | None]]:
    """DPOExamples for one benchmark and persona, and per example whether P~ involves --flip dims."""
    from alignx_jax.data.batching import make_example

    directions = None
    if settings.method == "pba" and settings.preference == "predicted":
        assert predicted is not None
        directions = predicted.directions(
            rows, persona or "p", spec.key if persona is None else f"{spec.key}/{persona}"
        )
    examples, involved = [], []
    for i, row in enumerate(rows):
        profile, direction = None, None
        if settings.method == "pba":
            if directions is not None:
                direction = directions[i]
                from alignx_jax.data.persona import profile_text

                profile = profile_text(
                    flip_direction(direction, settings.flip) if settings.flip else direction
                )
            elif settings.preference == "profile":
                profile, direction = file_profile(row, settings.flip, file=spec.path, index=i)
            else:
                profile, direction = golden_profile(row, settings.flip, file=spec.path, index=i)
        ex = make_example(
            tokenizer,
            row,
            method=settings.method,
            persona=persona or "p",
            max_length=settings.max_length,
            prompt_format=settings.prompt_format,
            profile=profile,
            index=i,
            eval_mode=True,
        )
        examples.append(ex)
        # "involves" is judged on the unflipped P~ (flipping keeps neutral dims neutral anyway)
        involved.append(
            None if not settings.flip or direction is None else involves(direction, settings.flip)
        )
    return examples, involved


def _example_row(
    spec: BenchmarkSpec,
    persona: str | None,
    ex: Any,
    lp: np.ndarray,
    ref: np.ndarray | None,
    beta: float,
    involved: bool | None,
    ica_reference: bool = False,
) -> dict[str, Any]:
    row = {
        "benchmark": spec.key,
        "persona": persona,
        "index": int(ex.index),
        "prompt_ids": list(ex.prompt_ids),
        "chosen_ids": list(ex.chosen_ids),
        "rejected_ids": list(ex.rejected_ids),
        "logp_chosen": float(lp[0]),
        "logp_rejected": float(lp[1]),
        "ref_logp_chosen": None if ref is None else float(ref[0]),
        "ref_logp_rejected": None if ref is None else float(ref[1]),
    }
    row["correct"] = is_correct(
        row["logp_chosen"], row["logp_rejected"], row["ref_logp_chosen"], row["ref_logp_rejected"], beta
    )
    if involved is not None:
        row["flip_involved"] = involved
    if ica_reference and ref is not None:
        row["reference_prompt"] = "ica"
    return row


def _check_resumed(stored: dict, ex: Any, has_ref: bool, path: str, ica_reference: bool = False) -> None:
    """A resumed row must describe the same token ids and reference setting as this run."""
    same = (
        stored.get("prompt_ids") == list(ex.prompt_ids)
        and stored.get("chosen_ids") == list(ex.chosen_ids)
        and stored.get("rejected_ids") == list(ex.rejected_ids)
        and (stored.get("ref_logp_chosen") is not None) == has_ref
        and (stored.get("reference_prompt") == "ica") == (has_ref and ica_reference)
    )
    if not same:
        raise DataError(
            f"row {key_of(stored)} was written by a run with other settings (prompt, tokenizer, "
            "max length or reference); use a new --per-example file",
            file=path,
        )


LOGP_KEYS = ("logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected")


def reward_stats(outcomes: Sequence[dict], beta: float) -> dict[str, float]:
    """Means over pairs under TRL's metric names (as `alignx train` logs them): `rewards/accuracies`
    (= `accuracy`), `rewards/chosen`, `rewards/rejected`, `rewards/margins` (rewards as `reward`: beta *
    (log pi - log ref), the policy's own log-prob without a reference), `logps/chosen`, `logps/rejected`
    (summed response log-probs). Empty when no outcome carries its log-probs."""
    have = [o for o in outcomes if o.get("logp_chosen") is not None and o.get("logp_rejected") is not None]
    if not have:
        return {}
    lc = np.array([float(o["logp_chosen"]) for o in have])
    lr = np.array([float(o["logp_rejected"]) for o in have])
    rc = np.array([reward(o["logp_chosen"], o.get("ref_logp_chosen"), beta) for o in have])
    rr = np.array([reward(o["logp_rejected"], o.get("ref_logp_rejected"), beta) for o in have])
    return {
        "rewards/accuracies": float(np.mean([bool(o["correct"]) for o in have])),
        "rewards/chosen": float(rc.mean()),
        "rewards/rejected": float(rr.mean()),
        "rewards/margins": float((rc - rr).mean()),
        "logps/chosen": float(lc.mean()),
        "logps/rejected": float(lr.mean()),
    }


def _summarize(outcomes: Sequence[dict], flip: Sequence[int], beta: float = 0.1) -> dict[str, Any]:
    stats = accuracy_stats([o["correct"] for o in outcomes])
    stats.update(reward_stats(outcomes, beta))
    groups: dict[str, list[bool]] = {}
    for o in outcomes:
        if o.get("group") is not None:
            groups.setdefault(str(o["group"]), []).append(o["correct"])
    if 1 < len(groups) <= MAX_PERSONA_GROUPS:  # P-SOUPS' two personas; not AlignX's thousands of users
        stats["by_persona"] = {g: accuracy_stats(c) for g, c in sorted(groups.items())}
    if flip:
        inv = [o["correct"] for o in outcomes if o.get("flip_involved")]
        rest = [o["correct"] for o in outcomes if not o.get("flip_involved")]
        stats["flip"] = {"dims": list(flip), "involved": accuracy_stats(inv), "rest": accuracy_stats(rest)}
    return stats


def evaluate(
    model_dir: str,
    benchmarks: Sequence[BenchmarkSpec],
    settings: EvalSettings,
    *,
    reference_dir: str | None = None,
    per_example: str | None = None,
    mesh: Any = None,
    rules: Any = None,
    progress: bool = True,
    dtype: str | None = None,
    reference_scores: str | None = None,
) -> dict[str, Any]:
    """Score every benchmark (and persona variant) and return the results dict of `alignx eval`.
    reference_scores: a per-example file of the reference model (`StoredScores`), instead of
    `reference_dir`."""
    from tqdm.auto import tqdm

    from alignx_jax.data.benchmarks import load_benchmark, persona_group
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.real_model import resolve_model_path
    from alignx_jax.sharding import make_mesh
    from alignx_jax.tokenizer import load_tokenizer

    settings.check()
    model_dir, reference_dir = (
        resolve_model_path(model_dir),
        reference_dir and resolve_model_path(reference_dir),
    )
    for d, what in ((model_dir, "--model"), (reference_dir, "--reference")):
        if d is not None and not paths.path(d).is_dir():
            raise CheckpointError(f"{what}: model folder not found: {d}")
    if (
        settings.method == "pba"
        and settings.preference == "predicted"
        and not os.path.isfile(os.path.join(model_dir, "preference_head.safetensors"))
    ):  # fail before loading anything
        raise CheckpointError(
            f"{model_dir}: --preference predicted needs preference_head.safetensors "
            "(export a PBA run with its head, or use --preference golden)"
        )
    if reference_dir is not None and reference_scores is not None:
        raise ConfigError("--reference and --reference-scores are two references; give one")
    ref_scores = StoredScores(reference_scores) if reference_scores is not None else None
    # Read every benchmark first: a bad file fails before minutes of model loading.
    data = [(spec, load_benchmark(spec.name, spec.path, limit=settings.limit)) for spec in benchmarks]

    tokenizer = load_tokenizer(model_dir)
    if settings.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{model_dir}: the tokenizer has no chat template; use --prompt-format paper")
    mesh = make_mesh(data=-1) if mesh is None else mesh
    kwargs = {} if dtype is None else {"dtype": dtype}
    policy = load_pretrained(model_dir, mesh=mesh, rules=rules, **kwargs)
    scorers = [SequenceScorer(policy, mesh, rules, share_prompt=settings.share_prompt)]
    if reference_dir is not None:
        reference = load_pretrained(reference_dir, mesh=mesh, rules=rules, **kwargs)
        if int(reference.cfg.vocab_size) != int(policy.cfg.vocab_size):
            raise CheckpointError(
                f"--reference {reference_dir}: vocabulary size {reference.cfg.vocab_size} "
                f"differs from the policy's {policy.cfg.vocab_size}"
            )
        scorers.append(SequenceScorer(reference, mesh, rules, share_prompt=settings.share_prompt))
    predicted = None
    if settings.method == "pba" and settings.preference == "predicted":
        predicted = PredictedPreferences(model_dir, policy, tokenizer, batch_size=settings.batch_size)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    has_ref = reference_dir is not None or ref_scores is not None
    # --reference-prompt ica: the reference reads the row's ICA prompt (for ICA that is the same prompt)
    ica_reference = has_ref and settings.reference_prompt == "ica" and settings.method != "ica"

    # every process scores every batch (its devices compute their slice of the global mesh); process 0
    # alone writes the per-example file, and all must resume from the same rows or their batches differ
    log = PerExampleLog(per_example, write=paths.is_main_process())
    _check_same_rows_everywhere(log)
    per_key: dict[str, dict[str | None, list[dict]]] = {}
    try:
        for spec, rows in data:
            for persona in resolve_personas(
                settings.persona, spec.name, method=settings.method, preference=settings.preference
            ):
                examples, involved = _prepare(rows, spec, persona, settings, tokenizer, predicted)
                ica_persona, ica_by_index = persona or "p", {}
                if ica_reference:
                    ica_settings = dataclasses.replace(settings, method="ica", flip=())
                    ica_examples, _ = _prepare(rows, spec, ica_persona, ica_settings, tokenizer, None)
                    ica_by_index = {ex.index: ex for ex in ica_examples}
                outcomes: list[dict] = []
                todo = []
                for ex, inv in zip(examples, involved):
                    stored = log.get((spec.key, persona, ex.index))
                    if stored is None:
                        todo.append((ex, inv))
                        continue
                    _check_resumed(stored, ex, has_ref, per_example, ica_reference)
                    # recompute `correct` with this run's beta; flip membership from this run
                    outcomes.append(
                        {
                            "correct": is_correct(
                                stored["logp_chosen"],
                                stored["logp_rejected"],
                                stored["ref_logp_chosen"],
                                stored["ref_logp_rejected"],
                                settings.beta,
                            ),
                            "flip_involved": inv,
                            "group": persona_group(rows[ex.index]),
                            **{k: stored.get(k) for k in LOGP_KEYS},
                        }
                    )
                if todo:
                    inv_by_index = {ex.index: inv for ex, inv in todo}
                    todo_ex = [ex for ex, _ in todo]
                    buckets = length_buckets(
                        max(
                            len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))
                            for ex in todo_ex
                        )
                    )
                    desc = spec.key if persona is None else f"{spec.key}/{persona}"
                    with tqdm(
                        total=len(todo_ex), desc=desc, unit="pair", disable=not progress, initial=0
                    ) as bar:
                        run_scorers = (
                            scorers
                            if ref_scores is None
                            else [*scorers, ref_scores.scorer(spec.key, persona, todo_ex)]
                        )
                        if ica_reference:
                            ref_scorer = (
                                scorers[1]
                                if ref_scores is None
                                else ref_scores.scorer(
                                    spec.key, ica_persona, [ica_by_index[ex.index] for ex in todo_ex]
                                )
                            )
                            run_scorers = [scorers[0], scorer_on(ref_scorer, ica_by_index, pad_id=pad_id)]
                        for chunk, outs in score_batches(
                            todo_ex,
                            run_scorers,
                            batch_size=settings.batch_size,
                            pad_id=pad_id,
                            buckets=buckets,
                            multiple=data_parallel_size(mesh),
                        ):
                            new_rows = [
                                _example_row(
                                    spec,
                                    persona,
                                    ex,
                                    outs[0][j],
                                    outs[1][j] if has_ref else None,
                                    settings.beta,
                                    inv_by_index[ex.index],
                                    ica_reference,
                                )
                                for j, ex in enumerate(chunk)
                            ]
                            log.append(new_rows)
                            outcomes.extend({**r, "group": persona_group(rows[r["index"]])} for r in new_rows)
                            bar.update(len(chunk))
                per_key.setdefault(spec.key, {})[persona] = outcomes
    finally:
        log.close()

    results: dict[str, Any] = {
        "model": paths.absolute(model_dir),
        "reference": (None if reference_dir is None else paths.absolute(reference_dir))
        if ref_scores is None
        else {"scores": paths.absolute(ref_scores.path)},
        "method": settings.method,
        # resolved per benchmark key; null where the prompt does not depend on the persona
        "persona": {
            spec.key: _none_if_independent(
                resolve_personas(
                    settings.persona, spec.name, method=settings.method, preference=settings.preference
                )
            )
            for spec in benchmarks
        },
        "preference": settings.preference if settings.method == "pba" else None,
        "reference_prompt": ("ica" if ica_reference else "same") if has_ref else None,
        "prompt_format": settings.prompt_format,
        "max_length": settings.max_length,
        "beta": settings.beta,
        "limit": settings.limit,
        "flip": list(settings.flip) or None,
        "benchmarks": {},
    }
    by_name: dict[str, list[BenchmarkSpec]] = {}
    for spec in benchmarks:
        by_name.setdefault(spec.name, []).append(spec)
    for name, specs in by_name.items():
        entries = [(spec.key, per_key[spec.key]) for spec in specs]
        if len(specs) > 1:  # pooled over the files, then each file
            pooled: dict[str | None, list[dict]] = {}
            for _, by_persona in entries:
                for persona, outs in by_persona.items():
                    pooled.setdefault(persona, []).extend(outs)
            entries = [(name, pooled)] + entries
        for key, by_persona in entries:
            nested = name == "alignx" and list(by_persona) != [None] or len(by_persona) > 1
            if nested:
                results["benchmarks"][key] = {
                    p: _summarize(o, settings.flip, settings.beta) for p, o in by_persona.items()
                }
            else:
                results["benchmarks"][key] = _summarize(
                    next(iter(by_persona.values())), settings.flip, settings.beta
                )
    if predicted is not None:
        results["preference_head"] = predicted.describe()
    return results


def _check_same_rows_everywhere(log: PerExampleLog) -> None:
    """A multi-process evaluation resumes only if every process read the same per-example rows (a
    shared file system or URL); otherwise their batches would differ and the collectives hang."""
    if paths.process_count() <= 1:
        return
    from jax.experimental import multihost_utils

    try:
        multihost_utils.assert_equal(np.int64(len(log.rows)), "per-example rows")
    except AssertionError:
        raise ConfigError(
            f"--per-example {log.path}: the processes read different rows; put it on a file system "
            "every host sees (or a gs:// URL)"
        ) from None


def _none_if_independent(personas: list[str | None]) -> list[str] | None:
    return None if personas == [None] else personas


def _format_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for key, entry in results["benchmarks"].items():
        items = [(None, entry)] if "accuracy" in entry else list(entry.items())
        for persona, stats in items:
            name = key if persona is None else f"{key}/{persona}"
            acc = "n/a" if stats["accuracy"] is None else f"{100 * stats['accuracy']:.2f}%"
            lo, hi = stats["ci95"]
            lines.append(f"{name:<28} {acc:>8}  n={stats['n']:<6} 95% CI [{100 * lo:.1f}, {100 * hi:.1f}]")
            for group, g in (stats.get("by_persona") or {}).items():
                a = "n/a" if g["accuracy"] is None else f"{100 * g['accuracy']:.2f}%"
                lines.append(f"  persona {group[:60]!r}: {a} n={g['n']}")
            if "flip" in stats:
                for part in ("involved", "rest"):
                    s = stats["flip"][part]
                    a = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
                    lines.append(f"  flip {part:<21} {a:>8}  n={s['n']}")
    return lines


def cli_eval(args: argparse.Namespace) -> int:
    """`alignx eval`: write RESULTS.json and print one line per benchmark (and persona)."""
    if args.out and paths.path(args.out).is_dir():
        raise ConfigError(f"--out must be a file, got a folder: {args.out}")
    specs = parse_benchmark_specs(args.benchmark)
    reference = None if args.reference in (None, "", "none") else args.reference
    settings = EvalSettings(
        method=args.method,
        persona=args.persona,
        preference=args.preference,
        flip=parse_flip(args.flip),
        prompt_format=default_prompt_format(args.model, args.prompt_format),
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        beta=args.beta,
        share_prompt=not args.no_share_prompt,
        reference_prompt=getattr(args, "reference_prompt", "same"),
    )
    try:
        # `--dtype` None: load_pretrained's default (float32)
        results = evaluate(
            args.model,
            specs,
            settings,
            reference_dir=reference,
            per_example=args.per_example,
            dtype=args.dtype,
            reference_scores=args.reference_scores,
        )
    except OSError as e:  # unreadable or unwritable files are the user's to fix
        raise AlignXError(f"eval: {e}") from e
    if not paths.is_main_process():  # process 0 writes the one results file of a multi-process run
        return 0
    out = paths.path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / (out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)  # never leave a half-written results file
    for line in _format_table(results):
        print(line)
    print(f"results: {args.out}")
    return 0
