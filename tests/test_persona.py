"""Preference space, profile text, the release's P~ rule, history sampling and the persona block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from alignx_jax import preference_space
from alignx_jax.data import persona
from alignx_jax.errors import DataError

PSOUPS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "benchmarks",
    "p-soups",
    "student_phd.json",
)


def test_preference_space():
    space = preference_space.load_preference_space()
    assert len(space) == 90 and [d["index"] for d in space] == list(range(90))
    labels = [d[k] for d in space for k in ("positive_label", "negative_label")]
    assert len(set(labels)) == 180
    space[0]["positive_label"] = "changed"  # callers get copies
    assert preference_space.load_preference_space()[0]["positive_label"] == "Young"


def test_profile_text_example_from_method():
    d = np.full(90, 0.5)
    d[0], d[3], d[73] = 0, 1, 1
    assert persona.profile_text(d) == "Older, High Extraversion, Likes humor"
    assert persona.profile_text(np.full(90, 0.5)) == ""
    with pytest.raises(ValueError, match="90 values"):
        persona.profile_text([0.5] * 89)
    with pytest.raises(ValueError, match="index 2"):
        persona.profile_text([0.5, 0.5, 0.7] + [0.5] * 87)


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not present")
def test_parse_profile_roundtrips_every_psoups_profile():
    with open(PSOUPS) as f:
        rows = json.load(f)
    assert len(rows) == 600
    for r in rows:
        d = persona.parse_profile(r["profile"])
        assert d.shape == (90,) and d.dtype == np.float32
        assert persona.profile_text(d) == r["profile"]


def test_parse_profile_random_and_errors():
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = rng.choice([0.0, 0.5, 1.0], size=90).astype(np.float32)
        d[[14, 22]] = rng.choice([0.0, 1.0], size=2)  # labels with ", " inside them
        np.testing.assert_array_equal(persona.parse_profile(persona.profile_text(d)), d)
    np.testing.assert_array_equal(persona.parse_profile("  "), np.full(90, 0.5, np.float32))
    with pytest.raises(DataError, match="Likes tennis"):
        persona.parse_profile("Older, Likes tennis, Likes humor")
    with pytest.raises(DataError, match="repeated"):
        persona.parse_profile("Older, Young")
    with pytest.raises(DataError):
        persona.parse_profile("Older,Likes humor")  # the separator is ", "


def _vectors(n: int, sums: dict[int, float]) -> np.ndarray:
    """n vectors (values in {0, 0.5, 1}) whose column sums are 0.5 * n plus the given offsets."""
    v = np.full((n, 90), 0.5)
    for dim, offset in sums.items():
        steps = int(round(abs(offset) / 0.5))
        v[:steps, dim] = 1.0 if offset > 0 else 0.0
    return v


def test_release_direction_thresholds():
    v = np.full((5, 90), 0.5)
    v[:, 1] = [1, 1, 1, 0, 0]  # mean 0.6 -> 1 (inclusive)
    v[:, 2] = [1, 1, 0, 0, 0]  # mean 0.4 -> 0 (inclusive)
    v[:, 3] = [1, 1, 0.5, 0, 0]  # mean 0.5 -> 0.5
    v[:, 4] = [1, 1, 1, 0.5, 0]  # mean 0.7 -> 1
    v[:, 5] = [1, 0.5, 0.5, 0, 0]  # mean 0.4 -> 0
    out = persona.release_direction(v)
    assert out.dtype == np.float32 and out.shape == (90,)
    assert out[1] == 1 and out[2] == 0 and out[3] == 0.5 and out[4] == 1 and out[5] == 0
    assert np.all(np.delete(out, [1, 2, 4, 5]) == 0.5)  # no fallback once any dim is set


def test_release_direction_fallback_max_branch_with_ties():
    # 16 items: means 0.5 + k/32. Max 0.5625 on dims 7 and 9 (a tie), min 0.46875: 1 - max < min.
    v = _vectors(16, {7: 1.0, 9: 1.0, 20: -0.5})
    out = persona.release_direction(v)
    expected = np.full(90, 0.5)
    expected[[7, 9]] = 1
    np.testing.assert_array_equal(out, expected)


def test_release_direction_fallback_min_branch_with_ties():
    # Max 0.53125, min 0.4375 on dims 2 and 5: 1 - max = 0.46875 >= min -> min dims become 0.
    v = _vectors(16, {30: 0.5, 2: -1.0, 5: -1.0, 6: -0.5})
    expected = np.full(90, 0.5)
    expected[[2, 5]] = 0
    np.testing.assert_array_equal(persona.release_direction(v), expected)


def test_release_direction_exact_tie_takes_min_branch():
    # 1 - max == min exactly (0.4375): the condition is strict, so the min dims become 0.
    v = _vectors(16, {11: 1.0, 40: -1.0, 41: -1.0})
    expected = np.full(90, 0.5)
    expected[[40, 41]] = 0
    np.testing.assert_array_equal(persona.release_direction(v), expected)
    # Same tie with n=7 (1/14 steps, not exact in binary): still the min branch.
    v = np.full((7, 90), 0.5)
    v[0, 11] = 1.0  # mean 8/14
    v[0, 40] = 0.0  # mean 6/14
    expected = np.full(90, 0.5)
    expected[40] = 0
    np.testing.assert_array_equal(persona.release_direction(v), expected)


def test_release_direction_all_neutral_history():
    # Every mean 0.5: max == min == 0.5, 1 - 0.5 < 0.5 is false -> all dims equal the min -> 0.
    np.testing.assert_array_equal(persona.release_direction(np.full((3, 90), 0.5)), np.zeros(90))
    with pytest.raises(ValueError):
        persona.release_direction(np.zeros((0, 90)))


def test_history_direction():
    base = np.full(90, 0.5)
    a, b = base.copy(), base.copy()
    a[3], b[3] = 1, 1
    a[8], b[8] = 0, 1
    row = {
        "User-Generated Content": [{"prompt": "p", "comment": "c", "Preference Direction": a.tolist()}],
        "Pair-wise Comparative Feedback": [
            {"prompt": "p", "chosen": "x", "rejected": "y", "Preference Direction": b.tolist()},
            {"prompt": "p", "chosen": "x", "rejected": "y", "Preference Direction": None},
        ],
    }
    np.testing.assert_array_equal(persona.history_direction(row), persona.release_direction(np.stack([a, b])))
    assert persona.history_direction(row)[3] == 1 and persona.history_direction(row)[8] == 0.5
    assert persona.history_direction({"Pair-wise Comparative Feedback": [{"prompt": "p"}]}) is None


def _history_row(n_ugc: int, n_pair: int) -> dict:
    return {
        "User-Generated Content": [{"prompt": f"u{i}", "comment": "c"} for i in range(n_ugc)],
        "Pair-wise Comparative Feedback": [
            {"prompt": f"p{i}", "chosen": "x", "rejected": "y"} for i in range(n_pair)
        ],
    }


def test_sample_history_distribution():
    row = _history_row(4, 4)
    rng = np.random.default_rng(0)
    n = 25000
    counts = Counter()
    for _ in range(n):
        ugc, pairs = persona.sample_history(row, rng)
        assert len({u["prompt"] for u in ugc}) == len(ugc)  # without replacement
        assert len({p["prompt"] for p in pairs}) == len(pairs)
        counts[(len(ugc), len(pairs))] += 1
    assert (0, 0) not in counts
    for k in range(5):
        for j in range(5):
            expected = 2 / 25 if (k, j) == (4, 4) else (0 if (k, j) == (0, 0) else 1 / 25)
            if expected:
                assert abs(counts[(k, j)] / n - expected) < 0.008, (k, j, counts[(k, j)])


def test_sample_history_short_lists():
    rng = np.random.default_rng(1)
    row = _history_row(2, 4)
    ugc_counts = Counter(len(persona.sample_history(row, rng)[0]) for _ in range(10000))
    # n_ugc = min(randint(0, 4), 2): 2 with probability 3/5 (plus the both-zero case, 1/25).
    assert abs(ugc_counts[2] / 10000 - (3 / 5 + 1 / 25)) < 0.02
    assert set(ugc_counts) == {0, 1, 2}
    # Only one kind of history: when its draw is 0, the both-zero rule still takes 4 of it.
    only_pairs = _history_row(0, 4)
    sizes = Counter(len(persona.sample_history(only_pairs, rng)[1]) for _ in range(5000))
    assert 0 not in sizes and abs(sizes[4] / 5000 - 2 / 5) < 0.03
    assert persona.sample_history(_history_row(0, 0), rng) == ([], [])


def _release_sample(row: dict, rng: np.random.Generator) -> tuple[list, list]:
    """The release's rule over both kinds, as `sample_history` drew it for every variant before."""
    ugc, pairs = row.get(persona.UGC_FIELD) or [], row.get(persona.PAIR_FIELD) or []
    n_ugc = min(int(rng.integers(0, 5)), len(ugc))
    n_pair = min(int(rng.integers(0, 5)), len(pairs))
    if n_ugc == 0 and n_pair == 0:
        n_ugc, n_pair = min(4, len(ugc)), min(4, len(pairs))
    pick_u = rng.permutation(len(ugc))[:n_ugc] if n_ugc else []
    pick_p = rng.permutation(len(pairs))[:n_pair] if n_pair else []
    return [ugc[i] for i in pick_u], [pairs[i] for i in pick_p]


def test_sample_history_p_draws_the_release_samples():
    # 'p' (the release's variant) must keep drawing exactly the same items from the same rng stream.
    for n_ugc in range(7):
        for n_pair in range(7):
            row = _history_row(n_ugc, n_pair)
            for seed in range(40):
                got = persona.sample_history(row, persona.row_rng(seed, (0, n_ugc * 7 + n_pair)))
                want = _release_sample(row, persona.row_rng(seed, (0, n_ugc * 7 + n_pair)))
                assert got == want, (n_ugc, n_pair, seed)
                assert persona.sample_history(row, persona.row_rng(seed, (1, 0)), "p") == _release_sample(
                    row, persona.row_rng(seed, (1, 0))
                )


@pytest.mark.parametrize("variant, shown", [("ugc", 0), ("pair", 1)])
def test_sample_history_single_kind_variants_always_show_their_kind(variant, shown):
    row = _history_row(4, 4)
    rng = np.random.default_rng(2)
    n = 20000
    sizes = Counter()
    for _ in range(n):
        sample = persona.sample_history(row, rng, variant)
        assert sample[1 - shown] == []  # the hidden kind is never drawn
        sizes[len(sample[shown])] += 1
    # the release rule over the shown kind alone: a count of 0 takes min(4, len) instead
    assert 0 not in sizes
    for k in (1, 2, 3):
        assert abs(sizes[k] / n - 1 / 5) < 0.015, (k, sizes)
    assert abs(sizes[4] / n - 2 / 5) < 0.015, sizes
    short = _history_row(2, 2)
    assert {len(persona.sample_history(short, rng, variant)[shown]) for _ in range(200)} == {1, 2}
    assert persona.sample_history(_history_row(0, 0) if shown else _history_row(0, 4), rng, variant) == (
        [],
        [],
    )


def test_sample_history_demo_draws_nothing():
    rng = np.random.default_rng(3)
    assert all(persona.sample_history(_history_row(4, 4), rng, "demo") == ([], []) for _ in range(50))
    with pytest.raises(DataError, match="unknown persona variant 'x'"):
        persona.sample_history(_history_row(4, 4), rng, "x")


def test_row_rng_is_deterministic_and_keyed():
    a = persona.row_rng(42, (3, 17)).integers(0, 1 << 30, size=5)
    b = persona.row_rng(42, (3, 17)).integers(0, 1 << 30, size=5)
    c = persona.row_rng(42, (4, 17)).integers(0, 1 << 30, size=5)
    d = persona.row_rng(43, (3, 17)).integers(0, 1 << 30, size=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # String keys must not depend on Python's per-process hash salt.
    code = (
        "from alignx_jax.data.persona import row_rng; print(row_rng(7, ('user-x', -2)).integers(0, 1 << 30))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(s)},
        ).stdout
        for s in (1, 2)
    }
    assert outs == {f"{persona.row_rng(7, ('user-x', -2)).integers(0, 1 << 30)}\n"}


ROW = {
    "prompt": "What should I cook?",
    "Demographic Information": "I am a 30-year-old nurse.",
    "User-Generated Content": [
        {"prompt": "Best pasta?", "comment": "Carbonara, always."},
        {"prompt": "Tea or coffee?", "comment": ""},
    ],
    "Pair-wise Comparative Feedback": [
        {"prompt": "Weekend plans?", "chosen": "Hiking.", "rejected": "Sleeping."}
    ],
}

UGC_BLOCK = (
    "**This person has commented on some posts:**\n\n"
    "1. *Post:*\nBest pasta?\n\n*Comment:*\nCarbonara, always.\n\n"
    "2. *Post:*\nTea or coffee?\n\n*Comment:*\n\n\n"
)
PAIR_BLOCK = (
    "**This person has chosen or rejected comments on some posts:**\n\n"
    "1. *Post:*\nWeekend plans?\n\n*Chosen:*\nHiking.\n\n*Rejected:*\nSleeping.\n\n"
)


def test_persona_text_variants():
    assert persona.persona_text(ROW, "p") == UGC_BLOCK + PAIR_BLOCK + "I am a 30-year-old nurse."
    assert persona.persona_text(ROW, "ugc") == UGC_BLOCK
    assert persona.persona_text(ROW, "pair") == PAIR_BLOCK
    assert persona.persona_text(ROW, "demo") == "I am a 30-year-old nurse."
    # Empty blocks are left out entirely; overrides replace the row's history.
    assert persona.persona_text(ROW, "p", ugc=[]) == PAIR_BLOCK + "I am a 30-year-old nurse."
    sub = persona.persona_text(ROW, "ugc", ugc=[ROW["User-Generated Content"][1]])
    assert sub.startswith("**This person has commented on some posts:**\n\n1. *Post:*\nTea or coffee?")
    assert persona.persona_text({"prompt": "x"}, "p") == ""
    with pytest.raises(DataError, match="persona variant"):
        persona.persona_text(ROW, "all")


def test_persona_text_names_malformed_items():
    bad = dict(ROW, **{"Pair-wise Comparative Feedback": [{"prompt": "p", "chosen": "c"}]})
    with pytest.raises(DataError, match=r"Pair-wise Comparative Feedback\[0\].*'rejected'"):
        persona.persona_text(bad, "pair")
    assert persona.persona_text(bad, "ugc") == UGC_BLOCK  # only the rendered part is read
