"""`alignx eval`: log-probs against transformers, the strict rule, resume, results JSON, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from conftest import cli_env, psoups_rows_with_a_blank_profile

from alignx_jax import cli, hardware
from alignx_jax import evaluate as ev
from alignx_jax.errors import ConfigError

PSOUPS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "benchmarks",
    "p-soups",
    "student_phd.json",
)
LIMIT = 6
MAX_LEN = 256  # prompts and responses are left-truncated to 128 tokens: short sequences, fast tests

pytestmark = pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _torch_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """The release's way: one unpadded sequence per forward, sum of response + EOS log-probs."""
    import torch

    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    p = len(prompt_ids)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(p, ids.shape[1])))


@pytest.fixture(scope="module")
def llama(tiny_hf_checkpoints) -> str:
    return tiny_hf_checkpoints["llama"]


@pytest.fixture(scope="module")
def ica_run(llama, tmp_path_factory):
    """One ICA evaluation of the first LIMIT P-SOUPS rows, no reference, with a per-example file."""
    d = tmp_path_factory.mktemp("ica")
    out, per = str(d / "results.json"), str(d / "per.jsonl")
    code = cli.main(
        [
            "eval",
            "--model",
            llama,
            "--benchmark",
            f"p-soups={PSOUPS}",
            "--method",
            "ica",
            "--limit",
            str(LIMIT),
            "--max-length",
            str(MAX_LEN),
            "--batch-size",
            "4",
            "--per-example",
            per,
            "--out",
            out,
        ]
    )
    assert code == 0
    with open(out, encoding="utf-8") as f:
        results = json.load(f)
    return {"results": results, "rows": _read_jsonl(per), "per": per, "out": out, "dir": d}


# ----------------------------------------------------------------------------- pure functions


def test_strict_rule_with_ties():
    beta = 0.1
    assert ev.is_correct(-1.0, -2.0, None, None, beta)
    assert not ev.is_correct(-2.0, -1.0, None, None, beta)
    assert not ev.is_correct(-1.5, -1.5, None, None, beta)  # tie without reference: wrong
    # rewards tie exactly: beta * (-3 - -2) == beta * (-5 - -4) == -0.1
    assert ev.reward(-3.0, -2.0, beta) == ev.reward(-5.0, -4.0, beta)
    assert not ev.is_correct(-3.0, -5.0, -2.0, -4.0, beta)
    # higher policy log-prob on chosen but the reference explains it all: not correct
    assert not ev.is_correct(-1.0, -3.0, -1.0, -3.0, beta)
    # lower absolute log-prob on chosen but a larger gain over the reference: correct
    assert ev.is_correct(-10.0, -2.0, -12.0, -2.5, beta)
    with pytest.raises(ValueError):
        ev.is_correct(-1.0, -2.0, -1.0, None, beta)


def test_wilson_interval_known_values():
    lo, hi = ev.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = ev.wilson_interval(0, 6)
    z2 = ev.WILSON_Z95**2
    assert lo == 0.0 and hi == pytest.approx(z2 / (6 + z2))
    lo, hi = ev.wilson_interval(6, 6)
    assert hi == 1.0 and lo == pytest.approx(6 / (6 + z2))
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    stats = ev.accuracy_stats([True, False, True, True])
    assert stats["accuracy"] == 0.75 and stats["n"] == 4
    assert stats["ci95"] == list(ev.wilson_interval(3, 4))


def test_parse_flip_indices_and_labels():
    assert ev.parse_flip(None) == ()
    assert ev.parse_flip("3, 0") == (0, 3)
    assert ev.parse_flip("Older,High Extraversion") == (0, 3)  # either label of a dimension
    # a label that itself contains ", " is matched whole
    label = "Dislikes a certain form of creative expression (e.g., art, writing, music)"
    from alignx_jax.preference_space import load_preference_space

    dim = next(
        d["index"] for d in load_preference_space() if label in (d["positive_label"], d["negative_label"])
    )
    assert ev.parse_flip(f"1,{label},2") == tuple(sorted({1, 2, dim}))
    for bad in ("90", "-1", "Not a label"):
        with pytest.raises(ConfigError):
            ev.parse_flip(bad)
    flipped = ev.flip_direction(np.array([1.0, 0.0, 0.5] + [0.5] * 87), (0, 1, 2))
    assert flipped[:3].tolist() == [0.0, 1.0, 0.5]
    assert ev.involves(np.array([0.5, 1.0] + [0.5] * 88), (1,)) and not ev.involves(np.full(90, 0.5), (1,))


def test_length_buckets_cover_and_bound():
    b = ev.length_buckets(1000)
    assert b[-1] >= 1000 and b[-2] < 1000 and list(b) == sorted(set(b))
    assert ev.length_buckets(10) == (64,)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("bogus={p}", "unknown benchmark 'bogus'"),
        ("p-soups=/no/such/file.json", "/no/such/file.json"),
        ("p-soups", "NAME=PATH"),
    ],
)
def test_bad_benchmark_is_one_line_exit_1(capsys, tmp_path, spec, needle):
    code, _, err = _run(
        capsys,
        "--model",
        str(tmp_path),
        "--benchmark",
        spec.format(p=PSOUPS),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignx: error:") and needle in lines[0]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_beta_must_be_finite_and_positive(beta):
    """--beta inf scored every pair wrong (inf * 0 = NaN rewards) and wrote NaN and Infinity into the
    results, which strict JSON readers refuse; train refuses it as loss.beta too."""
    from alignx_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="--beta must be a finite number > 0"):
        ev.EvalSettings(beta=beta).check()
    ev.EvalSettings(beta=1e-3).check()


@pytest.mark.parametrize(
    "flags,needle",
    [
        (
            ["--method", "none", "--preference", "predicted"],
            "--preference chooses PBA's P~ and needs --method pba",
        ),
        (
            ["--method", "ica", "--preference", "golden"],
            "--preference chooses PBA's P~ and needs --method pba",
        ),
        (["--method", "none", "--persona", "ugc"], "(--method none shows no persona)"),
        (
            ["--method", "pba", "--persona", "ugc"],
            "(--method pba --preference golden shows the row's direction)",
        ),
        (["--method", "pba", "--preference", "profile", "--persona", "p"], "shows the row's profile)"),
        (["--method", "none", "--flip", "3"], "--flip reverses dimensions of P~ and needs --method pba"),
    ],
)
def test_a_flag_the_method_does_not_read_is_refused_in_one_line(capsys, tmp_path, flags, needle):
    """`--method none` silently ignored `--preference` and `--persona` (and PBA with a golden or file
    profile ignored `--persona`) while `--flip` was refused: each is refused, before any model loads."""
    argv = ["--model", str(tmp_path / "no-model"), "--benchmark", f"p-soups={PSOUPS}", *flags]
    code, _, err = _run(capsys, *argv, "--out", str(tmp_path / "r.json"))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("alignx: error: --"), err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "r.json").exists()
    ev.EvalSettings(method="ica", persona="ugc").check()  # the prompts that show a persona take it
    ev.EvalSettings(method="pba", preference="predicted", persona="ugc").check()


def test_the_same_benchmark_file_twice_is_refused(tmp_path):
    """One file named twice (however spelt) would be scored twice and pooled as twice the pairs; files of one
    name in two folders are two benchmarks, each keyed by its file."""
    from alignx_jax.errors import DataError

    (tmp_path / "x").mkdir()
    for p in (tmp_path / "a.json", tmp_path / "x" / "a.json"):
        p.write_text("[]")
    same = [f"p-soups={tmp_path / 'a.json'}", f"p-soups={tmp_path / 'x' / '..' / 'a.json'}"]
    with pytest.raises(DataError, match="given twice with the same path"):
        ev.parse_benchmark_specs(same)
    specs = ev.parse_benchmark_specs(
        [f"p-soups={tmp_path / 'a.json'}", f"p-soups={tmp_path / 'x' / 'a.json'}"]
    )
    assert [s.key for s in specs] == ["p-soups:a", "p-soups:a.2"]
    assert [s.key for s in ev.parse_benchmark_specs([same[0], f"prism={tmp_path / 'a.json'}"])] == [
        "p-soups",
        "prism",
    ]


def test_a_benchmark_file_inside_a_benchmark_folder_of_its_name_is_refused(tmp_path):
    """A folder and a file in it under one NAME give that file twice as surely as `a.json` and `./a.json`:
    it was scored twice and pooled as twice its pairs; refused naming the file. The folder under another
    NAME is another benchmark (not pooled with it)."""
    from alignx_jax.errors import DataError

    (tmp_path / "x").mkdir()
    for name in ("a.json", "b.json"):
        (tmp_path / "x" / name).write_text("[]")
    for pair in (
        [f"p-soups={tmp_path / 'x'}", f"p-soups={tmp_path / 'x' / 'b.json'}"],
        [f"p-soups={tmp_path / 'x' / 'a.json'}", f"p-soups={tmp_path / 'x' / '..' / 'x'}"],
    ):
        with pytest.raises(
            DataError, match=r"/x/(a|b)\.json: --benchmark p-soups gives this file twice \(also"
        ):
            ev.parse_benchmark_specs(pair)
    specs = ev.parse_benchmark_specs([f"p-soups={tmp_path / 'x'}", f"prism={tmp_path / 'x' / 'a.json'}"])
    assert [s.key for s in specs] == ["p-soups", "prism"]


def test_out_never_replaces_an_input_or_a_file_that_is_not_results(capsys, tmp_path):
    """--out replaces an earlier results file only: the benchmark file itself, the --per-example file and any
    other existing file (notes, a model's config.json) are refused in one line before anything loads, and
    left as they were."""
    bench = tmp_path / "bench.json"
    bench.write_bytes(open(PSOUPS, "rb").read())
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    per = tmp_path / "per.jsonl"
    for out, extra, needle in (
        (bench, [], "is the --benchmark p-soups file"),
        (per, ["--per-example", str(per)], "is the --per-example file"),
        (notes, [], "is not an `alignx eval` results file"),
    ):
        before = out.read_bytes() if out.exists() else None
        code, _, err = _run(
            capsys, "--model", str(tmp_path), "--benchmark", f"p-soups={bench}", "--out", str(out), *extra
        )
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and needle in lines[0], err
        assert (out.read_bytes() if out.exists() else None) == before
    # a file of a --benchmark folder, or a new one there (the next eval of the folder would read it as a
    # benchmark file): refused by name, the folder not listed
    (tmp_path / "folder").mkdir()
    inner = tmp_path / "folder" / "bench.json"
    inner.write_bytes(bench.read_bytes())
    for out in (inner, inner.parent / "results.json"):
        code, _, err = _run(
            capsys, "--model", str(tmp_path), "--benchmark", f"p-soups={inner.parent}", "--out", str(out)
        )
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1, err
        assert f"--out {out} lies inside the --benchmark p-soups folder {inner.parent}" in lines[0], err
    assert inner.read_bytes() == bench.read_bytes() and not (inner.parent / "results.json").exists()
    # an earlier results file is what --out replaces: the check passes it (the missing model fails next)
    (tmp_path / "r.json").write_text(json.dumps({"model": "m", "benchmarks": {}}))
    code, _, err = _run(
        capsys, "--model", str(tmp_path), "--benchmark", f"p-soups={bench}", "--out", str(tmp_path / "r.json")
    )
    assert code == 1 and "holds no HF weights" in err


def test_a_refused_eval_leaves_no_per_example_file(capsys, tmp_path):
    """The --per-example log opens before the model path resolves, but its file (and folders) are made with
    the first row: an eval refused before scoring (a missing --model) left an empty file in new folders."""
    from alignx_jax.evaluate import PerExampleLog

    per = tmp_path / "new" / "sub" / "per.jsonl"
    argv = ["--model", str(tmp_path / "no-model"), "--benchmark", f"p-soups={PSOUPS}"]
    code, _, err = _run(capsys, *argv, "--per-example", str(per), "--out", str(tmp_path / "r.json"))
    assert code == 1 and "model folder not found" in err and not (tmp_path / "new").exists(), err
    log = PerExampleLog(str(per))  # the first row makes the file
    assert not per.exists()
    row = {"benchmark": "p-soups", "persona": "p", "index": 0, "logp_chosen": -1.0, "logp_rejected": -2.0}
    log.append([row])
    log.close()
    assert [json.loads(x) for x in per.read_text().splitlines()] == [row]
    (tmp_path / "file").write_text("x")  # a file where its folder would go: still refused as it opens
    with pytest.raises(NotADirectoryError):
        PerExampleLog(str(tmp_path / "file" / "per.jsonl"))


def test_a_bad_per_example_file_is_refused_before_the_model_path_is_resolved(capsys, monkeypatch, tmp_path):
    """--per-example's one check (the log's own, as it opens) runs before the model path is resolved (a hub
    id would download there) or loaded: a file of generate's rows, or a folder, is refused in one line ahead
    of a missing --model's error, and a file is left as it was."""
    from alignx_jax.models import presets

    resolved = []
    real = presets.resolve_model_path
    monkeypatch.setattr(presets, "resolve_model_path", lambda p, **kw: resolved.append(p) or real(p, **kw))
    theirs = tmp_path / "generated.jsonl"
    row = {"benchmark": "p", "persona": None, "index": 0, "id": 0, "method": "ica", "output": "hi"}
    theirs.write_text(json.dumps(row) + "\n")
    before = theirs.read_bytes()
    folder = tmp_path / "per"
    folder.mkdir()
    argv = ["--model", str(tmp_path / "no-model"), "--benchmark", f"p-soups={PSOUPS}"]
    argv += ["--out", str(tmp_path / "r.json")]
    code, _, err = _run(capsys, *argv)  # without --per-example: the model path is what fails
    assert code == 1 and "model folder not found" in err and resolved, err
    for per, needle in (
        (theirs, f"--per-example {theirs} holds `alignx generate --out` rows, not"),
        (folder, "--per-example must be a file, got a folder"),
    ):
        resolved.clear()
        code, _, err = _run(capsys, *argv, "--per-example", str(per))
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and needle in lines[0] and not resolved, err
    assert theirs.read_bytes() == before and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["--limit", "0"], "--limit must be positive, got 0"),
        (["--beta", "0"], "--beta must be a finite number > 0"),
        (["--max-length", "2"], "--max-length must be at least 4"),
        # ignored with no reference (results said nothing of it): refused as --flip without pba is
        (
            ["--reference-prompt", "ica"],
            "--reference-prompt ica chooses the prompt the reference is scored on",
        ),
        (["--reference", "org/ref", "--reference-scores", "s.jsonl"], "two references; give one"),
        # read first when the benchmarks were scored, after the models had loaded
        (["--method", "ica", "--persona", "ugc,zz"], "--persona: unknown variant 'zz'"),
        (["--method", "ica", "--persona", ","], "--persona: empty list"),
    ],
)
def test_a_bad_flag_is_refused_before_the_model_is_resolved(capsys, monkeypatch, tmp_path, flags, needle):
    """A plain bad flag is named before --model resolves: an uncached hub id offline (HF_HUB_OFFLINE=1) was
    reported instead of `--batch-size 0`, and a hub id online would have downloaded first."""
    from alignx_jax.models import presets

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = []
    real = presets.resolve_model_path
    monkeypatch.setattr(presets, "resolve_model_path", lambda p, **kw: resolved.append(p) or real(p, **kw))
    argv = ["--model", "org/not-cached", "--benchmark", f"p-soups={PSOUPS}"]
    argv += ["--out", str(tmp_path / "r.json")]
    code, _, err = _run(capsys, *argv)  # the flags good: the hub id is what fails
    assert code == 1 and "not in the Hugging Face cache" in err and resolved == ["org/not-cached"], err
    resolved.clear()
    code, _, err = _run(capsys, *argv, *flags)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and needle in lines[0] and not resolved, err
    assert not (tmp_path / "r.json").exists()


def test_eval_resolves_the_model_path_once(capsys, monkeypatch, llama, tmp_path):
    """`alignx eval` resolves --model once (a hub id's snapshot, a gs:// folder's listing and copy): the
    trained prompt format and the scoring read the folder it gives."""
    from alignx_jax.models import presets

    asked = []
    real = presets.resolve_model_path

    def resolve(p, **kw):  # "alias" stands for a path that resolves elsewhere, as a hub id does
        asked.append(p)
        return llama if p == "alias" else real(p, **kw)

    monkeypatch.setattr(presets, "resolve_model_path", resolve)
    out = tmp_path / "r.json"
    code, _, err = _run(
        capsys, "--model", "alias", "--benchmark", f"p-soups={PSOUPS}", "--limit", "2", "--out", str(out)
    )
    assert code == 0, err
    assert asked.count("alias") == 1, asked
    assert json.loads(out.read_text())["model"] == llama


def test_results_record_the_model_and_reference_as_given_beside_the_folders_scored(
    capsys, monkeypatch, llama, tmp_path
):
    """A hub id resolves to a snapshot folder: the results name that folder (`model`, `reference`, what
    the model card and a resume compare) and the id the user gave (`model_id`, `reference_id`)."""
    from alignx_jax.models import presets

    real = presets.resolve_model_path

    def resolve(p, **kw):  # "org/policy" and "org/ref" stand for hub ids
        return llama if p in ("org/policy", "org/ref") else real(p, **kw)

    monkeypatch.setattr(presets, "resolve_model_path", resolve)
    out, per = tmp_path / "r.json", tmp_path / "per.jsonl"
    argv = ["--benchmark", f"p-soups={PSOUPS}", "--limit", "2", "--out", str(out), "--per-example", str(per)]
    code, _, err = _run(capsys, "--model", "org/policy", "--reference", "org/ref", *argv)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert (res["model"], res["model_id"]) == (os.path.abspath(llama), "org/policy")
    assert (res["reference"], res["reference_id"]) == (os.path.abspath(llama), "org/ref")
    assert list(res)[:4] == ["model", "model_id", "reference", "reference_id"]
    assert {r["model"] for r in _read_jsonl(per)} == {os.path.abspath(llama)}


def test_a_refused_eval_leaves_no_folders_for_its_out(capsys, tmp_path):
    """--out's writability is probed without making its folders (the write makes them): a command refused
    after that check (a flag its method does not read) left `new/sub/` behind; a file where a folder of
    --out would go is still refused up front."""
    from alignx_jax import paths

    out = tmp_path / "new" / "sub" / "r.json"
    argv = ["--model", str(tmp_path), "--benchmark", f"p-soups={PSOUPS}", "--out", str(out)]
    code, _, err = _run(capsys, *argv, "--method", "ica", "--preference", "golden")
    assert code == 1 and "--preference" in err and not (tmp_path / "new").exists(), err
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        paths.check_writable(str(tmp_path / "file" / "sub" / "r.json"))
    paths.check_writable(str(out))  # writable: nothing made, no probe left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    # a folder as --out: judged with the rest on process 0, the one writer
    code, _, err = _run(
        capsys, "--model", str(tmp_path), "--benchmark", f"p-soups={PSOUPS}", "--out", str(tmp_path)
    )
    assert code == 1 and f"--out {tmp_path}: cannot be written (a folder, not a file)" in err, err


def test_a_folder_without_hf_weights_points_to_export(capsys, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    code, _, err = _run(
        capsys, "--model", str(workdir), "--benchmark", f"p-soups={PSOUPS}", "--out", str(tmp_path / "r.json")
    )
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "holds no HF weights" in lines[0]
    assert f"alignx export --checkpoint {workdir} --out HF_DIR" in lines[0]


def test_predicted_without_head_fails_clearly(capsys, llama, tmp_path):
    code, _, err = _run(
        capsys,
        "--model",
        llama,
        "--benchmark",
        f"p-soups={PSOUPS}",
        "--method",
        "pba",
        "--preference",
        "predicted",
        "--limit",
        "2",
        "--out",
        str(tmp_path / "r.json"),
    )
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "preference_head.safetensors" in err


# ----------------------------------------------------------------------------- scoring


def test_logps_match_transformers(ica_run, llama):
    """Per-example log-probs (batched, padded, jitted) equal transformers' one unpadded sequence at
    a time on the same weights and the same ids."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    rows = ica_run["rows"]
    assert len(rows) == LIMIT
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for row in rows:
        assert row["chosen_ids"][-1] in eos and row["rejected_ids"][-1] in eos  # closing EOS is scored
        assert len(row["prompt_ids"]) <= MAX_LEN - MAX_LEN // 2  # left truncation to L - reserve
        for side in ("chosen", "rejected"):
            want = _torch_logp(model, row["prompt_ids"], row[f"{side}_ids"])
            assert abs(row[f"logp_{side}"] - want) < 1e-3, (row["index"], side, row[f"logp_{side}"], want)
        assert row["ref_logp_chosen"] is None and row["ref_logp_rejected"] is None
        assert row["correct"] == (row["logp_chosen"] > row["logp_rejected"])


def test_results_json_keys_and_interval(ica_run, llama):
    res = ica_run["results"]
    for key in (
        "model",
        "reference",
        "method",
        "persona",
        "preference",
        "prompt_format",
        "max_length",
        "beta",
        "limit",
        "benchmarks",
    ):
        assert key in res
    assert res["model"] == os.path.abspath(llama) and res["reference"] is None
    assert "model_id" not in res and "reference_id" not in res  # a folder given is the folder scored
    # the resolved scoring settings (--dtype auto picks per machine)
    assert (res["dtype"], res["param_dtype"], res["batch_size"], res["share_prompt"]) == (
        "float32",
        "float32",
        4,
        True,
    )
    assert (res["method"], res["prompt_format"], res["max_length"], res["beta"], res["limit"]) == (
        "ica",
        "chat",
        MAX_LEN,
        0.1,
        LIMIT,
    )
    assert res["persona"] == {"p-soups": ["p"]} and res["rows_scored"] == {"p-soups": LIMIT}
    # auto: a float32 model's products are full float32 everywhere; on a CPU that is JAX's default
    assert res["matmul_precision"] == hardware.resolve_matmul_precision("auto", "float32")
    entry = res["benchmarks"]["p-soups"]
    k = sum(r["correct"] for r in ica_run["rows"])
    assert entry["n"] == LIMIT and entry["accuracy"] == pytest.approx(k / LIMIT)
    assert entry["ci95"] == pytest.approx(list(ev.wilson_interval(k, LIMIT)))
    assert entry["ci95"][0] <= entry["accuracy"] <= entry["ci95"][1]
    assert {(r["benchmark"], r["persona"]) for r in ica_run["rows"]} == {("p-soups", "p")}
    assert len({r["index"] for r in ica_run["rows"]}) == LIMIT


def test_padding_does_not_change_logp(llama):
    """A sequence scored alone (no padding, its exact length) vs inside a right-padded batch."""
    from alignx_jax.data.batching import make_example
    from alignx_jax.data.benchmarks import load_benchmark
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.sharding import make_mesh
    from alignx_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(llama)
    rows = load_benchmark("p-soups", PSOUPS, limit=3)
    exs = [
        make_example(tok, r, method="pba", max_length=MAX_LEN, index=i, eval_mode=True)
        for i, r in enumerate(rows)
    ]
    mesh = make_mesh(data=-1)
    scorer = ev.SequenceScorer(load_pretrained(llama, mesh=mesh), mesh)
    pad = int(tok.pad_token_id)
    alone = {}
    # chosen rows sit in the first half of a DPO batch, rejected ones in the second: check both
    for ex, side in ((exs[0], "c"), (exs[1], "c"), (exs[2], "r")):
        resp = ex.chosen_ids if side == "c" else ex.rejected_ids
        one = dataclasses.replace(ex, chosen_ids=resp, rejected_ids=resp)
        ((_, (lp,)),) = ev.score_batches(
            [one], [scorer], batch_size=1, pad_id=pad, buckets=(len(ex.prompt_ids) + len(resp),)
        )
        alone[(ex.index, side)] = lp[0, 0]
    got = {}
    for chunk, (lp,) in ev.score_batches(exs, [scorer], batch_size=4, pad_id=pad, buckets=(512,)):
        for j, ex in enumerate(chunk):  # 3 pairs + 1 dummy pair, all padded to 512
            got[(ex.index, "c")], got[(ex.index, "r")] = lp[j]
    assert set(alone) <= set(got)
    for key in alone:
        assert abs(got[key] - alone[key]) < 1e-4, (key, got[key], alone[key])
    assert (8, 512) in scorer.shapes


def test_self_reference_scores_exactly_zero(capsys, llama, tmp_path):
    ref = str(tmp_path / "ref")
    shutil.copytree(llama, ref)  # a separate load of the same weights, not the same object
    per = tmp_path / "per.jsonl"
    code, out, _ = _run(
        capsys,
        "--model",
        llama,
        "--reference",
        ref,
        "--benchmark",
        f"p-soups={PSOUPS}",
        "--method",
        "pba",
        "--limit",
        "4",
        "--max-length",
        str(MAX_LEN),
        "--per-example",
        str(per),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert code == 0 and "p-soups" in out
    rows = _read_jsonl(per)
    assert len(rows) == 4
    for r in rows:
        assert r["persona"] is None  # PBA with the golden profile does not depend on the persona
        assert r["logp_chosen"] == r["ref_logp_chosen"] and r["logp_rejected"] == r["ref_logp_rejected"]
        assert ev.reward(r["logp_chosen"], r["ref_logp_chosen"], 0.1) == 0.0
        assert r["correct"] is False  # 0 > 0 is false
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["benchmarks"]["p-soups"]["accuracy"] == 0.0 and res["reference"] == os.path.abspath(ref)
    assert res["persona"] == {"p-soups": None} and res["preference"] == "golden"


def test_resume_from_partial_file_gives_same_results(capsys, ica_run, llama, tmp_path, monkeypatch):
    full = ica_run["rows"]
    lines = open(ica_run["per"], encoding="utf-8").read().splitlines()
    part = tmp_path / "per.jsonl"
    # two complete rows and a third cut off mid-write, as a killed run leaves it
    part.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40], encoding="utf-8")
    scored = []
    real = ev.score_batches

    def counting(examples, *a, **kw):
        scored.extend(ex.index for ex in examples)
        yield from real(examples, *a, **kw)

    monkeypatch.setattr(ev.scoring, "score_batches", counting)
    out = tmp_path / "r.json"
    code, _, _ = _run(
        capsys,
        "--model",
        llama,
        "--benchmark",
        f"p-soups={PSOUPS}",
        "--method",
        "ica",
        "--limit",
        str(LIMIT),
        "--max-length",
        str(MAX_LEN),
        "--batch-size",
        "4",
        "--per-example",
        str(part),
        "--out",
        str(out),
    )
    assert code == 0
    assert sorted(scored) == sorted(r["index"] for r in full[2:])  # the two complete rows were reused
    res = json.loads(out.read_text())
    assert res["benchmarks"] == ica_run["results"]["benchmarks"]
    rows = _read_jsonl(part)
    assert len(rows) == LIMIT and rows[:2] == full[:2]
    by_key = {ev.key_of(r): r for r in full}
    for r in rows:
        assert r["correct"] == by_key[ev.key_of(r)]["correct"]
        assert abs(r["logp_chosen"] - by_key[ev.key_of(r)]["logp_chosen"]) < 1e-4


def test_resume_refuses_other_settings(capsys, ica_run, llama, tmp_path):
    part = tmp_path / "per.jsonl"
    shutil.copyfile(ica_run["per"], part)
    code, _, err = _run(
        capsys,
        "--model",
        llama,
        "--benchmark",
        f"p-soups={PSOUPS}",
        "--method",
        "ica",
        "--limit",
        "2",
        "--max-length",
        "512",
        "--per-example",
        str(part),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert code == 1 and "other settings" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_another_models_rows(capsys, ica_run, tmp_path):
    """Another model with the same tokenizer writes the same token ids: the rows name their model."""
    from conftest import build_tiny_hf

    other = build_tiny_hf("llama", str(tmp_path / "other"), seed=5)
    part = tmp_path / "per.jsonl"
    shutil.copyfile(ica_run["per"], part)
    assert {r["model"] for r in ica_run["rows"]} == {ica_run["results"]["model"]}
    argv = ["--model", other, "--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--limit", str(LIMIT)]
    argv += ["--max-length", str(MAX_LEN), "--per-example", str(part), "--out", str(tmp_path / "r.json")]
    capsys.readouterr()  # the model build's progress bars
    code, _, err = _run(capsys, *argv)
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
    assert code == 1 and len(errors) == 1 and "was scored with another model" in errors[0]


def test_resume_refuses_rows_of_another_reference_or_dtype(capsys, ica_run, llama, tmp_path):
    """The token ids do not say which reference or dtype scored a row: a resumed run with another --reference
    (or none) or --dtype is refused, never counted beside its own rows."""
    from conftest import build_tiny_hf

    ref = build_tiny_hf("llama", str(tmp_path / "ref"), seed=5)
    part = tmp_path / "per.jsonl"
    base = ["--model", llama, "--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--limit", "2"]
    base += ["--max-length", str(MAX_LEN), "--per-example", str(part), "--out", str(tmp_path / "r.json")]
    capsys.readouterr()  # the model build's progress bars
    assert _run(capsys, *base, "--reference", ref)[0] == 0
    for flags, says in (
        (["--reference", llama], f"another reference ({os.path.abspath(ref)}, now {os.path.abspath(llama)})"),
        (["--reference", ref, "--dtype", "bfloat16"], "another dtype (float32, now bfloat16)"),
    ):
        code, _, err = _run(capsys, *base, *flags, "--limit", "4")
        errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
        assert code == 1 and len(errors) == 1 and says in errors[0], err
    assert len(part.read_text().splitlines()) == 2  # nothing of the refused runs was appended


def test_resume_refuses_rows_of_another_matmul_precision(capsys, ica_run, llama, tmp_path):
    """The level --matmul-precision resolved to is recorded in every row: a resume at another level is refused
    in one line naming the file and both levels; rows of older files, which name none, are resumed as rows
    without a dtype are."""
    level = ica_run["results"]["matmul_precision"]
    assert {r["matmul_precision"] for r in ica_run["rows"]} == {level}
    other = "high" if level != "high" else "highest"
    part = tmp_path / "per.jsonl"
    two = open(ica_run["per"], encoding="utf-8").read().splitlines()[:2]
    part.write_text("\n".join(two) + "\n", encoding="utf-8")
    argv = ["--model", llama, "--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--limit", str(LIMIT)]
    argv += ["--max-length", str(MAX_LEN), "--batch-size", "4", "--per-example", str(part)]
    argv += ["--out", str(tmp_path / "r.json"), "--matmul-precision", other]
    code, _, err = _run(capsys, *argv)
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
    assert code == 1 and len(errors) == 1, err
    assert str(part) in errors[0] and f"another matmul_precision ({level}, now {other})" in errors[0]
    assert part.read_text().splitlines() == two  # nothing of the refused run was appended
    old = [{k: v for k, v in json.loads(line).items() if k != "matmul_precision"} for line in two]
    part.write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    assert _run(capsys, *argv)[0] == 0
    rows = _read_jsonl(part)
    assert len(rows) == LIMIT and rows[:2] == old and {r["matmul_precision"] for r in rows[2:]} == {other}


# ----------------------------------------------------------------------------- AlignX rows, flip


def _direction(seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return rng.choice([0.0, 0.5, 1.0], size=90, p=[0.1, 0.8, 0.1]).tolist()


@pytest.fixture(scope="module")
def alignx_file(tmp_path_factory) -> str:
    rows = []
    for i in range(3):
        d = _direction(i)
        d[0] = [1.0, 0.0, 0.5][i]  # rows 0 and 1 involve dimension 0, row 2 does not
        rows.append(
            {
                "prompt": f"What should I cook tonight, take {i}?",
                "chosen": "Pasta with garlic.",
                "rejected": "Nothing at all.",
                "Preference Direction": d,
                "Demographic Information": "A student who likes quick meals." if i != 1 else "",
                "User-Generated Content": [
                    {
                        "prompt": "Best snack?",
                        "comment": "Popcorn, always.",
                        "Preference Direction": _direction(10 + i),
                    }
                ],
                "Pair-wise Comparative Feedback": [
                    {
                        "prompt": "Tea or coffee?",
                        "chosen": "Tea.",
                        "rejected": "Coffee.",
                        "Preference Direction": _direction(20 + i),
                    }
                ],
            }
        )
    path = tmp_path_factory.mktemp("alignx") / "alignx_test.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def test_alignx_persona_variants_reported_separately(capsys, llama, alignx_file, tmp_path):
    per = tmp_path / "per.jsonl"
    code, out, err = _run(
        capsys,
        "--model",
        llama,
        "--benchmark",
        f"alignx={alignx_file}",
        "--method",
        "ica",
        "--persona",
        "ugc,demo",
        "--prompt-format",
        "paper",
        "--max-length",
        str(MAX_LEN),
        "--per-example",
        str(per),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert code == 0
    # row 1's demographics are blank: its demo prompt shows no persona, and one line says so
    warned = [line for line in err.splitlines() if line.startswith("alignx: warning:")]
    assert warned == [
        f"alignx: warning: {alignx_file}: 1 of 3 rows to score have no persona under --persona demo; their "
        "prompts are scored with an empty one"
    ]
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["benchmarks"]["alignx"]) == {"ugc", "demo"} and res["prompt_format"] == "paper"
    assert res["benchmark_paths"] == {"alignx": os.path.abspath(alignx_file)}  # what was scored
    assert all(res["benchmarks"]["alignx"][p]["n"] == 3 for p in ("ugc", "demo"))
    rows = _read_jsonl(per)
    assert sorted((r["persona"], r["index"]) for r in rows) == [
        (p, i) for p in ("demo", "ugc") for i in range(3)
    ]
    prompts = {(r["persona"], r["index"]): r["prompt_ids"] for r in rows}
    assert prompts[("ugc", 0)] != prompts[("demo", 0)]  # the persona block differs between variants
    assert prompts[("demo", 1)] != prompts[("ugc", 1)]


def test_flip_reports_involved_and_rest(capsys, llama, alignx_file, tmp_path):
    from alignx_jax.tokenizer import load_tokenizer

    res = {}
    for flip in (None, "0"):
        per = tmp_path / f"per_{flip}.jsonl"
        argv = [
            "--model",
            llama,
            "--benchmark",
            f"alignx={alignx_file}",
            "--method",
            "pba",
            "--max-length",
            str(MAX_LEN),
            "--per-example",
            str(per),
            "--out",
            str(tmp_path / "r.json"),
        ]
        code, _, _ = _run(capsys, *argv, *(["--flip", flip] if flip else []))
        assert code == 0
        res[flip] = (json.loads((tmp_path / "r.json").read_text()), _read_jsonl(per))
    results, rows = res["0"]
    entry = results["benchmarks"]["alignx"]  # golden P~: one entry, no persona level
    assert results["flip"] == [0] and entry["n"] == 3
    assert entry["flip"]["involved"]["n"] == 2 and entry["flip"]["rest"]["n"] == 1
    tok = load_tokenizer(llama)
    text = {r["index"]: tok.decode(r["prompt_ids"]) for r in rows}
    base = {r["index"]: tok.decode(r["prompt_ids"]) for r in res[None][1]}
    assert "Older" in text[0] and "Young" not in text[0] and "Young" in base[0]
    assert "Young" in text[1] and "Older" in base[1]
    assert text[2] == base[2]  # no flipped dimension in its profile: same prompt
    assert all(r["flip_involved"] == (r["index"] != 2) for r in rows)


def test_qwen2_tied_head_paper_format_matches_transformers(tiny_hf_checkpoints, tmp_path):
    """The tied-embedding (Qwen2-style, q/k/v biases) path and the release's `paper` prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    qwen = tiny_hf_checkpoints["qwen2"]
    settings = ev.EvalSettings(method="ica", prompt_format="paper", limit=2, max_length=MAX_LEN, batch_size=2)
    per = str(tmp_path / "per.jsonl")
    res = ev.evaluate(
        qwen, ev.parse_benchmark_specs([f"p-soups={PSOUPS}"]), settings, per_example=per, progress=False
    )
    assert res["benchmarks"]["p-soups"]["n"] == 2
    model = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32).eval()
    for row in _read_jsonl(per):
        for side in ("chosen", "rejected"):
            want = _torch_logp(model, row["prompt_ids"], row[f"{side}_ids"])
            assert abs(row[f"logp_{side}"] - want) < 1e-3


@pytest.mark.slow
def test_eight_devices_match_one(ica_run, llama, tmp_path):
    """Batches sharded over 8 (CPU) devices on the data axis, pairs padded to a multiple of 8."""
    import subprocess
    import sys

    per = tmp_path / "per.jsonl"
    env = cli_env(devices=8)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignx_jax",
            "eval",
            "--model",
            llama,
            "--benchmark",
            f"p-soups={PSOUPS}",
            "--method",
            "ica",
            "--limit",
            str(LIMIT),
            "--max-length",
            str(MAX_LEN),
            "--batch-size",
            "3",
            "--per-example",
            str(per),
            "--out",
            str(tmp_path / "r.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = {ev.key_of(r): r for r in ica_run["rows"]}
    rows = _read_jsonl(per)
    assert len(rows) == LIMIT
    for r in rows:
        for side in ("chosen", "rejected"):
            assert abs(r[f"logp_{side}"] - want[ev.key_of(r)][f"logp_{side}"]) < 1e-4


@pytest.mark.slow
def test_weights_too_large_for_a_device_are_sharded_fsdp_with_the_same_scores(llama, tmp_path):
    """`default_mesh`: replicated weights while they fit a device with room to spare; else FSDP over all 8
    (CPU) devices, each holding 1/8 of every weight, with the replicated run's log-probs and decisions."""
    import subprocess
    import sys

    code = f"""
from alignx_jax.evaluate import run
from alignx_jax.evaluate.options import BenchmarkSpec, EvalSettings
w = 4 * run.parameter_count({llama!r})  # float32
assert w > 0
settings = EvalSettings(method="ica", prompt_format="paper", limit={LIMIT}, max_length={MAX_LEN}, batch_size=3)
for name, per_device in (("replicated", 16 * w), ("fsdp", 2 * w)):
    mesh = run.default_mesh([{llama!r}], 4, per_device=per_device)
    assert dict(mesh.shape) == ({{"data": 8, "fsdp": 1, "tensor": 1}} if name == "replicated" else
                                {{"data": 1, "fsdp": 8, "tensor": 1}}), (name, mesh.shape)
    run.evaluate({llama!r}, [BenchmarkSpec("p-soups", {PSOUPS!r}, "p-soups")], settings,
                 per_example={str(tmp_path)!r} + f"/{{name}}.jsonl", mesh=mesh, progress=False)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(devices=8), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = {ev.key_of(r): r for r in _read_jsonl(tmp_path / "replicated.jsonl")}
    rows = _read_jsonl(tmp_path / "fsdp.jsonl")
    assert len(rows) == len(want) == LIMIT
    for r in rows:
        assert r["correct"] == want[ev.key_of(r)]["correct"]
        for side in ("chosen", "rejected"):  # sums of ~100 token log-probs: a few float32 ulps apart
            w = want[ev.key_of(r)][f"logp_{side}"]
            assert abs(r[f"logp_{side}"] - w) <= 1e-6 * max(1.0, abs(w)), (r[f"logp_{side}"], w)


@pytest.mark.slow
def test_predicted_preferences_use_the_head(capsys, llama, alignx_file, tmp_path):
    """PBA with a (random) exported head: P~ comes from the head, per persona variant, and the
    results carry the head's config and its agreement with the golden directions."""
    from flax import nnx

    from alignx_jax.data.persona import profile_text
    from alignx_jax.models import preference_head as ph
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.pba import predict
    from alignx_jax.tokenizer import load_tokenizer

    model_dir = str(tmp_path / "pba")
    shutil.copytree(llama, model_dir)
    head = ph.PreferenceHead(ph.HeadConfig(embed_dim=64, hidden=16, max_persona_tokens=64), rngs=nnx.Rngs(3))
    ph.save_head(head, None, model_dir)
    per = tmp_path / "per.jsonl"
    code, _, err = _run(
        capsys,
        "--model",
        model_dir,
        "--benchmark",
        f"alignx={alignx_file}",
        "--method",
        "pba",
        "--preference",
        "predicted",
        "--persona",
        "pair",
        "--max-length",
        "2048",
        "--per-example",
        str(per),
        "--out",
        str(tmp_path / "r.json"),
    )
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["benchmarks"]["alignx"]["pair"]["n"] == 3
    block = res["preference_head"]
    assert block["config"]["hidden"] == 16 and "alignx/pair" in block["agreement_with_golden"]
    # the profile in each prompt is the head's prediction from the PAIR persona
    from alignx_jax.data.benchmarks import load_benchmark

    rows = load_benchmark("alignx", alignx_file)
    tok = load_tokenizer(model_dir)
    loaded, _ = ph.load_head(model_dir)
    feats = predict.persona_features(
        load_pretrained(model_dir), tok, rows, pooling="mean", variant="pair", max_tokens=64
    )
    pred = ph.predict_direction(ph.head_probs(loaded, feats))
    for r in _read_jsonl(per):
        assert profile_text(pred[r["index"]]) in tok.decode(r["prompt_ids"])


# ----------------------------------------------------------------------------- shared rows, stored reference


def test_shared_prompt_scoring_equals_two_rows(llama):
    """One row per pair (the eval default) gives the two-row layout's log-probs."""
    from alignx_jax.data.batching import make_example
    from alignx_jax.data.benchmarks import load_benchmark
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.sharding import make_mesh
    from alignx_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(llama)
    rows = load_benchmark("p-soups", PSOUPS, limit=5)
    exs = [
        make_example(tok, r, method="ica", max_length=MAX_LEN, index=i, eval_mode=True)
        for i, r in enumerate(rows)
    ]
    mesh = make_mesh(data=-1)
    model = load_pretrained(llama, mesh=mesh)
    got = {}
    for shared in (False, True):
        scorer = ev.SequenceScorer(model, mesh, share_prompt=shared)
        got[shared] = np.concatenate(
            [
                lp
                for _, (lp,) in ev.score_batches(
                    exs,
                    [scorer],
                    batch_size=4,
                    pad_id=int(tok.pad_token_id),
                    buckets=ev.length_buckets(MAX_LEN),
                )
            ]
        )
    assert got[True].shape == (5, 2)
    np.testing.assert_allclose(got[True], got[False], rtol=1e-4, atol=1e-4)


def test_reference_scores_file_equals_scoring_the_reference(llama, tmp_path, capsys):
    """`--reference-scores` (the reference's own per-example file) gives `--reference DIR`'s results."""
    common = [
        "--benchmark",
        f"p-soups={PSOUPS}",
        "--method",
        "ica",
        "--limit",
        "4",
        "--max-length",
        str(MAX_LEN),
    ]
    from conftest import build_tiny_hf

    ref_dir, policy = llama, str(tmp_path / "policy")
    build_tiny_hf("llama", policy, seed=5)  # another llama of the same shape: the policy
    base_per = str(tmp_path / "base.jsonl")

    def scored(name: str, *args: str) -> list[dict]:
        """`alignx eval ARGS` with a per-example file NAME.jsonl and results NAME.json: its rows."""
        argv = [
            *args,
            "--per-example",
            str(tmp_path / f"{name}.jsonl"),
            "--out",
            str(tmp_path / f"{name}.json"),
        ]
        assert _run(capsys, *argv)[0] == 0
        return _read_jsonl(tmp_path / f"{name}.jsonl")

    scored("base", "--model", ref_dir, *common)
    a = scored("a", "--model", policy, "--reference", ref_dir, *common)
    s = scored("s", "--model", policy, "--reference-scores", base_per, *common)
    assert [r["correct"] for r in a] == [r["correct"] for r in s]
    np.testing.assert_allclose(
        [r["ref_logp_chosen"] for r in s], [r["ref_logp_chosen"] for r in a], rtol=1e-6
    )
    with open(tmp_path / "s.json", encoding="utf-8") as f:
        assert json.load(f)["reference"] == {"scores": os.path.abspath(base_per)}
    # rows are named by their row number in the file, so a smaller --limit (its sample is part of
    # the larger one) reuses the reference's scores
    small = scored(
        "two", "--model", policy, "--reference-scores", base_per, *common[:4], "--limit", "2", *common[6:]
    )
    by_index = {r["index"]: r for r in a}
    assert len(small) == 2 and {r["index"] for r in small} < set(by_index)
    for r in small:
        assert r["ref_logp_chosen"] == pytest.approx(by_index[r["index"]]["ref_logp_chosen"], rel=1e-6)
    # scored with another prompt (method pba): the token ids differ -> one line, exit 1
    code, _, err = _run(
        capsys,
        "--model",
        policy,
        "--reference-scores",
        base_per,
        "--benchmark",
        f"p-soups={PSOUPS}",
        "--method",
        "pba",
        "--limit",
        "4",
        "--max-length",
        str(MAX_LEN),
        "--out",
        str(tmp_path / "x.json"),
    )
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
    assert code == 1 and len(errors) == 1 and "base.jsonl" in errors[0] and "example" in errors[0]


def test_reference_scores_of_another_dtype_precision_or_max_length_are_refused(llama, tmp_path, capsys):
    """The same token ids give other log-probs at another compute dtype or matmul precision, and another
    --max-length cuts other ids: each is refused in one line naming the file and what differs, before anything
    is written. Rows of older files, which record neither setting, are taken as a resume takes them."""
    from conftest import build_tiny_hf

    policy = build_tiny_hf(
        "llama", str(tmp_path / "policy"), seed=5
    )  # another model: the point of a reference
    base_per = tmp_path / "base.jsonl"
    common = ["--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--limit", "2"]
    argv = ["--model", llama, *common, "--max-length", str(MAX_LEN), "--per-example", str(base_per)]
    capsys.readouterr()  # the model build's progress bars
    assert _run(capsys, *argv, "--out", str(tmp_path / "base.json"))[0] == 0
    level = json.loads((tmp_path / "base.json").read_text())["matmul_precision"]
    other = "high" if level != "high" else "highest"
    run = [
        "--model",
        policy,
        *common,
        "--reference-scores",
        str(base_per),
        "--per-example",
        str(tmp_path / "p.jsonl"),
    ]
    run += ["--out", str(tmp_path / "r.json")]
    for flags, says in (
        (
            ["--max-length", str(MAX_LEN), "--dtype", "bfloat16"],
            "scored with another dtype (float32, now bfloat16)",
        ),
        (
            ["--max-length", str(MAX_LEN), "--matmul-precision", other],
            f"scored with another matmul_precision ({level}, now {other})",
        ),
        (["--max-length", "512"], "was scored on other token ids"),  # P-SOUPS rows are cut at 256
    ):
        code, _, err = _run(capsys, *run, *flags)
        errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
        assert code == 1 and len(errors) == 1 and str(base_per) in errors[0] and says in errors[0], err
        assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "r.json").exists()
    rows = _read_jsonl(base_per)
    old = [{k: v for k, v in r.items() if k not in ("dtype", "matmul_precision")} for r in rows]
    base_per.write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    assert _run(capsys, *run, "--max-length", str(MAX_LEN), "--matmul-precision", other)[0] == 0
    got = {r["index"]: r["ref_logp_chosen"] for r in _read_jsonl(tmp_path / "p.jsonl")}
    assert got == {r["index"]: r["logp_chosen"] for r in rows}


def test_a_persona_variant_no_row_has_is_warned(capsys, llama, tmp_path):
    """P-SOUPS rows carry history pairs, no comments: --persona ugc scores empty personas, and says so."""
    argv = ["--model", llama, "--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--persona", "ugc,pair"]
    argv += ["--limit", "2", "--max-length", str(MAX_LEN), "--out", str(tmp_path / "r.json")]
    code, _, err = _run(capsys, *argv)
    warned = [line for line in err.splitlines() if line.startswith("alignx: warning:")]
    assert code == 0 and warned == [
        f"alignx: warning: {PSOUPS}: no row has a persona under --persona ugc; its prompts are scored "
        "with an empty one"
    ]


def test_limit_is_a_balanced_seeded_sample_and_accuracy_is_reported_per_persona(ica_run):
    """P-SOUPS files hold each persona's rows in a block: --limit must not take one persona only."""
    from alignx_jax.data.benchmarks import balanced_sample, load_benchmark, persona_group

    with open(PSOUPS, encoding="utf-8") as f:
        rows = json.load(f)
    picks = balanced_sample(rows, 10, seed=0)
    assert picks == sorted(picks) and picks == balanced_sample(rows, 10, seed=0) != balanced_sample(
        rows, 10, seed=1
    )
    groups = [persona_group(rows[i]) for i in picks]
    assert len(set(groups)) == 2 and groups.count(groups[0]) == 5
    assert [r["prompt"] for r in load_benchmark("p-soups", PSOUPS, limit=10)] == [
        rows[i]["prompt"] for i in picks
    ]
    # per-example rows name the file's row numbers, not positions in the sample
    assert sorted(r["index"] for r in ica_run["rows"]) == balanced_sample(rows, LIMIT, seed=0)
    entry = ica_run["results"]["benchmarks"]["p-soups"]
    assert sum(g["n"] for g in entry["by_persona"].values()) == entry["n"] == LIMIT
    assert len(entry["by_persona"]) == 2


def test_a_file_that_is_not_a_per_example_file_is_refused_not_truncated(tmp_path):
    """Only the head of a row cut by a kill is dropped from the end of a per-example file; a user's
    notes given as --per-example (or generate --out) are refused and left as they were."""
    from alignx_jax.errors import DataError
    from alignx_jax.evaluate import PerExampleLog, parse_per_example

    row = json.dumps({"benchmark": "p-soups", "persona": "p", "index": 3, "logp_chosen": -1.0}).encode()
    for head in (b'{"benchmark": "p-so', b"{", b'{"'):  # cut anywhere, down to the row's first byte
        rows, good, cut = parse_per_example([row, head], "f")
        assert list(rows) == [("p-soups", "p", 3)] and good == len(row) + 1 and cut == 2
    part = tmp_path / "cut.jsonl"
    part.write_bytes(row + b"\n{")
    log = PerExampleLog(str(part))
    log.close()
    assert list(log.rows) == [("p-soups", "p", 3)]
    assert part.read_bytes() == row + b"\n"  # the cut head is gone, the next row is appended after it
    notes = tmp_path / "notes.txt"
    for text in ("my precious notes", '{"a": 1}', f"{row.decode()}\nnot json at the end"):
        notes.write_text(text)
        with pytest.raises(DataError, match=r"notes.txt: line \d: not a per-example row .*; give a new file"):
            PerExampleLog(str(notes))
        assert notes.read_text() == text


def test_a_non_finite_log_prob_in_a_per_example_file_is_refused(tmp_path):
    from alignx_jax.errors import DataError
    from alignx_jax.evaluate import PerExampleLog

    path = tmp_path / "per.jsonl"
    row = {
        "benchmark": "p-soups",
        "persona": "p",
        "index": 0,
        "logp_chosen": float("nan"),
        "logp_rejected": -1.0,
    }
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"per.jsonl: line 1: logp_chosen is nan; give a new file"):
        PerExampleLog(str(path))
    with pytest.raises(DataError, match=r": --out must be a file, got a folder$"):
        PerExampleLog(str(tmp_path), flag="--out")


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"logp_rejected": "-1.5"}, "line 2: logp_rejected is '-1.5', not a number; give a new file"),
        ({"ref_logp_chosen": [1.0]}, "line 2: ref_logp_chosen is [1.0], not a number; give a new file"),
        ({"index": "two"}, "line 2: not a per-example row (invalid literal"),
        ({"index": None}, "line 2: not a per-example row (int() argument"),
        ({"persona": ["p"]}, "line 2: not a per-example row (unhashable type"),
    ],
)
def test_a_per_example_row_of_the_wrong_types_is_one_line(tmp_path, edit, says):
    """A row edited by hand: a log-prob that is no number, an index that is no integer (it failed as a
    traceback where the rows are keyed or the log-probs summed) is refused naming its line."""
    from alignx_jax.errors import DataError

    row = {"benchmark": "p-soups", "persona": "p", "index": 0, "logp_chosen": -1.0, "logp_rejected": -2.0}
    path = tmp_path / "per.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "index": 1, **edit}) + "\n")
    with pytest.raises(DataError) as e:
        ev.PerExampleLog(str(path))
    assert f"per.jsonl: {says}" in str(e.value) and "\n" not in str(e.value)


def test_a_resumed_or_reference_row_without_its_log_probs_is_one_line(capsys, ica_run, llama, tmp_path):
    """A row without a log-prob eval needs (hand-edited) is refused in one line naming the file and the field,
    on a resume and in --reference-scores (a KeyError traceback before)."""
    rows = [dict(r) for r in ica_run["rows"]]
    del rows[1]["logp_rejected"]
    part = tmp_path / "per.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    base = ["--model", llama, "--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--limit", str(LIMIT)]
    base += ["--max-length", str(MAX_LEN), "--out", str(tmp_path / "r.json")]
    for flags in (["--per-example", str(part)], ["--reference-scores", str(part)]):
        code, _, err = _run(capsys, *base, *flags)
        errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
        assert code == 1 and len(errors) == 1, err
        assert str(part) in errors[0] and "has no logp_rejected" in errors[0]


def test_benchmark_rows_know_their_file_and_a_split_folder_is_refused(tmp_path):
    """A benchmark folder's rows carry (file, row there) for errors; an `alignx data split` output
    (train/ beside test/) is refused, since scoring it whole would score its training half."""
    from alignx_jax.data.benchmarks import benchmark_sample
    from alignx_jax.errors import DataError

    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b", "profile": "free text"} for i in range(5)]
    folder = tmp_path / "ufp4"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(rows[:2]))
    (folder / "b.json").write_text(json.dumps(rows[2:]))
    sample = benchmark_sample("uf-p-4", str(folder))
    assert sample.picks == [0, 1, 2, 3, 4]
    assert sample.places[3] == (str(folder / "b.json"), 1)
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tmp_path / "split" / "test").mkdir()
    (tmp_path / "split" / "test" / "a.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"split folders train/, test/: name the one to score .*split/test"):
        benchmark_sample("uf-p-4", str(tmp_path / "split"))


def test_a_benchmark_folder_reports_each_file_beside_the_pooled_entry(capsys, llama, tmp_path):
    """`--benchmark uf-p-4=DIR` of several files: the pooled `uf-p-4` entry as before, then one `uf-p-4:FILE`
    entry per file whose rows were scored (`.2` for a second file of one name), named with its file in
    `benchmark_paths`; a resumed run reports the same."""
    with open(PSOUPS, encoding="utf-8") as f:
        src = json.load(f)
    # UF-P-4's shape: the task, the responses and history pairs (the first rows: one persona, short prompts)
    rows = [
        {k: r[k] for k in ("prompt", "chosen", "rejected", "Pair-wise Comparative Feedback")} for r in src[:7]
    ]
    folder = tmp_path / "ufp4"
    (folder / "sub").mkdir(parents=True)
    layout = {"helpfulness.json": rows[:3], "honesty.json": rows[3:5], "sub/helpfulness.json": rows[5:]}
    for name, part in layout.items():
        (folder / name).write_text(json.dumps(part), encoding="utf-8")
    # files that hold no rows: read without an error, named in one warning line each, and given no entry
    (folder / "empty.jsonl").write_text("", encoding="utf-8")
    (folder / "sub" / "none.json").write_text("[]", encoding="utf-8")
    out, per = tmp_path / "r.json", tmp_path / "per.jsonl"
    argv = [
        "--model",
        llama,
        "--benchmark",
        f"uf-p-4={folder}",
        "--method",
        "ica",
        "--max-length",
        str(MAX_LEN),
    ]
    argv += ["--per-example", str(per), "--out", str(out)]
    code, printed, err = _run(capsys, *argv)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("alignx: warning:")]
    assert warned == [
        f"alignx: warning: {folder / name}: holds no rows; --benchmark uf-p-4={folder} scores the folder's "
        "other files (this one gets no entry of its own)"
        for name in ("empty.jsonl", "sub/none.json")
    ]
    res = json.loads(out.read_text())
    keys = ["uf-p-4", "uf-p-4:helpfulness", "uf-p-4:honesty", "uf-p-4:helpfulness.2"]
    assert list(res["benchmarks"]) == keys
    assert res["benchmark_paths"] == dict(zip(keys, [str(folder), *(str(folder / n) for n in layout)]))
    assert set(res["persona"]) == set(keys)
    correct = [r["correct"] for r in sorted(_read_jsonl(per), key=lambda r: r["index"])]
    assert {r["benchmark"] for r in _read_jsonl(per)} == {"uf-p-4"}  # the rows stay the folder's
    for key, (lo, hi) in zip(keys, [(0, 7), (0, 3), (3, 5), (5, 7)]):
        entry = res["benchmarks"][key]
        assert entry["n"] == hi - lo and entry["accuracy"] == pytest.approx(np.mean(correct[lo:hi]))
        assert any(line.startswith(key + " ") for line in printed.splitlines())
    assert res["limit"] is None and res["rows_scored"] == dict(zip(keys, [7, 3, 2, 2]))
    # every row resumed; a --limit past the folder's 7 rows is recorded as given, beside the rows it scored
    assert _run(capsys, *argv, "--limit", "50")[0] == 0
    again = json.loads(out.read_text())
    assert again["benchmarks"] == res["benchmarks"]
    assert again["limit"] == 50 and again["rows_scored"] == res["rows_scored"]
    # --limit 2 samples two of the three files: the third has no entry
    code, _, err = _run(capsys, *argv[:-4], "--limit", "2", "--out", str(tmp_path / "two.json"))
    two_results = json.loads((tmp_path / "two.json").read_text())
    two = two_results["benchmarks"]
    assert code == 0 and two["uf-p-4"]["n"] == 2 and len(two) == 3
    assert all(two[k]["n"] == 1 for k in list(two)[1:])
    assert two_results["rows_scored"] == {k: two[k]["n"] for k in two}
    # each row records its file and its row there: a file added in front shifts the indices of the rows
    # after it, and the refused resume says so in one line instead of blaming other settings
    per_rows = sorted(_read_jsonl(per), key=lambda r: r["index"])
    places = [(str(folder / name), i) for name, part in layout.items() for i in range(len(part))]
    assert [(r["file"], r["row"]) for r in per_rows] == places
    (folder / "added.json").write_text(json.dumps(rows[6:] + rows[:1]), encoding="utf-8")
    code, _, err = _run(capsys, *argv)
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
    assert code == 1 and errors == [
        f"alignx: error: {per}: row ('uf-p-4', 'p', 0) was scored on {folder / 'helpfulness.json'} row 0, and "
        f"index 0 is now {folder / 'added.json'} row 0 (a file added to or removed from the benchmark folder "
        "shifts the later files' rows); use a new --per-example file"
    ]
    # the same rows given as --reference-scores: refused in the same words, not blamed on other settings
    scores = [*argv[:-4], "--reference-scores", str(per), "--per-example", str(tmp_path / "p2.jsonl")]
    code, _, err = _run(capsys, *scores, "--out", str(tmp_path / "r2.json"))
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignx: error:")]
    assert code == 1 and errors == [
        f"alignx: error: {per}: example 0 was scored on {folder / 'helpfulness.json'} row 0, and "
        f"index 0 is now {folder / 'added.json'} row 0 (a file added to or removed from the benchmark folder "
        "shifts the later files' rows); score the reference on the folder as it is now"
    ]
    assert not (tmp_path / "p2.jsonl").exists() and not (tmp_path / "r2.json").exists()


def test_a_free_text_profile_renders_as_is_and_flip_names_its_row():
    """`--preference golden|profile` with a profile that is not the preference space's labels: the text
    as it is (no direction to report); `--flip` needs the labels and names the file and row."""
    from alignx_jax.errors import DataError
    from alignx_jax.evaluate.profiles import file_profile, golden_profile

    row = {"prompt": "p", "chosen": "a", "rejected": "b", "profile": "The user prefers concise answers."}
    assert golden_profile(row, (), file="f.json", index=3) == (row["profile"], None)
    assert file_profile(row, (), file="f.json", index=3) == (row["profile"], None)
    for render in (golden_profile, file_profile):
        with pytest.raises(DataError, match=r"^f\.json, row 3: --flip needs a `profile`"):
            render(row, (4,), file="f.json", index=3)


def test_a_blank_profile_is_refused_where_pba_would_render_it(tmp_path):
    """A P-SOUPS row with a blank `profile` loads (ICA never reads it); PBA's `--preference profile`, and
    `golden` on a row with no direction, refuse it naming file, row and field; a direction wins over it."""
    from alignx_jax.data.benchmarks import benchmark_sample
    from alignx_jax.data.persona import profile_text
    from alignx_jax.errors import DataError
    from alignx_jax.evaluate.profiles import file_profile, golden_profile

    rows = psoups_rows_with_a_blank_profile("  ")
    (tmp_path / "ps.json").write_text(json.dumps(rows))
    sample = benchmark_sample("p-soups", str(tmp_path / "ps.json"))
    file, at = sample.places[1]
    for render in (golden_profile, file_profile):
        assert render(sample.rows[0], (), file=file, index=0)[0] == "Likes science"
        with pytest.raises(DataError, match=r"ps\.json, row 1, field 'profile': is empty"):
            render(sample.rows[1], (), file=file, index=at)
    direction = [0.5] * 89 + [1.0]
    golden = {**sample.rows[1], "Preference Direction": direction}
    assert golden_profile(golden, (), file=file, index=at)[0] == profile_text(direction) != ""


def test_matmul_precision_reaches_the_scoring_programs(capsys, ica_run, llama, tmp_path, monkeypatch):
    """`--matmul-precision highest` is the level JAX reads when the scoring programs are traced (a GPU's
    float32 default is TF32); on a CPU float32 is multiplied in full either way: the same log-probs."""
    import jax

    seen = []
    for name in ("_logps", "_pair_logps"):
        original = getattr(ev.scoring.SequenceScorer, name)

        def spy(self, *a, _original=original, **k):
            seen.append(jax.config.jax_default_matmul_precision)  # read at trace time
            return _original(self, *a, **k)

        monkeypatch.setattr(ev.scoring.SequenceScorer, name, spy)
    out, per = tmp_path / "r.json", tmp_path / "per.jsonl"
    code, _, err = _run(
        capsys,
        *("--model", llama, "--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--limit", str(LIMIT)),
        *("--max-length", str(MAX_LEN), "--batch-size", "4", "--matmul-precision", "highest"),
        *("--per-example", str(per), "--out", str(out)),
    )
    assert code == 0, err
    assert seen and set(seen) == {"highest"}
    assert json.loads(out.read_text())["matmul_precision"] == "highest"
    got = {r["index"]: r for r in _read_jsonl(per)}
    for r in ica_run["rows"]:
        for k in ("logp_chosen", "logp_rejected"):
            assert got[r["index"]][k] == pytest.approx(r[k], rel=1e-6, abs=1e-4)


def test_rows_past_the_models_positions_are_warned_once_with_the_cure(capsys, llama, tmp_path):
    """The tiny llama knows 256 positions: at --max-length 1024 P-SOUPS rows reach past them (scored, one
    warning line naming the flag that fits them); at that --max-length every row fits and nothing is said.
    256 itself does not: the prompt and a response keep 128 ids each, then the EOS (257)."""
    base = ("--model", llama, "--benchmark", f"p-soups={PSOUPS}", "--method", "ica", "--limit", "12")
    code, _, err = _run(capsys, *base, "--max-length", "1024", "--out", str(tmp_path / "a.json"))
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "max_position_embeddings" in ln]
    assert len(lines) == 1 and "max_position_embeddings (256); --max-length 254 cuts them" in lines[0]
    code, _, err = _run(capsys, *base, "--max-length", "254", "--out", str(tmp_path / "b.json"))
    assert code == 0 and "max_position_embeddings" not in err


@pytest.mark.parametrize("prompt_format", ["chat", "paper"])
def test_the_max_length_the_warning_names_is_the_largest_whose_rows_fit(prompt_format):
    """`fitting_max_length` against the truncation itself: at it the longest rows fit the positions, one
    more does not (below and past the 1026 where the reserve stops being half)."""
    from alignx_jax.data.batching import _fit
    from alignx_jax.evaluate.run import fitting_max_length

    def longest(max_length):
        ids = list(range(5000))
        prompt, chosen, _, _ = _fit(
            ids,
            ids,
            ids,
            max_length=max_length,
            prompt_format=prompt_format,
            overflow="truncate",
            eval_mode=True,
        )
        return len(prompt) + len(chosen) + 1  # + EOS

    for positions in (256, 257, 1000, 2048, 2051, 4096):
        fits = fitting_max_length(positions, prompt_format)
        assert longest(fits) <= positions < longest(fits + 1), (positions, fits)


def test_a_resume_takes_the_model_and_reference_through_a_link(tmp_path):
    """A --per-example row names its model and reference folders (absolute): a resume naming the same folders
    through a link was 'scored with another model'; other folders and another dtype are still refused."""
    from types import SimpleNamespace

    from alignx_jax.errors import DataError
    from alignx_jax.evaluate.run import _check_resumed

    for name in ("m", "r", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "lm").symlink_to(tmp_path / "m")
    (tmp_path / "lr").symlink_to(tmp_path / "r")
    ex = SimpleNamespace(prompt_ids=[1], chosen_ids=[2], rejected_ids=[3])
    stored = {"benchmark": "p-soups", "persona": None, "index": 0, "prompt_ids": [1], "chosen_ids": [2]}
    stored.update(
        rejected_ids=[3],
        ref_logp_chosen=-1.0,
        ref_logp_rejected=-2.0,
        logp_chosen=-1.0,
        logp_rejected=-2.0,
        model=str(tmp_path / "m"),
    )
    stored.update(reference=str(tmp_path / "r"), dtype="float32")

    def resume(model: str, reference: str, dtype: str = "float32") -> None:
        scored_with = {"reference": str(tmp_path / reference), "dtype": dtype}
        _check_resumed(stored, ex, True, "per.jsonl", model=str(tmp_path / model), scored_with=scored_with)

    resume("lm", "lr")
    resume("m", "lr")
    with pytest.raises(DataError, match="scored with another model"):
        resume("other", "r")
    with pytest.raises(DataError, match="scored with another reference"):
        resume("m", "other")
    with pytest.raises(DataError, match=r"scored with another dtype \(float32, now bfloat16\)"):
        resume("lm", "lr", "bfloat16")


def test_only_process_0_shows_the_scoring_bar(capsys, llama, monkeypatch):
    """A multi-process eval scores every batch on every process: each drew its own bar (generate, train and
    predict-preferences show process 0's only)."""
    from alignx_jax import paths

    settings = ev.EvalSettings(method="ica", limit=2, max_length=MAX_LEN, batch_size=2)
    specs = ev.parse_benchmark_specs([f"p-soups={PSOUPS}"])
    ev.evaluate(llama, specs, settings, progress=True)
    assert "p-soups/p: 100%" in capsys.readouterr().err
    monkeypatch.setattr(paths, "is_main_process", lambda: False)
    res = ev.evaluate(llama, specs, settings, progress=True)
    assert res["benchmarks"]["p-soups"]["n"] == 2
    assert "p-soups" not in capsys.readouterr().err
