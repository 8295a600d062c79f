"""The 90-dimension preference space and the release's rule from per-dimension scores to a direction.

One owner for both sides of the layering: `data/` renders personas and computes the release's P~ of a
history with it, `models/` turns the preference head's probabilities into a direction with it, and
neither may import the other. Facts from docs/method.md:
  * section 1 - a direction is 90 values in {0, 0.5, 1} over the dimensions of
    `assets/preference_space.json` (index, category, positive_label, negative_label);
  * section 5 - the release's rule on a mean score s in [0, 1] per dimension: s >= 0.6 -> 1,
    s <= 0.4 -> 0, else 0.5; if no dimension is left non-neutral, then when 1 - max < min the dims
    equal to the max become 1, otherwise (an exact tie 1 - max == min included) the dims equal to the
    min become 0.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np

from alignx_jax.errors import DataError

NUM_DIMS: int = 90
RELEASE_POS_THRESHOLD: float = 0.6
RELEASE_NEG_THRESHOLD: float = 0.4
# mathematically equal means can differ in the last bit after float division: they still count as equal
EPS: float = 1e-9

SPACE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "preference_space.json")


@functools.lru_cache(maxsize=1)
def dimensions() -> tuple[dict, ...]:
    """The 90 dimensions in index order from the package asset (read and checked once)."""
    with open(SPACE_PATH, encoding="utf-8") as f:
        dims = json.load(f)["dimensions"]
    if len(dims) != NUM_DIMS or [d["index"] for d in dims] != list(range(NUM_DIMS)):
        raise DataError(f"{SPACE_PATH}: expected dimensions 0..{NUM_DIMS - 1} in order")
    return tuple(dims)


def load_preference_space() -> list[dict]:
    """The 90 dimensions (index, category, positive_label, negative_label), copies the caller may change."""
    return [dict(d) for d in dimensions()]


def dimension_labels() -> list[tuple[str, str]]:
    """(negative_label, positive_label) of the 90 dims, in vector order."""
    return [(d["negative_label"], d["positive_label"]) for d in dimensions()]


def threshold_direction(
    scores: Any, pos_threshold: float = RELEASE_POS_THRESHOLD, neg_threshold: float = RELEASE_NEG_THRESHOLD
) -> np.ndarray:
    """Scores `[..., K]` -> {0, 0.5, 1} (float32): >= pos_threshold -> 1, <= neg_threshold -> 0, else 0.5."""
    s = np.asarray(scores, dtype=np.float64)
    return np.where(pos_threshold - EPS <= s, 1.0, np.where(neg_threshold + EPS >= s, 0.0, 0.5)).astype(
        np.float32
    )


def release_fallback(scores_K: Any) -> np.ndarray:
    """The release's direction for one row of scores whose thresholds left every dim neutral (section 5)."""
    s = np.asarray(scores_K, dtype=np.float64)
    out = np.full(s.shape, 0.5, dtype=np.float32)
    hi, lo = s.max(), s.min()
    if 1.0 - hi < lo - EPS:
        out[np.abs(s - hi) <= EPS] = 1.0
    else:
        out[np.abs(s - lo) <= EPS] = 0.0
    return out


def release_rule(scores_K: Any) -> np.ndarray:
    """The release's direction (float32 [K]) for one row of mean scores in [0, 1]: the thresholds, and
    the fallback when they leave no dimension non-neutral, so a profile is never empty."""
    out = threshold_direction(scores_K)
    return release_fallback(scores_K) if not (out != 0.5).any() else out
