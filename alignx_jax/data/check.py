"""`alignx data check`: a data set's summary (rows, kinds, history and length statistics) and its
warnings (chosen == rejected, repeated rows, ...), from `schema.load`; `--strict` makes a warning an error."""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from alignx_jax.data.schema import DEMO, DIRECTION, PAIR, UGC, Loaded, load, split_listing
from alignx_jax.errors import DataError


def _describe(values: list[float]) -> str:
    if not values:
        return "n/a"
    a = np.asarray(values, dtype=np.float64)
    return f"mean {a.mean():.1f}, min {a.min():.0f}, max {a.max():.0f}"


def summary(loaded: Loaded) -> list[str]:
    """Human-readable lines describing a loaded data set (printed by `alignx data check`)."""
    rows = loaded.rows
    lines = [f"rows: {len(rows)}  files: {len(loaded.files)}  kind: {loaded.kind}  skipped: {loaded.skipped}"]
    ugc = Counter(len(r[UGC]) for r in rows)
    pairs = Counter(len(r[PAIR]) for r in rows)
    lines.append(
        "history lengths: UGC "
        + ", ".join(f"{k}:{v}" for k, v in sorted(ugc.items()))
        + " | PAIR "
        + ", ".join(f"{k}:{v}" for k, v in sorted(pairs.items()))
    )
    dirs = [r[DIRECTION] for r in rows if r[DIRECTION] is not None]
    nn = [float(np.sum(np.asarray(d) != 0.5)) for d in dirs]
    lines.append(f"directions: {len(dirs)} rows; non-neutral dims per direction: {_describe(nn)}")
    demo = sum(1 for r in rows if r[DEMO].strip())
    lines.append(
        f"demographics: {demo}/{len(rows)} rows non-empty"
        + (f" ({100.0 * demo / len(rows):.1f}%)" if rows else "")
    )
    profiles = sum(1 for r in rows if r.get("profile"))
    if profiles:
        lines.append(f"profiles: {profiles}/{len(rows)} rows")
    lines.append(f"distinct prompts: {len({r['prompt'] for r in rows})}")
    personas = Counter(r["ground_truth_persona"] for r in rows if "ground_truth_persona" in r)
    for text, n in sorted(personas.items(), key=lambda kv: (-kv[1], kv[0])):
        short = text if len(text) <= 80 else text[:77] + "..."
        lines.append(f"persona ({n} rows): {short}")
    users = {r["user_id"] for r in rows if r.get("user_id") is not None}
    if users:
        lines.append(f"users: {len(users)}")
    return lines


def split_lines(path: str, loaded: Loaded) -> list[str]:
    """One line per split sub-folder of `path` (`alignx data split`'s train/, test/ ...), none for a plain
    file or folder: the totals add the splits together, while `alignx train` reads train/ alone."""
    listing = split_listing(path)
    if not listing:
        return []
    split_of = {f: split for split, (_, files) in listing.items() for f in files}
    kept = Counter(split_of[loaded.files[fi].path] for fi, _ in loaded.origin)
    return [
        f"split {split}/: {kept[split]} rows  files: {len(files)}" for split, (_, files) in listing.items()
    ]


def warnings_for(loaded: Loaded) -> list[DataError]:
    """Rows that are legal but useless or harmful, one DataError per kind of problem (naming the first such
    row): a pair whose chosen and rejected responses are the same text gives DPO nothing to learn; a row
    that repeats an earlier one exactly is counted twice, and `data split --by row` can put one copy in
    each half (a test row trained on)."""
    out = []
    same = [i for i, r in enumerate(loaded.rows) if r["chosen"] == r["rejected"]]
    if same:
        fi, ri = loaded.origin[same[0]]
        more = f"; {len(same)} rows like this" if len(same) > 1 else ""
        out.append(
            DataError(
                f"chosen == rejected: the pair gives DPO no signal{more}",
                file=loaded.files[fi].path,
                row=ri,
                field="rejected",
            )
        )
    dup = _duplicates(loaded.rows)
    if dup:
        (first, earlier), n = dup
        fi, ri = loaded.origin[first]
        efi, eri = loaded.origin[earlier]
        of = "" if efi == fi else f" of {loaded.files[efi].path}"
        more = f"; {n} rows repeat an earlier row" if n > 1 else ""
        out.append(
            DataError(
                f"the same row as row {eri}{of}, every field: `alignx data split --by row` can put one copy "
                f"in each half (a test row trained on){more}",
                file=loaded.files[fi].path,
                row=ri,
            )
        )
    return out


def _duplicates(rows: list[dict]) -> tuple[tuple[int, int], int] | None:
    """((the first row that repeats an earlier one exactly, that earlier row), how many rows repeat an
    earlier one), or None. Rows are compared normalised, by a digest of every field."""
    import hashlib
    import json

    def plain(o):
        return o.tolist() if hasattr(o, "tolist") else str(o)

    seen: dict[bytes, int] = {}
    first, n = None, 0
    for i, r in enumerate(rows):
        key = hashlib.blake2b(
            json.dumps(r, sort_keys=True, default=plain).encode("utf-8"), digest_size=16
        ).digest()
        j = seen.setdefault(key, i)
        if j != i:
            n += 1
            first = first or (i, j)
    return None if first is None else (first, n)


def cli_check(args: argparse.Namespace) -> int:
    """`alignx data check PATH [--kind K] [--strict]`: validate every row and print counts; exit 0 if
    clean. Legal but useless rows are a warning line each on stderr (errors, exit 1, with --strict)."""
    import sys

    loaded = load(args.path, kind=getattr(args, "kind", "auto"))
    if not loaded.rows:
        raise DataError("no rows", file=args.path)
    warnings = warnings_for(loaded)
    if warnings and getattr(args, "strict", False):
        raise warnings[0]
    lines = summary(loaded)
    lines[1:1] = split_lines(args.path, loaded)  # under the totals line, which counts every split
    for line in lines:
        print(line)
    for w in warnings:
        print(f"alignx: warning: {w}", file=sys.stderr)
    return 0
