"""KV-cached generation: greedy == transformers, cache == recompute, sampling filters, stops, CLI."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import cli_env, psoups_rows_with_a_blank_profile
from flax import nnx

import alignx_jax
from alignx_jax.cli import main
from alignx_jax.errors import CheckpointError, DataError
from alignx_jax.generate import generate, per_layer_decode, sample_token
from alignx_jax.models.hf import load_pretrained
from alignx_jax.tokenizer import load_tokenizer

NO_STOP = [9999]  # random weights rarely emit EOS; compare full-length continuations


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def llama(tiny_hf_checkpoints):
    return load_pretrained(tiny_hf_checkpoints["llama"])


def _prompts(tok):
    return [
        tok(t)["input_ids"]
        for t in (
            "The student explains climate change",
            "Hi",
            "A scientist asks about the history of science, because the teacher prefers music theory.",
        )
    ]


def test_greedy_matches_transformers_single_and_batch(tiny_hf_checkpoints, llama, tok):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        tiny_hf_checkpoints["llama"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompts = _prompts(tok)
    ours = generate(llama, tok, prompts, max_new_tokens=16, greedy=True, stop_ids=NO_STOP)
    assert all(len(o) == 16 for o in ours)
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    with torch.no_grad():
        ref = hf.generate(
            **enc, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )[:, enc["input_ids"].shape[1] :].tolist()
        single = hf.generate(
            torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False, eos_token_id=None
        )[0, len(prompts[0]) :].tolist()
    assert ours == ref
    assert generate(llama, tok, prompts[:1], max_new_tokens=16, greedy=True, stop_ids=NO_STOP)[0] == single


def test_cached_decode_equals_recomputing(tiny_hf_checkpoints, tok):
    model = load_pretrained(tiny_hf_checkpoints["qwen2"])
    prompt = tok("Our team studies the economy")["input_ids"]
    out = generate(model, tok, [prompt], max_new_tokens=8, greedy=True, stop_ids=NO_STOP)[0]
    seq = list(prompt)
    width = len(prompt) + 8
    fwd = nnx.jit(lambda m, i, k: m(i, k)[0, -1])
    for _ in range(8):  # no cache: the whole (left-padded, fixed-width) sequence each step
        ids = np.full((1, width), tok.pad_token_id, np.int32)
        mask = np.zeros((1, width), np.int32)
        ids[0, width - len(seq) :], mask[0, width - len(seq) :] = seq, 1
        seq.append(int(jnp.argmax(fwd(model, jnp.asarray(ids), jnp.asarray(mask)))))
    assert out == seq[len(prompt) :]


def test_per_layer_and_scanned_decoding_agree(llama, tok):
    """CPU decodes over per-layer weights and cache (`per_layer_decode`); GPU/TPU scan the stacked
    ones: the same tokens, greedy and sampled, and a mismatched cache form is refused."""
    prompts = _prompts(tok)
    for kw in (dict(greedy=True), dict(seed=7)):
        a = generate(llama, tok, prompts, max_new_tokens=10, stop_ids=NO_STOP, per_layer=True, **kw)
        b = generate(llama, tok, prompts, max_new_tokens=10, stop_ids=NO_STOP, per_layer=False, **kw)
        assert a == b
    assert per_layer_decode(llama, 64)  # CPU, enough tokens to pay for the compile, a tiny copy
    assert not per_layer_decode(llama, 63)
    assert not per_layer_decode(llama, 64, available=1024)  # the copy would not fit: scan the stack
    with pytest.raises(ValueError, match="per-layer cache"):
        llama(
            jnp.ones((1, 1), jnp.int32), cache=llama.init_cache(1, 4), layer_params=llama.layer_params(True)
        )


def test_stops_at_eos_and_pads_finished_rows(llama, tok):
    prompts = _prompts(tok)
    free = generate(llama, tok, prompts, max_new_tokens=12, greedy=True, stop_ids=NO_STOP)
    stop = free[0][4]  # pretend the 5th token of row 0 is a stop token
    out = generate(llama, tok, prompts, max_new_tokens=12, greedy=True, stop_ids=[stop])
    assert out[0] == free[0][:5]
    for o, f in zip(out[1:], free[1:]):
        k = f.index(stop) + 1 if stop in f else len(f)
        assert o == f[:k]


def test_sampling_is_seeded_and_filtered(llama, tok):
    prompts = _prompts(tok)
    a = generate(llama, tok, prompts, max_new_tokens=10, seed=3, stop_ids=NO_STOP)
    assert a == generate(llama, tok, prompts, max_new_tokens=10, seed=3, stop_ids=NO_STOP)
    assert a != generate(llama, tok, prompts, max_new_tokens=10, seed=4, stop_ids=NO_STOP)
    greedy = generate(llama, tok, prompts, max_new_tokens=10, greedy=True, stop_ids=NO_STOP)
    assert generate(llama, tok, prompts, max_new_tokens=10, top_k=1, seed=5, stop_ids=NO_STOP) == greedy
    assert alignx_jax.generate is not None and callable(alignx_jax.generate)


def test_a_rows_sample_depends_on_its_seed_and_id_not_on_its_batch(llama, tok):
    a, b, c = _prompts(tok)
    kw = dict(max_new_tokens=10, seed=3, stop_ids=NO_STOP)
    batch = generate(llama, tok, [a, b, c], **kw)
    assert generate(llama, tok, [c, a], row_ids=[2, 0], **kw) == [batch[2], batch[0]]
    assert generate(llama, tok, [b], row_ids=[1], **kw) == [batch[1]]
    assert generate(llama, tok, [a], row_ids=[5], **kw) != [batch[0]]  # another id: another draw
    with pytest.raises(DataError, match="row_ids"):
        generate(llama, tok, [a, b], row_ids=[0], **kw)


def test_stop_ids_include_generation_config_eos(tiny_hf_checkpoints, tmp_path, llama, tok):
    import shutil

    from alignx_jax.generate import _stop_ids

    folder = tmp_path / "m"
    shutil.copytree(tiny_hf_checkpoints["llama"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, 77]}))
    assert 77 not in _stop_ids(llama, tok)
    assert 77 in _stop_ids(llama, load_tokenizer(str(folder)))  # transformers' generate stops there too
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(CheckpointError, match="eos_token_id must be an id or a list"):
        _stop_ids(llama, load_tokenizer(str(folder)))


def test_a_pad_id_past_the_embeddings_pads_with_a_valid_id(llama, tok):
    # a pad token added to the tokenizer, not the model: its id read NaN embeddings into every padded row
    class Padded:
        def __init__(self, inner, pad):
            self.inner, self.pad_token_id = inner, pad

        def __getattr__(self, name):
            return getattr(self.inner, name)

    prompts = _prompts(tok)
    want = generate(llama, tok, prompts, max_new_tokens=6, greedy=True, stop_ids=NO_STOP)
    got = generate(
        llama, Padded(tok, llama.cfg.vocab_size), prompts, max_new_tokens=6, greedy=True, stop_ids=NO_STOP
    )
    assert got == want
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        generate(llama, tok, [[1, llama.cfg.vocab_size]], max_new_tokens=2, greedy=True)


def test_sample_token_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.06, 0.04]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2000)  # a key per row
    k2 = np.asarray(
        sample_token(
            logits, keys, greedy=False, temperature=jnp.float32(1.0), top_k=2, top_p=jnp.float32(1.0)
        )
    )
    assert set(k2.tolist()) == {0, 1} and 0.5 < np.mean(k2 == 0) < 0.75  # renormalised 0.5/0.8
    p = np.asarray(
        sample_token(
            logits, keys, greedy=False, temperature=jnp.float32(1.0), top_k=0, top_p=jnp.float32(0.85)
        )
    )
    assert set(p.tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 so the third token is the last kept
    g = sample_token(
        logits[:1], keys[:1], greedy=True, temperature=jnp.float32(1.0), top_k=10, top_p=jnp.float32(0.9)
    )
    assert int(g[0]) == 0


def test_cli_generate_json_with_persona(tiny_hf_checkpoints, tmp_path, tok, capsys):
    from alignx_jax.data import prompts as prompts_lib

    persona = {
        "Demographic Information": "A retired teacher who loves birds.",
        "Pair-wise Comparative Feedback": [{"prompt": "Cats?", "chosen": "Yes.", "rejected": "No."}],
    }
    path = tmp_path / "persona.json"
    path.write_text(json.dumps(persona))
    code = main(
        [
            "generate",
            "--model",
            tiny_hf_checkpoints["llama"],
            "--prompt",
            "Tell me about owls",
            "--prompt",
            "Hi",
            "--persona",
            str(path),
            "--method",
            "ica",
            "--max-new-tokens",
            "5",
            "--greedy",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2
    want = prompts_lib.prompt_ids(tok, {**persona, "prompt": "Tell me about owls"}, method="ica")
    assert lines[0]["prompt_ids"] == want
    assert 1 <= len(lines[0]["token_ids"]) <= 5
    assert lines[0]["text"] == tok.decode(lines[0]["token_ids"], skip_special_tokens=True)


def test_cli_generate_bad_persona_file(tiny_hf_checkpoints, tmp_path, capsys):
    bad = tmp_path / "p.json"
    bad.write_text("[1, 2")
    assert (
        main(["generate", "--model", tiny_hf_checkpoints["llama"], "--prompt", "x", "--persona", str(bad)])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


@pytest.mark.parametrize(
    "method, persona, needle",
    [
        ("ica", None, "--method ica needs --persona"),
        ("pba", {"Preference Direction": [0.5, 2]}, "expected 90 values, got 2"),
        ("pba", {"Demographic Information": "A nurse."}, "no profile for PBA"),
        ("ica", {"Demographic Information": 5}, "expected a string, got int"),
        ("ica", {"Preference Direction": [0.5] * 90}, "no persona"),
        ("pba", {"profile": "x"}, "unknown preference label"),
    ],
)
def test_cli_generate_persona_problems_are_one_line(
    tiny_hf_checkpoints, tmp_path, capsys, method, persona, needle
):
    """A persona the method cannot use is refused before the model loads, naming the file."""
    argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--prompt", "x", "--method", method]
    path = tmp_path / "persona.json"
    if persona is not None:
        path.write_text(json.dumps(persona))
        argv += ["--persona", str(path)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignx: error:") and needle in err[0], err
    if persona is not None:
        assert str(path) in err[0]


def test_cli_generate_warns_that_method_none_reads_no_persona(tiny_hf_checkpoints, tmp_path, capsys):
    path = tmp_path / "persona.json"
    path.write_text(json.dumps({"Demographic Information": "A nurse."}))
    argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--prompt", "x", "--persona", str(path)]
    assert main([*argv, "--max-new-tokens", "2", "--greedy"]) == 0
    err = capsys.readouterr().err
    assert f"alignx: warning: --persona {path} is not read with --method none" in err


def test_greedy_batch_of_8_left_padded_matches_transformers(tiny_hf_checkpoints, llama, tok):
    """Eight prompts of different lengths (left padding of 0..~20 tokens, over a 32-token bucket)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        tiny_hf_checkpoints["llama"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    words = ["the", "student", "explains", "why", "the", "teacher", "prefers", "music", "theory", "to"]
    words += ["the", "history", "of", "science"]
    prompts = [tok(" ".join(words[: 2 + 2 * i]))["input_ids"] for i in range(8)]
    assert len({len(p) for p in prompts}) >= 6 and max(map(len, prompts)) - min(map(len, prompts)) >= 10
    ours = generate(llama, tok, prompts, max_new_tokens=12, greedy=True, stop_ids=NO_STOP)
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    with torch.no_grad():
        ref = hf.generate(
            **enc, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )[:, enc["input_ids"].shape[1] :].tolist()
    assert ours == ref


SHARDED = """
import json, sys
import jax
from alignx_jax.generate import generate, load_model_and_tokenizer

model, tok = load_model_and_tokenizer(sys.argv[1])
emb = model.embed_tokens.embedding.get_value()
prompts = json.loads(sys.argv[2])
out = generate(model, tok, prompts, max_new_tokens=12, greedy=True, stop_ids=[9999])
print(json.dumps({"devices": len(emb.sharding.device_set), "tokens": out}))
"""


def test_generate_loads_sharded_over_the_devices_and_matches_one_device(tiny_hf_checkpoints, llama, tok):
    """`alignx generate` places the params over every local device (FSDP): the same greedy tokens."""
    import subprocess
    import sys

    prompts = _prompts(tok)
    env = cli_env(devices=4)
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, tiny_hf_checkpoints["llama"], json.dumps(prompts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4  # the embedding really is spread over the 4 devices
    one = generate(llama, tok, prompts, max_new_tokens=12, greedy=True, stop_ids=NO_STOP)
    assert res["tokens"] == one


def test_cli_matmul_precision_reaches_the_generation_program(
    tiny_hf_checkpoints, llama, tok, capsys, monkeypatch
):
    """`--matmul-precision highest` is the level JAX reads when the generation program is traced; on a CPU
    float32 is multiplied in full either way: the same tokens."""
    from alignx_jax import generate as gen

    seen = []
    original = gen._generate

    def spy(*a, **k):
        seen.append(jax.config.jax_default_matmul_precision)  # read at trace time
        return original(*a, **k)

    monkeypatch.setattr(gen, "_generate", spy)
    gen._generate_program.cache_clear()  # a program jitted earlier would not call the spy
    try:
        argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--prompt", "Tell me about owls"]
        code = main([*argv, "--max-new-tokens", "6", "--greedy", "--json", "--matmul-precision", "highest"])
    finally:
        gen._generate_program.cache_clear()
    assert code == 0
    assert seen and set(seen) == {"highest"}
    got = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    want = generate(llama, tok, [got["prompt_ids"]], max_new_tokens=6, greedy=True)[0]
    assert got["token_ids"] == want


def test_benchmark_rows_record_the_resolved_dtype(tiny_hf_checkpoints, tmp_path):
    """`alignx generate --benchmark` recorded `"dtype": null` (no --dtype) or `"auto"` in each row's
    settings: it records the dtype the model loads in, read before any model loads (a resume compares it)."""
    from alignx_jax.generate import _resolved_dtype
    from alignx_jax.hardware import resolve_dtype

    hf = tiny_hf_checkpoints["llama"]
    assert _resolved_dtype(hf, None) == "float32"  # an HF folder's default
    assert _resolved_dtype(hf, "bfloat16") == "bfloat16"
    assert _resolved_dtype(hf, "auto") == resolve_dtype("auto") != "auto"
    ck = str(tmp_path / "ck")
    assert main(["import", "--hf", hf, "--out", ck, "--dtype", "bfloat16"]) == 0
    assert _resolved_dtype(ck, None) == "bfloat16"  # a checkpoint's default: its stored dtype
    assert _resolved_dtype(ck, "float32") == "float32"
    from alignx_jax.models.checkpoint import load_checkpoint

    assert str(load_checkpoint(ck).cfg.dtype) == "bfloat16"


def test_benchmark_resolves_the_model_path_once(tiny_hf_checkpoints, tmp_path, monkeypatch, capsys):
    """`generate --benchmark` resolves --model once (a hub id's snapshot, a gs:// folder's copy): the dtype
    its rows record, the trained prompt format and the load all read the folder it gives; a rerun with every
    row generated still reads the dtype and format for its check, and loads no model."""
    import os
    import shutil

    from alignx_jax import generate as gen
    from alignx_jax import real_model
    from alignx_jax import tokenizer as tokenizer_lib
    from alignx_jax.models import presets

    trained = tmp_path / "trained"
    shutil.copytree(tiny_hf_checkpoints["llama"], trained)
    (trained / "alignx_export.json").write_text(json.dumps({"files": [], "prompt_format": "chat"}))
    hf = str(trained)
    asked, loaded, tokenizers = [], [], []
    real_resolve, real_load = presets.resolve_model_path, gen.load_model

    def resolve(p, **kw):  # "alias" stands for a path that resolves elsewhere, as a hub id does
        asked.append(p)
        return hf if p == "alias" else real_resolve(p, **kw)

    for module in (presets, real_model):
        monkeypatch.setattr(module, "resolve_model_path", resolve)
    monkeypatch.setattr(gen, "load_model", lambda p, *a, **kw: loaded.append(p) or real_load(p, *a, **kw))
    real_tokenizer = tokenizer_lib.load_tokenizer
    monkeypatch.setattr(
        tokenizer_lib,
        "load_tokenizer",
        lambda p, *a, **kw: tokenizers.append(p) or real_tokenizer(p, *a, **kw),
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "..", "shared", "benchmarks", "p-soups", "student_phd.json")
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", "alias", "--benchmark", f"p-soups={bench}", "--method", "ica"]
    argv += ["--out", str(out), "--limit", "1", "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert asked.count("alias") == 1 and loaded == [hf], (asked, loaded)
    assert tokenizers == [hf]  # read once: the resume's prompt ids and the decoding share it
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    # read from the resolved folder: the HF folder's own dtype and its trained format (not the fallback paper)
    assert row["settings"]["dtype"] == "float32" and row["prompt_format"] == "chat", row
    asked.clear()
    loaded.clear()
    capsys.readouterr()
    assert main(argv) == 0 and "all 1 rows already generated" in capsys.readouterr().err
    assert asked == ["alias"] and loaded == []


def test_a_blank_benchmark_profile_is_refused_before_pba_loads_a_model(
    tiny_hf_checkpoints, tmp_path, monkeypatch, capsys
):
    """`generate --benchmark --method pba` rendered a blank `profile` as a prompt with no preferences; it is
    one line naming file, row and field before any model loads (ICA, which never reads it, generates)."""
    from alignx_jax import generate as gen

    rows = psoups_rows_with_a_blank_profile("")
    bench = tmp_path / "ps.json"
    bench.write_text(json.dumps(rows))
    loaded = []
    real_load = gen.load_model
    monkeypatch.setattr(gen, "load_model", lambda p, *a, **kw: loaded.append(p) or real_load(p, *a, **kw))
    argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--benchmark", f"p-soups={bench}"]
    argv += ["--max-new-tokens", "1"]
    assert main([*argv, "--method", "pba", "--out", str(tmp_path / "pba.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bench}, row 1, field 'profile': is empty" in err[0], err
    assert loaded == []
    assert main([*argv, "--method", "ica", "--out", str(tmp_path / "ica.jsonl")]) == 0
    assert len((tmp_path / "ica.jsonl").read_text().splitlines()) == 2
    # beside a golden direction (read first) a blank profile is not read: no refusal
    with_direction = dict(rows[1], **{"Preference Direction": [0.5] * 89 + [1.0]})
    gen._check_profiles(types.SimpleNamespace(rows=[with_direction], picks=[0], places=[(str(bench), 1)]))


@pytest.mark.parametrize("mode", ["--prompt", "--benchmark"])
@pytest.mark.parametrize("dtype", [[], ["--dtype", "float32"]])
def test_a_missing_model_names_the_flag_as_eval_does(mode, dtype, tmp_path, capsys):
    """A --model that names nothing is eval's one line, naming the flag and the path once, before any --out
    file is opened (with --dtype the load was reached after the empty file had been made)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "..", "shared", "benchmarks", "p-soups", "student_phd.json")
    missing = str(tmp_path / "nope")
    argv = ["generate", "--model", missing, *dtype, "--max-new-tokens", "2"]
    if mode == "--prompt":
        argv += ["--prompt", "Hi"]
    else:
        argv += ["--benchmark", f"p-soups={bench}", "--out", str(tmp_path / "gen.jsonl"), "--limit", "1"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == f"alignx: error: --model: model folder not found: {missing}"
    assert os.listdir(tmp_path) == []


def test_rows_recorded_with_a_null_dtype_resume_as_the_models_own(tiny_hf_checkpoints, tmp_path, capsys):
    """Rows written before the resolved dtype was recorded hold `"dtype": null` (the model's own): a rerun
    without --dtype, or with the dtype null stood for, resumes them; another --dtype is refused."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "..", "shared", "benchmarks", "p-soups", "student_phd.json")
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--benchmark", f"p-soups={bench}"]
    argv += ["--method", "ica", "--out", str(out), "--limit", "1", "--max-new-tokens", "2"]
    assert main(argv) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    row["settings"]["dtype"] = None  # as an older alignx wrote it
    out.write_text(json.dumps(row) + "\n")
    for extra in ([], ["--dtype", "float32"]):
        capsys.readouterr()
        assert main(argv + extra) == 0 and "all 1 rows already generated" in capsys.readouterr().err
    capsys.readouterr()
    assert main(argv + ["--dtype", "bfloat16"]) == 1
    err = capsys.readouterr().err
    assert "dtype 'float32', now 'bfloat16'" in err and len(err.strip().splitlines()) == 1, err


def test_a_resume_compares_the_rendered_prompt_ids(tiny_hf_checkpoints, tmp_path, monkeypatch, capsys):
    """A resume compared method, format, task prompt and settings, not the PBA profile a row's prompt shows:
    rows written under another profile rule (or another file's profiles under the same name) resumed
    silently. Each row records its prompt ids' hash; a rerun that renders other ids is one line naming the row,
    before any model loads; the same rendering resumes."""
    from alignx_jax import generate as gen
    from alignx_jax.data import prompts as prompts_lib

    rows = [{"prompt": f"task {i}", "chosen": "a", "rejected": "b", "profile": "Concise"} for i in range(2)]
    bench = tmp_path / "uf.json"
    bench.write_text(json.dumps(rows))
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--benchmark", f"uf-p-4={bench}"]
    argv += ["--method", "pba", "--out", str(out), "--max-new-tokens", "1", "--greedy"]
    assert main(argv) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["prompt_ids_sha256"] for r in written}) == 2  # the task is part of the prompt ids
    capsys.readouterr()
    assert main(argv) == 0 and "all 2 rows already generated" in capsys.readouterr().err
    loaded = []
    real_load = gen.load_model
    monkeypatch.setattr(gen, "load_model", lambda p, *a, **kw: loaded.append(p) or real_load(p, *a, **kw))
    real_resolve = prompts_lib.resolve_profile
    for change in ("rule", "file"):
        with monkeypatch.context() as m:
            if change == "rule":  # another profile rule renders the same row otherwise
                m.setattr(
                    prompts_lib, "resolve_profile", lambda row, profile=None: real_resolve(row) + ", Formal"
                )
            else:
                bench.write_text(json.dumps([rows[0], {**rows[1], "profile": "Verbose"}]))
            assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        row = 0 if change == "rule" else 1
        assert len(err) == 1 and err[0].startswith(
            f"alignx: error: {out}: row {row} was generated from other "
        ), err
        assert "prompt token ids" in err[0] and "use a new --out file" in err[0], err
    assert loaded == [] and out.read_text().count("\n") == 2
    # rows of an older alignx hold no hash: compared as before, on method, format, prompt and settings
    out.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "prompt_ids_sha256"}) + "\n" for r in written)
    )
    assert main(argv) == 0 and "all 2 rows already generated" in capsys.readouterr().err


EVAL_ROW = {"benchmark": "p", "persona": None, "index": 0, "logp_chosen": -1.0, "logp_rejected": -2.0}
GENERATE_ROW = {"benchmark": "p", "persona": None, "index": 0, "id": 0, "method": "ica", "output": "hi"}


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_row_file_inside_the_benchmark_folder_is_refused(command, tiny_hf_checkpoints, tmp_path, capsys):
    """generate --out and eval --per-example append rows: inside the --benchmark folder they would be read as
    one of its data files by the next eval or generate of it; refused by name in one line, nothing made."""
    import os
    import shutil

    from alignx_jax.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = tmp_path / "bench"
    folder.mkdir()
    shutil.copy(os.path.join(root, "..", "shared", "benchmarks", "p-soups", "student_phd.json"), folder)
    rows = folder / "rows.jsonl"
    argv = [
        command,
        "--model",
        tiny_hf_checkpoints["llama"],
        "--benchmark",
        f"p-soups={folder}",
        "--limit",
        "1",
    ]
    if command == "generate":
        argv += ["--out", str(rows), "--max-new-tokens", "2"]
    else:
        argv += ["--out", str(tmp_path / "r.json"), "--per-example", str(rows)]
    flag = "--out" if command == "generate" else "--per-example"
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {rows} lies inside the --benchmark p-soups folder {folder}" in err[0], (
        err
    )
    assert sorted(p.name for p in folder.iterdir()) == ["student_phd.json"]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_one_commands_row_file_is_refused_by_the_other(command, tiny_hf_checkpoints, tmp_path, capsys):
    """generate --out and eval --per-example append to a file of their own rows only: the other command's
    file is refused in one line naming the flag and the file, before the model loads, and left
    byte-identical (rows of two kinds in one file are neither command's)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = tmp_path / "bench.json"
    bench.write_bytes(
        open(os.path.join(root, "..", "shared", "benchmarks", "p-soups", "student_phd.json"), "rb").read()
    )
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text(json.dumps(EVAL_ROW if command == "generate" else GENERATE_ROW) + "\n")
    before = theirs.read_bytes()
    flag = "--out" if command == "generate" else "--per-example"
    model = tiny_hf_checkpoints["llama"]
    argv = [
        command,
        "--model",
        model,
        "--benchmark",
        f"p-soups={bench}",
        "--method",
        "ica",
        flag,
        str(theirs),
    ]
    if command == "eval":
        argv += ["--out", str(tmp_path / "r.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    other = "`alignx eval --per-example`" if command == "generate" else "`alignx generate --out`"
    assert len(err) == 1 and f"{flag} {theirs} holds {other} rows" in err[0], err
    assert theirs.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["bench.json", "theirs.jsonl"]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_split_folder_benchmark_is_refused_as_eval_refuses_it(
    command, tiny_hf_checkpoints, tmp_path, capsys
):
    """`alignx generate --benchmark NAME=DIR` on an `alignx data split` output generated for both halves (its
    training rows too) where `alignx eval` refuses the folder; both read benchmarks with eval's loader and
    refuse it in one line naming the half to score, before the model loads, writing nothing."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = json.load(open(os.path.join(root, "..", "shared", "benchmarks", "p-soups", "student_phd.json")))
    for half, part in (("train", rows[:4]), ("test", rows[300:304])):
        (tmp_path / "split" / half).mkdir(parents=True)
        (tmp_path / "split" / half / "rows.json").write_text(json.dumps(part))
    split = tmp_path / "split"
    out = tmp_path / ("gen.jsonl" if command == "generate" else "r.json")
    argv = [command, "--model", tiny_hf_checkpoints["llama"], "--benchmark", f"p-soups={split}", "--out", out]
    if command == "generate":
        argv += ["--method", "ica", "--max-new-tokens", "2"]
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the split folders train/, test/: name the one to score" in err[0], err
    assert f"{split}/test" in err[0] and not out.exists()


def test_a_benchmark_folders_file_of_no_rows_is_warned_as_eval_warns(tiny_hf_checkpoints, tmp_path, capsys):
    """`alignx generate --benchmark NAME=DIR` reads a folder with eval's loader: an empty .jsonl or a `[]` file
    in it is read without an error, named in one warning line each (as eval names it), and gives no rows."""
    folder = tmp_path / "uf"
    (folder / "sub").mkdir(parents=True)
    rows = [{"prompt": f"task {i}", "chosen": "a", "rejected": "b"} for i in range(2)]
    (folder / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "empty.jsonl").write_text("", encoding="utf-8")
    (folder / "sub" / "none.json").write_text("[]", encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--benchmark", f"uf-p-4={folder}"]
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--max-new-tokens", "2", "--greedy"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "holds no rows" in line]
    assert warned == [
        f"alignx: warning: {folder / name}: holds no rows; --benchmark uf-p-4={folder} generates for the "
        "folder's other files"
        for name in ("empty.jsonl", "sub/none.json")
    ]
    assert sorted(json.loads(line)["index"] for line in out.read_text().splitlines()) == [0, 1]


def test_a_resume_takes_its_model_in_any_spelling(tmp_path):
    """A --benchmark file's rows record their model by place: a gs:// folder recorded with its trailing
    '/' (as earlier versions wrote it) or a local folder through a link is the same model; another is not."""
    from alignx_jax.generate import _model_identity, _other_job

    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    done = {"method": "none", "prompt_format": "paper", "prompt": "p"}
    job = {"method": "none", "fmt": "paper", "prompt": "p", "where": "row 0"}
    for recorded, given in (
        ("gs://b/m/", "gs://b/m"),
        ("gs://b/m", "gs://b/m/"),
        (str(tmp_path / "m"), "link"),
    ):
        settings = _model_identity(str(tmp_path / given) if given == "link" else given, "float32")
        assert (
            _other_job(
                {**done, "settings": {"model": recorded, "dtype": "float32"}}, settings=settings, **job
            )
            is None
        )
    other = _model_identity("gs://b/other/", "float32")
    assert other["model"] == "gs://b/other"
    said = _other_job({**done, "settings": {"model": "gs://b/m/", "dtype": "float32"}}, settings=other, **job)
    assert said == "with other settings (model 'gs://b/m', now 'gs://b/other')"


def test_a_benchmark_resume_drops_a_last_row_cut_at_any_byte(tiny_hf_checkpoints, tmp_path, capsys):
    """A kill mid-write may leave any head of --out's last row, down to its `{` alone (which was refused
    as a line that is not a row, so the run could not resume): the head is dropped and the row generated
    again, as an uninterrupted run wrote it."""
    from alignx_jax.evaluate import PerExampleLog

    rows = [{"prompt": f"task {i}", "chosen": "a", "rejected": "b"} for i in range(2)]
    bench = tmp_path / "uf.json"
    bench.write_text(json.dumps(rows))
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", tiny_hf_checkpoints["llama"], "--benchmark", f"uf-p-4={bench}"]
    argv += ["--out", str(out), "--max-new-tokens", "2", "--greedy"]
    assert main(argv) == 0
    full = out.read_bytes()
    first, last = full.splitlines(keepends=True)
    for cut in range(1, len(last) - 1):  # every head of the last row short of its closing brace
        out.write_bytes(first + last[:cut])
        log = PerExampleLog(str(out), flag="--out", kind="generate")
        log.close()
        assert [k[2] for k in log.rows] == [json.loads(first)["index"]], last[:cut]
        assert out.read_bytes() == first, last[:cut]
    out.write_bytes(first + b"{")
    capsys.readouterr()
    assert main(argv) == 0
    assert "1 rows generated, 2 in all" in capsys.readouterr().out
    assert out.read_bytes() == full
