"""Persona-contrast pairs (`alignx data contrast`): each pair again under the other persona, swapped."""

from __future__ import annotations

import json
import os

import pytest

from alignx_jax.cli import main
from alignx_jax.data.contrast import check_twins, contrast_rows
from alignx_jax.errors import DataError

# labels of the preference space, as P-SOUPS profiles are written (the validator reads them)
PROFILES = [
    ["Young, Concise communication style", "Young, High Extraversion, Concise communication style"],
    [
        "Older, Detailed communication style",
        "Older, Concerned about complexity, Detailed communication style",
    ],
    ["Likes science", "Likes humor"],
]


def psoups_rows(per_persona=(3, 2)):
    rows = []
    for p, n in enumerate(per_persona):
        for k in range(n):
            rows.append(
                {
                    "prompt": f"prompt {p}-{k}",
                    "chosen": f"style {p} answer {k}",
                    "rejected": f"style {1 - p} answer {k}",
                    "ground_truth_persona": f"persona {p}",
                    "profile": PROFILES[p][k % 2],
                    "Pair-wise Comparative Feedback": [
                        {"prompt": f"h{p}{k}", "chosen": "x", "rejected": "y"}
                    ],
                }
            )
    return rows


def test_contrast_rows_swap_labels_under_the_other_persona():
    rows = psoups_rows()
    out = contrast_rows(rows, seed=1)
    assert out[: len(rows)] == rows and len(out) == 2 * len(rows)
    for row, con in zip(rows, out[len(rows) :]):
        assert (con["prompt"], con["chosen"], con["rejected"]) == (
            row["prompt"],
            row["rejected"],
            row["chosen"],
        )
        assert con["ground_truth_persona"] != row["ground_truth_persona"]
        # the whole context (profile, history pairs) is one real row of the other persona
        donors = [r for r in rows if r["ground_truth_persona"] == con["ground_truth_persona"]]
        assert any(all(con[k] == d[k] for k in ("profile", "Pair-wise Comparative Feedback")) for d in donors)
    assert contrast_rows(rows, seed=1) == out  # seeded
    assert any(contrast_rows(rows, seed=s) != out for s in range(2, 8))


def test_twins_follow_their_rows_in_a_seeded_order(tmp_path, capsys):
    rows = psoups_rows()
    plain = contrast_rows(rows, seed=2)
    twins = contrast_rows(rows, seed=2, twins=True)
    n = len(rows)
    assert sorted(map(json.dumps, twins)) == sorted(map(json.dumps, plain))  # the same rows, reordered
    order = [rows.index(twins[2 * i]) for i in range(n)]
    assert sorted(order) == list(range(n)) and order != list(range(n))  # each row once, shuffled
    for i, k in enumerate(order):  # ... and right after it, its own twin: same pair, labels swapped
        row, twin = twins[2 * i], twins[2 * i + 1]
        assert (twin["prompt"], twin["chosen"], twin["rejected"]) == (
            row["prompt"],
            row["rejected"],
            row["chosen"],
        )
        assert twin["ground_truth_persona"] != row["ground_truth_persona"]
        assert twin == plain[n + k]
    src, out = tmp_path / "train.json", tmp_path / "twins.json"
    src.write_text(json.dumps(rows))
    assert main(["data", "contrast", str(src), "--out", str(out), "--seed", "2", "--twins"]) == 0
    assert json.loads(out.read_text()) == twins
    assert "as twins" in capsys.readouterr().out
    check_twins(twins)  # what data.twins checks before training
    with pytest.raises(
        DataError, match="t.json, row 3: data.twins: rows 2 and 3 of the training rows are not twins"
    ):
        check_twins(
            [*twins[:3], twins[5], twins[4], twins[3], *twins[6:]], file="t.json"
        )  # twins out of place
    with pytest.raises(
        DataError, match="f.json, row 13: data.twins: rows 2 and 3"
    ):  # the row's own file and row
        check_twins([*twins[:3], twins[5], *twins[4:]][: len(twins)], where=lambda i: ("f.json", i + 10))
    with pytest.raises(DataError, match="odd number"):
        check_twins(twins[:-1])


def test_originals_keep_each_row_k_times_before_the_contrast_rows(tmp_path, capsys):
    # at K=2 a preference both personas share is asserted twice and contradicted once per pair
    rows = psoups_rows()
    one = contrast_rows(rows, seed=1)
    two = contrast_rows(rows, seed=1, originals=2)
    assert two == rows + one  # the same contrast rows, the originals once more in front
    src, out = tmp_path / "train.json", tmp_path / "mixed.json"
    src.write_text(json.dumps(rows))
    assert main(["data", "contrast", str(src), "--out", str(out), "--seed", "1", "--originals", "2"]) == 0
    assert json.loads(out.read_text()) == two
    assert "2 x 5 rows + 5 contrast rows" in capsys.readouterr().out
    for bad in ({"originals": 0}, {"originals": 2, "twins": True}):
        with pytest.raises(DataError, match=r"f.json: persona contrast: originals="):
            contrast_rows(rows, file="f.json", **bad)


def test_cli_contrast_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    """--originals 0/-1 (or 2 with --twins) were named `originals=K`, an empty --out a line starting ": ",
    a folder as --out or a file on its path the system's line ("Is a directory", "File exists") naming no
    flag. Each is refused in one line naming the flag, nothing written; unicode persona names go through."""
    monkeypatch.chdir(tmp_path)
    rows = psoups_rows()
    for r in rows:
        r["ground_truth_persona"] = {"persona 0": "Ünïcødé 学生 😀", "persona 1": "PhD—ドクター"}[
            r["ground_truth_persona"]
        ]
    (tmp_path / "t.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "f").write_text("mine")
    for extra, line in (
        (["--originals", "0"], "--originals 0: must be 1 or more"),
        (["--originals=-1"], "--originals -1: must be 1 or more"),
        (
            ["--originals", "2", "--twins"],
            "--originals 2 with --twins: a twin is one row and its contrast row",
        ),
        (["--out", ""], "--out: an empty path; name a file"),
        (["--out", "dir.json"], "--out dir.json: is a folder, not a file"),
        (["--out", "f/c.json"], "--out f/c.json: cannot be written (a file where a folder would go: "),
    ):
        assert main(["data", "contrast", "t.json", "--out", "c.json", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"alignx: error: {line}"), err
    assert sorted(os.listdir(tmp_path)) == ["dir.json", "f", "t.json"] and not os.listdir(
        tmp_path / "dir.json"
    )
    assert main(["data", "contrast", "t.json", "--out", "c.json"]) == 0
    written = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert written == contrast_rows(rows) and "Ünïcødé 学生 😀" in (tmp_path / "c.json").read_text(
        encoding="utf-8"
    )


@pytest.mark.parametrize("personas", [(4,), (2, 2, 2)])
def test_contrast_needs_exactly_two_personas(personas):
    with pytest.raises(DataError, match=f"exactly two .* found {len(personas)}"):
        contrast_rows(psoups_rows(personas), file="f.json")


def test_user_ids_1_and_quoted_1_are_two_personas():
    """The persona is keyed with its JSON type, as `data split` keys users: str(group) made user_id 1 and
    "1" one persona (a file of two personas was refused as one)."""
    rows = [{k: v for k, v in r.items() if k != "ground_truth_persona"} for r in psoups_rows((2, 2))]
    for r, uid in zip(rows, [1, 1, "1", "1"]):
        r["user_id"] = uid
    out = contrast_rows(rows, seed=0)
    assert [type(c["user_id"]) for c in out[len(rows) :]] == [str, str, int, int]
    with pytest.raises(DataError, match="found 3"):
        contrast_rows([*rows, {**rows[0], "user_id": 2}])


def test_cli_contrast_writes_the_input_format(tmp_path, capsys):
    src = tmp_path / "train.json"
    src.write_text(json.dumps(psoups_rows()))
    out = tmp_path / "o" / "contrast.json"
    assert main(["data", "contrast", str(src), "--out", str(out), "--seed", "3"]) == 0
    assert json.loads(out.read_text()) == contrast_rows(psoups_rows(), seed=3)
    jl = tmp_path / "train.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in psoups_rows()))
    assert main(["data", "contrast", str(jl), "--out", str(tmp_path / "c.jsonl")]) == 0
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 10
    # a rerun onto its own earlier output replaces it (another seed, --twins: still a contrast file)
    assert main(["data", "contrast", str(src), "--out", str(out), "--seed", "4", "--twins"]) == 0
    assert json.loads(out.read_text()) == contrast_rows(psoups_rows(), seed=4, twins=True)
    assert main(["data", "contrast", str(jl), "--out", str(tmp_path / "c.jsonl"), "--originals", "2"]) == 0
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 15
    # JSON Lines in a .json file (Hugging Face `to_json`): a .json --out, written as JSON Lines too
    hf = tmp_path / "hf.json"
    hf.write_text(jl.read_text())
    assert main(["data", "contrast", str(hf), "--out", str(tmp_path / "hf_c.json"), "--seed", "3"]) == 0
    written = (tmp_path / "hf_c.json").read_text().splitlines()
    assert [json.loads(line) for line in written] == contrast_rows(psoups_rows(), seed=3)


def test_cli_contrast_bad_input_is_one_line(tmp_path, capsys):
    src = tmp_path / "bad.json"
    rows = psoups_rows()
    del rows[2]["chosen"]
    src.write_text(json.dumps(rows))
    out = tmp_path / "c.json"
    assert main(["data", "contrast", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and "row 2" in err[0]
    assert not out.exists()  # nothing written
    one = tmp_path / "one.json"
    one.write_text(json.dumps(psoups_rows((3,))))
    assert main(["data", "contrast", str(one), "--out", str(out)]) == 1
    assert "exactly two" in capsys.readouterr().err and not out.exists()


def test_a_row_without_persona_is_named():
    rows = psoups_rows()
    del rows[3]["ground_truth_persona"]
    with pytest.raises(DataError, match=r"f.json, row 3: persona contrast: a row names no persona"):
        contrast_rows(rows, file="f.json")


def test_cli_contrast_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = tmp_path / "train.json"
    src.write_text(json.dumps(psoups_rows()))
    before = src.read_text()
    assert main(["data", "contrast", str(src), "--out", str(src)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {src} is the input file" in err[0] and src.read_text() == before
    assert os.listdir(tmp_path) == ["train.json"]  # no temporary file left either
    # written in the input's format: an --out named for another is refused (JSONL in a .json file was)
    for name in ("c.jsonl", "c.txt"):
        assert main(["data", "contrast", str(src), "--out", str(tmp_path / name)]) == 1
        assert "--out must name a .json file, as the input" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["train.json"]


@pytest.mark.parametrize("target", ["notes", "config", "data"])
def test_cli_contrast_never_replaces_a_file_that_is_not_its_output(target, tmp_path, capsys):
    """An existing --out must be an earlier contrast file: notes, a model folder's config.json and a data
    file of plain rows (another persona file) are refused in one line naming --out and the file, and
    left byte-identical."""
    src = tmp_path / "train.json"
    src.write_text(json.dumps(psoups_rows()))
    (tmp_path / "model").mkdir()
    out = {"notes": "notes.json", "config": "model/config.json", "data": "other.json"}[target]
    out = tmp_path / out
    out.write_text(
        {
            "notes": "my notes\n",
            "config": json.dumps({"model_type": "llama", "hidden_size": 48}),
            "data": json.dumps(psoups_rows((3, 5))),
        }[target]
    )
    before = out.read_bytes()
    assert main(["data", "contrast", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out} exists and is not an `alignx data contrast` file" in err[0], err
    assert out.read_bytes() == before
