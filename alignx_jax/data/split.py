"""Train/test splits that keep groups whole: by prompt, by user or by row.

  * by='prompt': every row of a prompt lands in the same half, so no test prompt was trained on
    (for P-SOUPS each prompt carries both personas, so both personas appear in both halves);
  * by='user': groups by `user_id`, else `ground_truth_persona`, else the persona itself
    (demographics + both histories): rows that share a persona are one user;
  * by='row': rows independently.
Groups are shuffled by `seed`; round(test_fraction * groups) go to test (at least one group on each
side when there are two or more and 0 < test_fraction < 1). Rows keep their input order.
`alignx data split` writes DIR/train/NAME and DIR/test/NAME in the input's own format.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from alignx_jax import paths
from alignx_jax.data import persona as persona_lib
from alignx_jax.data import schema
from alignx_jax.errors import DataError

SPLIT_BY = ("prompt", "user", "row")


def _user_key(row: dict) -> str:
    if row.get("user_id") is not None:
        return f"id:{json.dumps(row['user_id'])}"  # 1 and "1" are two users: the key keeps the JSON type
    if row.get("ground_truth_persona") is not None:
        return f"persona:{row['ground_truth_persona']}"
    fields = {k: row.get(k) for k in (persona_lib.DEMO_FIELD, persona_lib.UGC_FIELD, persona_lib.PAIR_FIELD)}
    return "history:" + json.dumps(fields, sort_keys=True, ensure_ascii=False)


def group_keys(rows: Sequence[dict], by: str) -> list:
    """Each row's group under `by` (rows of one key land in the same half)."""
    if by not in SPLIT_BY:
        raise DataError(f"unknown split key {by!r}; expected one of {', '.join(SPLIT_BY)}")
    return [
        i if by == "row" else (r["prompt"] if by == "prompt" else _user_key(r)) for i, r in enumerate(rows)
    ]


def split_indices(
    rows: Sequence[dict], *, by: str = "prompt", test_fraction: float = 0.5, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Indices of the train and test rows (see the module docstring)."""
    return split_keys(group_keys(rows, by), test_fraction=test_fraction, seed=seed)


def split_keys(keys: Sequence, *, test_fraction: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """`split_indices` of rows whose `group_keys` are `keys`."""
    if not 0.0 <= test_fraction <= 1.0:
        raise DataError(f"test fraction must be between 0 and 1, got {test_fraction}")
    groups = list(dict.fromkeys(keys))  # first-appearance order: independent of hash seeds
    n_test = int(round(test_fraction * len(groups)))
    if len(groups) >= 2 and 0.0 < test_fraction < 1.0:
        n_test = min(max(n_test, 1), len(groups) - 1)
    order = np.random.default_rng(seed).permutation(len(groups))
    test_groups = {groups[i] for i in order[:n_test]}
    train = [i for i, k in enumerate(keys) if k not in test_groups]
    test = [i for i, k in enumerate(keys) if k in test_groups]
    return train, test


def split_rows(
    rows: Sequence[dict], *, by: str = "prompt", test_fraction: float = 0.5, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, test) rows; see the module docstring for what stays together."""
    train, test = split_indices(rows, by=by, test_fraction=test_fraction, seed=seed)
    return [rows[i] for i in train], [rows[i] for i in test]


def rows_bytes(raw: schema.RawFile, picks: list[int]) -> bytes:
    """The picked rows of `raw` as a file in the input's format."""
    if raw.fmt == "parquet" and not raw.rows and schema.is_empty_file(raw.path):
        return b""  # a 0-byte input (no rows, no columns) is written as it was: pyarrow cannot read it
    if raw.fmt == "parquet":
        import io

        import pyarrow.parquet as pq

        # Re-read as a table so the output keeps the input's exact column types.
        table = schema.read_parquet_table(raw.path)
        buf = io.BytesIO()
        pq.write_table(table.take(np.asarray(picks, dtype=np.int64)), buf)
        return buf.getvalue()
    if raw.fmt == "json":
        return (json.dumps([raw.rows[i] for i in picks], ensure_ascii=False, indent=4) + "\n").encode("utf-8")
    return "".join(json.dumps(raw.rows[i], ensure_ascii=False) + "\n" for i in picks).encode("utf-8")


def write_rows(raw: schema.RawFile, picks: list[int], dest: str) -> None:
    """The picked rows of `raw` into `dest` (a local path or a URL), in the input's format."""
    paths.write_all({dest: rows_bytes(raw, picks)})


def _refuse_inputs_inside(out: str, inputs: list[str], dests: list[str]) -> None:
    """DataError when an input file lies inside `out`, local or a URL: a dest that names it would replace
    it; else it would sit beside the train/ and test/ written there, a folder every reader refuses
    (`schema.split_folders`), so `data split DIR --out DIR` would spoil its own input folder."""

    ins = {paths.place(p): p for p in inputs}
    for d in dests:  # by place: a symlinked OUT/train can lead outside `out`
        if paths.place(d) in ins:
            raise DataError(
                "--out would overwrite this input file; choose another --out", file=ins[paths.place(d)]
            )
    inside = [p for p in inputs if paths.within(p, out) and paths.place(p) != paths.place(out)]
    if inside:
        raise DataError(
            f"--out {out} holds the input file {inside[0]}: the train/ and test/ written beside it would make "
            f"{out} a folder train and eval refuse; choose an --out outside the input",
            file=out,
        )


def _refuse_other_splits(out: str, dests: set[str]) -> None:
    """A data file of another split in OUT/train or OUT/test would be read beside this one as one data set."""
    for half in ("train", "test"):
        try:
            there = schema.list_files(_join(out, half)) if paths.is_dir(_join(out, half)) else []
        except DataError:  # an empty folder (no data files) holds nothing that would be read
            there = []
        other = [f for f in there if f not in dests]
        if other:
            raise DataError(
                f"--out holds another split's file {other[0]}, which would be read with this one; "
                "choose another --out or remove it",
                file=out,
            )


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if paths.is_url(root) else os.path.join(root, *parts)


def cli_split(args: argparse.Namespace) -> int:
    """`alignx data split PATH --by prompt|user|row --test-fraction F --seed S --out DIR`."""
    if not 0.0 <= args.test_fraction <= 1.0:  # NaN too: no comparison holds for it
        raise DataError(f"--test-fraction {args.test_fraction}: the test fraction must be between 0 and 1")
    problem = paths.refuse_unwritable("--out", args.out, folder=True)
    if problem:  # an empty --out was the working directory; a file there failed after the rows were read
        raise DataError(problem)
    schema.split_folders(args.path)  # a data file beside train/, test/ ...: the readers' own line first
    # split whole, both halves would be shuffled together and written to OUT/train/train/..., OUT/train/test/...
    schema.refuse_split_folder(args.path, "split")
    loaded = schema.load(args.path)
    if not loaded.rows:
        raise DataError("no rows", file=args.path)
    keys = group_keys(loaded.rows, args.by)
    train, test = split_keys(keys, test_fraction=args.test_fraction, seed=args.seed)
    groups = set(keys)
    for half, idx in (("train", train), ("test", test)):
        if not idx:  # a file of no rows, which data check, eval and train refuse: not written
            raise DataError(
                f"--by {args.by} --test-fraction {args.test_fraction}: the {half} half would hold no rows "
                f"({len(loaded.rows)} rows in {len(groups)} group(s)); give a fraction strictly between 0 "
                "and 1 and data of two groups or more",
                file=args.path,
            )
    # P-SOUPS: no user ids, a few personas
    if args.by == "user" and all(k.startswith("persona:") for k in groups):
        print(
            f"alignx: warning: {args.path}: no row has a user_id: --by user grouped the rows by "
            f"ground_truth_persona ({len(groups)} groups), so each half holds whole personas; --by prompt "
            "keeps every persona in both halves",
            file=sys.stderr,
        )
    is_dir = paths.is_dir(args.path)
    root = args.path.rstrip("/") if is_dir else os.path.dirname(args.path)
    writes = []
    for half, idx in (("train", train), ("test", test)):
        per_file: dict[int, list[int]] = {fi: [] for fi in range(len(loaded.files))}
        for i in idx:
            fi, ri = loaded.origin[i]
            per_file[fi].append(ri)
        for fi, picks in per_file.items():
            raw = loaded.files[fi]
            if not is_dir:
                rel = os.path.basename(raw.path)
            else:
                rel = (
                    raw.path[len(root) :].lstrip("/")
                    if paths.is_url(root)
                    else os.path.relpath(raw.path, root)
                )
            writes.append((raw, picks, _join(args.out, half, rel)))
    _refuse_inputs_inside(args.out, [raw.path for raw in loaded.files], [dest for _, _, dest in writes])
    _refuse_other_splits(args.out, {dest for _, _, dest in writes})
    # both halves renamed into place together: a kill leaves no train/ without its test/
    paths.write_all({dest: rows_bytes(raw, picks) for raw, picks, dest in writes})
    print(
        f"split {len(loaded.rows)} rows by {args.by}: train {len(train)}, test {len(test)} -> "
        f"{_join(args.out, 'train')}, {_join(args.out, 'test')}"
    )
    return 0
