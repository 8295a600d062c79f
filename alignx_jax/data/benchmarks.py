"""The evaluation benchmarks of METHOD.md section 7, each normalised to the row dict.

  * alignx  - AlignX-test rows are AlignX rows (golden direction, demographics, both histories);
  * p-soups - a JSON list of {prompt, chosen, rejected, ground_truth_persona, profile,
              Pair-wise Comparative Feedback}: 4 history pairs, no vectors, `profile` for PBA;
  * uf-p-4, prism - JSON lists with prompt/chosen/rejected plus whichever persona fields the set
              carries (`Pair-wise Comparative Feedback`, `User-Generated Content`,
              `Demographic Information`, `profile`); a missing prompt/chosen/rejected is a DataError.
A path may be a file or a folder (UF-P-4 ships four files: they are read in sorted order).
"""

from __future__ import annotations

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


def load_benchmark(name: str, path: str, *, limit: int | None = None) -> list[dict]:
    """Read one benchmark's rows (every row validated as `name`), the first `limit` if given."""
    if name not in BENCHMARK_KINDS:
        raise DataError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARK_KINDS)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be positive, got {limit}")
    rows, _ = schema.load_rows(path, kind=name)
    if not rows:
        raise DataError("benchmark holds no rows", file=path)
    return rows[:limit] if limit is not None else rows
