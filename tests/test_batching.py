"""DPO examples (ids, truncation, drop), length buckets and the collated batch layout."""

from __future__ import annotations

import os

import numpy as np
import pytest

from alignx_jax.data import batching, persona, prompts
from alignx_jax.data.batching import DPOExample
from alignx_jax.errors import ConfigError, DataError

TOKENIZER_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alignx_jax", "assets", "tokenizer"
)


@pytest.fixture(scope="module")
def tok():
    if not os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        pytest.skip("shipped tokenizer not built")
    try:
        from alignx_jax.tokenizer import load_tokenizer
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return load_tokenizer()


def row(prompt="Plan my weekend.", chosen="Go hiking in the hills.", rejected="Stay in.", direction=True):
    d = np.full(90, 0.5)
    d[[2, 50]] = [1, 0]
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "Preference Direction": d.tolist() if direction else None,
        "Demographic Information": "Retired teacher.",
        "User-Generated Content": [
            {"prompt": f"post {i}", "comment": f"comment {i}", "Preference Direction": None} for i in range(4)
        ],
        "Pair-wise Comparative Feedback": [
            {"prompt": "Pets?", "chosen": "Dogs.", "rejected": "None.", "Preference Direction": None}
        ],
    }


def words(n: int, word: str = "science") -> str:
    return " ".join([word] * n)


def test_response_ids(tok):
    ids = batching.response_ids(tok, "Go hiking.")
    assert ids[-1] == tok.eos_token_id and tok.bos_token_id not in ids
    assert ids[:-1] == tok("Go hiking.", add_special_tokens=False)["input_ids"]


def test_example_that_fits(tok):
    r = row()
    ex = batching.make_example(tok, r, method="ica", max_length=512, index=3)
    assert ex.prompt_ids == prompts.prompt_ids(tok, r, method="ica")
    assert ex.chosen_ids == batching.response_ids(tok, r["chosen"])
    assert ex.rejected_ids == batching.response_ids(tok, r["rejected"])
    assert not ex.truncated and ex.index == 3 and ex.persona_ids is None
    assert ex.direction.dtype == np.float32 and ex.direction[2] == 1 and ex.direction[50] == 0
    assert ex.length == len(ex.prompt_ids) + len(ex.chosen_ids)
    assert batching.make_example(tok, row(direction=False), method="none", max_length=512).direction is None


def test_prompt_left_truncation(tok):
    r = row(prompt=words(300))
    full = prompts.prompt_ids(tok, r, method="none")
    ex = batching.make_example(tok, r, method="none", max_length=128)
    longest = max(len(ex.chosen_ids), len(ex.rejected_ids))
    assert ex.truncated and len(ex.prompt_ids) + longest == 128
    assert ex.prompt_ids == full[-len(ex.prompt_ids) :]  # the end (assistant header) survives
    assert ex.chosen_ids == batching.response_ids(tok, r["chosen"])  # short responses untouched
    assert batching.make_example(tok, r, method="none", max_length=128, overflow="drop") is None
    assert batching.make_example(tok, row(), method="none", max_length=128, overflow="drop") is not None


def test_response_left_truncation(tok):
    r = row(chosen=words(400, "music"))
    ex = batching.make_example(tok, r, method="none", max_length=128)
    full = batching.response_ids(tok, r["chosen"])
    budget = 128 - batching.reserve(128)
    assert ex.truncated and len(ex.chosen_ids) == budget + 1 and ex.chosen_ids[-1] == tok.eos_token_id
    assert ex.chosen_ids[:-1] == full[:-1][-budget:]
    assert len(ex.prompt_ids) + len(ex.chosen_ids) <= 128
    assert ex.prompt_ids == prompts.prompt_ids(tok, r, method="none")[-len(ex.prompt_ids) :]


def test_eval_mode_release_rule(tok):
    assert batching.reserve(1100) == 513 and batching.reserve(8192) == 513 and batching.reserve(64) == 32
    r = row(prompt=words(900), chosen=words(900, "music"))
    ex = batching.make_example(tok, r, method="ica", max_length=1100, eval_mode=True, prompt_format="paper")
    full_prompt = prompts.prompt_ids(tok, r, method="ica", fmt="paper")
    full_chosen = batching.response_ids(tok, r["chosen"])[:-1]
    assert len(full_prompt) > 587 and len(full_chosen) > 587
    # the prompt string's ids are truncated, then the BOS put back in front (the release keeps its BOS)
    assert ex.prompt_ids == [tok.bos_token_id] + full_prompt[1:][-587:]
    assert ex.chosen_ids == full_chosen[-587:] + [tok.eos_token_id]
    assert ex.rejected_ids == batching.response_ids(tok, r["rejected"]) and ex.truncated
    short = batching.make_example(tok, row(), method="ica", max_length=1100, eval_mode=True)
    assert not short.truncated


def test_eval_mode_truncated_flag_counts_only_what_was_cut(tok):
    """A paper prompt of BOS + exactly L - reserve(L) ids is not cut (the BOS is put back in front, outside
    the budget) but was flagged truncated, and `alignx eval` counted the row as cut to --max-length."""
    r = row()
    full = prompts.prompt_ids(tok, r, method="ica", fmt="paper")
    fits = 2 * (len(full) - 1)  # budget = L - L // 2 = len(full) - 1: the body exactly
    assert batching.reserve(fits) == fits // 2 and len(batching.response_ids(tok, r["chosen"])) < fits // 2
    ex = batching.make_example(tok, r, method="ica", max_length=fits, eval_mode=True, prompt_format="paper")
    assert ex.prompt_ids == full and not ex.truncated
    cut = batching.make_example(
        tok, r, method="ica", max_length=fits - 2, eval_mode=True, prompt_format="paper"
    )
    assert cut.prompt_ids == full[:1] + full[2:] and cut.truncated


def test_paper_training_prompt_keeps_its_bos_when_cut(tok):
    """A `paper` training prompt cut to fit keeps its BOS in front (BOS + the left-truncated rest), as
    evaluation does, and the pair still fits L; it lost the BOS to the left cut."""
    r = row(prompt=words(300))
    full = prompts.prompt_ids(tok, r, method="none", fmt="paper")
    ex = batching.make_example(tok, r, method="none", max_length=128, prompt_format="paper")
    longest = max(len(ex.chosen_ids), len(ex.rejected_ids))
    assert ex.truncated and len(full) + longest > 128
    assert ex.prompt_ids[0] == tok.bos_token_id and ex.prompt_ids.count(tok.bos_token_id) == 1
    assert ex.prompt_ids[1:] == full[-(len(ex.prompt_ids) - 1) :]
    assert len(ex.prompt_ids) + longest == 128


def suffix(ids: list[int], n: int) -> list[int]:
    """The last n ids (all of them when n >= len(ids), none when n <= 0)."""
    return ids[max(0, len(ids) - n) :] if n > 0 else []


def _expected_fit(prompt, chosen, rejected, L, fmt, overflow, eval_mode):
    """The module docstring's length rules, written out case by case (what `_fit` must return)."""
    budget = L - batching.reserve(L)
    if eval_mode:  # section 7: each part cut to the budget on its own; paper keeps its BOS outside it
        p = prompt[:1] + suffix(prompt[1:], budget) if fmt == "paper" else suffix(prompt, budget)
        return p, suffix(chosen, budget), suffix(rejected, budget)
    if fmt == "release":  # dropped only for the prompt's own length; else the heads kept, EOS last
        if len(prompt) >= L - 2:
            if overflow == "drop":
                return None
            prompt = suffix(prompt, budget)
        room = L - len(prompt) - 1
        return prompt, chosen[:room], rejected[:room]
    if len(prompt) + max(len(chosen), len(rejected)) + 1 <= L:  # fits: untouched
        return prompt, chosen, rejected
    if overflow == "drop":
        return None
    chosen, rejected = suffix(chosen, budget), suffix(rejected, budget)
    room = L - max(len(chosen), len(rejected)) - 1
    p = prompt[:1] + suffix(prompt[1:], room - 1) if fmt == "paper" else suffix(prompt, room)
    return p, chosen, rejected


@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("overflow", batching.OVERFLOW_POLICIES)
@pytest.mark.parametrize("fmt", ["chat", "paper", "release"])
def test_fit_keeps_the_documented_length_invariants(fmt, overflow, eval_mode):
    """Random prompt/response lengths at small L: every cut keeps what the module docstring says (the
    prompt's tail, paper's BOS in front, the response tail, or the release's heads), the pair fits L in
    training, and only the documented pairs are dropped."""
    rng = np.random.default_rng([len(fmt), overflow == "drop", eval_mode])
    BOS = 0
    for _ in range(300):
        L = int(rng.integers(16, 65))
        n_p, n_c, n_r = (int(n) for n in rng.integers(0, 2 * L, size=3))
        body = list(range(100, 100 + n_p))
        prompt = [BOS] + body if fmt == "paper" else body + [7]  # never empty; paper's ids start with BOS
        chosen, rejected = list(range(1000, 1000 + n_c)), list(range(3000, 3000 + n_r))
        got = batching._fit(
            prompt, chosen, rejected, max_length=L, prompt_format=fmt, overflow=overflow, eval_mode=eval_mode
        )
        want = _expected_fit(prompt, chosen, rejected, L, fmt, overflow, eval_mode)
        case = (L, len(prompt), n_c, n_r)
        if want is None:
            assert got is None, case
            continue
        assert got is not None, case
        p, c, r, truncated = got
        assert (p, c, r) == want, case
        assert truncated == ((p, c, r) != (prompt, chosen, rejected)), case
        if fmt == "paper":
            assert p[0] == BOS and p.count(BOS) == 1, case
        longest = max(len(c), len(r)) + 1  # + EOS
        if eval_mode:
            budget = L - batching.reserve(L)
            assert len(p) - (fmt == "paper") <= budget and longest - 1 <= budget, case
            continue
        assert len(p) + longest <= L, case
        # as one share_prompt row (each response with its EOS): within the bound the config check uses
        assert len(p) + len(c) + len(r) + 2 <= batching.shared_row_bound(L), case
        if truncated and fmt != "release":  # the prompt is cut no further than the fit needs
            assert len(p) == len(prompt) or len(p) + longest == L, case
        ex = DPOExample(prompt_ids=p, chosen_ids=c + [4], rejected_ids=r + [4])
        batch = batching.collate([ex], pad_id=5, buckets=(64,))
        last = batch["attention_mask"].sum(axis=1) - 1  # each row's last real token: its EOS
        assert batch["input_ids"][[0, 1], last].tolist() == [4, 4], case


def test_training_sample_and_persona_ids(tok):
    r = row()
    a = batching.make_example(
        tok, r, method="ica", max_length=512, rng=persona.row_rng(1, (0, 0)), persona_length=64
    )
    b = batching.make_example(
        tok, r, method="ica", max_length=512, rng=persona.row_rng(1, (0, 0)), persona_length=64
    )
    assert a.prompt_ids == b.prompt_ids and a.persona_ids == b.persona_ids
    assert a.persona_ids[0] == tok.bos_token_id and len(a.persona_ids) <= 64
    # The head input and the prompt see the same history sample.
    sample_u, sample_p = persona.sample_history(r, persona.row_rng(1, (0, 0)))
    block = persona.persona_text(r, "p", ugc=sample_u, pairs=sample_p)
    body = tok(block, add_special_tokens=False)["input_ids"]
    assert a.persona_ids[1:] == body[-63:]
    assert tok.decode(a.prompt_ids).count("*Comment:*") == len(sample_u)


@pytest.mark.parametrize("variant, shown, hidden", [("ugc", 0, 1), ("pair", 1, 0)])
def test_single_kind_variant_samples_only_its_kind_for_prompt_profile_and_head(tok, variant, shown, hidden):
    r = row()
    d_ugc, d_pair = np.full(90, 0.5), np.full(90, 0.5)
    d_ugc[0], d_pair[1] = 1, 1
    for item in r[persona.UGC_FIELD]:
        item[persona.DIRECTION_FIELD] = d_ugc.tolist()
    r[persona.PAIR_FIELD] = [
        {
            "prompt": f"Pets {i}?",
            "chosen": "Dogs.",
            "rejected": "None.",
            persona.DIRECTION_FIELD: d_pair.tolist(),
        }
        for i in range(4)
    ]
    # every item of the shown kind has one direction, so every sample's profile is that direction's text
    want_profile = persona.profile_text((d_ugc, d_pair)[shown])
    want_prompt = prompts.prompt_ids(tok, r, method="pba", persona=variant, profile=want_profile)
    header = (persona.UGC_HEADER, persona.PAIR_HEADER)[shown].strip()
    for index in range(40):
        rng = persona.row_rng(3, (0, index))
        ex = batching.make_example(
            tok,
            r,
            method="pba",
            persona=variant,
            max_length=1024,
            rng=rng,
            persona_length=512,
            pba_preference="history",
        )
        assert ex.prompt_ids == want_prompt, index
        head_text = tok.decode(ex.persona_ids[1:])
        assert header in head_text, index  # the head always sees a sample of the shown kind
        ica = tok.decode(
            batching.make_example(
                tok, r, method="ica", persona=variant, max_length=1024, rng=persona.row_rng(3, (0, index))
            ).prompt_ids
        )
        assert header in ica and (persona.UGC_HEADER, persona.PAIR_HEADER)[hidden].strip() not in ica, index


def test_bucket_length():
    assert batching.bucket_length(1, (8, 16)) == 8
    assert batching.bucket_length(8, (16, 8)) == 8
    assert batching.bucket_length(9, (8, 16)) == 16
    with pytest.raises(ConfigError, match="largest length bucket 16"):
        batching.bucket_length(17, (8, 16))


def test_collate_layout_exact():
    d = np.full(90, 0.5, np.float32)
    d[0] = 1
    ex1 = DPOExample([10, 11, 12], [20, 21, 4], [30, 4], direction=d, persona_ids=[0, 7, 8], index=5)
    ex2 = DPOExample(
        [13], [22, 4], [31, 32, 33, 4], direction=np.zeros(90, np.float32), persona_ids=[0], index=9
    )
    b = batching.collate([ex1, ex2], buckets=(8, 16), pad_id=99, num_pairs=3)
    P = 99
    np.testing.assert_array_equal(
        b["input_ids"],
        [
            [10, 11, 12, 20, 21, 4, P, P],  # chosen 1
            [13, 22, 4, P, P, P, P, P],  # chosen 2
            [P] * 8,  # dummy
            [10, 11, 12, 30, 4, P, P, P],  # rejected 1
            [13, 31, 32, 33, 4, P, P, P],  # rejected 2
            [P] * 8,  # dummy
        ],
    )
    np.testing.assert_array_equal(
        b["loss_mask"],
        [
            [0, 0, 0, 1, 1, 1, 0, 0],
            [0, 1, 1, 0, 0, 0, 0, 0],
            [0] * 8,
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0, 0],
            [0] * 8,
        ],
    )
    np.testing.assert_array_equal(
        b["attention_mask"],
        [
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(b["positions"][4], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(b["pair_mask"], [1, 1, 0])
    np.testing.assert_array_equal(b["index"], [5, 9, -1])
    for k, ex in enumerate([ex1, ex2]):  # scored tokens are exactly response + EOS
        assert b["input_ids"][k][b["loss_mask"][k] == 1].tolist() == ex.chosen_ids
        assert b["input_ids"][3 + k][b["loss_mask"][3 + k] == 1].tolist() == ex.rejected_ids
    assert b["direction"].shape == (3, 90) and b["direction"][0, 0] == 1 and b["direction"][1].sum() == 0
    assert np.all(b["direction"][2] == 0.5)
    np.testing.assert_array_equal(b["persona_ids"], [[0, 7, 8, P, P, P, P, P], [0] + [P] * 7, [P] * 8])
    np.testing.assert_array_equal(b["persona_mask"].sum(axis=1), [3, 1, 1])
    for key in ("input_ids", "attention_mask", "loss_mask", "positions", "pair_mask", "persona_ids"):
        assert b[key].dtype == np.int32
    stats = batching.padding_stats(b)
    assert stats["real_tokens"] == 6 + 3 + 5 + 5 and stats["total_tokens"] == 48
    assert stats["padded_tokens"] == 48 - 19 and stats["padded_pairs"] == 1 and stats["pairs"] == 2


def test_collate_options_and_errors(tok):
    plain = DPOExample([1, 2], [3, 4], [5, 4])
    b = batching.collate([plain], buckets=(4, 8), pad_id=0)
    assert b["input_ids"].shape == (2, 4) and "direction" not in b and "persona_ids" not in b
    with pytest.raises(ValueError, match="num_pairs"):
        batching.collate([plain, plain], buckets=(8,), pad_id=0, num_pairs=1)
    with_dir = DPOExample([1], [3, 4], [5, 4], direction=np.full(90, 0.5, np.float32))
    with pytest.raises(DataError, match="Preference Direction"):
        batching.collate([plain, with_dir], buckets=(8,), pad_id=0)
    # End to end with the tokenizer: a batch of real examples.
    exs = [
        batching.make_example(tok, row(), method=m, max_length=256, index=i)
        for i, m in enumerate(("none", "ica", "pba"))
    ]
    b = batching.collate(exs, buckets=(128, 256, 512), pad_id=tok.pad_token_id, num_pairs=4)
    assert b["input_ids"].shape == (8, 256)
    assert b["loss_mask"][:3].sum(axis=1).tolist() == [len(e.chosen_ids) for e in exs]
    assert b["loss_mask"][4:7].sum(axis=1).tolist() == [len(e.rejected_ids) for e in exs]


@pytest.mark.parametrize(
    "share,packing,compact,head,response_logits",
    [
        (False, False, 0, False, False),
        (False, False, 8, True, True),
        (True, False, 0, False, True),
        (True, False, 8, True, True),
        (True, True, 8, False, True),
    ],
)
def test_batch_builder_returns_one_typed_struct_per_layout(share, packing, compact, head, response_logits):
    """`BatchBuilder` gives a `TwoRowBatch` or a `SharedPromptBatch` (segment_ids when packed), with
    the optional parts (kept tokens, head inputs, response window, reference log-probs) None when off."""
    import jax

    from alignx_jax.batch import BatchBuilder, HeadInputs, KeptTokens, SharedPromptBatch, TwoRowBatch

    rng = np.random.default_rng(0)
    exs = [
        DPOExample(
            [int(x) for x in rng.integers(5, 50, size=3 + k)],
            [int(x) for x in rng.integers(5, 50, size=2 + k % 3)] + [4],
            [int(x) for x in rng.integers(5, 50, size=1 + k % 2)] + [4],
            direction=np.full(90, 0.5, np.float32),
            persona_ids=[1, 2, 3][: 1 + k % 3],
            index=k,
        )
        for k in range(6)
    ]
    coll = batching.collate(exs, buckets=(16, 32), pad_id=0, num_pairs=8)
    builder = BatchBuilder(
        num_micro=2,
        buckets=(16, 32),
        pad_id=0,
        batch_shards=1,
        head=head,
        response_logits=response_logits,
        share=share,
        packing=packing,
        pack_length=32,
        compact=compact,
    )
    out, stats = builder(coll)
    assert type(out) is (SharedPromptBatch if share else TwoRowBatch)
    assert out.layout == ("packed" if packing else "shared_prompt" if share else "two_rows")
    assert out.num_micro == 2 and out.pair_mask.shape == (2, 4)
    assert out.ref_logps is None and out.slot is None  # added by the loop, never by the builder
    assert isinstance(out.tokens, KeptTokens) if compact else out.tokens is None
    assert isinstance(out.head, HeadInputs) if head else out.head is None
    if head:
        assert out.head.persona_ids.shape[:2] == (2, 4) and out.head.direction.shape == (2, 4, 90)
    if share:
        assert (out.segment_ids is not None) == packing and out.score_count.shape == (2, 4, 2)
        assert out.score_flat.shape == out.score_valid.shape and out.score_flat.shape[0] == 2
    else:
        assert out.input_ids.shape[:3] == (2, 4, 2)
        assert (out.score_index is not None) == response_logits
    assert 0.0 <= stats["computed_padding_fraction"] < 1.0
    # a pytree: None parts have no leaves; one microbatch drops the leading axis; replace adds a part
    leaves = jax.tree.leaves(out)
    assert all(x.shape[0] == 2 for x in leaves)
    mb = out.microbatch(1)
    assert type(mb) is type(out) and all(x.shape == y.shape[1:] for x, y in zip(jax.tree.leaves(mb), leaves))
    ref = out.replace(ref_logps=np.zeros((2, 4, 2), np.float32))
    assert len(jax.tree.leaves(ref)) == len(leaves) + 1
    assert len(jax.tree.leaves(ref.model_inputs())) == len(leaves) - (3 if head else 0)


@pytest.mark.parametrize("share", [False, True])
def test_a_batch_without_a_real_pair_still_carries_the_head_inputs(share):
    """Joint PBA: a batch whose rows were all dropped (or a shorter shard's last one-pass batch) gets
    dummy head inputs, like the other processes' batches (it raised alone, the others hung)."""
    from alignx_jax.batch import BatchBuilder

    coll = batching.collate([], buckets=(16,), pad_id=0, num_pairs=4)
    assert "persona_ids" not in coll
    builder = BatchBuilder(
        num_micro=1, buckets=(16,), pad_id=0, batch_shards=1, head=True, response_logits=False, share=share
    )
    out, _ = builder(coll)
    assert out.head.persona_ids.shape[:2] == (1, 4) and int(out.pair_mask.sum()) == 0
    np.testing.assert_array_equal(out.head.direction, np.full((1, 4, 90), 0.5, np.float32))


def test_to_global_lays_a_process_rows_over_its_batch_shards_in_order():
    """A process's part of the pair/row axis is its batch shards, ascending (one block on a CPU mesh,
    interleaved with the other hosts' on a TPU pod's): local index -> global index."""
    from alignx_jax.batch import to_global

    local = np.arange(8)
    np.testing.assert_array_equal(to_global(local, 8, ()), local)  # one process
    # process 1 of 2 holding shards 4-7 of 8 as one block: its rows follow process 0's 8
    np.testing.assert_array_equal(to_global(local, 8, (4, 5, 6, 7)), local + 8)
    # interleaved: shards 1, 3, 5, 7 of 8, two rows each
    np.testing.assert_array_equal(to_global(local, 8, (1, 3, 5, 7)), [2, 3, 6, 7, 10, 11, 14, 15])
