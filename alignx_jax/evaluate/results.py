"""What an evaluation reports: accuracy with its Wilson 95% interval, rewards under TRL's metric
names, per-persona and `--flip` breakdowns (`summarize`), and the `--per-example` JSONL log
(`PerExampleLog`, read by `parse_per_example`, which `scoring.StoredScores` reads too)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from alignx_jax import distributed, paths
from alignx_jax.errors import DataError

# Per-example rows are matched on these fields when an evaluation resumes.
KEY_FIELDS: tuple[str, ...] = ("benchmark", "persona", "index")
# The two commands that append rows to a JSONL file of the user's naming, and the fields every row of
# each holds: one command's file given to the other would mix two kinds of rows (`refuse_other_rows`).
ROW_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "eval": ("`alignx eval --per-example`", (*KEY_FIELDS, "logp_chosen")),
    "generate": ("`alignx generate --out`", (*KEY_FIELDS, "output")),
}
# accuracy is reported per persona group (benchmarks.persona_group) when a file has 2..this many
MAX_PERSONA_GROUPS = 16
WILSON_Z95: float = 1.959963984540054


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


# ----------------------------------------------------------------------------- per-example file


class PerExampleLog:
    """The `--per-example` JSONL file: rows already there are reused (resume); new rows are appended
    and flushed batch by batch, so an interrupted evaluation loses at most one batch.

    write=False (the other processes of a multi-process run): read the rows, never write the file.
    A URL (gs://...) goes through etils.epath; such a file cannot be appended to, so it is rewritten
    whole after each batch."""

    def __init__(
        self, path: str | None, *, write: bool = True, flag: str = "--per-example", kind: str = "eval"
    ):
        self.path = None if path is None else paths.absolute(path)
        self.rows: dict[tuple, dict] = {}
        self._f = None
        self._new = False  # a local file not made yet (`append` makes it and its folders)
        self._write = write
        if path is None:
            return
        p = paths.path(path)
        if p.is_dir():
            raise DataError(f"{flag} must be a file, got a folder", file=path)
        refuse_other_rows(path, flag, kind)
        if p.exists():
            self._read()
        if not write:
            return
        if paths.is_url(self.path):
            p.parent.mkdir(parents=True, exist_ok=True)
        elif p.exists():
            self._f = open(self.path, "a", encoding="utf-8")
        else:  # made with its first row: a command refused before then (a bad --model) leaves no empty file
            paths.check_writable(self.path)
            self._new = True

    @classmethod
    def for_job(cls, path: str | None, *, flag: str = "--per-example", kind: str = "eval") -> PerExampleLog:
        """The log as every process of a job opens it: process 0 writes, the others read; a path process 0
        cannot open stops every process together (`distributed.agree`), not only it."""
        from alignx_jax import distributed
        from alignx_jax.errors import AlignXError

        problem, log = None, None
        try:
            log = cls(path, write=paths.is_main_process(), flag=flag, kind=kind)
        except (AlignXError, OSError) as e:
            problem = e if isinstance(e, AlignXError) else AlignXError(f"{flag} {path}: {e}")
        distributed.agree(problem, flag)
        return log

    def _read(self) -> None:
        if paths.is_url(self.path):
            self.rows.update(parse_per_example(paths.path(self.path).read_bytes().split(b"\n"), self.path)[0])
            return
        with open(self.path, "rb") as f:
            data = f.read()
        rows, good_bytes, cut = parse_per_example(data.split(b"\n"), self.path)
        self.rows.update(rows)
        if cut is not None and self._write:  # only the final line may be cut short (killed mid-write)
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        if good_bytes and not data[:good_bytes].endswith(b"\n") and self._write:
            with open(self.path, "ab") as f:  # a complete last row without newline: end it
                f.write(b"\n")

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
        if self._new:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
            self._new = False
        if self._f is None:
            return
        for row in rows:
            self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def append_agreed(self, rows: Iterable[dict], flag: str) -> None:
        """`append`, then (a file given) one check every process of a job makes: a write that failed on
        process 0, the one writer (a full disk), stops them all at this batch (else the others went on into
        the next batch's collectives, or generated on while process 0 waited for them). `flag` names it."""
        problem = None
        try:
            self.append(rows)
        except OSError as e:
            problem = e
        if self.path is not None:
            distributed.agree(problem, flag)
        elif problem is not None:
            raise problem

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def refuse_other_rows(path: str | None, flag: str, kind: str) -> None:
    """DataError when the existing local file `path`, which a `kind` command (a key of ROW_KINDS) would
    append to, holds rows of another kind: its first row is a JSON object without that kind's fields (the
    other command's rows are named as such). An empty file passes; so does a first row cut short by a kill
    and text that is not rows at all, which `parse_per_example` refuses as it reads the file."""
    if path is None or paths.is_url(path) or not os.path.isfile(path):
        return
    row = paths.first_json_line(path)
    if not isinstance(row, dict) or any(k not in row for k in KEY_FIELDS):
        return
    label, fields = ROW_KINDS[kind]
    if all(k in row for k in fields):
        return
    other = [lbl for k, (lbl, f) in ROW_KINDS.items() if k != kind and all(x in row for x in f)]
    held = f"{other[0]} rows" if other else f"rows without {[k for k in fields if k not in row][0]!r}"
    raise DataError(f"{flag} {path} holds {held}, not {label} rows; give a new file")


def key_of(row: dict) -> tuple:
    return (row["benchmark"], row["persona"], int(row["index"]))


def parse_per_example(
    lines: Sequence[bytes], path: str, required: Sequence[str] = KEY_FIELDS
) -> tuple[dict[tuple, dict], int, int | None]:
    """The rows of a per-example JSONL file split into lines, each a JSON object with the `required`
    fields, keyed by `key_of`. Only the last non-blank line may be cut short (by a kill mid-write: the
    head of a JSON object that does not parse): it is left out; any other malformed line is a DataError
    (so a file that is not ours, such as notes given by mistake, is refused, not truncated). Returns the
    rows, the byte length of the lines before the cut one (newlines included) and the cut line's number
    (or None)."""
    rows: dict[tuple, dict] = {}
    good_bytes = 0
    for lineno, raw in enumerate(lines, start=1):
        last = lineno == len(lines)
        if not raw.strip():
            good_bytes += len(raw) + (0 if last else 1)
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or any(k not in row for k in required):
                raise ValueError("not a per-example row")
            bad = [k for k in LOGP_KEYS if isinstance(row.get(k), float) and not math.isfinite(row[k])]
            if bad:  # nothing non-finite is loaded (a NaN would pass as a wrong decision)
                raise DataError(f"line {lineno}: {bad[0]} is {row[bad[0]]}; give a new file", file=path)
            odd = [k for k in LOGP_KEYS if row.get(k) is not None and not _is_number(row[k])]
            if odd:  # read as a number by every use (a string or a list would fail there as a traceback)
                raise DataError(
                    f"line {lineno}: {odd[0]} is {row[odd[0]]!r}, not a number; give a new file", file=path
                )
            rows[key_of(row)] = row  # an index that is no integer or a persona that is a list fails here
        except (ValueError, TypeError) as e:
            head = raw.strip()
            # a kill may cut a row anywhere, down to its opening brace (`{` alone: the head of a row all the same)
            cut = (head == b"{" or head.startswith(b'{"')) and isinstance(e, json.JSONDecodeError)
            if cut and all(not r.strip() for r in lines[lineno:]):  # the rows before a cut last line stand
                return rows, good_bytes, lineno
            raise DataError(
                f"line {lineno}: not a per-example row ({e}); give a new file", file=path
            ) from None
        good_bytes += len(raw) + (0 if last else 1)
    return rows, good_bytes, None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def moved_row(stored: dict, place: tuple[str, int] | None) -> str | None:
    """Where a per-example row recording its benchmark file and row (`file`, `row`) names another row than the
    example of its index now (`place`: its file and row there): the words saying so, else None (rows of older
    files record neither). A file added to or removed from a benchmark folder shifts the later files' rows."""
    if place is None or not isinstance(stored.get("file"), str) or not isinstance(stored.get("row"), int):
        return None
    file, row = place
    if paths.same_place(stored["file"], file) and stored["row"] == row:
        return None
    return (
        f"was scored on {stored['file']} row {stored['row']}, and index {key_of(stored)[2]} is now {paths.absolute(file)} "
        f"row {row} (a file added to or removed from the benchmark folder shifts the later files' rows)"
    )


def missing_logps(row: dict, with_reference: bool) -> list[str]:
    """The log-prob fields a row scored with (or without) a reference must hold and does not (a row edited by
    hand, or written by something else: eval writes them all)."""
    return [k for k in (LOGP_KEYS if with_reference else LOGP_KEYS[:2]) if row.get(k) is None]


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


def summarize(outcomes: Sequence[dict], flip: Sequence[int], beta: float = 0.1) -> dict[str, Any]:
    stats = accuracy_stats([o["correct"] for o in outcomes])
    stats.update(reward_stats(outcomes, beta))
    # pairs whose prompt or a response was cut to --max-length (docs/method.md section 7)
    stats["truncated"] = sum(bool(o.get("truncated")) for o in outcomes)
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
