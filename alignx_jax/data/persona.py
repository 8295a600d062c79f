"""Personas: profile text over the 90-dim preference space (`alignx_jax.preference_space`), the
release's P~ rule and the persona block.

Facts from docs/method.md:
  * section 1 - a direction is 90 values in {0, 0.5, 1}; profile text = the labels of the
    non-neutral dims in index order joined with ", " (1 -> positive label, 0 -> negative label);
  * section 4 - ICA training samples the history (`sample_history`) and renders
    `{ugc}{pairs}{demographics}` (`persona_text`);
  * section 5 - the release's P~ for a history (`release_direction`); section 6b - the release's
    PBA training profile from the sampled history (`sampled_preference`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignx_jax.errors import ConfigError, DataError
from alignx_jax.preference_space import NUM_DIMS, dimensions, release_rule

PERSONA_VARIANTS = ("ugc", "pair", "demo", "p")
UGC_FIELD = "User-Generated Content"
PAIR_FIELD = "Pair-wise Comparative Feedback"
DEMO_FIELD = "Demographic Information"
DIRECTION_FIELD = "Preference Direction"
# The release's sampling: at most this many history items of each kind in a training prompt.
MAX_HISTORY = 4
# What a training prompt shows of the history (`data.history`): 'sample' a fresh release draw per row
# and epoch, 'fixed' one draw per row for every epoch (epoch 0's), 'all' the whole history, as
# evaluation shows it
HISTORY_MODES = ("sample", "fixed", "all")

UGC_HEADER = "**This person has commented on some posts:**\n\n"
PAIR_HEADER = "**This person has chosen or rejected comments on some posts:**\n\n"


@functools.lru_cache(maxsize=1)
def _label_table() -> dict[str, tuple[int, float]]:
    """label -> (dimension, value); every one of the 180 labels is distinct."""
    table: dict[str, tuple[int, float]] = {}
    for d in dimensions():
        table[d["positive_label"]] = (d["index"], 1.0)
        table[d["negative_label"]] = (d["index"], 0.0)
    assert len(table) == 2 * NUM_DIMS
    return table


def check_direction(direction: Any, what: str = "direction") -> np.ndarray:
    """`direction` as a float32 [90] array; ValueError if its length or values are wrong."""
    arr = np.asarray(direction, dtype=np.float64)
    if arr.shape != (NUM_DIMS,):
        raise ValueError(f"{what}: expected {NUM_DIMS} values, got shape {arr.shape}")
    bad = ~(np.isin(arr, (0.0, 0.5, 1.0)))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what}: value {arr[i]!r} at index {i} is not one of 0, 0.5, 1")
    return arr.astype(np.float32)


def row_profile(row: dict, *, file: str | None = None, index: int | None = None) -> str | None:
    """The row's `profile` text for a PBA prompt, None where it has none. A blank one is a DataError naming
    the field (and `file`, row `index`): the prompt would show no preferences, as no profile would."""
    text = row.get("profile")
    if isinstance(text, str) and not text.strip():
        raise DataError(
            "is empty: a PBA prompt would show no preferences", file=file, row=index, field="profile"
        )
    return text


def profile_text(direction: Any) -> str:
    """Labels of the non-neutral dims in index order, joined with ", " ("" when all neutral)."""
    arr = check_direction(direction)
    labels = []
    for d, v in zip(dimensions(), arr):
        if v == 1.0:
            labels.append(d["positive_label"])
        elif v == 0.0:
            labels.append(d["negative_label"])
    return ", ".join(labels)


def parse_profile(text: str) -> np.ndarray:
    """Inverse of `profile_text`: a float32 [90] direction (unmentioned dims 0.5).

    Some labels contain ", " themselves ("... (e.g., art, writing, music)"), so the text is
    matched label by label (longest first, backtracking) rather than split on commas.
    Unknown text or a dimension named twice is a DataError.
    """
    if not isinstance(text, str):
        raise DataError(f"profile: expected a string, got {type(text).__name__}")
    text = text.strip()
    out = np.full((NUM_DIMS,), 0.5, dtype=np.float32)
    if not text:
        return out
    table = _label_table()
    by_first_char: dict[str, list[str]] = {}
    for label in sorted(table, key=len, reverse=True):
        by_first_char.setdefault(label[0], []).append(label)

    def match(pos: int, used: frozenset) -> list[str] | None:
        if pos == len(text):
            return []
        for label in by_first_char.get(text[pos], ()):
            end = pos + len(label)
            if not text.startswith(label, pos) or table[label][0] in used:
                continue
            if end == len(text):
                return [label]
            if text.startswith(", ", end):
                rest = match(end + 2, used | {table[label][0]})
                if rest is not None:
                    return [label] + rest
        return None

    labels = match(0, frozenset())
    if labels is None:
        # Name the first piece that is not a label, to make the error actionable.
        pos = 0
        while True:
            hit = next(
                (
                    lab
                    for lab in by_first_char.get(text[pos], ())
                    if text.startswith(lab, pos)
                    and (pos + len(lab) == len(text) or text.startswith(", ", pos + len(lab)))
                ),
                None,
            )
            if hit is None or pos + len(hit) >= len(text):
                break
            pos += len(hit) + 2
        snippet = text[pos : pos + 60]
        raise DataError(f"profile: unknown preference label or repeated dimension at {snippet!r}")
    for label in labels:
        dim, value = table[label]
        out[dim] = value
    return out


def release_direction(vectors: np.ndarray) -> np.ndarray:
    """The release's P~ for a history (docs/method.md section 5), float32 [90]: the release's rule
    (`preference_space.release_rule`: thresholds 0.6 / 0.4, then its fallback) on the mean of the
    items' directions."""
    vecs = np.asarray(vectors, dtype=np.float64)
    if vecs.ndim != 2 or vecs.shape[1] != NUM_DIMS or vecs.shape[0] == 0:
        raise ValueError(f"release_direction: expected [n>0, {NUM_DIMS}] vectors, got shape {vecs.shape}")
    return release_rule(vecs.mean(axis=0))


def _history(row: dict, field: str) -> list[dict]:
    items = row.get(field)
    return list(items) if items is not None else []


# The history kinds each persona variant shows (`persona_text`): what the release rule may average
_VARIANT_HISTORY = {"p": (UGC_FIELD, PAIR_FIELD), "ugc": (UGC_FIELD,), "pair": (PAIR_FIELD,), "demo": ()}


def history_direction(row: dict, variant: str = "p") -> np.ndarray | None:
    """The release's P~ from the directions of the history items persona `variant` shows (UGC and
    PAIR for 'p'); None if no such item has one."""
    if variant not in _VARIANT_HISTORY:
        raise DataError(f"unknown persona variant {variant!r}; expected one of {', '.join(PERSONA_VARIANTS)}")
    vectors = [
        item[DIRECTION_FIELD]
        for field in _VARIANT_HISTORY[variant]
        for item in _history(row, field)
        if item.get(DIRECTION_FIELD) is not None
    ]
    if not vectors:
        return None
    return release_direction(np.asarray(vectors, dtype=np.float64))


def sampled_preference(ugc: Sequence[dict], pairs: Sequence[dict]) -> tuple[np.ndarray, str] | None:
    """The release's PBA training profile (docs/method.md section 6b): P~ = `release_direction` of the
    `Preference Direction` vectors of the *sampled* history items (`sample_history`'s output, UGC then
    PAIR), and its profile text. None when no given item carries a direction.

    The release's script reads a kind's sampled list even when that kind's count is 0, so such a row
    reuses the previous row's sample; that depends on row order and is not reproduced: a kind with
    no sampled item contributes nothing here."""
    vectors = [
        item[DIRECTION_FIELD]
        for item in (*ugc, *pairs)
        if isinstance(item, dict) and item.get(DIRECTION_FIELD) is not None
    ]
    if not vectors:
        return None
    direction = release_direction(np.asarray(vectors, dtype=np.float64))
    return direction, profile_text(direction)


def sample_history(row: dict, rng: np.random.Generator, variant: str = "p") -> tuple[list, list]:
    """The release's training-time history sample (docs/method.md section 4): (ugc_items, pair_items),
    drawn over the kinds persona `variant` shows (`_VARIANT_HISTORY`); a kind it hides comes back [].

    Per shown kind, n = min(randint(0, 4), len) with randint inclusive; if every shown n is 0, take
    min(4, len) of each shown kind (for 'p' this is the release's rule over UGC and PAIR). Items are
    drawn without replacement, in the order drawn; 'demo' draws nothing.
    """
    if variant not in _VARIANT_HISTORY:
        raise DataError(f"unknown persona variant {variant!r}; expected one of {', '.join(PERSONA_VARIANTS)}")
    shown = _VARIANT_HISTORY[variant]
    fields = (UGC_FIELD, PAIR_FIELD)
    lists = {field: _history(row, field) if field in shown else [] for field in fields}
    # the rng stream, in the release's order: every shown kind's count, then every non-empty draw
    counts = {field: min(int(rng.integers(0, MAX_HISTORY + 1)), len(lists[field])) for field in shown}
    if not any(counts.values()):
        counts = {field: min(MAX_HISTORY, len(lists[field])) for field in shown}
    picked = {
        field: [lists[field][i] for i in rng.permutation(len(lists[field]))[: counts[field]]]
        for field in shown
        if counts[field]
    }
    return picked.get(UGC_FIELD, []), picked.get(PAIR_FIELD, [])


def _key_ints(key: Any) -> list[int]:
    """A stable (process- and platform-independent) list of ints for a seed key."""
    if isinstance(key, (tuple, list)):
        return [x for k in key for x in _key_ints(k)]
    if isinstance(key, (bool, np.bool_)):
        return [int(key)]
    if isinstance(key, (int, np.integer)):
        k = int(key)
        return [k] if k >= 0 else [1 << 63, -k]  # SeedSequence only takes non-negative ints
    # Strings (and anything else) go through a fixed hash: Python's hash() is salted per process.
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return [int.from_bytes(digest, "little")]


def row_rng(seed: int, key: Any) -> np.random.Generator:
    """A generator determined by (seed, key) only, e.g. key=(epoch, row_index): reruns and resumed
    runs draw the same history sample for the same row and epoch, whatever the batch order."""
    return np.random.default_rng(np.random.SeedSequence(_key_ints((seed, key))))


def history_rng(mode: str, seed: int, epoch: int, index: int) -> np.random.Generator | None:
    """The history-sampling generator of row `index` in `epoch` under `data.history` = mode
    (HISTORY_MODES); None shows the whole history (`sample_history` is not called)."""
    if mode == "sample":
        return row_rng(seed, (epoch, index))
    if mode == "fixed":
        return row_rng(seed, (0, index))  # epoch 0's draw: a run's first epoch is the same as with 'sample'
    if mode == "all":
        return None
    raise ConfigError(f"data.history must be one of {', '.join(HISTORY_MODES)}, got {mode!r}")


def _get(item: Any, key: str, field: str, j: int) -> str:
    # Rows from load_rows are already checked; this catches hand-written persona files (generate).
    if not isinstance(item, dict) or not isinstance(item.get(key), str):
        raise DataError(f"history item needs a string {key!r}", field=f"{field}[{j}]")
    return item[key]


# each history kind's block: its header and, per item, the (label, row key) of each part in order
_BLOCKS = {
    UGC_FIELD: (UGC_HEADER, (("Post", "prompt"), ("Comment", "comment"))),
    PAIR_FIELD: (PAIR_HEADER, (("Post", "prompt"), ("Chosen", "chosen"), ("Rejected", "rejected"))),
}


def _history_block(field: str, items: Sequence[dict]) -> str:
    """The numbered items of one history kind under its header ("" for none)."""
    if not items:
        return ""
    header, parts = _BLOCKS[field]
    body = "".join(
        f"{i}. " + "".join(f"*{label}:*\n{_get(it, key, field, i - 1)}\n\n" for label, key in parts)
        for i, it in enumerate(items, start=1)
    )
    return header + body


def persona_text(
    row: dict, variant: str = "p", *, ugc: Sequence[dict] | None = None, pairs: Sequence[dict] | None = None
) -> str:
    """The `{ugc}{pairs}{demographics}` block (docs/method.md section 4) for one persona variant.

    `ugc`/`pairs` override the row's full history (pass `sample_history`'s output for training);
    variant ugc/pair/demo keeps only that part, p keeps all three. Empty blocks are left out and
    the demographic text is appended raw.
    """
    if variant not in PERSONA_VARIANTS:
        raise DataError(f"unknown persona variant {variant!r}; expected one of {', '.join(PERSONA_VARIANTS)}")
    ugc = _history(row, UGC_FIELD) if ugc is None else list(ugc)
    pairs = _history(row, PAIR_FIELD) if pairs is None else list(pairs)
    demo = row.get(DEMO_FIELD) or ""
    if not isinstance(demo, str):
        raise DataError(f"expected a string, got {type(demo).__name__}", field=DEMO_FIELD)
    parts = []
    if variant in ("ugc", "p"):
        parts.append(_history_block(UGC_FIELD, ugc))
    if variant in ("pair", "p"):
        parts.append(_history_block(PAIR_FIELD, pairs))
    if variant in ("demo", "p"):
        parts.append(demo)
    return "".join(parts)
