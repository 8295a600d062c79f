"""The evaluation benchmarks of docs/method.md section 7, each normalised to the row dict.

  * alignx  - AlignX-test rows are AlignX rows (golden direction, demographics, both histories);
  * p-soups - a JSON list of {prompt, chosen, rejected, ground_truth_persona, profile,
              Pair-wise Comparative Feedback}: 4 history pairs, no vectors, `profile` for PBA;
  * uf-p-4, prism - JSON lists with prompt/chosen/rejected plus whichever persona fields the set
              carries (`Pair-wise Comparative Feedback`, `User-Generated Content`,
              `Demographic Information`, `profile`); a missing prompt/chosen/rejected is a DataError.
A path may be a file or a folder (UF-P-4 ships four files: they are read in sorted order).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignx_jax.data import schema
from alignx_jax.errors import DataError

BENCHMARK_KINDS = ("alignx", "p-soups", "uf-p-4", "prism")


def parse_benchmark_arg(spec: str) -> tuple[str, str]:
    """`NAME=PATH` (the `alignx eval --benchmark` syntax) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise DataError(f"--benchmark expects NAME=PATH, got {spec!r}")
    if name not in BENCHMARK_KINDS:
        raise DataError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARK_KINDS)}")
    return name, path


def persona_group(row: dict) -> str | None:
    """Whose preference a row states: P-SOUPS' `ground_truth_persona`, else the row's `user_id`."""
    group = row.get("ground_truth_persona")
    return group if group is not None else row.get("user_id")


def balanced_sample(
    rows: Sequence[dict], n: int, seed: int = 0, *, files: Sequence[str] | None = None
) -> list[int]:
    """`n` row indices, a seeded sample balanced across `persona_group`s, in file order.

    Benchmark files hold one persona's rows in a block (P-SOUPS: 300 rows of each of two): the
    first n rows would be one persona, a score that says nothing about personalization. Groups
    take turns, each in a seeded random order, until n rows are taken. `files` (each row's file, a
    folder's files in order): the files take turns first, each offering its own persona-balanced
    order, so a UF-P-4 folder's sample holds about n / 4 rows of each file. A smaller n's sample is
    part of a larger one's."""
    if n >= len(rows):
        return list(range(len(rows)))
    rng = np.random.default_rng(seed)
    by_file: dict[str, list[int]] = {}
    for i in range(len(rows)):
        by_file.setdefault("" if files is None else files[i], []).append(i)
    # one rng through the files in order: a single file draws exactly as before files took turns
    orders = [_persona_order(rows, members, rng) for members in by_file.values()]
    return sorted(_take_turns(orders)[:n])


def _persona_order(rows: Sequence[dict], members: Sequence[int], rng: np.random.Generator) -> list[int]:
    """`members` in the order `balanced_sample` takes them: persona groups in turn, each seeded-shuffled."""
    groups: dict[Any, list[int]] = {}
    for i in members:
        groups.setdefault(persona_group(rows[i]), []).append(i)
    # each group's permutation is taken from its end
    queues = [
        [int(i) for i in rng.permutation(g)][::-1]
        for _, g in sorted(groups.items(), key=lambda kv: str(kv[0]))
    ]
    return _take_turns(queues)


def _take_turns(queues: Sequence[Sequence[int]]) -> list[int]:
    """The queues' items interleaved: the first of each, then the second of each, ... (an emptied one skipped)."""
    return [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]


def load_benchmark(name: str, path: str, *, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Read one benchmark's rows (every row validated as `name`); with `limit`, a seeded sample of
    that many rows balanced across a folder's files and the personas (`balanced_sample`)."""
    sample = benchmark_sample(name, path, limit=limit, seed=seed)
    return [sample.rows[i] for i in sample.picks]


@dataclass(frozen=True)
class BenchmarkSample:
    """Every row of one benchmark, the row numbers taken, where each row is (its file, its row there), and
    every file read, in order (one that holds no rows is in no place)."""

    rows: list[dict]
    picks: list[int]
    places: list[tuple[str, int]]
    files: list[str] = field(default_factory=list)


def benchmark_sample(name: str, path: str, *, limit: int | None = None, seed: int = 0) -> BenchmarkSample:
    """Every row of one benchmark (validated as `name`; a folder's files in sorted order) and the row
    numbers taken: all of them, or with `limit` the sample balanced across the files and personas
    (`balanced_sample`) `load_benchmark` returns. Results
    name rows by these numbers, so a run with one --limit can reuse another's per-example scores."""
    if name not in BENCHMARK_KINDS:
        raise DataError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARK_KINDS)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be positive, got {limit}")
    schema.refuse_split_folder(path, "score")  # scored whole, it would score its training half too
    loaded = schema.load(path, kind=name)
    rows = loaded.rows
    if not rows:
        raise DataError("benchmark holds no rows", file=path)
    # a folder's files take turns (`balanced_sample`), so --limit samples each of them, not the first ones
    files = [f for f, _ in loaded.places] if len(loaded.files) > 1 else None
    picks = list(range(len(rows))) if limit is None else balanced_sample(rows, limit, seed, files=files)
    return BenchmarkSample(rows, picks, loaded.places, [f.path for f in loaded.files])


def warn_empty_files(name: str, path: str, sample: BenchmarkSample, uses: str) -> None:
    """One line per file of a benchmark folder that holds no rows (an empty file, `[]`): it is read without
    an error, and gives nothing. `uses`: what the command does with the folder's other files."""
    with_rows = {f for f, _ in sample.places}
    for f in sample.files:
        if f not in with_rows:
            print(f"alignx: warning: {f}: holds no rows; --benchmark {name}={path} {uses}", file=sys.stderr)
