"""Reading and validating rows: formats, normalisation, error messages, skip_bad, `alignx data check`."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from alignx_jax.cli import main
from alignx_jax.data import schema
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


def alignx_row(i: int, rng: np.random.Generator, n_ugc: int = 2, n_pair: int = 3) -> dict:
    def d():
        return rng.choice([0.0, 0.5, 1.0], size=90).tolist()

    return {
        "prompt": f"post {i}",
        "chosen": f"good answer {i}",
        "rejected": f"bad answer {i}",
        "Preference Direction": d(),
        "Demographic Information": f"I am {20 + i} years old.",
        "User-Generated Content": [
            {"prompt": f"ugc {i}.{j}", "comment": f"comment {j}", "Preference Direction": d()}
            for j in range(n_ugc)
        ],
        "Pair-wise Comparative Feedback": [
            {"prompt": f"pair {i}.{j}", "chosen": "c", "rejected": "r", "Preference Direction": d()}
            for j in range(n_pair)
        ],
    }


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@needs_psoups
def test_all_psoups_rows_load_and_normalise():
    rows, skipped = schema.load_rows(PSOUPS)
    assert len(rows) == 600 and skipped == 0
    loaded = schema.load(PSOUPS)
    assert loaded.kind == "p-soups"
    for r in rows:
        assert r["Preference Direction"] is None
        assert r["Demographic Information"] == "" and r["User-Generated Content"] == []
        assert len(r["Pair-wise Comparative Feedback"]) == 4
        assert all(item["Preference Direction"] is None for item in r["Pair-wise Comparative Feedback"])
        assert isinstance(r["profile"], str) and r["ground_truth_persona"]
    # An explicit kind that does not fit is an error naming the missing field.
    with pytest.raises(DataError, match="Preference Direction"):
        schema.load_rows(PSOUPS, kind="alignx")


def test_parquet_cells_become_plain_lists(tmp_path):
    rng = np.random.default_rng(0)
    rows = [alignx_row(i, rng) for i in range(5)]
    path = tmp_path / "part.parquet"
    pd.DataFrame(rows).to_parquet(path)
    got, skipped = schema.load_rows(str(path))
    assert skipped == 0 and got == rows
    r = got[0]
    assert type(r["Preference Direction"]) is list and type(r["Preference Direction"][0]) is float
    assert type(r["User-Generated Content"]) is list and type(r["User-Generated Content"][0]) is dict
    assert type(r["User-Generated Content"][0]["Preference Direction"]) is list
    # Rows read through pandas carry numpy arrays: validate_row converts them too.
    df_row = pd.read_parquet(path).iloc[1].to_dict()
    assert isinstance(df_row["Preference Direction"], np.ndarray)
    norm = schema.validate_row(df_row, kind="alignx")
    assert norm == rows[1] and type(norm["Pair-wise Comparative Feedback"][0]["Preference Direction"]) is list


def test_jsonl_json_and_sorted_folder(tmp_path):
    rng = np.random.default_rng(1)
    rows = [alignx_row(i, rng) for i in range(6)]
    write_jsonl(tmp_path / "b.jsonl", rows[3:])
    with open(tmp_path / "a.json", "w") as f:
        json.dump(rows[:3], f)
    (tmp_path / "notes.txt").write_text("ignored")
    got, _ = schema.load_rows(str(tmp_path))
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]  # a.json before b.jsonl
    assert schema.load_rows(str(tmp_path / "b.jsonl"))[0] == rows[3:]


def test_check_reports_bad_direction_without_traceback(tmp_path, capsys):
    rng = np.random.default_rng(2)
    rows = [alignx_row(i, rng) for i in range(4)]
    rows[3]["Preference Direction"] = rows[3]["Preference Direction"][:89]
    path = tmp_path / "data.jsonl"
    write_jsonl(path, rows)
    assert main(["data", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "data.jsonl" in err and "row 3" in err and "'Preference Direction'" in err
    assert "expected 90 values, got 89" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_check_reports_truncated_json(tmp_path, capsys):
    rng = np.random.default_rng(3)
    text = json.dumps([alignx_row(i, rng) for i in range(3)], indent=2)
    path = tmp_path / "broken.json"
    path.write_text(text[: len(text) // 2])
    assert main(["data", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "broken.json" in err and "invalid JSON" in err and "Traceback" not in err
    # A truncated JSONL line names its line.
    jl = tmp_path / "cut.jsonl"
    jl.write_text(json.dumps(alignx_row(0, rng)) + "\n" + json.dumps(alignx_row(1, rng))[:50] + "\n")
    with pytest.raises(DataError, match=r"cut\.jsonl.*line 2"):
        schema.load_rows(str(jl))


def test_skip_bad_drops_and_counts(tmp_path):
    rng = np.random.default_rng(4)
    rows = [alignx_row(i, rng) for i in range(6)]
    rows[1]["Preference Direction"][5] = 0.3
    rows[4]["chosen"] = 17
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, rows)
    with open(path, "a") as f:
        f.write('{"prompt": "half a row\n')
    with pytest.raises(DataError, match="row 1.*value at index 5"):
        schema.load_rows(str(path))
    got, skipped = schema.load_rows(str(path), skip_bad=True)
    assert skipped == 3
    assert [r["prompt"] for r in got] == ["post 0", "post 2", "post 3", "post 5"]


def _good():
    return alignx_row(0, np.random.default_rng(5))


@pytest.mark.parametrize(
    "mutate, field, message",
    [
        (lambda r: r.update(prompt=3), "prompt", "expected a string"),
        (lambda r: r.update(chosen="   "), "chosen", "empty"),
        (lambda r: r.pop("rejected"), "rejected", "missing"),
        (lambda r: r.pop("Demographic Information"), "Demographic Information", "missing"),
        (lambda r: r.update({"Demographic Information": 5}), "Demographic Information", "expected a string"),
        (lambda r: r["Preference Direction"].__setitem__(0, True), "Preference Direction", "index 0"),
        (lambda r: r["Preference Direction"].__setitem__(7, "1"), "Preference Direction", "index 7"),
        (lambda r: r.update({"Preference Direction": "0.5"}), "Preference Direction", "expected a list"),
        (
            lambda r: r.update({"User-Generated Content": r["User-Generated Content"] * 3}),
            "User-Generated Content",
            "at most 4 items, got 6",
        ),
        (
            lambda r: r["User-Generated Content"][1].pop("Preference Direction"),
            "User-Generated Content[1].Preference Direction",
            "missing",
        ),
        (
            lambda r: r["User-Generated Content"][0].update({"Preference Direction": [0.5] * 91}),
            "User-Generated Content[0].Preference Direction",
            "expected 90 values, got 91",
        ),
        (
            lambda r: r["Pair-wise Comparative Feedback"][2].update(chosen=None),
            "Pair-wise Comparative Feedback[2].chosen",
            "missing",
        ),
        (
            lambda r: r["Pair-wise Comparative Feedback"].__setitem__(0, "text"),
            "Pair-wise Comparative Feedback[0]",
            "expected an object",
        ),
        (
            lambda r: r.update({"Pair-wise Comparative Feedback": {"prompt": "x"}}),
            "Pair-wise Comparative Feedback",
            "expected a list",
        ),
        # half an emoji (a lone surrogate) is no text any tokenizer or writer takes
        (
            lambda r: r.update(chosen="nice \ud83d"),
            "chosen",
            "not valid Unicode text: \\ud83d at character 5",
        ),
        (
            lambda r: r["User-Generated Content"][0].update(comment="\udc00"),
            "User-Generated Content[0].comment",
            "not valid Unicode text",
        ),
    ],
)
def test_validate_row_rejects(mutate, field, message):
    row = _good()
    mutate(row)
    with pytest.raises(DataError) as e:
        schema.validate_row(row, kind="alignx", file="f.jsonl", index=7)
    assert e.value.field == field and e.value.row == 7 and e.value.file == "f.jsonl"
    assert message in str(e.value)


def test_validate_row_leniency():
    row = _good()
    row["User-Generated Content"][0]["comment"] = ""  # empty comments exist in real data
    row["Pair-wise Comparative Feedback"][0].pop("Preference Direction")  # pairs may lack vectors
    row["Demographic Information"] = None
    row["Preference Direction"] = [int(v) if v != 0.5 else v for v in row["Preference Direction"]]
    row["extra"] = {"kept": True}
    out = schema.validate_row(row, kind="alignx")
    assert out["Demographic Information"] == "" and out["extra"] == {"kept": True}
    assert out["Pair-wise Comparative Feedback"][0]["Preference Direction"] is None
    assert all(type(v) is float for v in out["Preference Direction"])
    generic = {"prompt": "p", "chosen": "a", "rejected": "b"}
    out = schema.validate_row(generic, kind="prism")
    assert out["Preference Direction"] is None and out["User-Generated Content"] == []
    assert schema.detect_kind(generic) == "uf-p-4"


def test_check_summary(tmp_path, capsys):
    rng = np.random.default_rng(6)
    rows = [alignx_row(i, rng, n_ugc=i % 3, n_pair=4) for i in range(9)]
    rows[0]["Demographic Information"] = ""
    pd.DataFrame(rows).to_parquet(tmp_path / "x.parquet")
    assert main(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rows: 9  files: 1  kind: alignx  skipped: 0" in out
    assert "UGC 0:3, 1:3, 2:3 | PAIR 4:9" in out
    assert "demographics: 8/9" in out
    nn = [sum(v != 0.5 for v in r["Preference Direction"]) for r in rows]
    assert f"mean {np.mean(nn):.1f}" in out


def test_check_counts_each_split_of_a_split_folder(tmp_path, capsys):
    """A `data split` folder's totals add train/ and test/ together (train reads train/ alone): each split
    gets its own line under them; a plain folder gets none."""
    rng = np.random.default_rng(7)
    rows = [alignx_row(i, rng, n_ugc=1, n_pair=2) for i in range(9)]
    for half, part in (("train", rows[:6]), ("test", rows[6:])):
        (tmp_path / half).mkdir()
        pd.DataFrame(part[:2]).to_parquet(tmp_path / half / "a.parquet")
        pd.DataFrame(part[2:]).to_parquet(tmp_path / half / "b.parquet")
    assert main(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "rows: 9  files: 4  kind: alignx  skipped: 0",
        "split train/: 6 rows  files: 2",
        "split test/: 3 rows  files: 2",
    ]
    assert main(["data", "check", str(tmp_path / "train")]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("split ")]


@needs_psoups
def test_check_psoups_persona_counts(capsys):
    assert main(["data", "check", PSOUPS, "--kind", "p-soups"]) == 0
    out = capsys.readouterr().out
    assert out.count("persona (300 rows)") == 2 and "kind: p-soups" in out


def test_missing_path_and_empty_folder(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.parquet")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path)]) == 1
    assert "no .parquet" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, text", [("e.jsonl", ""), ("e.json", ""), ("w.json", " \n\n"), ("e.parquet", "")]
)
def test_an_empty_file_of_any_format_holds_no_rows(name, text, tmp_path, capsys):
    """A 0-byte .json (or .parquet) was "invalid JSON ... truncated or corrupt file?" where an empty .jsonl
    was "no rows": an empty file is no rows in any format, alone and beside a file of rows."""
    empty = tmp_path / "alone" / name
    empty.parent.mkdir()
    empty.write_text(text)
    for args in (["check", str(empty)], ["split", str(empty), "--out", str(tmp_path / "o")]):
        assert main(["data", *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"alignx: error: {empty}: no rows"]
    assert schema.head_rows(str(empty)) == [] and [r for r, _, _ in schema.iter_rows(str(empty))] == []
    folder = tmp_path / "beside"
    folder.mkdir()
    (folder / name).write_text(text)
    write_jsonl(folder / "rows.jsonl", [alignx_row(i, np.random.default_rng(i)) for i in range(2)])
    assert len(schema.load_rows(str(folder))[0]) == 2
    assert len(list(schema.iter_rows(str(folder)))) == 2
    assert main(["data", "split", str(folder), "--by", "row", "--out", str(tmp_path / "halves")]) == 0
    assert (tmp_path / "halves" / "train" / name).exists()  # written back as the input was: no rows
    assert len(schema.load_rows(str(tmp_path / "halves" / "train"))[0]) == 1


def test_auto_kind_is_not_fooled_by_a_broken_first_row(tmp_path):
    rng = np.random.default_rng(7)
    rows = [alignx_row(i, rng) for i in range(3)]
    rows[0]["Preference Direction"] = None
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        schema.load_rows(str(tmp_path / "d.jsonl"))
    assert e.value.row == 0 and e.value.field == "Preference Direction"
    got, skipped = schema.load_rows(str(tmp_path / "d.jsonl"), skip_bad=True)
    assert skipped == 1 and len(got) == 2


def test_byte_order_mark_dot_folders_and_jsonl_named_json(tmp_path):
    """A BOM (Windows editors) is read past; dot-folders (.ipynb_checkpoints copies) are skipped like
    dot-files; objects one after another that are not one per line get a hint that says so, not "truncated"."""
    rng = np.random.default_rng(5)
    rows = [alignx_row(i, rng) for i in range(4)]
    (tmp_path / "a.json").write_text("\ufeff" + json.dumps(rows[:2]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "\ufeff" + "".join(json.dumps(r) + "\n" for r in rows[2:]), encoding="utf-8"
    )
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.json").write_text(json.dumps(rows[:2]))
    got, _ = schema.load_rows(str(tmp_path))
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]
    pretty = tmp_path / "rows.json"
    pretty.write_text("".join(json.dumps(r, indent=2) + "\n" for r in rows))
    second = len(json.dumps(rows[0], indent=2).splitlines()) + 1  # the line the second object starts on
    with pytest.raises(
        DataError, match=rf"rows\.json.*line {second}, column 1: Extra data \(more than one JSON"
    ):
        schema.load_rows(str(pretty))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("bom", ["", "\ufeff"])
def test_json_lines_in_a_json_file_load_as_jsonl(newline, bom, tmp_path):
    """Hugging Face `Dataset.to_json` writes JSON Lines into a .json file: it loads (one row too), its kind
    is read from its first rows when streamed, and a broken line is named by its number."""
    rng = np.random.default_rng(3)
    rows = [alignx_row(i, rng) for i in range(4)]
    path = tmp_path / "train.json"
    path.write_text(bom + "".join(json.dumps(r) + newline for r in rows), encoding="utf-8", newline="")
    loaded = schema.load(str(path))
    assert loaded.kind == "alignx" and [r["prompt"] for r in loaded.rows] == [r["prompt"] for r in rows]
    assert [r["prompt"] for r, _, _ in schema.iter_rows(str(path))] == [r["prompt"] for r in rows]
    assert [r["prompt"] for r in schema.head_rows(str(path), 3)] == [r["prompt"] for r in rows[:3]]
    path.write_text(bom + json.dumps(rows[0]) + newline, encoding="utf-8", newline="")
    assert [r["prompt"] for r in schema.load_rows(str(path))[0]] == [rows[0]["prompt"]]
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-5]  # cut short
    path.write_text(bom + newline.join(lines) + newline, encoding="utf-8", newline="")
    with pytest.raises(DataError, match=r"train\.json: line 3: invalid JSON"):
        schema.load_rows(str(path))
    lines[2] = json.dumps({**rows[2], "chosen": 5})
    path.write_text(bom + newline.join(lines) + newline, encoding="utf-8", newline="")
    with pytest.raises(DataError, match=r"train\.json, row 2, field 'chosen'"):
        schema.load_rows(str(path))


def test_a_pretty_printed_object_in_a_json_file_is_still_no_list_of_rows(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}, indent=2))
    with pytest.raises(DataError, match=r"one\.json: expected a JSON list of rows, got dict"):
        schema.load_rows(str(path))


def test_a_jsonl_row_after_blank_lines_is_named_by_its_line_too(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path.write_text(json.dumps(good) + "\n\n\n" + json.dumps({**good, "chosen": 5}) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl, row 1 \(line 4\), field 'chosen': expected a string"):
        schema.load_rows(str(path), kind="uf-p-4")
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": 5}) + "\n")  # no blank line
    with pytest.raises(DataError, match=r"rows\.jsonl, row 1, field 'chosen'"):
        schema.load_rows(str(path), kind="uf-p-4")


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (json.dumps(ensure_ascii=False) writes them so):
    a JSONL line ends at a newline only, so such rows load, and `data split` writes halves that load too."""
    rng = np.random.default_rng(0)
    rows = [alignx_row(i, rng) for i in range(6)]
    rows[2]["chosen"] = "one\u2028two\u2029three\x85four\x0cfive"
    path = tmp_path / "ls.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    loaded = schema.load(str(path))
    assert len(loaded.rows) == 6 and loaded.rows[2]["chosen"] == rows[2]["chosen"]
    assert schema.head_rows(str(path))[2]["chosen"] == rows[2]["chosen"]
    out = tmp_path / "split"
    assert main(["data", "split", str(path), "--by", "row", "--out", str(out)]) == 0
    halves = [schema.load(str(out / half)) for half in ("train", "test")]
    assert sorted(r["chosen"] for h in halves for r in h.rows) == sorted(r["chosen"] for r in loaded.rows)


@pytest.mark.parametrize("command", [["data", "check"], ["data", "split"]])
def test_data_files_beside_split_folders_are_refused_as_train_refuses_them(command, tmp_path, capsys):
    """`alignx data check` passed (and `data split` read) a folder holding train/ and test/ beside another
    data file, which `alignx train`, `eval` and `data prepare` refuse: no split holds it. Both refuse it in
    the readers' one line naming the file, and write nothing."""
    rng = np.random.default_rng(7)
    for half in ("train", "test"):
        (tmp_path / "d" / half).mkdir(parents=True)
        write_jsonl(tmp_path / "d" / half / "rows.jsonl", [alignx_row(i, rng) for i in range(4)])
    write_jsonl(tmp_path / "d" / "extra.jsonl", [alignx_row(9, rng)])
    extra = ["--out", str(tmp_path / "out")] if command[1] == "split" else []
    assert main([*command, str(tmp_path / "d"), *extra]) == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "1 data file(s) beside the split folders train/, test/ would not be read" in err
    )
    assert "extra.jsonl" in err and not (tmp_path / "out").exists()
    (tmp_path / "d" / "extra.jsonl").unlink()  # the split folders alone still check
    assert main(["data", "check", str(tmp_path / "d")]) == 0


@pytest.mark.parametrize(
    "kind, mutate, field, meant",
    [
        # a benchmark's persona fields are optional: a near-miss spelling left its persona part empty, unsaid
        (
            "prism",
            lambda r: r.update({"Demographic information": r.pop("Demographic Information")}),
            "Demographic information",
            "Demographic Information",
        ),
        (
            "uf-p-4",
            lambda r: r.update({"user_generated_content": r.pop("User-Generated Content")}),
            "user_generated_content",
            "User-Generated Content",
        ),
        ("prism", lambda r: r.update({"User ID": "u1"}), "User ID", "user_id"),
        (
            "alignx",
            lambda r: r.update({"preference direction": r.pop("Preference Direction")}),
            "preference direction",
            "Preference Direction",
        ),
        # a pair's direction is optional too: its misspelling dropped the vector
        (
            "prism",
            lambda r: r["Pair-wise Comparative Feedback"][1].update(
                {"Preference_Direction": r["Pair-wise Comparative Feedback"][1].pop("Preference Direction")}
            ),
            "Pair-wise Comparative Feedback[1].Preference_Direction",
            "Preference Direction",
        ),
    ],
)
def test_validate_row_refuses_misspelled_fields(kind, mutate, field, meant):
    row = _good()
    mutate(row)
    with pytest.raises(DataError) as e:
        schema.validate_row(row, kind=kind, file="f.json", index=3)
    assert e.value.field == field and e.value.row == 3 and e.value.file == "f.json"
    assert f"spelled {meant!r}" in str(e.value)


def test_misspelled_field_beside_the_real_one_is_kept(tmp_path):
    row = _good()
    row["demographic information"] = "a note of the collector"  # the real field is there: an extra field
    row["Source"] = "reddit"  # nothing reads `source`: its look-alike is just another extra field
    out = schema.validate_row(row, kind="alignx")
    assert out["Source"] == "reddit"
    assert out["demographic information"] == "a note of the collector"
    assert out["Demographic Information"] == row["Demographic Information"]


def test_data_check_names_a_misspelled_persona_field(tmp_path, capsys):
    rows = [
        {"prompt": f"p{i}", "chosen": "a", "rejected": "b", "Demographic information": "age 30"}
        for i in range(2)
    ]
    (tmp_path / "prism.json").write_text(json.dumps(rows))
    assert main(["data", "check", "--kind", "prism", str(tmp_path / "prism.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prism.json, row 0, field 'Demographic information'" in err[0]
    assert "'Demographic Information'" in err[0]


def test_a_null_profile_column_does_not_make_alignx_rows_a_benchmark(tmp_path):
    """An AlignX parquet with a `profile` column left null (rows merged from files that had one) was
    detected as uf-p-4, so a comment without its direction, an error in AlignX rows, passed unsaid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(4)
    rows = [{**alignx_row(i, rng), "profile": None} for i in range(3)]
    assert schema.detect_kind(rows) == "alignx"
    rows[2]["User-Generated Content"][1]["Preference Direction"] = None
    path = tmp_path / "merged.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"merged.parquet, row 2, field 'User-Generated Content\[1\]"):
        schema.load(str(path))
    rows[0]["profile"] = "Older, Likes humor"  # a profile that is there still marks a benchmark
    assert schema.detect_kind(rows) == "uf-p-4"


def test_a_benchmark_file_with_golden_directions_is_read_as_a_benchmark(tmp_path, capsys):
    """UF-P-4 rows carry a golden `Preference Direction` beside the `profile` PBA reads and only some
    persona fields: auto-detected as AlignX, every row failed on a missing `Demographic Information`
    (train, prepare and predict-preferences have no --kind to say otherwise)."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(3):
        row = alignx_row(i, rng, n_ugc=0, n_pair=2)
        del row["Demographic Information"], row["User-Generated Content"]
        row["profile"] = "Older, Likes humor"
        rows.append(row)
    assert schema.detect_kind(rows) == "uf-p-4"
    assert schema.detect_kind([alignx_row(0, rng)]) == "alignx"
    write_jsonl(tmp_path / "honesty.jsonl", rows)
    assert main(["data", "check", str(tmp_path / "honesty.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "kind: uf-p-4" in out and "directions: 3 rows" in out
    counts: dict = {}
    streamed = list(schema.iter_rows(str(tmp_path / "honesty.jsonl"), counts=counts))
    assert counts["rows"] == 3 and streamed[0][0]["Preference Direction"] == rows[0]["Preference Direction"]
