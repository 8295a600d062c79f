"""Persona-contrast pairs for a file of two opposite personas (P-SOUPS).

A P-SOUPS file holds two opposite personas (docs/method.md section 7): for every pair one persona
prefers, the other prefers the reverse. Trained on the file's rows alone, a persona-conditioned
policy can fit each prompt from its content and never read the persona (each prompt is asked of
mostly one persona). `contrast_rows` adds, for every row, the same prompt and responses under the
other persona's context (every field but prompt/chosen/rejected, taken from a seeded row of the
other persona) with chosen and rejected swapped: the same two responses with opposite labels, so
only the persona tells them apart. It is only true of files built that way; a file with any other
number of personas is refused.

`twins=True` (`--twins`) orders the output as twins instead: the rows in a seeded order, each followed
at once by its contrast row. Trained with `data.twins=true` (the loader shuffles, shards and
length-groups each twin as one unit; an even batch per host), every batch holds whole twins, so a
preference that ignores the persona cancels within the batch and only reading the persona lowers the
loss (docs/recipes.md, section 2, for what it did). `check_twins` is the loader's check of such a file.

The twins assume the personas are opposed on every pair. Where both prefer the same kind of answer
over a plain one (P-SOUPS friendly_unfriendly: each persona's chosen answer is styled its way, the
rejected one mostly plain), that shared preference is real and the twins erase it. `originals=K`
(`--originals K`, not with twins) writes each row K times before the contrast rows: at K=2 a
persona-blind preference keeps a third of its weight (two rows for it, one against) and reading the
persona still pays.

    alignx data contrast TRAIN.json --out TRAIN_CONTRAST.json [--seed S] [--twins | --originals K]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from alignx_jax import paths
from alignx_jax.data import schema
from alignx_jax.data.benchmarks import persona_group
from alignx_jax.errors import AlignXError, DataError


def persona_groups(rows: Sequence[dict]) -> dict[str | int | None, list[int]]:
    """Row indices by `persona_group`, as it is (key None: the rows that name no persona; user_id 1 and "1"
    are two personas, as in `data split`); `contrast_rows` needs exactly two groups and no None."""
    groups: dict[str | int | None, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(persona_group(row), []).append(i)
    return groups


def contrast_rows(
    rows: Sequence[dict],
    seed: int = 0,
    *,
    file: str | None = None,
    twins: bool = False,
    originals: int = 1,
) -> list[dict]:
    """The rows (`originals` times over), then one contrast row per row (module docstring), in the same
    order; with `twins`, each row (in a seeded order) followed by its contrast row."""
    if originals < 1 or (twins and originals != 1):
        raise DataError(
            f"persona contrast: originals={originals}; it must be >= 1, and 1 with twins (a twin is one row "
            "and its contrast row)",
            file=file,
        )
    groups = persona_groups(rows)
    if None in groups:
        raise DataError(
            "persona contrast: a row names no persona (ground_truth_persona or user_id)",
            file=file,
            row=groups[None][0],
        )
    if len(groups) != 2:
        raise DataError(
            f"persona contrast needs exactly two (opposite) personas, as a P-SOUPS file holds; found {len(groups)}",
            file=file,
        )
    rng = np.random.default_rng(seed)
    first, second = groups  # each maps to the other: their order changes nothing
    other = {first: groups[second], second: groups[first]}
    swapped = []
    for row in rows:
        ctx = rows[int(rng.choice(other[persona_group(row)]))]
        swapped.append({**ctx, "prompt": row["prompt"], "chosen": row["rejected"], "rejected": row["chosen"]})
    if not twins:
        return [*(list(rows) * originals), *swapped]
    return [r for i in rng.permutation(len(rows)) for r in (rows[int(i)], swapped[int(i)])]


def check_twins(
    rows: Sequence[dict], file: str | None = None, where: Callable[[int], tuple[str, int]] | None = None
) -> None:
    """`data.twins`: rows 2k and 2k+1 must be twins (the same prompt, chosen and rejected swapped).
    `where(i)`: the (file, row) that row i came from (a folder's or a checked source's), for the error."""
    if len(rows) % 2:
        raise DataError(
            f"data.twins: {len(rows)} rows, an odd number (rows 2k and 2k+1 are twins)", file=file
        )
    for k in range(0, len(rows), 2):
        a, b = rows[k], rows[k + 1]
        if a["prompt"] != b["prompt"] or a["chosen"] != b["rejected"] or a["rejected"] != b["chosen"]:
            named = (file, k + 1) if where is None else where(k + 1)
            raise DataError(
                f"data.twins: rows {k} and {k + 1} of the training rows are not twins (the same prompt with "
                "chosen and rejected swapped; write the file with `alignx data contrast --twins`)",
                file=named[0],
                row=named[1],
            )


def _is_contrast_file(p: str) -> bool:
    """Whether the file `p` is an earlier `alignx data contrast` output: data rows, each beside its
    contrast row (the same prompt with chosen and rejected swapped), as nothing else is."""
    try:
        rows = [r for f in schema.load(p).files for r in f.rows]
    except (AlignXError, OSError, ValueError):
        return False

    def key(r: dict, a: str, b: str) -> str:
        return json.dumps([r.get("prompt"), r.get(a), r.get(b)], sort_keys=True, default=str)

    pairs = {key(r, "chosen", "rejected") for r in rows}
    return bool(rows) and all(key(r, "rejected", "chosen") in pairs for r in rows)


def cli_contrast(args: argparse.Namespace) -> int:
    """`alignx data contrast PATH --out FILE [--seed S]` (JSON list or JSONL, as the input)."""
    from alignx_jax.data.split import write_rows

    # the flags' own errors first, named as given (contrast_rows words them for its callers, as originals=K)
    if args.originals < 1:
        raise DataError(f"--originals {args.originals}: must be 1 or more (each row that many times)")
    if args.twins and args.originals != 1:
        raise DataError(
            f"--originals {args.originals} with --twins: a twin is one row and its contrast row; give one of them"
        )
    problem = paths.refuse_unwritable("--out", args.out, folder=False)
    if problem:  # a folder there, or a file on its path, failed at the write with the system's line
        raise DataError(problem)
    loaded = schema.load(args.path)  # every row validated (file and row named) before anything is written
    if len(loaded.files) != 1 or loaded.files[0].fmt not in ("json", "jsonl"):
        raise DataError("persona contrast reads one JSON list or JSONL file", file=args.path)
    raw = loaded.files[0]
    if not raw.rows:
        raise DataError("no rows", file=args.path)
    problem = paths.refuse_to_replace(
        "--out", args.out, [("input", raw.path)], _is_contrast_file, "an `alignx data contrast` file"
    )
    if problem:
        raise DataError(problem)
    originals = args.originals
    rows = contrast_rows(raw.rows, args.seed, file=args.path, twins=args.twins, originals=originals)
    # written as the input is (JSON Lines in a .json input: JSON Lines in a .json file)
    if schema.EXTENSIONS.get(os.path.splitext(args.out)[1].lower()) != schema.file_format(raw.path):
        raise DataError(
            f"--out must name a .{schema.file_format(raw.path)} file, as the input (it is written in the "
            "input's format)",
            file=args.out,
        )
    write_rows(schema.RawFile(raw.path, raw.fmt, rows), list(range(len(rows))), args.out)
    order = ", as twins (train with data.twins=true, an even batch)" if args.twins else ""
    kept = f"{originals} x {len(raw.rows)}" if originals > 1 else f"{len(raw.rows)}"
    print(f"persona contrast: {kept} rows + {len(raw.rows)} contrast rows{order} -> {args.out}")
    return 0
