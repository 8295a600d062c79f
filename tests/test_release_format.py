"""Release fidelity (issue #19): the release's training input byte for byte (`prompt_format='release'`,
`pba_preference='history'`), the paper evaluation input keeping its BOS under truncation, and
`alignx eval --preference profile / --reference-prompt ica`, `alignx generate --benchmark`.

Expected strings are written out here from the release's formatting rules (docs/method.md 6b, 7),
not produced by the code under test.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from alignx_jax.data import batching
from alignx_jax.tokenizer import load_tokenizer

SYS_ICA = "Generate a task-specific response based on user historical behavior."
SYS_PBA = "Generate a task-specific response based on user preferences."
HEAD = "<|start_header_id|>system<|end_header_id|>\n\n"
USER = "\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"


def _vec(**dims: float) -> list[float]:
    v = [0.5] * 90
    for k, x in dims.items():
        v[int(k[1:])] = x
    return v


def _row(n_ugc: int = 2, n_pair: int = 2) -> dict:
    ugc = [
        {
            "prompt": "Best pizza topping?",
            "comment": "Pineapple, obviously.",
            "Preference Direction": _vec(d0=1.0),
        },
        {
            "prompt": "Cats or dogs?",
            "comment": "Cats.\nAlways.",
            "Preference Direction": _vec(d0=1.0, d1=0.0),
        },
    ][:n_ugc]
    pairs = [
        {
            "prompt": "How to relax?",
            "chosen": "Take a walk.",
            "rejected": "Work more.",
            "Preference Direction": _vec(d0=1.0, d1=0.0),
        },
        {
            "prompt": "Tea or coffee?",
            "chosen": "Tea.",
            "rejected": "Coffee.",
            "Preference Direction": _vec(d1=0.0),
        },
    ][:n_pair]
    return {
        "prompt": "Why is the sky blue?",
        "chosen": "Because of Rayleigh scattering.\n\n",
        "rejected": "No idea.",
        "Preference Direction": _vec(d5=1.0),  # golden: High Agreeableness
        "Demographic Information": "I am a 30-year-old teacher.",
        "User-Generated Content": ugc,
        "Pair-wise Comparative Feedback": pairs,
    }


class FakeRng:
    """Stands in for the history sampler's generator: fixed draws, fixed permutations."""

    def __init__(self, ints, perms):
        self.ints, self.perms = list(ints), [list(p) for p in perms]

    def integers(self, lo, hi):
        assert (lo, hi) == (0, 5)
        return self.ints.pop(0)

    def permutation(self, n):
        p = self.perms.pop(0)
        assert sorted(p) == list(range(n))
        return np.asarray(p)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]


def _example(tok, row, rng, *, method="ica", max_length=4096, **kw):
    return batching.make_example(
        tok, row, method=method, max_length=max_length, prompt_format="release", rng=rng, **kw
    )


U1 = "1. *Post:*\nBest pizza topping?\n\n*Comment:*\nPineapple, obviously.\n\n"
U2_AS_1 = "1. *Post:*\nCats or dogs?\n\n*Comment:*\nCats.\nAlways.\n\n"
P1 = "*Post:*\nHow to relax?\n\n*Chosen:*\nTake a walk.\n\n*Rejected:*\nWork more.\n\n"
P2 = "*Post:*\nTea or coffee?\n\n*Chosen:*\nTea.\n\n*Rejected:*\nCoffee.\n\n"
UGC_H = "**This person has commented on some posts:**\n\n"
PAIR_H = "**This person has chosen or rejected comments on some posts:**\n\n"
CHOSEN = "Because of Rayleigh scattering. <|eot_id|>"
REJECTED = "No idea. <|eot_id|>"


def _check(tok, ex, prompt: str, chosen: str = CHOSEN, rejected: str = REJECTED):
    assert tok.decode(ex.prompt_ids) == prompt  # byte for byte, and no BOS in front
    assert ex.prompt_ids == _ids(tok, prompt) and ex.prompt_ids[0] != tok.bos_token_id
    assert tok.decode(ex.chosen_ids) == chosen and ex.chosen_ids == _ids(tok, chosen)
    assert tok.decode(ex.rejected_ids) == rejected and ex.rejected_ids == _ids(tok, rejected)
    assert ex.chosen_ids[-2:] == [_ids(tok, " ")[0], tok.eos_token_id]  # a space token before EOS


def test_release_ica_ugc_and_pairs(tok):
    # n_ugc = min(1, 2) = 1 (the second item), n_pair = min(2, 2) = 2 (second, then first)
    ex = _example(tok, _row(), FakeRng([1, 2], [[1, 0], [1, 0]]))
    user = (
        "***Task***\n\nWhy is the sky blue?\n\n***Historical Behavior***\n\n"
        + UGC_H
        + U2_AS_1
        + PAIR_H
        + "1. "
        + P2
        + "2. "
        + P1
        + "\n\n***Response:***\n\n"
    )
    _check(tok, ex, HEAD + SYS_ICA + USER + user + TAIL)


def test_release_ica_without_ugc(tok):
    # no UGC: n_ugc = 0; the pair draw 0 too -> both 0 -> min(4, len) of each: the 2 pairs
    ex = _example(tok, _row(n_ugc=0), FakeRng([3, 0], [[0, 1]]))
    user = (
        "***Task***\n\nWhy is the sky blue?\n\n***Historical Behavior***\n\n"
        + PAIR_H
        + "1. "
        + P1
        + "2. "
        + P2
        + "\n\n***Response:***\n\n"
    )
    _check(tok, ex, HEAD + SYS_ICA + USER + user + TAIL)


def test_release_ica_without_pairs(tok):
    ex = _example(tok, _row(n_pair=0), FakeRng([4, 2], [[0, 1]]))
    user = (
        "***Task***\n\nWhy is the sky blue?\n\n***Historical Behavior***\n\n"
        + UGC_H
        + U1
        + "2. *Post:*\nCats or dogs?\n\n*Comment:*\nCats.\nAlways.\n\n"
        + "\n\n***Response:***\n\n"
    )
    _check(tok, ex, HEAD + SYS_ICA + USER + user + TAIL)


def test_release_ica_zero_draws_take_four_of_each(tok):
    # both draws 0 -> min(4, len) of each kind: everything, in the permuted order
    ex = _example(tok, _row(), FakeRng([0, 0], [[0, 1], [1, 0]]))
    user = (
        "***Task***\n\nWhy is the sky blue?\n\n***Historical Behavior***\n\n"
        + UGC_H
        + U1
        + "2. *Post:*\nCats or dogs?\n\n*Comment:*\nCats.\nAlways.\n\n"
        + PAIR_H
        + "1. "
        + P2
        + "2. "
        + P1
        + "\n\n***Response:***\n\n"
    )
    _check(tok, ex, HEAD + SYS_ICA + USER + user + TAIL)


def _pba_prompt(profile: str) -> str:
    user = f"***Task***\n\nWhy is the sky blue?\n\n***User Preferences***\n\n{profile}\n\n***Response:***\n\n"
    return HEAD + SYS_PBA + USER + user + TAIL


def test_release_pba_profile_from_the_sampled_history(tok):
    # sample: UGC #1 (d0=1) and pair #2 (d1=0): mean d0 = 0.75 -> 1 (Young), d1 = 0.25 -> 0 (Male)
    ex = _example(tok, _row(), FakeRng([1, 1], [[0, 1], [1, 0]]), method="pba", pba_preference="history")
    _check(tok, ex, _pba_prompt("Young, Male"))
    # the same draws with another sample: pair #1 only adds d0=1, d1=0 -> d0 = 1, d1 = 0.5 -> neutral
    ex = _example(tok, _row(), FakeRng([1, 1], [[0, 1], [0, 1]]), method="pba", pba_preference="history")
    _check(tok, ex, _pba_prompt("Young, Male"))
    ex = _example(tok, _row(n_pair=0), FakeRng([1, 0], [[0, 1]]), method="pba", pba_preference="history")
    _check(tok, ex, _pba_prompt("Young"))
    # golden: the row's own pair-level direction, whatever was sampled
    ex = _example(tok, _row(), FakeRng([1, 1], [[0, 1], [1, 0]]), method="pba", pba_preference="golden")
    _check(tok, ex, _pba_prompt("High Agreeableness"))
    assert ex.direction is not None and ex.direction[5] == 1.0  # the head still learns the golden P~


def test_release_pba_zero_draws_and_the_neutral_fallback(tok):
    # 4 UGC + 4 pairs, both draws 0 -> all 8 items; only one item leans (d4=1): mean 0.5625 leaves
    # every dim neutral, so the rule takes the max (1 - 0.5625 < 0.5): d4 -> 1 (High Openness)
    row = _row(n_ugc=0, n_pair=0)
    row["User-Generated Content"] = [
        {"prompt": f"p{i}", "comment": f"c{i}", "Preference Direction": _vec(d4=1.0) if i == 2 else _vec()}
        for i in range(4)
    ]
    row["Pair-wise Comparative Feedback"] = [
        {"prompt": f"q{i}", "chosen": "a", "rejected": "b", "Preference Direction": _vec()} for i in range(4)
    ]
    ex = _example(
        tok, row, FakeRng([0, 0], [[0, 1, 2, 3], [3, 2, 1, 0]]), method="pba", pba_preference="history"
    )
    _check(tok, ex, _pba_prompt("High Openness"))


def test_release_pba_history_without_vectors_falls_back_to_golden(tok):
    row = _row()
    for item in row["User-Generated Content"] + row["Pair-wise Comparative Feedback"]:
        del item["Preference Direction"]
    ex = _example(tok, row, FakeRng([1, 1], [[0, 1], [0, 1]]), method="pba", pba_preference="history")
    _check(tok, ex, _pba_prompt("High Agreeableness"))


def test_release_length_rule(tok):
    row = _row()
    row["chosen"] = "word " * 40 + "\n"
    full = _example(tok, row, FakeRng([1, 1], [[0, 1], [0, 1]]))
    p = len(full.prompt_ids)
    assert not full.truncated and full.chosen_ids[-1] == tok.eos_token_id
    # the response is cut (its head kept, EOS kept) so that prompt + response = L
    L = p + 10
    ex = _example(tok, row, FakeRng([1, 1], [[0, 1], [0, 1]]), max_length=L)
    assert ex is not None and ex.truncated and ex.prompt_ids == full.prompt_ids
    assert ex.chosen_ids == full.chosen_ids[:9] + [tok.eos_token_id]
    assert ex.rejected_ids == full.rejected_ids  # short enough: untouched
    # kept while the prompt alone is below L - 2, dropped once it reaches it
    ex = _example(tok, row, FakeRng([1, 1], [[0, 1], [0, 1]]), max_length=p + 3)
    assert ex is not None and ex.chosen_ids == full.chosen_ids[:2] + [tok.eos_token_id]
    assert _example(tok, row, FakeRng([1, 1], [[0, 1], [0, 1]]), max_length=p + 2, overflow="drop") is None


def test_paper_eval_truncation_keeps_bos(tok):
    row = {"prompt": "Tell me. " * 80, "chosen": "Sure.", "rejected": "No."}
    ex = batching.make_example(tok, row, method="none", max_length=128, prompt_format="paper", eval_mode=True)
    budget = 128 - 64  # max length - reserve (513 scaled down to L // 2 below 1026)
    body = _ids(
        tok,
        HEAD
        + "Generate a task-specific response."
        + USER
        + "***Task***\n\n**Post:**\n"
        + "Tell me. " * 80
        + "\n\n***Response:***\n\n"
        + TAIL,
    )
    assert len(body) > budget and ex.truncated
    assert ex.prompt_ids == [tok.bos_token_id] + body[-budget:]
    assert tok.decode(ex.prompt_ids[:1]) == "<|begin_of_text|>"
    assert tok.decode(ex.prompt_ids).endswith("Tell me. \n\n***Response:***\n\n" + TAIL)
    assert ex.chosen_ids == _ids(tok, "Sure.") + [tok.eos_token_id]


# ----------------------------------------------------------------------------- configs


def test_release_configs_train_as_the_release():
    from alignx_jax.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("llama3_8b_ica_gpu.py", "llama3_8b_pba_tpu_v5p_64.py"):
        c = load_config(os.path.join(root, "configs", name))
        assert (
            c.data.prompt_format == "release" and c.pba.preference == "history" and c.data.overflow == "drop"
        )


# ----------------------------------------------------------------------------- alignx eval / generate


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    """AlignX-shaped rows whose `profile` ("Young") differs from their golden direction ("Male")."""
    rows = []
    for i in range(3):
        r = _row()
        r["prompt"] = f"Why is the sky blue, take {i}?"
        r["Preference Direction"] = _vec(d1=0.0)
        r["profile"] = "Young"
        rows.append(r)
    path = tmp_path_factory.mktemp("bench") / "alignx_test.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def _eval(capsys, tmp_path, tag: str, *argv: str) -> tuple[dict, list[dict], str]:
    from alignx_jax import cli

    out, per = tmp_path / f"{tag}.json", tmp_path / f"{tag}.jsonl"
    code = cli.main(["eval", *argv, "--max-length", "1024", "--per-example", str(per), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.read_text()), _jsonl(per), err


def test_eval_preference_profile_and_reference_prompt_ica(capsys, tiny_hf_checkpoints, bench, tmp_path, tok):
    import shutil

    llama = tiny_hf_checkpoints["llama"]
    ref = str(tmp_path / "ref")
    shutil.copytree(llama, ref)  # the same weights: reference log-probs equal the model's own
    common = ["--model", llama, "--benchmark", f"alignx={bench}", "--prompt-format", "paper"]
    res, rows, _ = _eval(capsys, tmp_path, "profile", *common, "--method", "pba", "--preference", "profile")
    assert res["preference"] == "profile" and len(rows) == 3
    for r in rows:
        text = tok.decode(r["prompt_ids"])
        assert text.startswith("<|begin_of_text|>") and "***User Preferences***\n\nYoung\n\n" in text
    _, golden, _ = _eval(capsys, tmp_path, "golden", *common, "--method", "pba")
    assert all("***User Preferences***\n\nMale\n\n" in tok.decode(r["prompt_ids"]) for r in golden)

    # the model's own ICA log-probs (persona p: the whole history) are what an ICA-prompt reference gives
    _, ica, _ = _eval(capsys, tmp_path, "ica", *common, "--method", "ica", "--persona", "p")
    res, pba, _ = _eval(
        capsys,
        tmp_path,
        "refica",
        *common,
        "--method",
        "pba",
        "--reference",
        ref,
        "--reference-prompt",
        "ica",
    )
    assert res["reference_prompt"] == "ica"
    by_index = {r["index"]: r for r in ica}
    for r in pba:
        assert r["reference_prompt"] == "ica"
        np.testing.assert_allclose(r["ref_logp_chosen"], by_index[r["index"]]["logp_chosen"], rtol=1e-5)
        np.testing.assert_allclose(r["ref_logp_rejected"], by_index[r["index"]]["logp_rejected"], rtol=1e-5)
        assert r["logp_chosen"] != r["ref_logp_chosen"]  # the policy read the PBA prompt
    # the same from the reference's stored ICA scores
    _, stored, _ = _eval(
        capsys,
        tmp_path,
        "refstored",
        *common,
        "--method",
        "pba",
        "--reference-scores",
        str(tmp_path / "ica.jsonl"),
        "--reference-prompt",
        "ica",
    )
    assert [r["ref_logp_chosen"] for r in stored] == [by_index[r["index"]]["logp_chosen"] for r in stored]
    # default 'same': the reference reads the policy's own prompt, so rewards are exactly zero
    res, same, _ = _eval(capsys, tmp_path, "same", *common, "--method", "pba", "--reference", ref)
    assert res["reference_prompt"] == "same"
    assert all(r["logp_chosen"] == r["ref_logp_chosen"] and "reference_prompt" not in r for r in same)


def test_default_prompt_format_follows_the_training(tmp_path, capsys):
    from alignx_jax import evaluate as ev

    hf_dir, work = tmp_path / "export", tmp_path / "run"
    hf_dir.mkdir()
    work.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert ev.trained_prompt_format(str(hf_dir)) is None
    assert ev.default_prompt_format(str(hf_dir), None) == "chat"
    # an export that names its source workdir: the run's config.json says how it was trained
    (work / "config.json").write_text(json.dumps({"model": {}, "data": {"prompt_format": "release"}}))
    (hf_dir / "alignx_export.json").write_text(json.dumps({"files": [], "source": str(work)}))
    assert ev.trained_prompt_format(str(hf_dir)) == "release"
    assert ev.default_prompt_format(str(hf_dir), None) == "paper"  # the release evaluates with paper
    # the manifest's own key wins
    (hf_dir / "alignx_export.json").write_text(json.dumps({"files": [], "prompt_format": "chat"}))
    assert ev.trained_prompt_format(str(hf_dir)) == "chat"
    capsys.readouterr()
    assert ev.default_prompt_format(str(hf_dir), "paper") == "paper"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "(chat)" in err
    assert ev.default_prompt_format(str(hf_dir), "chat") == "chat" and capsys.readouterr().err == ""


def test_trained_prompt_format_of_corrupt_or_missing_records_is_none(tmp_path, capsys):
    """A manifest, run config or import record that is missing, not JSON or not an object records no
    format: None, no error, and the next record in the lookup still counts."""
    from alignx_jax import evaluate as ev
    from alignx_jax.model_card import BASE_INFO

    folder = tmp_path / "model"
    folder.mkdir()
    assert ev.trained_prompt_format(str(folder)) is None
    for text in ("{", "[]"):
        for name in ("alignx_export.json", "config.json", BASE_INFO):
            (folder / name).write_text(text)
        assert ev.trained_prompt_format(str(folder)) is None
    (folder / BASE_INFO).write_text(json.dumps({"prompt_format": "release"}))
    assert ev.trained_prompt_format(str(folder)) == "release"
    (folder / "config.json").write_text(json.dumps({"model": {}, "data": {"prompt_format": "paper"}}))
    assert ev.trained_prompt_format(str(folder)) == "paper"
    assert capsys.readouterr().err == ""


def test_import_then_export_keeps_the_trained_prompt_format(tiny_hf_checkpoints, tmp_path, capsys):
    """An export records the format its run trained with, and eval/generate default to it; `alignx import`
    of that export and an export of the checkpoint keep it (they dropped it: a release-trained model was
    then scored with `chat` prompts instead of `paper`, other log-probs from the same weights)."""
    import shutil

    from alignx_jax import cli
    from alignx_jax import evaluate as ev

    src = tmp_path / "trained"
    shutil.copytree(tiny_hf_checkpoints["llama"], src)
    (src / "alignx_export.json").write_text(json.dumps({"files": [], "prompt_format": "release"}))
    assert ev.default_prompt_format(str(src), None) == "paper"
    assert cli.main(["import", "--hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert ev.trained_prompt_format(str(tmp_path / "ckpt")) == "release"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "again")]) == 0
    manifest = json.loads((tmp_path / "again" / "alignx_export.json").read_text())
    assert manifest["prompt_format"] == "release"
    assert ev.default_prompt_format(str(tmp_path / "again"), None) == "paper"
    # a model with no recorded format stays without one
    assert cli.main(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", str(tmp_path / "plain")]) == 0
    assert ev.trained_prompt_format(str(tmp_path / "plain")) is None
    capsys.readouterr()


def test_generate_benchmark_writes_one_line_per_row_and_resumes(capsys, tiny_hf_checkpoints, bench, tmp_path):
    from alignx_jax import cli

    out = tmp_path / "gen.jsonl"
    argv = [
        "generate",
        "--model",
        tiny_hf_checkpoints["llama"],
        "--benchmark",
        f"alignx={bench}",
        "--method",
        "ica",
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
    ]
    assert cli.main([*argv, "--limit", "2"]) == 0
    first = _jsonl(out)
    assert len(first) == 2 and len({r["id"] for r in first}) == 2
    for r in first:
        assert set(r) >= {"id", "prompt", "output"} and r["prompt_format"] == "paper" and r["method"] == "ica"
        assert r["settings"]["dtype"] == "float32"  # the dtype the model loaded in, not the flag's none
    # an interrupted run: the last line cut short; the rerun keeps what is there and adds the rest
    data = out.read_bytes()
    out.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 1] + b'{"benchmark": "al')
    assert cli.main(argv) == 0
    rows = _jsonl(out)
    assert len(rows) == 3 and sorted(r["id"] for r in rows) == [0, 1, 2] and rows[0] == first[0]
    capsys.readouterr()
    assert cli.main(argv) == 0 and len(_jsonl(out)) == 3  # nothing left: no model loaded
    assert "already generated" in capsys.readouterr().err
    # another method into the same file is refused
    assert cli.main([*argv[:6], "pba", *argv[7:]]) == 1
    assert "--method ica" in capsys.readouterr().err
    # other sampling settings or another model into the same file: refused, naming what changed
    assert cli.main([*argv, "--temperature", "0.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings (temperature 0.9, now 0.5)" in err, err
    assert cli.main([*argv[:2], tiny_hf_checkpoints["qwen2"], *argv[3:]]) == 1
    assert "other settings (model " in capsys.readouterr().err
    # each row samples by its own index: the resumed file's rows equal one run's at another batch size
    whole = tmp_path / "whole.jsonl"
    assert cli.main([*argv[:-5], str(whole), "--max-new-tokens", "3", "--batch-size", "3"]) == 0
    by_id = {r["id"]: r["output"] for r in _jsonl(whole)}
    assert {r["id"]: r["output"] for r in rows} == by_id


def test_generate_flag_checks_are_one_line_before_the_model_loads(
    capsys, tiny_hf_checkpoints, bench, tmp_path
):
    from alignx_jax import cli

    base = ["generate", "--model", str(tmp_path / "no_such_model"), "--prompt", "Hi"]
    cases = [
        (["--temperature", "nan"], "--temperature must be a finite number > 0"),
        (["--temperature", "inf"], "--temperature must be a finite number > 0"),
        (["--top-p", "-1"], "--top-p must be in [0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in [0, 1]"),
        (["--top-k", "-5"], "--top-k must be >= 0"),
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--seed", str(2**32)], "--seed must be in [0, 2**32)"),
        (["--max-length", "0"], "--max-length must be at least 4"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--out", str(tmp_path / "x.jsonl")], "--out applies to --benchmark"),
        (["--limit", "0"], "--limit applies to --benchmark"),
        (["--batch-size", "3"], "--batch-size applies to --benchmark"),
    ]
    for extra, why in cases:
        assert cli.main([*base, *extra]) == 1, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("alignx: error: " + why) and "\n" not in err, (extra, err)
    out = tmp_path / "gen.jsonl"
    bench_argv = [
        "generate",
        "--model",
        str(tmp_path / "nope"),
        "--benchmark",
        f"alignx={bench}",
        "--out",
        str(out),
    ]
    assert cli.main([*bench_argv, "--seed", "-1"]) == 1
    assert "--seed must be in" in capsys.readouterr().err and not out.exists()  # before the model, no file
    assert cli.main([*bench_argv, "--json"]) == 1
    err = capsys.readouterr().err
    assert err == "alignx: error: --json applies to --prompt, not to --benchmark (--out holds JSON lines)\n"
    assert not out.exists()
    # --greedy with sampling flags: they are named as unused
    r = cli.main(
        [
            "generate",
            "--model",
            tiny_hf_checkpoints["llama"],
            "--prompt",
            "Hi",
            "--greedy",
            "--top-k",
            "3",
            "--max-new-tokens",
            "2",
        ]
    )
    assert r == 0 and "alignx: warning: --top-k not used with --greedy" in capsys.readouterr().err
    # --seed too (it was taken without a word); a refused one still stops before the model loads
    greedy = ["generate", "--model", tiny_hf_checkpoints["llama"], "--prompt", "Hi", "--greedy"]
    assert cli.main([*greedy, "--seed", "5", "--max-new-tokens", "2"]) == 0
    assert "alignx: warning: --seed not used with --greedy" in capsys.readouterr().err
    # a refused one is refused alone: it was first named as unused, then refused
    assert cli.main([*greedy, "--seed", "-1", "--top-k", "3"]) == 1
    assert capsys.readouterr().err == "alignx: error: --seed must be in [0, 2**32), got -1\n"
    assert cli.main([*greedy, "--max-new-tokens", "2"]) == 0
    assert "warning" not in capsys.readouterr().err
