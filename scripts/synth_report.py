"""Measure the synthetic persona world's designed properties on held-out users.

    python scripts/synth_report.py --users 400 --seed 0 [--pairs-per-user 4] [--json]

Prints: persona-blind rules (majority label per (prompt, response) seen in train users; logistic
regression on response features), the golden-direction rule, a keyword count over the history
text, the release's averaging rule over the history vectors (pair accuracy and per-dim recovery).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignx_jax.data.synth import generate_world
from alignx_jax.data.synth_measure import measure_world

LINES = [
    ("blind_majority", "persona-blind: majority label per (prompt, response), held-out users"),
    ("blind_majority_seen_fraction", "  (fraction of held-out pairs also seen in train users)"),
    ("blind_logreg", "persona-blind: logistic regression on response features"),
    ("golden", "persona-aware: golden direction"),
    ("history_text", "persona-aware: keyword count over the history text"),
    ("release_rule", "persona-aware: release averaging rule over history vectors"),
    ("dim_acc_history_text", "per active dim recovered: history text"),
    ("dim_acc_release_rule", "per active dim recovered: release averaging rule"),
    ("pair_label_noise", "label noise in held-out pairs"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--pairs-per-user", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    world = generate_world(args.users, args.pairs_per_user, args.seed)
    m = measure_world(world, test_fraction=args.test_fraction, seed=args.seed)
    m["seed"] = args.seed
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(
        f"synthetic world: {m['users']} users, {m['rows']} rows, {m['test_rows']} held-out rows, seed {args.seed}"
    )
    for key, text in LINES:
        v = m.get(key)
        print(f"  {text:<75} {'n/a' if v is None else f'{v:.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
