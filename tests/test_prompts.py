"""Prompt text for none/ica/pba and their token ids (chat and paper).

The templates are those of docs/method.md sections 4, 5 and 7; one test compares them char for char
with the authors' file ../shared/alignx/METHOD.md and is skipped when that file is absent.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from alignx_jax.data import persona, prompts
from alignx_jax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = os.path.join(ROOT, "..", "shared", "alignx", "METHOD.md")
TOKENIZER_DIR = os.path.join(ROOT, "alignx_jax", "assets", "tokenizer")


def load_test_tokenizer():
    try:
        from alignx_jax.tokenizer import load_tokenizer
    except ImportError:  # the tokenizer module is another helper's; fall back to the shipped files
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return load_tokenizer()


@pytest.fixture(scope="module")
def tok():
    if not os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        pytest.skip("shipped tokenizer not built")
    return load_test_tokenizer()


def _method_spans() -> list[str]:
    with open(METHOD, encoding="utf-8") as f:
        text = f.read()
    # Markdown code spans; the document writes newlines as the two characters backslash-n.
    return [s.replace("\\n", "\n") for s in re.findall(r"`([^`\n]*)`", text)]


needs_method = pytest.mark.skipif(not os.path.isfile(METHOD), reason="METHOD.md not present")


@needs_method
def test_templates_match_method_md_char_for_char():
    spans = _method_spans()
    assert prompts.SYSTEM_ICA in spans and prompts.SYSTEM_PBA in spans
    # the evaluation form (with `**Post:**`); section 6b's training form is the release's other input
    ica = [s for s in spans if s.startswith("***Task***\n\n**Post:**") and "Historical Behavior" in s]
    pba = [s for s in spans if s.startswith("***Task***\n\n**Post:**") and "***User Preferences***" in s]
    assert len(ica) == 1 and len(pba) == 1
    assert ica[0].replace("{ugc}{pairs}{demographics}", "{persona}") == prompts.ICA_USER
    assert pba[0] == prompts.PBA_USER
    assert persona.UGC_HEADER in spans and persona.PAIR_HEADER in spans
    paper = [s for s in spans if s.startswith("<|start_header_id|>")]
    assert "".join(paper) == prompts.PAPER_TEMPLATE


ROW = {
    "prompt": "Plan my weekend.",
    "chosen": "Go hiking.",
    "rejected": "Stay in.",
    "Preference Direction": None,
    "Demographic Information": "Retired teacher.",
    "User-Generated Content": [
        {"prompt": "Best trail?", "comment": "The ridge walk.", "Preference Direction": None}
    ],
    "Pair-wise Comparative Feedback": [
        {"prompt": "Pets?", "chosen": "Dogs.", "rejected": "None.", "Preference Direction": None}
    ],
}


def test_user_messages_exact():
    ica = prompts.user_message(ROW, method="ica")
    assert ica == (
        "***Task***\n\n**Post:**\nPlan my weekend.\n\n***Historical Behavior and User Preferences***\n\n"
        "**This person has commented on some posts:**\n\n1. *Post:*\nBest trail?\n\n*Comment:*\n"
        "The ridge walk.\n\n**This person has chosen or rejected comments on some posts:**\n\n"
        "1. *Post:*\nPets?\n\n*Chosen:*\nDogs.\n\n*Rejected:*\nNone.\n\nRetired teacher."
        "\n\n***Response:***\n\n"
    )
    demo = prompts.user_message(ROW, method="ica", persona="demo")
    assert "Retired teacher.\n\n***Response:***" in demo and "commented" not in demo
    assert (
        prompts.user_message(ROW, method="none")
        == "***Task***\n\n**Post:**\nPlan my weekend.\n\n***Response:***\n\n"
    )
    assert prompts.user_message(ROW, method="pba", profile="Older, Likes travel") == (
        "***Task***\n\n**Post:**\nPlan my weekend.\n\n***User Preferences***\n\nOlder, Likes travel"
        "\n\n***Response:***\n\n"
    )
    assert prompts.system_message("ica") == prompts.SYSTEM_ICA
    assert prompts.system_message("pba") == prompts.SYSTEM_PBA
    assert prompts.system_message("none") == prompts.SYSTEM_NONE != prompts.SYSTEM_ICA
    with pytest.raises(DataError, match="unknown method"):
        prompts.system_message("sft")


def test_pba_profile_precedence():
    golden = np.full(90, 0.5)
    golden[0] = 0
    hist = np.full(90, 0.5)
    hist[73] = 1
    row = dict(ROW, **{"Preference Direction": golden.tolist()})
    row["User-Generated Content"] = [
        dict(ROW["User-Generated Content"][0], **{"Preference Direction": hist.tolist()})
    ]
    vec = np.full(90, 0.5)
    vec[1] = 1
    assert prompts.resolve_profile(row, vec) == "Female"
    assert prompts.resolve_profile(row, "free text") == "free text"
    # the golden P~ is the row's direction: a `profile` beside it (UF-P-4's shape) is not read
    assert prompts.resolve_profile(dict(row, profile="Likes art"), None) == "Older"
    no_direction = dict(row, **{"Preference Direction": None})
    assert prompts.resolve_profile(dict(no_direction, profile="Likes art"), None) == "Likes art"
    assert prompts.resolve_profile(row) == "Older"
    assert prompts.resolve_profile(dict(row, **{"Preference Direction": None})) == "Likes humor"
    with pytest.raises(DataError, match="needs a profile"):
        prompts.resolve_profile(ROW)
    # a blank `profile` read for a PBA prompt (no direction beside it) is one line naming the field
    for blank in ("", " \n"):
        with pytest.raises(DataError, match=r"^field 'profile': is empty: a PBA prompt would show no"):
            prompts.user_message(dict(no_direction, profile=blank), method="pba")
        # beside a direction the direction is read
        assert "Older" in prompts.user_message(dict(row, profile=blank), method="pba")
        assert ROW["prompt"] in prompts.user_message(dict(ROW, profile=blank), method="ica")  # not read


def test_ica_training_sampling_uses_rng():
    row = dict(ROW)
    row["User-Generated Content"] = [{"prompt": f"u{i}", "comment": "c"} for i in range(4)]
    row["Pair-wise Comparative Feedback"] = [
        {"prompt": f"p{i}", "chosen": "x", "rejected": "y"} for i in range(4)
    ]
    a = prompts.user_message(row, method="ica", rng=persona.row_rng(0, (0, 5)))
    b = prompts.user_message(row, method="ica", rng=persona.row_rng(0, (0, 5)))
    assert a == b
    variants = {prompts.user_message(row, method="ica", rng=persona.row_rng(0, (e, 5))) for e in range(20)}
    assert len(variants) > 5
    full = prompts.user_message(row, method="ica")
    assert all(f"u{i}" in full for i in range(4)) and all(f"p{i}" in full for i in range(4))


@pytest.mark.parametrize("variant, shown, hidden", [("ugc", "u", "p"), ("pair", "p", "u")])
def test_ica_training_sample_of_a_single_kind_variant_always_shows_history(variant, shown, hidden):
    row = dict(ROW)
    row["User-Generated Content"] = [{"prompt": f"u{i}", "comment": "c"} for i in range(4)]
    row["Pair-wise Comparative Feedback"] = [
        {"prompt": f"p{i}", "chosen": "x", "rejected": "y"} for i in range(4)
    ]
    header = persona.UGC_HEADER if variant == "ugc" else persona.PAIR_HEADER
    for index in range(200):
        text = prompts.user_message(row, method="ica", persona=variant, rng=persona.row_rng(0, (0, index)))
        shown_items = sum(f"{shown}{i}\n" in text for i in range(4))
        # the release rule over the shown kind: 1..4 of its items, never an empty history
        assert header in text and 1 <= shown_items <= 4, index
        assert not any(f"{hidden}{i}\n" in text for i in range(4)), index
    demo = prompts.user_message(row, method="ica", persona="demo", rng=persona.row_rng(0, (0, 1)))
    assert demo == prompts.user_message(row, method="ica", persona="demo")


def test_paper_prompt_ids(tok):
    ids = prompts.prompt_ids(tok, ROW, method="ica", fmt="paper")
    system, user = prompts.SYSTEM_ICA, prompts.user_message(ROW, method="ica")
    expected = (
        "<|start_header_id|>system<|end_header_id|>\n\n" + system + "\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + user + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>"
    )
    assert prompts.paper_prompt(system, user) == expected
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[1:] == tok(expected, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "<|begin_of_text|>" + expected
    # Special-token strings inside the text are single ids.
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.convert_tokens_to_ids("<|end_header_id|>")


def _tokenizer_without_headers(folder) -> object:
    """The shipped tokenizer less its <|start_header_id|> and <|end_header_id|> special tokens (as a
    tokenizer of another family has none)."""
    import json
    import shutil

    from alignx_jax.tokenizer import load_tokenizer

    shutil.copytree(TOKENIZER_DIR, folder)
    headers = {"<|start_header_id|>", "<|end_header_id|>"}
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in headers]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in headers]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(folder))


def test_paper_and_release_warn_once_where_the_tokenizer_lacks_the_headers(tok, tmp_path, capsys):
    """`paper`/`release` write Llama-3 header strings as text: with a tokenizer that has no such special
    tokens they became ordinary text tokens silently; one warning line per format names both and `chat`."""
    for fmt in ("paper", "release"):  # the shipped (Llama-3 style) tokenizer has them: nothing said
        prompts.prompt_ids(tok, ROW, method="ica", fmt=fmt)
    assert capsys.readouterr().err == ""
    other = _tokenizer_without_headers(tmp_path / "other")
    assert prompts.missing_headers(other) == ("<|start_header_id|>", "<|end_header_id|>")
    assert prompts.missing_headers(tok) == ()
    ids = prompts.prompt_ids(other, ROW, method="ica", fmt="paper")
    prompts.prompt_ids(other, ROW, method="none", fmt="paper")
    prompts.prompt_ids(other, ROW, method="ica", fmt="release")
    prompts.prompt_ids(other, ROW, method="ica", fmt="release")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    for line, fmt in zip(lines, ("paper", "release")):
        assert line.startswith(
            f"alignx: warning: prompt format {fmt!r} writes Llama-3 headers as text "
            f"(<|start_header_id|>, <|end_header_id|>) that tokenizer {tmp_path / 'other'} has no special "
            "tokens for: they become ordinary text tokens"
        ), line
        assert line.endswith("use prompt format 'chat' (the tokenizer's own template)"), line
    # a word-level vocabulary maps an unknown header to its one unk id: missing too
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "hi": 2}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", unk_token="<unk>")
    assert prompts.missing_headers(words) == prompts.HEADER_TOKENS
    # the prompt itself is as before: the headers tokenized as text
    assert ids[0] == other.bos_token_id and len(ids) > len(
        prompts.prompt_ids(tok, ROW, method="ica", fmt="paper")
    )


def test_chat_prompt_ids(tok):
    row = dict(ROW, profile="Older, Likes travel")
    ids = prompts.prompt_ids(tok, row, method="pba", fmt="chat")
    text = tok.decode(ids)
    assert ids[0] == tok.bos_token_id
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + prompts.SYSTEM_PBA
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        + prompts.user_message(row, method="pba")
        + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert prompts.prompt_ids(tok, row, method="none") != ids
    with pytest.raises(DataError, match="prompt format"):
        prompts.prompt_ids(tok, row, method="none", fmt="llama")


# Gemma's chat template in short: it refuses a system turn
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)


def test_chat_template_without_a_system_role_gets_the_system_text_in_the_user_turn():
    if not os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        pytest.skip("shipped tokenizer not built")
    tok = load_test_tokenizer()  # its own copy: the template is changed below
    tok.chat_template = NO_SYSTEM_TEMPLATE
    row = dict(ROW, profile="Older, Likes travel")
    for method, system in (("pba", prompts.SYSTEM_PBA), ("none", prompts.system_message("none"))):
        text = tok.decode(prompts.prompt_ids(tok, row, method=method, fmt="chat"))
        user = prompts.user_message(row, method=method)
        assert text == (
            f"<|begin_of_text|><start_of_turn>user\n{system}\n\n{user.strip()}<end_of_turn>\n<start_of_turn>model\n"
        )
    tok.chat_template = "{{ raise_exception('broken') }}"  # a template that fails either way still fails
    with pytest.raises(Exception, match="broken"):
        prompts.prompt_ids(tok, row, method="pba", fmt="chat")


def test_training_and_eval_take_one_golden_profile_from_a_row_holding_both(tok):
    """A UF-P-4-shaped row carries its golden `Preference Direction` and a `profile`: PBA training's 'golden'
    (`batching.make_example`) and `alignx eval --preference golden` (`golden_profile`) render the same P~,
    the direction (docs/method.md: the golden P~ is the row's own direction); training took the profile."""
    from alignx_jax.data.batching import make_example
    from alignx_jax.evaluate.profiles import golden_profile

    golden = np.full(90, 0.5)
    golden[0] = 0  # "Older"
    row = dict(ROW, **{"Preference Direction": golden.tolist()}, profile="Likes art")
    text, direction = golden_profile(row, (), file="uf.json", index=0)
    assert text == "Older" == prompts.resolve_profile(row)
    np.testing.assert_array_equal(direction, golden)
    trained = make_example(tok, row, method="pba", max_length=4096, prompt_format="paper")
    scored = make_example(tok, row, method="pba", max_length=4096, prompt_format="paper", profile=text)
    assert trained.prompt_ids == scored.prompt_ids
    user = prompts.user_message(row, method="pba")
    assert "***User Preferences***\n\nOlder\n\n" in user and "Likes art" not in user
    # the profile is the golden P~ only of a row with no direction (P-SOUPS)
    bare = dict(row, **{"Preference Direction": None})
    assert (
        golden_profile(bare, (), file="uf.json", index=0)[0] == "Likes art" == prompts.resolve_profile(bare)
    )
