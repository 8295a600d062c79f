"""Benchmark files (docs/method.md section 7 shapes) normalised to rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from alignx_jax.data import benchmarks
from alignx_jax.errors import DataError

PSOUPS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "benchmarks",
    "p-soups",
    "student_phd.json",
)


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not present")
def test_psoups():
    rows = benchmarks.load_benchmark("p-soups", PSOUPS)
    assert len(rows) == 600
    with open(PSOUPS) as f:
        raw = json.load(f)
    for r, src in zip(rows, raw):
        assert (r["prompt"], r["chosen"], r["rejected"], r["profile"]) == (
            src["prompt"],
            src["chosen"],
            src["rejected"],
            src["profile"],
        )
        assert r["Preference Direction"] is None
        assert [
            (p["prompt"], p["chosen"], p["rejected"], p["Preference Direction"])
            for p in r["Pair-wise Comparative Feedback"]
        ] == [(p["prompt"], p["chosen"], p["rejected"], None) for p in src["Pair-wise Comparative Feedback"]]
    assert len(benchmarks.load_benchmark("p-soups", PSOUPS, limit=7)) == 7


def _uf_rows():
    return [
        {
            "prompt": "Explain tides.",
            "chosen": "Moon gravity.",
            "rejected": "Wind.",
            "Pair-wise Comparative Feedback": [{"prompt": "q", "chosen": "a", "rejected": "b"}],
            "profile": "Concerned about truthfulness",
        },
        {
            "prompt": "Explain rain.",
            "chosen": "Condensation.",
            "rejected": "Clouds cry.",
            "Demographic Information": "A farmer.",
            "User-Generated Content": [{"prompt": "p", "comment": "c"}],
        },
    ]


def test_uf_p_4_and_prism(tmp_path):
    for name in ("helpfulness", "honesty"):
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump(_uf_rows(), f)
    rows = benchmarks.load_benchmark("uf-p-4", str(tmp_path))
    assert len(rows) == 4
    assert rows[0]["profile"] == "Concerned about truthfulness" and "profile" not in rows[1]
    assert rows[1]["Demographic Information"] == "A farmer." and rows[0]["Demographic Information"] == ""
    assert rows[1]["User-Generated Content"][0]["Preference Direction"] is None
    # --limit is a seeded sample (rows without persona fields form one group), not the first rows
    prism = benchmarks.load_benchmark("prism", str(tmp_path / "honesty.json"), limit=1)
    pick = benchmarks.balanced_sample(_uf_rows(), 1, seed=0)
    assert [r["prompt"] for r in prism] == [_uf_rows()[pick[0]]["prompt"]]


def test_a_benchmark_of_json_lines_in_a_json_file_loads(tmp_path):
    """Hugging Face `Dataset.to_json` writes JSON Lines into a .json file: the benchmark loads from it, as
    train data does, and a broken line is named by its number."""
    path = tmp_path / "prism.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in _uf_rows()))
    rows = benchmarks.load_benchmark("prism", str(path))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in _uf_rows()]
    path.write_text(json.dumps(_uf_rows()[0]) + "\n" + json.dumps(_uf_rows()[1])[:-1] + "\n")
    with pytest.raises(DataError, match=r"prism\.json: line 2: invalid JSON"):
        benchmarks.load_benchmark("prism", str(path))


def test_missing_response_is_named(tmp_path):
    bad = _uf_rows()
    del bad[1]["chosen"]
    with open(tmp_path / "prism.json", "w") as f:
        json.dump(bad, f)
    with pytest.raises(DataError) as e:
        benchmarks.load_benchmark("prism", str(tmp_path / "prism.json"))
    assert e.value.field == "chosen" and e.value.row == 1 and "prism.json" in str(e.value)


def test_alignx_benchmark_needs_directions(tmp_path):
    with open(tmp_path / "t.json", "w") as f:
        json.dump(_uf_rows(), f)
    with pytest.raises(DataError, match="Preference Direction"):
        benchmarks.load_benchmark("alignx", str(tmp_path / "t.json"))
    d = np.full(90, 0.5).tolist()
    row = {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "Preference Direction": d,
        "Demographic Information": "",
        "User-Generated Content": [],
        "Pair-wise Comparative Feedback": [],
    }
    with open(tmp_path / "a.jsonl", "w") as f:
        f.write(json.dumps(row) + "\n")
    assert benchmarks.load_benchmark("alignx", str(tmp_path / "a.jsonl"))[0]["Preference Direction"] == d


def test_names_and_args():
    with pytest.raises(DataError, match="unknown benchmark"):
        benchmarks.load_benchmark("hh-rlhf", "x.json")
    assert benchmarks.parse_benchmark_arg("p-soups=/a=b.json") == ("p-soups", "/a=b.json")
    for bad in ("p-soups", "psoups=x.json", "prism="):
        with pytest.raises(DataError):
            benchmarks.parse_benchmark_arg(bad)


# ---- benchmarks/score.py and benchmarks/generate.py (the scripts, on a tiny shape) -------------


def _bench_script(name: str):
    from conftest import load_benchmark

    return load_benchmark(name)


def test_score_benchmark_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "score.json"
    argv = ["--shape", "tiny", "--batch", "2", "--batches", "1", "--prompt-len", "24", "--response-len", "6"]
    assert _bench_script("score").main([*argv, "--rounds", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in (
        "jax_pairs_per_sec",
        "transformers_pairs_per_sec",
        "jax_vs_transformers",
        "model_shape",
        "machine",
    ):
        assert key in res
    assert len(res["jax_vs_transformers_per_round"]) == 1
    assert res["outputs_identical"] is True and res["max_abs_logp_diff"] <= 1e-3


def test_generate_benchmark_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "generate.json"
    argv = ["--shape", "tiny", "--batch", "3", "--prompt-len", "20", "--new-tokens", "8", "--rounds", "1"]
    assert _bench_script("generate").main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("jax_tokens_per_sec", "transformers_tokens_per_sec", "jax_vs_transformers", "model_shape"):
        assert key in res
    assert len(res["jax_vs_transformers_per_round"]) == 1
    assert res["outputs_identical"] is True and len(set(res["prompt_lengths"])) > 1  # left padding


@pytest.mark.slow
def test_layouts_benchmark_tiny(tmp_path):
    """`python benchmarks/layouts.py`: every layout runs the same step (equal losses after one update)
    and the JSON names the machine."""
    out = tmp_path / "layouts.json"
    assert _bench_script("layouts").main(["--pairs", "2", "--steps", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    names = {"full_logits", "response_window", "shared_prompt", "packed"}
    assert names <= set(res["layouts"]) and {"cpu", "machine", "allocator"} <= set(res)
    losses = [r["second_step_loss"] for r in res["layouts"].values()]
    assert max(losses) - min(losses) < 1e-4, losses
    assert all(r["step_seconds"] > 0 and r["tokens_in_model"] > 0 for r in res["layouts"].values())


def test_limit_on_a_folder_takes_its_files_in_turn(tmp_path):
    """`--limit N` on a UF-P-4 folder (four files, rows with no persona group) samples every file evenly,
    the same rows every run, a smaller N's rows inside a larger N's; it took the N rows out of the pool as if
    one file, so a file could be missing from the sample. A short file's share goes to the others."""
    names = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    for k, name in enumerate(names):
        rows = [{"prompt": f"{name} {i}", "chosen": "a", "rejected": "b"} for i in range(12 if k else 2)]
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))

    def per_file(limit: int) -> list[int]:
        sample = benchmarks.benchmark_sample("uf-p-4", str(tmp_path), limit=limit)
        assert sample.picks == sorted(sample.picks)
        files = [os.path.basename(sample.places[i][0]) for i in sample.picks]
        return [files.count(f"{name}.json") for name in names]

    assert per_file(8) == [2, 2, 2, 2]
    assert per_file(11) == [2, 3, 3, 3]
    assert per_file(20) == [2, 6, 6, 6]  # the 2-row file is spent: the others take turns
    small = benchmarks.benchmark_sample("uf-p-4", str(tmp_path), limit=6).picks
    large = benchmarks.benchmark_sample("uf-p-4", str(tmp_path), limit=14).picks
    assert (
        set(small) <= set(large)
        and large == benchmarks.benchmark_sample("uf-p-4", str(tmp_path), limit=14).picks
    )
    # a file alone samples as before: its persona groups in turn, from the same seed
    one = json.loads((tmp_path / "honesty.json").read_text())
    assert benchmarks.benchmark_sample("uf-p-4", str(tmp_path / "honesty.json"), limit=5).picks == (
        benchmarks.balanced_sample(one, 5, seed=0)
    )


# ---- every benchmark script: its --json and count flags are checked before the work ----------------

# (script, the function its main hands the work to, a count flag below its minimum)
_SCRIPTS = [
    ("score", "run", ["--rounds", "0"]),
    ("generate", "run", ["--new-tokens", "0"]),
    ("dpo_step", "run", ["--steps", "-1"]),
    ("accelerator_step", "run_all", ["--steps", "0"]),
    ("compile_options", "run", ["--rounds", "0"]),
    ("cpu_dtype", "run", ["--rounds", "0"]),
    ("layouts", "build_batches", ["--steps", "0"]),
    ("scaling", "measure", ["--steps", "0"]),
    ("prepare_memory", "_child", ["--users", "0"]),
]


@pytest.mark.parametrize("name, work, bad_count", _SCRIPTS, ids=[s[0] for s in _SCRIPTS])
def test_a_bad_json_or_count_is_refused_in_one_line_before_the_work(
    name, work, bad_count, tmp_path, monkeypatch
):
    """A --json that is a folder, lies under a file, or would replace a file that is no benchmark JSON, and a
    count below its minimum: one line, exit 1, nothing run or written (they failed after the whole run, or on
    the median of no rounds); an earlier benchmark JSON is replaced."""
    mod = _bench_script(name)

    def ran(*a, **k):
        raise RuntimeError("the work ran")

    monkeypatch.setattr(mod, work, ran)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    for argv, says in (
        (["--json", str(tmp_path)], "is a folder, not a file"),
        (["--json", str(notes / "out.json")], "cannot be written"),
        (["--json", str(notes)], "exists and is not a benchmark's JSON output"),
        ([*bad_count, "--json", str(tmp_path / "new.json")], "must be >= 1, got"),
    ):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert says in str(e.value) and "\n" not in str(e.value), (argv, e.value)
    assert notes.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["notes.txt"]
    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"jax_vs_torch": 1.0}\n')
    with pytest.raises(RuntimeError, match="the work ran"):
        mod.main(["--json", str(earlier)])


def test_json_out_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    common = _bench_script("_smollm2")
    out = tmp_path / "sub" / "r.json"
    common.write_json_out(str(out), {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and os.listdir(out.parent) == ["r.json"]

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        common.write_json_out(str(out), {"a": 2})
    assert json.loads(out.read_text()) == {"a": 1} and os.listdir(out.parent) == ["r.json"]


def test_json_out_writes_a_non_finite_float_as_null(tmp_path):
    """json.dumps wrote `NaN` / `Infinity`, which strict JSON readers refuse."""
    common = _bench_script("_smollm2")
    out = tmp_path / "r.json"
    nan = float("nan")
    common.write_json_out(
        str(out), {"a": nan, "b": [1.5, float("inf"), np.float32(nan)], "c": {"d": (-np.inf, 2)}}
    )
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, None], "c": {"d": [None, 2]}}


def test_dpo_step_batch_refuses_no_pairs_and_rows_too_short_for_a_response():
    """make_setup (dpo_step, accelerator_step, compile_options, scaling): a fixed row needs a prompt token,
    a response token and the EOS; it failed inside numpy (`low >= high`) after the imports."""
    dpo = _bench_script("dpo_step")
    for kwargs, says in (
        ({"seq_len": 2, "batch": 1}, "--seq-len must be >= 3, got 2"),
        ({"seq_len": 8, "batch": 0}, "--batch must be >= 1, got 0"),
    ):
        with pytest.raises(SystemExit, match=says):
            dpo.make_setup("tiny", **kwargs)
    assert dpo.make_setup("tiny", 3, 1).data["input_ids"].shape == (2, 3)
    with pytest.raises(SystemExit, match="--warmup must be >= 0, got -1"):
        dpo.main(["--warmup", "-1"])


def test_score_and_generate_refuse_prompts_too_short_for_their_draws():
    """Prompts are drawn from 85% of --prompt-len (at least the BOS), responses from 60% of --response-len:
    below that numpy failed (a negative size, `low >= high`) after the model was written and loaded."""
    for name, argv, says in (
        ("score", ["--prompt-len", "1"], "--prompt-len must be >= 2, got 1"),
        ("score", ["--response-len", "-3"], "--response-len must be >= 1, got -3"),
        ("generate", ["--prompt-len", "0"], "--prompt-len must be >= 2, got 0"),
    ):
        with pytest.raises(SystemExit, match=says):
            _bench_script(name).main(argv)


def test_scaling_refuses_an_unknown_base_size_in_one_line():
    with pytest.raises(SystemExit, match="unknown --base-size 'huge'; one of demo, tiny"):
        _bench_script("scaling").main(["--base-size", "huge"])


def test_profile_step_refuses_a_bad_dump_hlo_or_json_in_one_line_before_the_work(tmp_path, monkeypatch):
    """--dump-hlo under a file failed in open() after the model was built and compiled."""
    mod = _bench_script("profile_step")

    def ran(*a, **k):
        raise RuntimeError("the work ran")

    monkeypatch.setattr(mod, "run", ran)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    for argv, says in (
        (
            ["--dump-hlo", str(notes / "hlo.txt")],
            "--dump-hlo " + str(notes / "hlo.txt") + ": cannot be written",
        ),
        (["--dump-hlo", str(tmp_path)], "is a folder, not a file"),
        (["--json", str(notes)], "exists and is not a benchmark's JSON output"),
    ):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert says in str(e.value) and "\n" not in str(e.value), (argv, e.value)
    assert notes.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_profile_step_tiny_names_the_machine_and_writes_json_and_hlo(tmp_path, capsys):
    common = _bench_script("_smollm2")
    out, hlo = tmp_path / "p.json", tmp_path / "sub" / "step.hlo.txt"  # the HLO's folder is made
    argv = ["--model-size", "tiny", "--seq-len", "32", "--batch", "1", "--trace-warmup", "0", "--top", "3"]
    assert _bench_script("profile_step").main([*argv, "--json", str(out), "--dump-hlo", str(hlo)]) == 0
    assert f"machine: {common.machine()['machine']}" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {"machine", "cpu", "cpu_count", "allocator"} <= set(res) and len(res["top_ops"]) == 3
    assert res["op_seconds_over_threads"] > 0 and "HloModule" in hlo.read_text()
