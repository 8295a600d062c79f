"""The synthetic persona world: schema, determinism, balance and its measured properties."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alignx_jax.data import synth, synth_measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = [
    "prompt",
    "chosen",
    "rejected",
    "Preference Direction",
    "Demographic Information",
    "User-Generated Content",
    "Pair-wise Comparative Feedback",
    "user_id",
    "source",
]


@pytest.fixture(scope="module")
def world():
    return synth.generate_world(400, 4, seed=0)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "alignx_jax", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_parquet_schema_and_users_file(tmp_path):
    import pandas as pd

    out = str(tmp_path / "syn")
    synth.cli_synth(type("A", (), {"out": out, "users": 12, "pairs_per_user": 3, "seed": 5})())
    df = pd.read_parquet(os.path.join(out, "data.parquet"))
    assert list(df.columns) == FIELDS
    assert len(df) == 36 and df["user_id"].nunique() == 12
    for _, r in df.iterrows():
        assert all(isinstance(r[k], str) and r[k] for k in ("prompt", "chosen", "rejected"))
        assert r["chosen"] != r["rejected"]
        d = np.asarray(r["Preference Direction"])
        assert d.shape == (90,) and set(np.unique(d)) <= {0.0, 0.5, 1.0}
        assert (
            1 <= len(r["User-Generated Content"]) <= 4 and 1 <= len(r["Pair-wise Comparative Feedback"]) <= 4
        )
        for it in r["User-Generated Content"]:
            assert (
                set(it) == {"prompt", "comment", "Preference Direction"}
                and len(it["Preference Direction"]) == 90
            )
        for it in r["Pair-wise Comparative Feedback"]:
            assert set(it) == {"prompt", "chosen", "rejected", "Preference Direction"}
            assert len(it["Preference Direction"]) == 90
    users = json.loads(open(os.path.join(out, synth.USERS_FILE)).read())
    assert len(users["users"]) == 12
    by_id = {u["user_id"]: u for u in users["users"]}
    for _, r in df.iterrows():  # the row's golden direction is its user's hidden direction
        assert list(r["Preference Direction"]) == by_id[r["user_id"]]["direction"]
    assert {d["index"] for d in users["world_dims"]} == set(synth.WORLD_DIMS)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    paths = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = str(tmp_path / name)
        synth.write_world(synth.generate_world(20, 3, seed), out)
        paths.append(out)
    read = lambda p, f: open(os.path.join(p, f), "rb").read()
    for f in ("data.parquet", synth.USERS_FILE):
        assert read(paths[0], f) == read(paths[1], f)
    assert read(paths[0], "data.parquet") != read(paths[2], "data.parquet")


def test_phrases_are_unambiguous():
    # The analysis rules count exact phrases: none may contain another.
    corpus = set(synth.world_corpus())
    for a, b in itertools.permutations(corpus, 2):
        assert a not in b, (a, b)


def test_balanced_and_recurring(world):
    dirs = np.array([u.direction for u in world.users])
    for d in synth.WORLD_DIMS:  # every feature: half the holders prefer each side
        ones, zeros = int((dirs[:, d] == 1).sum()), int((dirs[:, d] == 0).sum())
        assert ones + zeros > 0 and abs(ones - zeros) <= 1
    assert all(2 <= len(u.active) <= 4 for u in world.users)
    # P-SOUPS-like: the same (prompt, response pair) occurs with opposite labels for different users.
    labels: dict[tuple, set] = {}
    for r in world.rows:
        key = (r["prompt"], frozenset((r["chosen"], r["rejected"])))
        labels.setdefault(key, set()).add(r["chosen"])
    assert sum(len(v) == 2 for v in labels.values()) > 0.3 * len(labels)


def test_pair_differs_on_its_dimension_only(world):
    for r, m in zip(world.rows[:200], world.meta[:200]):
        diff = synth.response_scores(r["chosen"]) - synth.response_scores(r["rejected"])
        w = synth.WORLD_DIMS.index(m["dim"])
        assert np.count_nonzero(diff) == 1 and diff[w] == (2 if m["pos_chosen"] else -2)
        g = r["Preference Direction"][m["dim"]]
        assert g in (0.0, 1.0) and ((g == 1.0) == m["pos_chosen"]) != m["label_flipped"]


def test_measured_properties(world):
    m = synth_measure.measure_world(world, seed=0)
    # (a) persona-blind rules are near chance on held-out users
    assert 0.40 <= m["blind_majority"] <= 0.56 and m["blind_majority_seen_fraction"] > 0.5
    assert 0.40 <= m["blind_logreg"] <= 0.56
    # (b) the persona carries the signal
    assert m["golden"] >= 0.8
    assert m["history_text"] >= m["blind_majority"] + 0.2
    # (c) the release's averaging rule recovers the direction only partly; reading the text does better
    if importlib.util.find_spec("alignx_jax.data.persona") is None:
        pytest.skip("persona.py not present")
    assert m["dim_acc_release_rule"] is not None and m["dim_acc_release_rule"] < 0.8
    assert m["dim_acc_history_text"] > m["dim_acc_release_rule"] + 0.2
    assert m["history_text"] > m["release_rule"] + 0.1


def test_report_script_json():
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "synth_report.py"),
            "--users",
            "60",
            "--seed",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["users"] == 60 and m["rows"] == 240 and 0.0 <= m["blind_logreg"] <= 1.0


def test_cli_synth_then_data_check(tmp_path):
    if importlib.util.find_spec("alignx_jax.data.schema") is None:
        pytest.skip("schema.py not present")
    out = str(tmp_path / "syn")
    r = _cli("synth", "--out", out, "--users", "10", "--pairs-per-user", "2", "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = _cli("data", "check", out)
    assert r.returncode == 0, r.stderr
    assert "rows: 20" in r.stdout


def test_bad_arguments_are_user_errors(tmp_path):
    r = _cli("synth", "--out", str(tmp_path / "x"), "--users", "1")
    assert r.returncode == 1 and "alignx: error:" in r.stderr and "Traceback" not in r.stderr


def test_synth_writes_rows_and_users_or_neither(tmp_path):
    """A failing second output (here .users.json is a folder) leaves no data.parquet without its users."""
    out = tmp_path / "syn"
    (out / ".users.json").mkdir(parents=True)
    r = _cli("synth", "--out", str(out), "--users", "4", "--pairs-per-user", "2")
    assert r.returncode == 1 and "alignx: error:" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(out)) == [".users.json"]


@pytest.mark.parametrize("other", ["rows.jsonl", "train/rows.jsonl"])
def test_an_out_holding_other_data_is_refused(tmp_path, other):
    """`alignx synth --out DIR` wrote DIR/data.parquet beside whatever data DIR held: another data set's
    file, read with the synthetic rows as one data set, or an `alignx data split` output's train/ and
    test/, which every reader then refuses. It is refused in one line naming the file, and DIR is left as
    it was; a rerun over its own earlier output still replaces it."""
    from conftest import run_cli

    out = tmp_path / "d"
    (out / other).parent.mkdir(parents=True, exist_ok=True)
    (out / other).write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (out / "notes.txt").write_text("not data")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    r = run_cli(["synth", "--out", out, "--users", "4", "--pairs-per-user", "2"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"--out holds another data file {out / other}" in r.stderr, r.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    own = tmp_path / "own"
    for _ in range(2):
        assert run_cli(["synth", "--out", own, "--users", "4", "--pairs-per-user", "2"]).returncode == 0


def test_an_out_that_cannot_be_a_folder_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    """An empty --out wrote the rows into the working directory; a file as --out (or on its path) was the
    system's line ("File exists", "Not a directory") naming no flag. Each is refused, nothing written."""
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("mine")
    for out, line in (
        ("", "--out: an empty path; name a folder"),
        ("f", "--out f: is a file, not a folder"),
        ("f/sub", "--out f/sub: cannot be written (a file where a folder would go: "),
    ):
        r = run_cli(["synth", "--out", out, "--users", "4", "--pairs-per-user", "2"])
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"alignx: error: {line}"), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["f"] and (tmp_path / "f").read_text() == "mine"


def test_a_data_parquet_of_the_users_in_out_is_not_replaced(tmp_path):
    """OUT/data.parquet that no synth wrote (a data set of the user's) was silently replaced by the rows;
    it is refused in one line. An earlier synth's, even with other settings, is still replaced."""
    import pandas as pd
    from conftest import run_cli

    out = tmp_path / "d"
    out.mkdir()
    pd.DataFrame([{"prompt": "p", "chosen": "a", "rejected": "b"}]).to_parquet(out / "data.parquet")
    before = (out / "data.parquet").read_bytes()
    r = run_cli(["synth", "--out", out, "--users", "4", "--pairs-per-user", "2"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "is not an `alignx synth` output" in r.stderr and "--out" in r.stderr, r.stderr
    assert os.listdir(out) == ["data.parquet"] and (out / "data.parquet").read_bytes() == before
    own = tmp_path / "own"
    assert run_cli(["synth", "--out", own, "--users", "4", "--pairs-per-user", "2"]).returncode == 0
    r = run_cli(["synth", "--out", own, "--users", "5", "--pairs-per-user", "2", "--seed", "3"])
    assert r.returncode == 0 and "5 users" in r.stdout, r.stderr
