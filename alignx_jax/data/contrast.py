"""Persona-contrast pairs for a file of two opposite personas (P-SOUPS).

A P-SOUPS file holds two opposite personas (docs/method.md section 7): for every pair one persona
prefers, the other prefers the reverse. Trained on the file's rows alone, a persona-conditioned
policy can fit each prompt from its content and never read the persona (each prompt is asked of
mostly one persona). `contrast_rows` adds, for every row, the same prompt and responses under the
other persona's context (every field but prompt/chosen/rejected, taken from a seeded row of the
other persona) with chosen and rejected swapped: the same two responses with opposite labels, so
only the persona tells them apart. It is only true of files built that way; a file with any other
number of personas is refused.

    alignx data contrast TRAIN.json --out TRAIN_CONTRAST.json [--seed S]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from alignx_jax import paths
from alignx_jax.data import schema
from alignx_jax.data.benchmarks import persona_group
from alignx_jax.errors import DataError

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def contrast_rows(rows: Sequence[dict], seed: int = 0, *, file: str | None = None) -> list[dict]:
    """The rows, then one contrast row per row (module docstring), in the same order."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        group = persona_group(row)
        if group is None:
            raise DataError(
                "persona contrast: a row names no persona (ground_truth_persona or user_id)", file=file, row=i
            )
        groups.setdefault(str(group), []).append(i)
    if len(groups) != 2:
        raise DataError(
            f"persona contrast needs exactly two (opposite) personas, as a P-SOUPS file holds; found {len(groups)}",
            file=file,
        )
    rng = np.random.default_rng(seed)
    first, second = sorted(groups)
    other = {first: groups[second], second: groups[first]}
    out = list(rows)
    for row in rows:
        ctx = rows[int(rng.choice(other[str(persona_group(row))]))]
        out.append({**ctx, "prompt": row["prompt"], "chosen": row["rejected"], "rejected": row["chosen"]})
    return out


def cli_contrast(args: argparse.Namespace) -> int:
    """`alignx data contrast PATH --out FILE [--seed S]` (JSON list or JSONL, as the input)."""
    raw = schema.read_file(args.path)
    if raw.fmt not in ("json", "jsonl"):
        raise DataError(f"persona contrast reads a JSON list or JSONL file, not {raw.fmt}", file=args.path)
    for i, message in raw.line_errors.items():
        raise DataError(message, file=args.path, row=i)
    if not raw.rows:
        raise DataError("no rows", file=args.path)
    kind = schema.detect_kind(raw.rows)
    for i, row in enumerate(raw.rows):  # a malformed row fails here, named, before anything is written
        schema.validate_row(row, kind=kind, file=args.path, index=i)
    rows = contrast_rows(raw.rows, args.seed, file=args.path)
    if raw.fmt == "json":
        text = json.dumps(rows, ensure_ascii=False, indent=4) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    out = paths.path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(text.encode("utf-8"))
    print(f"persona contrast: {len(raw.rows)} rows + {len(rows) - len(raw.rows)} contrast rows -> {args.out}")
    return 0
