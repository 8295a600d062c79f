"""Train/test splits: groups stay whole; `alignx data split` writes each half in the input's format."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from alignx_jax.cli import main
from alignx_jax.data import schema, split
from alignx_jax.errors import DataError

PSOUPS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "benchmarks",
    "p-soups",
    "student_phd.json",
)
needs_psoups = pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not present")


def synthetic_rows(n_users=6, per_user=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for k in range(per_user):
            rows.append(
                {
                    "prompt": f"prompt {k % 3}-{u % 2}",
                    "chosen": "a",
                    "rejected": "b",
                    "Preference Direction": rng.choice([0.0, 0.5, 1.0], size=90).tolist(),
                    "Demographic Information": f"user {u}",
                    "User-Generated Content": [],
                    "Pair-wise Comparative Feedback": [],
                    "user_id": f"u{u}",
                }
            )
    return rows


@needs_psoups
def test_psoups_by_prompt():
    rows, _ = schema.load_rows(PSOUPS)
    train, test = split.split_rows(rows, by="prompt", test_fraction=0.5, seed=0)
    assert len(train) + len(test) == 600 and 200 < len(test) < 400
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    personas = {r["ground_truth_persona"] for r in rows}
    assert len(personas) == 2
    assert {r["ground_truth_persona"] for r in train} == personas == {r["ground_truth_persona"] for r in test}
    again = split.split_rows(rows, by="prompt", test_fraction=0.5, seed=0)
    assert again == (train, test)
    assert split.split_rows(rows, by="prompt", test_fraction=0.5, seed=1)[1] != test
    # Rows keep their input order within each half.
    pos = {id(r): i for i, r in enumerate(rows)}
    assert [pos[id(r)] for r in test] == sorted(pos[id(r)] for r in test)


def test_by_user_and_row():
    rows = synthetic_rows()
    train, test = split.split_rows(rows, by="user", test_fraction=1 / 3, seed=3)
    assert len({r["user_id"] for r in test}) == 2 and len(test) == 10
    assert not {r["user_id"] for r in train} & {r["user_id"] for r in test}
    # Without user ids, a shared persona (demographics + histories) identifies the user.
    anon = [{k: v for k, v in r.items() if k != "user_id"} for r in rows]
    _, test_anon = split.split_rows(anon, by="user", test_fraction=0.5, seed=0)
    assert len({r["Demographic Information"] for r in test_anon}) == 3 and len(test_anon) == 15
    train_r, test_r = split.split_rows(rows, by="row", test_fraction=0.2, seed=0)
    assert len(test_r) == 6 and len(train_r) == 24
    # A tiny fraction still puts one group on each side.
    assert len(split.split_rows(rows, by="user", test_fraction=0.01, seed=0)[1]) == 5
    assert split.split_rows(rows, by="row", test_fraction=0.0, seed=0)[1] == []


@needs_psoups
def test_cli_split_json_keeps_raw_rows(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "split", PSOUPS, "--out", str(out), "--seed", "2", "--test-fraction", "0.25"]) == 0
    with open(PSOUPS) as f:
        raw = json.load(f)
    with open(out / "train" / "student_phd.json") as f:
        train = json.load(f)
    with open(out / "test" / "student_phd.json") as f:
        test = json.load(f)
    assert len(train) + len(test) == 600 and 100 < len(test) < 200
    assert all(r in raw for r in test[:20]) and set(test[0]) == set(raw[0])  # not the normalised dicts
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    out_err = capsys.readouterr()
    assert "train" in out_err.out and "warning" not in out_err.err  # --by prompt: both personas in each half


def test_cli_split_refuses_an_out_holding_its_input(tmp_path, capsys):
    """`data split DIR --out DIR` (or a file's own folder as --out) put train/ and test/ beside the input
    files: a folder train and eval then refused. One line, the folder left as it was."""
    rows = synthetic_rows(n_users=2, per_user=2)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (folder, folder / "rows.jsonl"):
        assert main(["data", "split", str(path), "--by", "row", "--out", str(folder)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds the input file" in err[0]
        assert sorted(os.listdir(folder)) == ["rows.jsonl"]
    assert main(["data", "split", str(folder), "--by", "row", "--out", str(tmp_path / "halves")]) == 0


def test_by_user_keeps_user_ids_of_different_json_types_apart(tmp_path, capsys):
    """user_id 1, "1" and true were one user (`id:1`, `id:True` == 1 in a set too): the schema reads a
    string or an integer, so true is refused naming its file, row and field, and 1 and "1" are two users."""
    rows = synthetic_rows(n_users=2, per_user=1)
    rows[0]["user_id"], rows[1]["user_id"] = 1, "1"
    assert split.group_keys(rows, "user")[0] != split.group_keys(rows, "user")[1]
    train, test = split.split_rows(rows, by="user", test_fraction=0.5, seed=0)
    assert len(train) == len(test) == 1
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {**rows[0], "user_id": True}]))
    assert main(["data", "split", str(src), "--by", "user", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rows.jsonl, row 2" in err[0], err
    assert "field 'user_id': expected a string or integer, got bool" in err[0], err
    with pytest.raises(DataError, match="field 'source': expected a string or integer, got bool"):
        schema.validate_row({**rows[0], "source": False}, kind="alignx")


def test_cli_split_refuses_a_split_folder(tmp_path, capsys):
    """`data split` of its own output (train/ and test/) shuffled both halves together and wrote
    OUT/train/train/...: refused in one line naming the folder, as eval and generate refuse it; a half
    named on its own splits."""
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(n_users=4, per_user=2)))
    halves = tmp_path / "halves"
    assert main(["data", "split", str(src), "--by", "user", "--out", str(halves)]) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["data", "split", str(halves), "--by", "user", "--out", str(again)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"alignx: error: {halves}: holds the split folders train/, test/: name the one to split "
        f"(e.g. {halves}/test)"
    ]
    assert not again.exists()
    assert main(["data", "split", str(halves / "train"), "--by", "row", "--out", str(again)]) == 0
    assert sorted(os.listdir(again / "train")) == ["rows.jsonl"]


def test_cli_split_refuses_an_empty_half(tmp_path, capsys):
    """A half of no rows is a file data check, eval and train refuse: one line, nothing written (it was a
    `[]` file and exit 0), whether the fraction asks for it or the rows form one group."""
    rows = synthetic_rows(n_users=2, per_user=2)
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({**r, "prompt": "same"}) + "\n" for r in rows))
    for path, extra, half in (
        (src, ["--test-fraction", "0"], "test"),
        (src, ["--test-fraction", "1"], "train"),
        (one, ["--by", "prompt"], "test"),  # one prompt: one group, all in train
    ):
        out = tmp_path / f"out-{half}-{path.stem}"
        assert main(["data", "split", str(path), "--out", str(out), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"the {half} half would hold no rows" in err[0] and not out.exists()


@needs_psoups
def test_cli_split_by_user_of_rows_without_user_ids_says_it_splits_personas(tmp_path, capsys):
    """P-SOUPS rows have no user_id: --by user groups them by ground_truth_persona, two groups, one a half."""
    assert main(["data", "split", PSOUPS, "--by", "user", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "no row has a user_id" in err and "(2 groups)" in err and "--by prompt" in err
    with open(tmp_path / "out" / "test" / "student_phd.json") as f:
        assert len({r["ground_truth_persona"] for r in json.load(f)}) == 1


def test_cli_split_parquet_and_jsonl_folder(tmp_path):
    rows = synthetic_rows()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    pd.DataFrame(rows[:15]).to_parquet(src / "part0.parquet")
    with open(src / "sub" / "part1.jsonl", "w") as f:
        for r in rows[15:]:
            f.write(json.dumps(r) + "\n")
    out = tmp_path / "out"
    assert main(["data", "split", str(src), "--by", "user", "--out", str(out)]) == 0
    got = {}
    for half in ("train", "test"):
        assert os.path.isfile(out / half / "part0.parquet") and os.path.isfile(
            out / half / "sub" / "part1.jsonl"
        )
        got[half], _ = schema.load_rows(str(out / half))
    assert len(got["train"]) + len(got["test"]) == 30
    assert not {r["user_id"] for r in got["train"]} & {r["user_id"] for r in got["test"]}
    assert sorted(
        got["train"] + got["test"], key=lambda r: (r["user_id"], r["Preference Direction"])
    ) == sorted(schema.load_rows(str(src))[0], key=lambda r: (r["user_id"], r["Preference Direction"]))
    table = pd.read_parquet(out / "test" / "part0.parquet")
    assert list(table.columns) == list(pd.read_parquet(src / "part0.parquet").columns)


def test_cli_split_bad_fraction(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(2, 2)))
    assert main(["data", "split", str(path), "--test-fraction", "1.5", "--out", str(tmp_path / "o")]) == 1
    assert "test fraction" in capsys.readouterr().err
    # each named the flag only as "test fraction"; refused before the rows are read, nothing written
    for value in ("-0.5", "nan", "inf", "-inf"):
        argv = ["data", "split", str(tmp_path / "missing.jsonl"), f"--test-fraction={value}"]
        assert main([*argv, "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"alignx: error: --test-fraction {float(value)}: the test fraction must be between 0 and 1"
        ]
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_cli_split_an_out_that_cannot_be_a_folder_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    """An empty --out wrote train/ and test/ into the working directory; a file as --out (or on its path) was
    the system's "Not a directory" naming no flag. Each is refused, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(2, 2)))
    (tmp_path / "f").write_text("mine")
    for out, line in (
        ("", "--out: an empty path; name a folder"),
        ("f", "--out f: is a file, not a folder"),
        ("f/sub", "--out f/sub: cannot be written (a file where a folder would go: "),
    ):
        assert main(["data", "split", "d.jsonl", "--by", "user", "--out", out]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"alignx: error: {line}"), err
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "f"] and (tmp_path / "f").read_text() == "mine"


def test_cli_split_refuses_to_overwrite_its_input(tmp_path, capsys):
    """`data split out/train/d.jsonl --out out` would write out/train/d.jsonl: refused before anything is written."""
    path = tmp_path / "train" / "d.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(4, 2)))
    before = path.read_text()
    assert main(["data", "split", str(path), "--by", "row", "--out", str(tmp_path)]) == 1
    assert "--out would overwrite this input file" in capsys.readouterr().err
    assert path.read_text() == before and sorted(os.listdir(tmp_path)) == ["train"]


def test_cli_split_refuses_to_overwrite_its_input_through_a_symlinked_half(tmp_path, capsys):
    """OUT/train a link to the input's folder: the input is not inside OUT, but OUT/train/d.jsonl is the
    input itself; refused before anything is written."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(4, 2)))
    before = path.read_text()
    out = tmp_path / "out"
    out.mkdir()
    (out / "train").symlink_to(src)
    assert main(["data", "split", str(path), "--by", "row", "--out", str(out)]) == 1
    assert "--out would overwrite this input file" in capsys.readouterr().err
    assert path.read_text() == before and sorted(os.listdir(out)) == ["train"]


def test_cli_split_writes_both_halves_or_neither(tmp_path, capsys):
    """An output that fails part-way (here test/ is a file) leaves no train/ half behind, and no temporaries."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(4, 2)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "test").write_text("a user's file\n")
    assert main(["data", "split", str(path), "--by", "row", "--out", str(out)]) == 1
    assert "alignx: error:" in capsys.readouterr().err
    assert (out / "test").read_text() == "a user's file\n"
    assert [f for _, _, files in os.walk(out / "train") for f in files] == []  # no half, no temporary


def test_cli_split_refuses_an_out_holding_another_splits_files(tmp_path, capsys):
    """Splitting a.jsonl, then b.jsonl into the same --out left both in train/ and test/, read as one data
    set: refused; the same file split again (its own halves, replaced) is not."""
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(4, 2)))
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["data", "split", str(tmp_path / "a.jsonl"), "--by", "row", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "split", str(tmp_path / "b.jsonl"), "--by", "row", "--out", str(out)]) == 1
    assert "--out holds another split's file" in capsys.readouterr().err
    assert sorted(os.listdir(out / "train")) == ["a.jsonl"]


def test_cli_split_computes_each_rows_group_once(tmp_path, capsys, monkeypatch):
    """`data split --by user` json-dumped each row's history three times (the split, the empty-half check,
    the persona warning): once now, and the check and the warning still count the groups."""
    rows = [{**r, "ground_truth_persona": r["user_id"]} for r in synthetic_rows(n_users=3, per_user=2)]
    for r in rows:
        del r["user_id"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    user_key = split._user_key
    monkeypatch.setattr(split, "_user_key", lambda r: calls.append(1) or user_key(r))
    assert main(["data", "split", str(path), "--by", "user", "--out", str(tmp_path / "o")]) == 0
    assert len(calls) == len(rows) and "ground_truth_persona (3 groups)" in capsys.readouterr().err
    calls.clear()
    assert (
        main(
            ["data", "split", str(path), "--by", "user", "--test-fraction", "0", "--out", str(tmp_path / "z")]
        )
        == 1
    )
    assert len(calls) == len(rows) and f"({len(rows)} rows in 3 group(s))" in capsys.readouterr().err
