"""The shipped tiny tokenizer: special tokens, chat template, byte-level round trips, rebuildability."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignx_jax.errors import CheckpointError
from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer, stop_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_tokens_are_llama3_style(tok):
    assert len(tok) == 4096
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|eot_id|>"  # as in Llama-3.1-Instruct
    assert tok.pad_token == "<|pad|>"
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|pad|>",
        ]
    }
    assert len(set(ids.values())) == 6 and all(i < 6 for i in ids.values())
    assert stop_token_ids(tok) == [ids["<|eot_id|>"]]  # no generation_config.json beside it: its eos alone
    # special-token strings inside text become their ids (the release's `paper` prompts rely on it)
    enc = tok("<|start_header_id|>user<|end_header_id|>", add_special_tokens=False)["input_ids"]
    assert enc[0] == ids["<|start_header_id|>"] and enc[-1] == ids["<|end_header_id|>"]


def test_bos_added_once_and_byte_level_round_trip(tok):
    text = "Héllo wörld — naïve café 123456 ☃ \n\tindent  two spaces"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    enc = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1


def test_domain_text_is_compressed(tok):
    # a BPE trained on the AlignX templates should spend few tokens on them
    sys_text = "Generate a task-specific response based on user historical behavior and preferences."
    assert len(tok(sys_text, add_special_tokens=False)["input_ids"]) < len(sys_text) / 3


def test_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))


def test_build_script_reproduces_shipped_files(tmp_path):
    # the shipped files were trained on a corpus that includes the P-SOUPS file's text
    build_script = os.path.join(ROOT, "scripts", "build_tokenizer.py")
    psoups = os.path.join(os.path.dirname(ROOT), "shared", "benchmarks", "p-soups", "student_phd.json")
    if not os.path.isfile(psoups):
        pytest.skip(f"{psoups} (part of the tokenizer's training corpus) is not present")
    assert os.path.isfile(build_script)
    out = tmp_path / "tok"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "build_tokenizer.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    built, shipped = {}, {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with (
            open(out / name, encoding="utf-8") as f,
            open(os.path.join(TINY_TOKENIZER_DIR, name), encoding="utf-8") as g,
        ):
            built[name], shipped[name] = json.load(f), json.load(g)
    assert built["tokenizer.json"] == shipped["tokenizer.json"]  # vocabulary, merges, special tokens
    # transformers 4.x restates the added tokens in tokenizer_config.json, 5.x names its backend there
    by_version = {"added_tokens_decoder", "extra_special_tokens", "backend"}
    a, b = built["tokenizer_config.json"], shipped["tokenizer_config.json"]
    assert set(a) ^ set(b) <= by_version, set(a) ^ set(b)
    assert {k: a[k] for k in set(a) & set(b)} == {k: b[k] for k in set(a) & set(b)}


def test_plain_fast_tokenizers_load_as_auto_tokenizer_would_and_without_torch(tiny_hf_checkpoints):
    """`load_tokenizer` skips AutoTokenizer (whose imports pull in torch) only for the class it resolves
    to anyway: the same class, ids, specials and chat template as AutoTokenizer's load."""
    from transformers import AutoTokenizer

    text = "Hello there <|eot_id|> world, 123"
    for path in (TINY_TOKENIZER_DIR, *tiny_hf_checkpoints.values()):
        ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert type(ours) is type(auto), path
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
        assert ours.all_special_ids == auto.all_special_ids and ours.chat_template == auto.chat_template
    probe = (
        "import sys; from alignx_jax.tokenizer import load_tokenizer; load_tokenizer(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def _word_tokenizer(folder, tokens: list[str], eos: str):
    """A one-word-per-token tokenizer folder with `tokens` as its vocabulary (ids in order) and `eos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=eos, unk_token=tokens[0]).save_pretrained(
        folder
    )
    return load_tokenizer(str(folder))


def test_stop_ids_are_the_tokenizers_eos_and_its_generation_config_eos(tmp_path):
    """No spelling is a stop token by name: a ChatML vocabulary that also holds Llama-3's `<|end_of_text|>`
    stops at its eos alone; a Gemma-like folder stops at its generation_config.json's eos ids too."""
    chatml = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "hi"]
    tok = _word_tokenizer(tmp_path / "chatml", chatml, "<|im_end|>")
    assert stop_token_ids(tok) == [2]
    gemma = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "hi"]
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    tok = _word_tokenizer(tmp_path / "gemma", gemma, "<eos>")
    assert stop_token_ids(tok) == [1, 4]
    (tmp_path / "gemma" / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert stop_token_ids(tok) == [1, 4]
    (tmp_path / "gemma" / "generation_config.json").write_text('{"eos_token_id": [1, "x"]}')
    with pytest.raises(CheckpointError, match="eos_token_id must be an id or a list of ids"):
        stop_token_ids(tok)
