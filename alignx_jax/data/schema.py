"""Read and validate AlignX rows and benchmark files (parquet, JSONL, JSON; a file or a folder).

Every row comes out as the normalised dict of docs/ARCHITECTURE.md "Rows": the AlignX field names,
plain Python values (numpy arrays from parquet/pandas become lists), `Preference Direction` a list
of 90 floats or None, `Demographic Information` a str ("" if absent) and both history lists
(possibly empty). Every problem is a `DataError` naming the file, the 0-based row and the field.

Strictness (decided here, tested in tests/test_schema.py):
  * prompt, chosen, rejected: str and not blank - a blank task or response is a broken pair;
  * history items: every text field must be a str, but may be empty (real comments can be);
  * history lists: at most 4 items; item directions 90 values in {0, 0.5, 1} when present
    (required on UGC items of AlignX rows, optional on pairs: P-SOUPS has none);
  * user_id, source: a string or an integer when present (1 and "1" are two ids; true is none);
  * unknown extra fields are kept unchanged, except one spelled like a field this reader knows but
    not exactly (`Demographic information`, `user-generated content`, `preference_direction`) while
    that field is absent: it would be read as nothing, so it is an error naming the right spelling.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignx_jax import paths
from alignx_jax.data import persona as persona_lib
from alignx_jax.errors import AlignXError, DataError, one_line

DIRECTION = persona_lib.DIRECTION_FIELD
DEMO = persona_lib.DEMO_FIELD
UGC = persona_lib.UGC_FIELD
PAIR = persona_lib.PAIR_FIELD
KINDS = ("auto", "alignx", "p-soups", "uf-p-4", "prism")
EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "json"}
MAX_HISTORY = persona_lib.MAX_HISTORY
_ALLOWED = frozenset((0.0, 0.5, 1.0))
_SCALARS = frozenset((float, int, str, bool, type(None)))
_FLOAT = {float}
ROW_FIELDS = frozenset(
    (
        "prompt",
        "chosen",
        "rejected",
        DIRECTION,
        DEMO,
        UGC,
        PAIR,
        "profile",
        "ground_truth_persona",
        "user_id",
        "source",
    )
)
ITEM_FIELDS = frozenset(("prompt", "comment", "chosen", "rejected", DIRECTION))


def _spelling(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


# nothing reads `source`: a `Source` column is data of its own, not a misspelling
_ROW_SPELLINGS = {_spelling(f): f for f in ROW_FIELDS - {"source"}}
_ITEM_SPELLINGS = {_spelling(f): f for f in ITEM_FIELDS}


def _refuse_misspelled(obj: dict, known: frozenset, *, where: dict, prefix: str = "") -> None:
    """A DataError for a key spelled like a known field but not exactly, where that field is absent: its
    value would be kept as an extra field and the known one read as empty (a persona part lost unsaid)."""
    if obj.keys() <= known:  # the common case, one set operation per row
        return
    spellings = _ROW_SPELLINGS if known is ROW_FIELDS else _ITEM_SPELLINGS
    for key in obj.keys() - known:
        meant = spellings.get(_spelling(key)) if isinstance(key, str) else None
        if meant is not None and obj.get(meant) is None:
            raise DataError(
                f"unknown field (it would be ignored): the field is spelled {meant!r}",
                field=f"{prefix}{key}",
                **where,
            )


def _plain(value: Any) -> Any:
    """numpy arrays / scalars (parquet via pandas) -> plain lists / Python scalars, recursively."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if set(map(type, value)) <= _SCALARS:  # fast path (C loops): e.g. a direction vector
            return list(value)
        return [_plain(v) for v in value]
    return value


def _direction(value: Any, *, where: dict, field_name: str) -> list[float]:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise DataError(
            f"expected a list of {persona_lib.NUM_DIMS} numbers, got {type(value).__name__}",
            field=field_name,
            **where,
        )
    if len(value) != persona_lib.NUM_DIMS:
        raise DataError(
            f"expected {persona_lib.NUM_DIMS} values, got {len(value)}", field=field_name, **where
        )
    # Fast path for the common case (the full AlignX set has ~10M direction vectors to check).
    if set(map(type, value)) == _FLOAT and set(value) <= _ALLOWED:
        return list(value)
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(
                f"value at index {i} is {type(v).__name__} {v!r}, expected 0, 0.5 or 1",
                field=field_name,
                **where,
            )
        if v not in (0, 0.5, 1):
            raise DataError(f"value at index {i} is {v!r}, expected 0, 0.5 or 1", field=field_name, **where)
        out.append(float(v))
    return out


def _text(
    row: dict,
    key: str,
    *,
    where: dict,
    field_name: str | None = None,
    required: bool = True,
    blank_ok: bool = False,
) -> str | None:
    field_name = field_name or key
    if key not in row or row[key] is None:
        if required:
            raise DataError("missing", field=field_name, **where)
        return None
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field_name, **where)
    if not blank_ok and not value.strip():
        raise DataError("is empty", field=field_name, **where)
    try:
        value.encode("utf-8")
    except (
        UnicodeEncodeError
    ) as e:  # a lone surrogate ("\ud83d", half an emoji): no tokenizer or writer takes it
        bad = value[e.start : e.end].encode("unicode_escape").decode("ascii")
        raise DataError(
            f"not valid Unicode text: {bad} at character {e.start}", field=field_name, **where
        ) from None
    return value


def _items(
    row: dict, key: str, *, where: dict, item_fields: tuple[str, ...], direction_required: bool
) -> list[dict]:
    value = row.get(key)
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list of items, got {type(value).__name__}", field=key, **where)
    if len(value) > MAX_HISTORY:
        raise DataError(f"expected at most {MAX_HISTORY} items, got {len(value)}", field=key, **where)
    out = []
    for j, item in enumerate(value):
        name = f"{key}[{j}]"
        if not isinstance(item, dict):
            raise DataError(f"expected an object, got {type(item).__name__}", field=name, **where)
        _refuse_misspelled(item, ITEM_FIELDS, where=where, prefix=f"{name}.")
        norm = {}
        for f in item_fields:
            norm[f] = _text(item, f, where=where, field_name=f"{name}.{f}", blank_ok=True)
        d = item.get(DIRECTION)
        if d is None and direction_required:
            raise DataError("missing", field=f"{name}.{DIRECTION}", **where)
        norm[DIRECTION] = None if d is None else _direction(d, where=where, field_name=f"{name}.{DIRECTION}")
        out.append(norm)
    return out


def validate_row(
    row: Any, *, kind: str, file: str | None = None, index: int | None = None, line: int | None = None
) -> dict:
    """Check one row of `kind` (alignx | p-soups | uf-p-4 | prism) and return it normalised; `line`: its
    line in a JSONL file, named in errors beside the row number."""
    where = {"file": file, "row": index, "line": line}
    if kind not in KINDS[1:]:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS[1:])}")
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {type(row).__name__}", **where)
    row = _plain(row)
    _refuse_misspelled(row, ROW_FIELDS, where=where)
    out = dict(row)  # extra fields are kept as they are
    for key in ("prompt", "chosen", "rejected"):
        out[key] = _text(row, key, where=where)
    if kind == "alignx":
        for key in (DIRECTION, DEMO, UGC, PAIR):
            if key not in row:
                raise DataError("missing", field=key, **where)
    if row.get(DIRECTION) is None and kind == "alignx":
        raise DataError("missing", field=DIRECTION, **where)
    out.update(_persona_fields(row, where, ugc_directions=kind == "alignx"))
    psoups = kind == "p-soups"
    for key in ("profile", "ground_truth_persona"):
        value = _text(row, key, where=where, required=psoups, blank_ok=not psoups or key == "profile")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    if psoups:
        _check_profile(out["profile"], where)
        if not out[PAIR]:
            raise DataError("P-SOUPS rows need history pairs", field=PAIR, **where)
    for key in ("user_id", "source"):
        value = row.get(key)
        # a bool is an int to Python (True == 1) but no id: `data split --by user` would group it with 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise DataError(f"expected a string or integer, got {type(value).__name__}", field=key, **where)
    return out


def _persona_fields(row: dict, where: dict, *, ugc_directions: bool) -> dict:
    """A row's persona fields normalised: the direction (or None), the demographic text ("" if absent)
    and both history lists (`ugc_directions`: every comment must carry a direction, as in AlignX)."""
    d = row.get(DIRECTION)
    return {
        DIRECTION: None if d is None else _direction(d, where=where, field_name=DIRECTION),
        DEMO: _text(row, DEMO, where=where, required=False, blank_ok=True) or "",
        UGC: _items(
            row, UGC, where=where, item_fields=("prompt", "comment"), direction_required=ugc_directions
        ),
        PAIR: _items(
            row, PAIR, where=where, item_fields=("prompt", "chosen", "rejected"), direction_required=False
        ),
    }


def _check_profile(profile: str, where: dict) -> None:
    """The release writes profiles with the preference space's labels: a profile must parse as one."""
    try:
        persona_lib.parse_profile(profile)
    except DataError as e:
        raise DataError(str(e), field="profile", **where) from None


PERSONA_NEEDS = ("none", "ica", "pba")


def read_persona_file(path: str, *, needs: str = "ica") -> dict:
    """One row's persona fields from a JSON file (an object, or a list holding exactly one), each
    checked as a data row's is. `needs` says what the file must hold: ica a persona (comments, pairs
    or demographics), pba a profile (`profile`, a `Preference Direction` or history vectors), none
    nothing more."""
    if needs not in PERSONA_NEEDS:
        raise ValueError(f"needs={needs!r}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is read past
            obj = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read persona file: {e.strerror}", file=path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", file=path) from None
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    if not isinstance(obj, dict):
        raise DataError("expected a JSON object with the persona fields of one row", file=path)
    where = {"file": path, "row": None}
    _refuse_misspelled(obj, ROW_FIELDS, where=where)
    out = {**obj, **_persona_fields(obj, where, ugc_directions=False)}
    profile = _text(obj, "profile", where=where, required=False, blank_ok=False)
    if profile is not None:
        _check_profile(profile, where)
    if needs == "ica" and not (out[UGC] or out[PAIR] or out[DEMO].strip()):
        raise DataError(
            f"no persona: none of {UGC!r}, {PAIR!r}, {DEMO!r} is present and non-empty", file=path
        )
    if (
        needs == "pba"
        and profile is None
        and out[DIRECTION] is None
        and persona_lib.history_direction(out) is None
    ):
        raise DataError(
            f"no profile for PBA: no 'profile', no {DIRECTION!r} and no history item with one", file=path
        )
    return out


def detect_kind(rows: Any) -> str:
    """auto, from a row or a sample of rows: AlignX if any has a `Preference Direction` and none a
    `profile`, P-SOUPS if any has profile + ground_truth_persona, else the generic benchmark shape
    (validated as uf-p-4; prism is the same shape). Looking at several rows keeps one broken first row
    from turning a whole AlignX file into a leniently checked benchmark. A `profile` marks a benchmark:
    UF-P-4 rows carry one beside their golden direction (and often no comments or demographics), AlignX
    rows never do."""
    sample = [r for r in ([rows] if isinstance(rows, dict) else rows) if isinstance(r, dict)]
    # a null profile is none (as validate_row reads it): a parquet column only some merged rows fill
    if any(r.get(DIRECTION) is not None for r in sample) and all(r.get("profile") is None for r in sample):
        return "alignx"
    if any("profile" in r and "ground_truth_persona" in r for r in sample):
        return "p-soups"
    return "uf-p-4"


def list_files(path: str) -> list[str]:
    """The data files at `path`: the file itself, or a folder's parquet/JSONL/JSON files (recursive,
    sorted by relative path so that every run reads the same rows in the same order). `path` may be a
    URL (gs://...): it is listed through etils.epath and the files keep their URLs."""
    if paths.is_url(path):
        return _list_url(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError("no such file or folder", file=path)
    refuse_tfds_folder(path)
    found = []
    for root, dirs, files in os.walk(path):
        # dot-folders (.ipynb_checkpoints, .git) hold copies, not data: skipped as dot-files are
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if _is_data_name(name):
                found.append(os.path.join(root, name))
    if not found:
        raise DataError(NO_DATA_FILES, file=path)
    return sorted(found, key=lambda p: os.path.relpath(p, path))


NO_DATA_FILES = "folder holds no .parquet, .jsonl or .json files"


def refuse_tfds_folder(path: str) -> None:
    """A DataError where the local folder `path` holds a TFDS dataset up to 2 levels down."""
    if any(glob.glob(os.path.join(glob.escape(path), *["*"] * depth, "features.json")) for depth in range(3)):
        raise DataError(
            "a TFDS dataset folder: `alignx data prepare`'s (train and eval read it; data check, split and "
            "contrast read the parquet/JSON(L) files it was made from) or another builder's, not rows",
            file=path,
        )


SPLIT_DIRS = ("train", "validation", "test")  # `alignx data split`'s sub-folders, one split each


def refuse_split_folder(path: str, verb: str) -> None:
    """A DataError where `path` is a folder holding split folders (`alignx data split`'s output): read
    whole, its halves would be read as one data set; `verb` says what to name one of them for."""
    halves = [h for h in SPLIT_DIRS if paths.is_dir(f"{path.rstrip('/')}/{h}")]
    if paths.is_dir(path) and halves:
        raise DataError(
            f"holds the split folders {', '.join(h + '/' for h in halves)}: name the one to {verb} "
            f"(e.g. {path.rstrip('/')}/{halves[-1]})",
            file=path,
        )


def split_folders(path: str) -> dict[str, str]:
    """A folder's split sub-folders (split name -> path), {} where it has none. Data files beside them
    are an error naming one: no command would read them."""
    return {split: folder for split, (folder, _) in split_listing(path).items()}


def split_listing(path: str) -> dict[str, tuple[str, list[str]]]:
    """`split_folders` with each split's data files (`list_files`' order; [] for an empty sub-folder), from
    one listing of `path`."""
    if not paths.is_dir(path):
        return {}
    url = paths.is_url(path)

    def join(sub: str) -> str:
        return f"{path.rstrip('/')}/{sub}" if url else os.path.join(path, sub)

    found = {s: join(s) for s in SPLIT_DIRS if paths.is_dir(join(s))}
    if not found:
        return {}
    inside = {s: p.rstrip("/") + ("/" if url else os.sep) for s, p in found.items()}
    files = list_files(path)
    stray = [f for f in files if not f.startswith(tuple(inside.values()))]
    if stray:
        raise DataError(
            f"{len(stray)} data file(s) beside the split folders {'/, '.join(found)}/ would not be read, "
            f"e.g. {stray[0]} (move them into a split folder or give their own path)",
            file=path,
        )
    return {s: (folder, [f for f in files if f.startswith(inside[s])]) for s, folder in found.items()}


def _is_data_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSIONS and not name.startswith(".")


def _list_url(url: str) -> list[str]:
    url = url.rstrip("/")
    try:
        top = paths.path(url)
        if top.is_file():
            return [url]
        if not top.is_dir():
            raise DataError("no such file or folder", file=url)
        # (path relative to url, url of the file)
        found = [
            (sub, f"{url}/{sub}")
            for sub, child in paths.files_below(top)
            if _is_data_name(child.name) and not any(part.startswith(".") for part in sub.split("/"))
        ]
    # a DataError, paths' unknown scheme, a missing client (which cli names): as they are
    except (AlignXError, ImportError):
        raise
    except Exception as e:  # the storage client's errors (permissions, network) vary by backend
        raise DataError(f"cannot list: {one_line(e)}", file=url) from None
    if not found:
        raise DataError(NO_DATA_FILES, file=url)
    return [u for _, u in sorted(found)]


def read_parquet_table(path: str):
    """The pyarrow table of a local or URL (gs://...) parquet file."""
    import pyarrow.parquet as pq

    if paths.is_url(path):
        return pq.read_table(io.BytesIO(paths.path(path).read_bytes()))
    return pq.read_table(path)


def file_format(path: str) -> str:
    fmt = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError("unknown file type (expected .parquet, .jsonl or .json)", file=path)
    return fmt


@dataclass
class RawFile:
    """One file's raw rows (None where a JSONL line is not valid JSON) and the format they were read in
    (jsonl for JSON Lines in a .json file too; `file_format(path)` is its name's)."""

    path: str
    fmt: str
    rows: list[Any]
    line_errors: dict[int, str] = field(default_factory=dict)
    lines: list[int] | None = None  # JSONL: each row's 1-based line (blank lines are no rows)


def read_file(path: str) -> RawFile:
    """Raw rows of one file (a .json file holding JSON Lines comes back as JSONL). Unreadable or truncated
    files are a DataError naming the file (and the line for a JSON/JSONL syntax error)."""
    fmt = file_format(path)
    if fmt == "parquet":
        try:
            rows = read_parquet_table(path).to_pylist()  # list columns come back as plain lists
        except Exception as e:  # pyarrow (and a bucket's client) raise several types
            if is_empty_file(path):
                return RawFile(path, fmt, [])
            raise DataError(f"cannot read parquet: {one_line(e)}", file=path) from None
        return RawFile(path, fmt, rows)
    try:
        if paths.is_url(path):
            text = paths.path(path).read_bytes().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read: {e}", file=path) from None
    except Exception as e:  # a bucket client's own error types
        raise DataError(f"cannot read: {one_line(e)}", file=path) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows editors write UTF-8
    if not text.strip():  # an empty file of any format holds no rows, as an empty .jsonl always did
        return RawFile(path, fmt, [], lines=[] if fmt == "jsonl" else None)
    if fmt == "json":
        return _read_json(path, text)
    return _read_jsonl(path, text)


def is_empty_file(path: str) -> bool:
    """Whether the file at `path` (local or a URL) holds 0 bytes: no rows in any format (False where it
    cannot be asked)."""
    try:
        return (paths.path(path).stat().length if paths.is_url(path) else os.path.getsize(path)) == 0
    except Exception:  # a bucket client's own error types: the caller names the read's error
        return False


def _read_jsonl(path: str, text: str) -> RawFile:
    rows, errors, lines = [], {}, []
    # "\n" alone ends a line: str.splitlines also cuts at U+2028, U+0085 and others, which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        lines.append(lineno)
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            errors[len(rows)] = f"line {lineno}: invalid JSON: {e.msg}"
            rows.append(None)
    return RawFile(path, "jsonl", rows, errors, lines)


def _read_json(path: str, text: str) -> RawFile:
    """A .json file: a JSON list of rows, or JSON Lines (what Hugging Face `Dataset.to_json` writes), which
    is read as a .jsonl file: one object per line, a broken line named by its number."""
    jsonl = text.lstrip().startswith("{")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if jsonl:
            as_lines = _read_jsonl(path, text)
            # some line is an object of its own: JSON Lines (a broken object spread over lines is not)
            if any(isinstance(r, dict) for r in as_lines.rows):
                return as_lines
        hint = (
            "more than one JSON value: a .json file holds one list of rows, or one object per line"
            if e.msg == "Extra data"
            else "truncated or corrupt file?"
        )
        raise DataError(
            f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg} ({hint})", file=path
        ) from None
    if isinstance(rows, dict) and jsonl and len(text.strip().split("\n")) == 1:
        return _read_jsonl(path, text)  # JSON Lines of one row
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON list of rows, got {type(rows).__name__}", file=path)
    return RawFile(path, "json", rows)


@dataclass
class Loaded:
    """Normalised rows plus where each came from (split writes rows back to their own file)."""

    rows: list[dict]
    skipped: int
    kind: str
    files: list[RawFile]
    origin: list[tuple[int, int]]  # per kept row: (file number, row number in that file)
    first_skipped: str | None = None  # skip_bad: the first skipped row's error, naming it

    @property
    def places(self) -> list[tuple[str, int]]:
        """Per kept row: (its file's path, its row number there), for errors that name it."""
        return [(self.files[fi].path, ri) for fi, ri in self.origin]


def load(path: str, *, kind: str = "auto", skip_bad: bool = False) -> Loaded:
    """`load_rows` with provenance: files read, the kind used and each row's (file, row)."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    split_folders(path)  # a data file beside train/, test/ ... is refused here as train and eval refuse it
    files = [read_file(p) for p in list_files(path)]
    if kind == "auto":
        kind = detect_kind([r for f in files for r in f.rows[:100]])
    rows, origin, skipped, first_skipped = [], [], 0, None
    for fi, raw in enumerate(files):
        for ri, valid in _validated(raw, kind, skip_bad):
            if isinstance(valid, str):
                skipped, first_skipped = skipped + 1, first_skipped or valid
            else:
                rows.append(valid)
                origin.append((fi, ri))
    return Loaded(rows, skipped, kind, files, origin, first_skipped)


def _validated(raw: RawFile, kind: str, skip_bad: bool, offset: int = 0) -> Iterator[tuple[int, dict | str]]:
    """(row number, normalised row) for each row of one file (or of its chunk whose first row is row
    `offset`); under skip_bad a bad row's is its error."""
    for i, row in enumerate(raw.rows):
        ri = offset + i
        try:
            if i in raw.line_errors:
                raise DataError(raw.line_errors[i], file=raw.path)
            line = None if raw.lines is None else raw.lines[i]
            valid: dict | str = validate_row(row, kind=kind, file=raw.path, index=ri, line=line)
        except DataError as e:
            if not skip_bad:
                raise
            valid = str(e)
        yield ri, valid


def head_rows(path: str, n: int = 100) -> list[Any]:
    """The first `n` raw rows of one file (local or a URL), reading it only as far as they go: a parquet
    file's first record batch, a JSONL file's first lines, a JSON list's first items. A JSONL line that is
    not JSON is skipped here and a JSON syntax error ends the items (`read_file` names either)."""
    fmt = file_format(path)
    try:
        with paths.path(path).open("rb") if paths.is_url(path) else open(path, "rb") as f:
            if fmt == "parquet":
                return _parquet_head(f, n, path)
            if fmt == "jsonl":
                return _jsonl_head((line.decode("utf-8") for line in f), n)
            return _json_list_head(io.TextIOWrapper(f, encoding="utf-8-sig"), n)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read: {e}", file=path) from None
    except Exception as e:  # a bucket client's own error types
        raise DataError(f"cannot read: {one_line(e)}", file=path) from None


def _parquet_head(f: Any, n: int, path: str) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        # pages streamed as needed: each column's first, not the whole row group (often the whole file)
        reader = pq.ParquetFile(f, buffer_size=1 << 14, pre_buffer=False)
        first = next(reader.iter_batches(batch_size=n), None)
    except Exception as e:  # pyarrow raises several types
        if is_empty_file(path):
            return []
        raise DataError(f"cannot read parquet: {one_line(e)}", file=path) from None
    return [] if first is None else first.to_pylist()


def _jsonl_head(lines: Iterable[str], n: int) -> list[Any]:
    """The first `n` rows of JSON Lines (`lines` end at "\n" only, as read_file's: not at U+2028)."""
    rows: list[Any] = []
    for line in lines:
        if len(rows) >= n:
            break
        text = line.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return rows


HEAD_CHUNK = 1 << 16  # characters of a JSON file `head_rows` reads first (then as many again as it holds)


def _json_list_head(f: io.TextIOBase, n: int) -> list[Any]:
    """The first `n` items of the JSON list in the text file `f`, read no further than they end, or its
    first `n` rows where it holds JSON Lines (read_file reads such a .json file as JSONL); [] where it
    holds neither."""
    decoder = json.JSONDecoder()
    buf, pos, rows = "", 0, []

    def more() -> bool:  # reads as long as the buffer: a long item is decoded a logarithmic number of times
        nonlocal buf
        chunk = f.read(max(HEAD_CHUNK, len(buf)))
        buf += chunk
        return bool(chunk)

    def token() -> str:  # the next character past JSON white space ("" at the end of the file)
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos : pos + 1]

    first = token()
    if first == "{":
        return _jsonl_head(_lines_from(buf[pos:], f), n)
    if first != "[":
        return []
    pos += 1
    while len(rows) < n and token():
        start, size = pos, len(buf)
        try:
            item, pos = decoder.raw_decode(buf, start)
        except json.JSONDecodeError:
            pos = -1
        sep = token() if pos >= 0 else None
        if sep in (",", "]"):
            rows.append(item)
            if sep == "]":
                break
            pos += 1
            continue
        # an item cut off at the buffer's end goes on past it (a number too: "0.5" read as far as "0.")
        pos = start
        if len(buf) == size and not more():
            break
    return rows


def _lines_from(start: str, f: io.TextIOBase) -> Iterator[str]:
    """The lines of `start` and the rest of `f` after it, each cut at "\n" only, read a chunk at a time."""
    pending: list[str] = []  # the unfinished line's pieces: joined once, however many chunks it spans
    for chunk in itertools.chain([start], iter(lambda: f.read(HEAD_CHUNK), "")):
        first, *done = chunk.split("\n")
        pending.append(first)
        if done:
            yield "".join(pending)
            yield from done[:-1]
            pending = [done[-1]]
    yield "".join(pending)


def iter_rows(
    path: str,
    *,
    kind: str = "auto",
    skip_bad: bool = False,
    counts: dict[str, int] | None = None,
    files: list[str] | None = None,
) -> Iterator[tuple[dict, str, int]]:
    """`load`'s rows as (row, file, row number there), reading one file at a time: a data set larger than
    memory streams (`alignx data prepare`). `counts` gets "rows" and "skipped" as they go (and
    "first_skipped", the first skipped row's error). `files`: `list_files(path)` where the caller has it."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    names = list_files(path) if files is None else files
    # the kind comes from every file's first 100 rows (as `load`'s) before any row is validated: a second
    # pass, kept cheap by reading each file only as far as those rows
    if kind == "auto":
        kind = detect_kind([r for name in names for r in head_rows(name)])
    counts = {} if counts is None else counts
    counts.update(rows=0, skipped=0)
    for name in names:
        for raw, offset in _file_chunks(name):
            for ri, valid in _validated(raw, kind, skip_bad, offset):
                if isinstance(valid, str):
                    counts["skipped"] += 1
                    counts.setdefault("first_skipped", valid)
                else:
                    counts["rows"] += 1
                    yield valid, raw.path, ri


PARQUET_CHUNK = 4096  # rows of a local parquet file read at a time by `iter_rows`


def _file_chunks(path: str) -> Iterator[tuple[RawFile, int]]:
    """One file's raw rows as (chunk, row number of its first row): a local parquet file a record batch at
    a time (a release-sized file streams too), any other file whole."""
    if file_format(path) != "parquet" or paths.is_url(path):
        yield read_file(path), 0
        return
    import pyarrow.parquet as pq

    offset = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_CHUNK):
            rows = batch.to_pylist()
            yield RawFile(path, "parquet", rows), offset
            offset += len(rows)
    except Exception as e:  # pyarrow raises several types (a truncated file mid-way too)
        if offset == 0 and is_empty_file(path):
            yield RawFile(path, "parquet", []), 0
            return
        raise DataError(f"cannot read parquet: {one_line(e)}", file=path) from None


def load_rows(path: str, *, kind: str = "auto", skip_bad: bool = False) -> tuple[list[dict], int]:
    """Read, validate and normalise every row at `path` -> (rows, number of rows skipped).

    kind: auto | alignx | p-soups | uf-p-4 | prism (see `detect_kind`). With skip_bad, malformed
    rows (and unparsable JSONL lines) are dropped and counted; a file that cannot be read at all
    (e.g. a truncated JSON list) is still a DataError.
    """
    loaded = load(path, kind=kind, skip_bad=skip_bad)
    return loaded.rows, loaded.skipped
