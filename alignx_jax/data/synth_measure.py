"""The synthetic persona world's designed properties (`measure_world`), measured on held-out users:
persona-blind rules near chance, the golden direction, a keyword count over the history text and the
release's averaging rule over the history vectors (`scripts/synth_report.py`, the demo's stats)."""

from __future__ import annotations

from typing import Any

import numpy as np

from alignx_jax.data.synth import (
    NEUTRAL,
    WORLD_DIMS,
    World,
    direction_vote,
    history_scores,
    response_scores,
    scores_to_direction,
)


def _split_users(world: World, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of train users and of held-out users."""
    perm = np.random.default_rng([seed, 7]).permutation(len(world.users))
    n_test = max(1, int(round(len(perm) * test_fraction)))
    test_users = {int(u) for u in perm[:n_test]}
    train = [i for i, m in enumerate(world.meta) if m["user"] not in test_users]
    test = [i for i, m in enumerate(world.meta) if m["user"] in test_users]
    return train, test


def _vote_accuracy(votes: list[float]) -> float:
    """Accuracy of 'chosen wins iff vote > 0', a tie (no evidence) counted as a coin flip."""
    v = np.asarray(votes, np.float64)
    return float(np.mean((v > 0) + 0.5 * (v == 0))) if len(v) else float("nan")


def _blind_majority(world: World, train: list[int], test: list[int]) -> tuple[float, float]:
    """Persona-blind: per unordered (prompt, response pair), predict the text chosen more often in train."""
    wins: dict[tuple[str, str], int] = {}
    for i in train:
        r = world.rows[i]
        wins[(r["prompt"], r["chosen"])] = wins.get((r["prompt"], r["chosen"]), 0) + 1
    votes, seen = [], 0
    for i in test:
        r = world.rows[i]
        a, b = wins.get((r["prompt"], r["chosen"]), 0), wins.get((r["prompt"], r["rejected"]), 0)
        seen += (a + b) > 0
        votes.append(a - b)
    return _vote_accuracy(votes), seen / max(1, len(test))


def _pair_features(chosen: str, rejected: str) -> np.ndarray:
    return np.concatenate(
        [response_scores(chosen) - response_scores(rejected), [(len(chosen) - len(rejected)) / 50.0]]
    )


def _blind_logreg(world: World, train: list[int], test: list[int], steps: int = 500) -> float:
    """Persona-blind: logistic regression on response-feature differences (no persona input)."""
    x = np.stack([_pair_features(world.rows[i]["chosen"], world.rows[i]["rejected"]) for i in train])
    # Both orders, so the model cannot use which slot the chosen response sits in.
    x_all, y_all = np.concatenate([x, -x]), np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x_all @ w)))
        w -= 0.5 * (x_all.T @ (p - y_all) / len(y_all) + 1e-3 * w)
    votes = [float(_pair_features(world.rows[i]["chosen"], world.rows[i]["rejected"]) @ w) for i in test]
    return _vote_accuracy(votes)


def release_estimate(row: dict[str, Any]) -> np.ndarray:
    """The release's P̃ for the row's history (persona.release_direction over the items' vectors)."""
    from alignx_jax.data.persona import release_direction

    vecs = [
        it["Preference Direction"]
        for it in (row.get("User-Generated Content") or [])
        + (row.get("Pair-wise Comparative Feedback") or [])
        if it.get("Preference Direction") is not None
    ]
    return np.asarray(release_direction(vecs), np.float64)


def measure_world(world: World, test_fraction: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """The properties the world is built to have, measured on held-out users.

    blind_*: persona-blind rules (should be ~0.5); golden: the row's golden direction;
    history_text: a keyword count over the history text; release_rule: the release's averaging
    rule over the history vectors; dim_acc_*: per golden-active-dim recovery of the direction.
    """
    train, test = _split_users(world, test_fraction, seed)
    blind_major, seen = _blind_majority(world, train, test)
    out: dict[str, Any] = {
        "users": len(world.users),
        "rows": len(world.rows),
        "test_rows": len(test),
        "pair_label_noise": float(np.mean([world.meta[i]["label_flipped"] for i in test])),
        "blind_majority": blind_major,
        "blind_majority_seen_fraction": seen,
        "blind_logreg": _blind_logreg(world, train, test),
    }
    golden, text, release = [], [], []
    dim_text, dim_release = [], []
    for i in test:
        r = world.rows[i]
        g = np.asarray(r["Preference Direction"], np.float64)
        t = scores_to_direction(history_scores(r))
        golden.append(direction_vote(g, r["chosen"], r["rejected"]))
        text.append(direction_vote(t, r["chosen"], r["rejected"]))
        active = [d for d in WORLD_DIMS if g[d] != NEUTRAL]
        dim_text += [t[d] == g[d] for d in active]
        try:
            p = release_estimate(r)
        except ImportError:
            continue
        release.append(direction_vote(p, r["chosen"], r["rejected"]))
        dim_release += [p[d] == g[d] for d in active]
    out.update(
        {
            "golden": _vote_accuracy(golden),
            "history_text": _vote_accuracy(text),
            "release_rule": _vote_accuracy(release) if release else None,
            "dim_acc_history_text": float(np.mean(dim_text)),
            "dim_acc_release_rule": float(np.mean(dim_release)) if dim_release else None,
        }
    )
    return out
