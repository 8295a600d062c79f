"""PBA preference-vector head: shapes, loss, decision rule, metrics, I/O, two-stage and joint training."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.models import preference_head as ph
from alignx_jax.models.preference_head import (
    HEAD_CONFIG_FILE,
    HEAD_WEIGHTS_FILE,
    LABEL_VALUES,
    HeadConfig,
    PreferenceHead,
    direction_to_labels,
    head_loss,
    head_metrics,
    labels_to_direction,
    predict_direction,
)
from alignx_jax.pba import predict


@pytest.fixture(scope="module")
def tok():
    from alignx_jax.tokenizer import load_tokenizer

    return load_tokenizer()


def tiny_decoder(tok, hidden: int = 32, layers: int = 1, seed: int = 0):
    from alignx_jax.models.decoder import Decoder, DecoderConfig

    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Decoder(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def world():
    from alignx_jax.data.synth import generate_world

    return generate_world(48, 1, seed=3).rows


def _probs(*rows_of_triples) -> np.ndarray:
    """[B, 90, 3] probabilities: every dim (p_neg, p_neu, p_pos) = (0.1, 0.8, 0.1) unless given."""
    out = np.tile(np.array([0.1, 0.8, 0.1]), (len(rows_of_triples), 90, 1))
    for b, triples in enumerate(rows_of_triples):
        for dim, p in triples.items():
            out[b, dim] = p
    return out


# ----------------------------------------------------------------------------- shapes and labels


def test_label_order_and_conversions():
    assert LABEL_VALUES == (0.0, 0.5, 1.0)
    d = np.array([[0.0, 0.5, 1.0, 1.0]], np.float32)
    lab = direction_to_labels(d)
    np.testing.assert_array_equal(lab, [[0, 1, 2, 2]])
    np.testing.assert_array_equal(labels_to_direction(lab), d)
    np.testing.assert_array_equal(np.asarray(direction_to_labels(jnp.asarray(d))), [[0, 1, 2, 2]])


def test_the_head_and_the_personas_share_one_preference_space():
    """The head's dims and labels and data.persona's come from alignx_jax.preference_space, which reads
    the shipped asset in index order."""
    import json

    from alignx_jax import preference_space
    from alignx_jax.data import persona

    assert ph.NUM_DIMS == persona.NUM_DIMS == HeadConfig(embed_dim=8).num_dims == 90
    with open(preference_space.SPACE_PATH, encoding="utf-8") as f:
        dims = sorted(json.load(f)["dimensions"], key=lambda d: d["index"])
    assert ph.dimension_labels() == [(d["negative_label"], d["positive_label"]) for d in dims]
    assert preference_space.load_preference_space() == dims


def test_output_shape_axes_and_pooling():
    from alignx_jax.sharding import variable_axes

    cfg = HeadConfig(embed_dim=16, hidden=8, pooling="mean")
    head = PreferenceHead(cfg, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (3, 6, 16))
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    logits = head(h, mask)
    assert logits.shape == (3, 90, 3) and logits.dtype == jnp.float32
    axes = {n: variable_axes(getattr(head, n)) for n in ("w_in", "b_in", "w_out", "b_out")}
    assert axes == {
        "w_in": ("embed", "mlp"),
        "b_in": ("mlp",),
        "w_out": ("mlp", "pref_dims", "pref_classes"),
        "b_out": ("pref_dims", "pref_classes"),
    }
    # Mean pooling ignores padded positions: garbage there changes nothing.
    h2 = jnp.where(mask[..., None] == 1, h, 1e3)
    np.testing.assert_allclose(head(h2, mask), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.pool(h, mask)[0], h[0, :3].mean(0), rtol=1e-5)
    # 'last' takes the last attended position, for right (rows 0, 1) and left (row 2) padding.
    last = PreferenceHead(HeadConfig(embed_dim=16, hidden=8, pooling="last"), rngs=nnx.Rngs(0))
    pooled = last.pool(h, mask)
    np.testing.assert_array_equal(pooled, jnp.stack([h[0, 2], h[1, 5], h[2, 5]]))
    with pytest.raises(ConfigError):
        HeadConfig(embed_dim=16, pooling="max")


# ----------------------------------------------------------------------------- loss


def test_head_loss_weights_mask_and_focal():
    logits = jax.random.normal(jax.random.key(0), (4, 90, 3))
    d = np.full((4, 90), 0.5, np.float32)
    d[:, :5] = 1.0
    d[:, 5:8] = 0.0
    ce = head_loss(logits, d)
    logp = jax.nn.log_softmax(logits, -1)
    manual = -jnp.take_along_axis(logp, direction_to_labels(jnp.asarray(d))[..., None], -1).mean()
    np.testing.assert_allclose(ce, manual, rtol=1e-6)
    # A masked row contributes nothing: same as dropping it.
    np.testing.assert_allclose(
        head_loss(logits, d, mask=np.array([1, 1, 0, 0])), head_loss(logits[:2], d[:2]), rtol=1e-6
    )
    # Class weights: up-weighting only neutral moves the loss towards the neutral entries' mean.
    nll = -jnp.take_along_axis(logp, direction_to_labels(jnp.asarray(d))[..., None], -1)[..., 0]
    neutral_mean = nll[:, 8:].mean()
    w = head_loss(logits, d, class_weights=(1e-6, 1.0, 1e-6))
    np.testing.assert_allclose(w, neutral_mean, rtol=1e-4)
    # Focal loss with gamma 0 is CE; with gamma > 0 it is smaller (every term scaled by (1-p)^g < 1).
    np.testing.assert_allclose(head_loss(logits, d, focal_gamma=0.0), ce, rtol=1e-6)
    assert float(head_loss(logits, d, focal_gamma=2.0)) < float(ce)


# ----------------------------------------------------------------------------- decision rule


def test_predict_direction_argmax_with_ties():
    probs = _probs(
        {
            0: (0.1, 0.2, 0.7),
            1: (0.6, 0.3, 0.1),
            2: (0.4, 0.4, 0.2),  # neg ties neutral -> 0.5
            3: (0.45, 0.1, 0.45),  # neg ties pos -> 0.5
            4: (0.2, 0.4, 0.4),
        }
    )  # pos ties neutral -> 0.5
    out = predict_direction(probs, rule="argmax")
    assert out.shape == (1, 90) and out.dtype == np.float32
    assert out[0, :5].tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert (out[0, 5:] == 0.5).all()


def test_predict_direction_threshold_rule():
    # E = p_neu/2 + p_pos: dim0 0.1+0.5=0.6 -> 1 (boundary inclusive), dim1 0.4 -> 0, dim2 0.55 -> 0.5
    probs = _probs({0: (0.3, 0.2, 0.5), 1: (0.5, 0.2, 0.3), 2: (0.2, 0.5, 0.3)})
    out = predict_direction(probs, rule="threshold")
    assert out[0, :3].tolist() == [1.0, 0.0, 0.5]
    out = predict_direction(probs, rule="threshold", pos_threshold=0.7, neg_threshold=0.2)
    # nothing decided -> fallback on E: max 0.6 (dim0), min 0.4 (dim1); 1 - 0.6 < 0.4 is false -> min dims -> 0
    assert out[0, 1] == 0.0 and (np.delete(out[0], 1) == 0.5).all()
    with pytest.raises(ConfigError):
        predict_direction(probs, rule="vote")


def test_fallback_all_neutral_rows_with_ties():
    # Row 0: E = 0.5 except dims 7 and 40 at 0.58 (tied max) and dim 3 at 0.45: 1-0.58=0.42 < 0.45 -> max dims -> 1.
    r0 = {7: (0.1, 0.5, 0.4), 40: (0.1, 0.5, 0.4), 3: (0.2, 0.7, 0.1)}
    # Row 1: dims 2, 9 at E=0.42 (tied min), dim 5 at 0.55: 1-0.55=0.45 < 0.42 false -> min dims -> 0.
    r1 = {2: (0.26, 0.64, 0.1), 9: (0.26, 0.64, 0.1), 5: (0.1, 0.7, 0.2)}
    # Row 2: exact tie 1 - max == min (0.6 and 0.4): the release takes the "min -> 0" branch.
    r2 = {11: (0.0, 0.8, 0.2), 12: (0.2, 0.8, 0.0)}
    probs = _probs(r0, r1, r2)
    for rule in ("argmax", "threshold"):
        out = predict_direction(probs, rule=rule, pos_threshold=0.9, neg_threshold=0.1)
        assert np.flatnonzero(out[0] != 0.5).tolist() == [7, 40] and (out[0, [7, 40]] == 1.0).all()
        assert np.flatnonzero(out[1] != 0.5).tolist() == [2, 9] and (out[1, [2, 9]] == 0.0).all()
        assert np.flatnonzero(out[2] != 0.5).tolist() == [12] and out[2, 12] == 0.0
    # Uniform probabilities everywhere: all E equal -> every dim is "the min" -> all 0 (release behaviour).
    assert (predict_direction(np.full((1, 90, 3), 1 / 3)) == 0.0).all()


def test_threshold_rule_equals_release_rule_on_means():
    """With p(pos) = mean and p(neg) = 1 - mean, E is the mean: the rule must equal the release's."""
    from alignx_jax.data.persona import release_direction

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 7))
        vecs = np.full((n, 90), 0.5)
        for i in range(n):  # sparse history vectors, as in AlignX
            dims = rng.choice(90, size=int(rng.integers(0, 4)), replace=False)
            vecs[i, dims] = rng.choice([0.0, 1.0], size=len(dims))
        mean = vecs.mean(0)
        probs = np.stack([1 - mean, np.zeros(90), mean], -1)[None]
        np.testing.assert_array_equal(
            predict_direction(probs, rule="threshold")[0], release_direction(vecs), err_msg=f"trial {trial}"
        )


# ----------------------------------------------------------------------------- metrics


def test_head_metrics_by_hand():
    gold = np.full((2, 90), 0.5, np.float32)
    pred = gold.copy()
    gold[0, 0], pred[0, 0] = 1.0, 1.0  # tp positive
    gold[0, 1], pred[0, 1] = 0.0, 0.5  # missed negative
    gold[1, 2], pred[1, 2] = 1.0, 0.0  # wrong sign
    pred[1, 3] = 1.0  # false positive on a neutral dim
    m = head_metrics(pred, gold)
    assert m["accuracy"] == pytest.approx(177 / 180)  # three wrong entries
    assert m["accuracy_non_neutral"] == pytest.approx(1 / 3)
    f1_pos = 2 * 1 / (2 * 1 + 1 + 1)  # tp=1; fp=1 (dim3); fn=1 (row1 dim2)
    f1_neg = 0.0  # tp=0; fp=1; fn=1
    f1_neu = 2 * 176 / (177 + 177)  # tp=176; 177 predicted neutral; 177 gold neutral
    assert m["f1_positive"] == pytest.approx(f1_pos)
    assert m["f1_negative"] == pytest.approx(f1_neg)
    assert m["f1_neutral"] == pytest.approx(f1_neu)
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg + f1_neu) / 3)
    # A class absent from both gold and prediction is left out of the macro average.
    all_neutral = np.full((1, 90), 0.5)
    assert head_metrics(all_neutral, all_neutral)["macro_f1"] == 1.0


def test_heuristic_metrics_use_history_vectors(world):
    from alignx_jax.data.persona import history_direction

    rows = world[:10]
    expect = head_metrics(
        np.stack([history_direction(r) for r in rows]), np.stack([r["Preference Direction"] for r in rows])
    )
    no_history = {"User-Generated Content": [], "Pair-wise Comparative Feedback": []}
    got = predict.heuristic_metrics(
        rows + [dict(rows[0], **{"Preference Direction": None}), dict(rows[1], **no_history)]
    )  # a row with no gold, and one with gold but no history vector for the rule: both skipped
    assert got == {f"heuristic_{k}": v for k, v in expect.items()} and got["heuristic_n"] == 10


def test_heuristic_reads_the_history_the_persona_variant_shows_and_scores_the_head_on_its_rows(world):
    from alignx_jax.data.persona import PAIR_FIELD, UGC_FIELD, release_direction

    rows = world[:8]
    gold = np.stack([r["Preference Direction"] for r in rows])
    # the rule under 'ugc' averages the comments' vectors only; 'demo' shows no history: nothing to score
    ugc_only = np.stack(
        [release_direction(np.asarray([it["Preference Direction"] for it in r[UGC_FIELD]])) for r in rows]
    )
    got = predict.heuristic_metrics(rows, variant="ugc")
    assert got == {f"heuristic_{k}": v for k, v in head_metrics(ugc_only, gold).items()}
    assert any(r[PAIR_FIELD] for r in rows) and got != predict.heuristic_metrics(rows)
    assert predict.heuristic_metrics(rows, variant="demo")["heuristic_n"] == 0
    # with the head's P~: the head on exactly the rows the rule scored (one with no history is left out)
    head_pred = np.where(gold > 0.5, 1.0, 0.5)  # a stand-in prediction, not the gold
    bare = dict(rows[0], **{UGC_FIELD: [], PAIR_FIELD: []})
    both = predict.heuristic_metrics([bare, *rows[1:]], head_pred, variant=["p"] * 8)
    expect = head_metrics(head_pred[1:], gold[1:])
    assert both["heuristic_n"] == 7 and "heuristic_head_n" not in both
    assert {k: both[f"heuristic_head_{k}"] for k in expect if k != "n"} == {
        k: v for k, v in expect.items() if k != "n"
    }


# ----------------------------------------------------------------------------- persona input


def test_persona_prompt_ids_match_batching(tok, world):
    from alignx_jax.data.batching import make_example
    from alignx_jax.data.persona import persona_text

    row = world[0]
    for variant in ("p", "demo", "ugc"):
        for n in (16, 4096):
            ids = predict.persona_prompt_ids(tok, row, variant, max_tokens=n)
            ex = make_example(tok, row, method="pba", persona=variant, max_length=4096, persona_length=n)
            assert ids == ex.persona_ids
    full = tok(persona_text(row, "p"), add_special_tokens=False)["input_ids"]
    short = predict.persona_prompt_ids(tok, row, "p", max_tokens=16)
    assert short[0] == tok.bos_token_id and short[1:] == full[-15:]  # left-truncated: the end survives


# ----------------------------------------------------------------------------- export / import


def test_save_load_bit_exact_and_config(tmp_path):
    cfg = HeadConfig(embed_dim=16, hidden=8, pooling="last", persona_variant="demo", max_persona_tokens=64)
    head = PreferenceHead(cfg, rngs=nnx.Rngs(7))
    head.b_out.set_value(jax.random.normal(jax.random.key(2), (90, 3)))  # non-trivial values everywhere
    ph.save_head(head, cfg, str(tmp_path))
    head2, cfg2 = ph.load_head(str(tmp_path))
    assert cfg2 == cfg
    for n in ph._PARAM_NAMES:
        a, b = np.asarray(getattr(head, n).get_value()), np.asarray(getattr(head2, n).get_value())
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), n
    meta = json.loads((tmp_path / HEAD_CONFIG_FILE).read_text())
    assert meta["label_values"] == [0.0, 0.5, 1.0] and meta["pooling"] == "last" and meta["hidden"] == 8
    assert len(meta["dim_labels"]) == 90 and meta["dim_labels"][0] == {
        "index": 0,
        "negative": "Older",
        "positive": "Young",
    }
    # A config that does not fit the tensors is a clear error.
    meta["hidden"] = 9
    (tmp_path / HEAD_CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        ph.load_head(str(tmp_path))


def test_a_save_cut_short_leaves_no_head(tmp_path, monkeypatch):
    # `alignx demo` keeps a head it finds (`has_head`): a save killed while writing must not leave one
    head = PreferenceHead(HeadConfig(embed_dim=16, hidden=8), rngs=nnx.Rngs(0))

    def cut(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill, mid-write of the config

    monkeypatch.setattr(ph.json, "dump", cut)
    with pytest.raises(KeyboardInterrupt):
        ph.save_head(head, None, str(tmp_path))
    assert not ph.has_head(str(tmp_path)) and not (tmp_path / HEAD_CONFIG_FILE).exists()
    monkeypatch.undo()
    ph.save_head(head, None, str(tmp_path))
    assert ph.has_head(str(tmp_path)) and ph.load_head(str(tmp_path))[1] == head.cfg
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # the save again took its place


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda m: [m], "a JSON object expected"),
        (lambda m: dict(m, embed_dim="abc"), "embed_dim must be an integer"),
        (lambda m: dict(m, embed_dim="16"), "embed_dim must be an integer"),
        (lambda m: dict(m, pooling="max"), "pba.pooling must be one of"),
        (lambda m: dict(m, label_values=5), "label_values 5 differ"),
    ],
)
def test_a_malformed_head_config_is_one_error_naming_the_file(tmp_path, edit, why):
    ph.save_head(PreferenceHead(HeadConfig(embed_dim=16, hidden=8), rngs=nnx.Rngs(0)), None, str(tmp_path))
    path = tmp_path / HEAD_CONFIG_FILE
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match=why) as e:
        ph.load_head(str(tmp_path))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_folder_without_head_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="an export of a PBA run that trained one"):
        ph.load_head(str(tmp_path))


# ----------------------------------------------------------------------------- training


def full_loss(head, features, rows, *, class_weights=None) -> float:
    """The head loss over every row with a direction, normalised as training's (rows x dims): the
    before/after measure of the training tests."""
    keep = [i for i, r in enumerate(rows) if r.get("Preference Direction") is not None]
    gold = np.asarray([rows[i]["Preference Direction"] for i in keep], np.float32)
    logits = head.classify(jnp.asarray(np.asarray(features)[keep]))
    return float(head_loss(logits, gold, class_weights=class_weights, normalizer=len(keep) * gold.shape[1]))


def test_an_explicit_focal_gamma_of_zero_wins_over_the_run_configs(world):
    """`train_head_two_stage`'s explicit arguments win over the run config's `pba` settings: focal_gamma=0.0
    (plain CE) was taken for "not given", so the config's focal gamma trained the head instead."""
    import types

    import ml_collections

    from alignx_jax.pba.head_training import train_head_two_stage

    def run_config(focal_gamma):
        return ml_collections.ConfigDict(
            {
                "pba": {
                    "hidden": 16,
                    "pooling": "mean",
                    "max_persona_tokens": 64,
                    "class_weights": (1.0, 1.0, 1.0),
                    "focal_gamma": focal_gamma,
                },
                "data": {"persona": "p"},
            }
        )

    backbone = types.SimpleNamespace(cfg=types.SimpleNamespace(hidden_size=8))
    feats = np.random.default_rng(0).normal(size=(len(world), 8)).astype(np.float32)

    def losses(cfg, **kw):
        res = train_head_two_stage(backbone, None, world, cfg, features=feats, steps=3, batch_size=8, **kw)
        return res.losses

    plain, focal = losses(run_config(0.0)), losses(run_config(2.0))
    assert plain != focal
    assert losses(run_config(2.0), focal_gamma=0.0) == plain
    assert losses(run_config(0.0), focal_gamma=2.0) == focal


def test_two_stage_training_reduces_head_loss(tok, world):
    from alignx_jax.pba.head_training import head_config_for, train_head_two_stage

    model = tiny_decoder(tok)
    before_params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    cfg = HeadConfig(embed_dim=32, hidden=32, max_persona_tokens=128)  # one padded length: one compile
    res = train_head_two_stage(
        model, tok, world, cfg, steps=150, batch_size=32, class_weights=(2, 1, 2), feature_batch_size=16
    )
    assert res.features.shape == (len(world), 32)
    untrained = PreferenceHead(cfg, rngs=nnx.Rngs(0))
    l0 = full_loss(untrained, res.features, world, class_weights=(2, 1, 2))
    l1 = full_loss(res.head, res.features, world, class_weights=(2, 1, 2))
    assert l1 < 0.5 * l0, (l0, l1)
    assert res.losses[-1] < res.losses[0]
    # the loss joint training uses: sum(w * CE) over rows x 90 dims (not over the weights' sum), in numpy
    logits = np.asarray(res.head.classify(jnp.asarray(res.features)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = np.rint(np.stack([r["Preference Direction"] for r in world]) * 2).astype(int)
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    w = np.asarray([2.0, 1.0, 2.0])[labels]
    np.testing.assert_allclose(l1, (w * nll).sum() / (len(world) * 90), rtol=1e-5)
    # The backbone is frozen.
    after_params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before_params), jax.tree.leaves(after_params))
    )
    # A run config works as cfg too: its pba section and data.persona.
    from alignx_jax import config_schema

    run = config_schema.default_config()
    run.pba.update(hidden=16, pooling="last", max_persona_tokens=128)
    run.data.persona = "demo"
    hc = head_config_for(model, run)
    assert (hc.hidden, hc.pooling, hc.embed_dim, hc.max_persona_tokens) == (16, "last", 32, 128)
    assert hc.persona_variant == "demo"


def _joint_batch(tok, rows, persona_length=64):
    from alignx_jax.data.batching import collate, make_example

    exs = [
        make_example(tok, r, method="pba", max_length=512, persona_length=persona_length, index=i)
        for i, r in enumerate(rows)
    ]
    batch = collate(exs, buckets=(64, 128, 256, 512), pad_id=tok.pad_token_id, num_pairs=len(rows) + 1)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_joint_head_term_gradients_and_descent(tok, world):
    import optax

    model = tiny_decoder(tok)
    head = PreferenceHead(HeadConfig(embed_dim=32, hidden=32), rngs=nnx.Rngs(1))
    batch = _joint_batch(tok, world[:6])
    assert batch["pair_mask"].tolist() == [1] * 6 + [0]

    def cfg(stop):
        return ph.HeadTermOptions(
            weight=0.5, stop_gradient=stop, class_weights=(2.0, 1.0, 2.0), focal_gamma=0.0
        )

    loss, metrics = ph.joint_head_term(model, head, batch, cfg(True))
    np.testing.assert_allclose(loss, 0.5 * metrics["head_loss"], rtol=1e-6)
    assert 0.0 <= float(metrics["head_accuracy"]) <= 1.0
    # Micro-batching: with the global pair count, the terms of two halves add up to the whole's
    # (unit class weights: then the per-batch mean and the n_pairs form agree).
    c1 = ph.HeadTermOptions(weight=1.0, stop_gradient=True, class_weights=(1.0, 1.0, 1.0), focal_gamma=0.0)
    whole = ph.joint_head_term(model, head, batch, c1)[0]
    halves = [
        {k: v[sl] for k, v in batch.items() if k in ("persona_ids", "persona_mask", "direction", "pair_mask")}
        for sl in (slice(0, 3), slice(3, 7))
    ]
    parts = [ph.joint_head_term(model, head, h, c1, n_pairs=6)[0] for h in halves]
    np.testing.assert_allclose(parts[0] + parts[1], whole, rtol=1e-5)

    # stop_gradient: the head's loss reaches the head only, never the policy.
    grad_fn = nnx.jit(nnx.grad(lambda m, h: ph.joint_head_term(m, h, batch, cfg(True))[0], argnums=(0, 1)))
    g_model, g_head = grad_fn(model, head)
    assert float(optax.tree.norm(nnx.state(g_model, nnx.Param))) == 0.0
    assert float(optax.tree.norm(nnx.state(g_head, nnx.Param))) > 0.0
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

    # A few joint steps (model + head, no stop-gradient) reduce the head term.
    both = nnx.Dict(m=model, h=head)
    opt = nnx.Optimizer(both, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(both, opt):
        def f(both):
            return ph.joint_head_term(both["m"], both["h"], batch, cfg(False))[0]

        loss, grads = nnx.value_and_grad(f)(both)
        opt.update(both, grads)
        return loss

    losses = [float(step(both, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    # Without stop_gradient the same term trains the policy too.
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def exported(tok, world, tmp_path_factory):
    """An HF folder (tiny decoder + tokenizer) with a two-stage-trained head beside it."""
    from alignx_jax.models.hf import save_hf
    from alignx_jax.pba.head_training import train_head_two_stage
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR

    out = str(tmp_path_factory.mktemp("pba_export"))
    model = tiny_decoder(tok)
    save_hf(model, out, tokenizer_dir=TINY_TOKENIZER_DIR)
    res = train_head_two_stage(
        model,
        tok,
        world,
        HeadConfig(embed_dim=32, hidden=32, max_persona_tokens=128),
        steps=60,
        batch_size=32,
        feature_batch_size=16,
    )
    ph.save_head(res.head, res.cfg, out)
    return out, model, res.head


def test_predict_preferences_matches_loaded_head(tok, world, exported):
    from alignx_jax.models.hf import load_pretrained

    out, model, head = exported
    direct = predict.predict_preferences(model, head, tok, world[:5], batch_size=4)
    head2, _ = ph.load_head(out)
    loaded = predict.predict_preferences(load_pretrained(out), head2, tok, world[:5], batch_size=2)
    assert len(direct) == 5 and all(d.shape == (90,) for d in direct)
    for a, b in zip(direct, loaded):
        np.testing.assert_array_equal(a, b)
        assert (a != 0.5).any()  # never an empty profile


def test_cli_predict_preferences(tok, world, exported, tmp_path, capsys):
    from alignx_jax.cli import main
    from alignx_jax.data.persona import profile_text

    out, _, _ = exported
    persona = {
        k: world[0][k]
        for k in ("User-Generated Content", "Pair-wise Comparative Feedback", "Demographic Information")
    }
    pfile = tmp_path / "persona.json"
    pfile.write_text(json.dumps(persona))
    assert main(["predict-preferences", "--model", out, "--persona", str(pfile), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(rec["direction"]) == 90 and rec["profile"] == profile_text(rec["direction"]) and rec["profile"]
    # --out is --data's: with --persona it would be neither written nor mentioned
    lone = tmp_path / "lone.jsonl"
    assert main(["predict-preferences", "--model", out, "--persona", str(pfile), "--out", str(lone)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out applies to --data" in err[0] and not lone.exists()

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in world[:6]))
    jl = tmp_path / "pred" / "p.jsonl"
    assert main(["predict-preferences", "--model", out, "--data", str(data), "--out", str(jl), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "persona features" in captured.err and "6/6" in captured.err  # a data set's progress on stderr
    assert (
        summary["rows"] == 6
        and "accuracy" in summary["head"]
        and "heuristic_accuracy" in summary["heuristic"]
    )
    recs = [json.loads(line) for line in jl.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(6)) and recs[0]["user_id"] == world[0]["user_id"]
    assert "file" not in recs[0]  # one file: the index is its row
    # the rule scores the rows with history vectors: the head's figures on those same rows beside it
    h = summary["heuristic"]
    assert h["heuristic_n"] == 6 and h["heuristic_head_accuracy"] == summary["head"]["accuracy"]
    # a rerun onto its own earlier --out replaces it
    assert main(["predict-preferences", "--model", out, "--data", str(data), "--out", str(jl)]) == 0
    capsys.readouterr()
    assert [json.loads(line) for line in jl.read_text().splitlines()] == recs

    # a folder of several files: each record names its own file and row there
    folder = tmp_path / "folder"
    os.makedirs(folder)
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world[:2]))
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world[2:5]))
    jl2 = tmp_path / "pred" / "f.jsonl"
    assert main(["predict-preferences", "--model", out, "--data", str(folder), "--out", str(jl2)]) == 0
    capsys.readouterr()
    recs = [json.loads(line) for line in jl2.read_text().splitlines()]
    assert [(os.path.basename(r["file"]), r["row"]) for r in recs] == [
        ("a.jsonl", 0),
        ("a.jsonl", 1),
        ("b.jsonl", 0),
        ("b.jsonl", 1),
        ("b.jsonl", 2),
    ]
    assert [r["index"] for r in recs] == list(range(5)) and recs[3]["user_id"] == world[3]["user_id"]

    # a head beside a model of another width: one line, before any prediction
    narrow = tmp_path / "narrow"
    from alignx_jax.models.hf import save_hf
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR

    save_hf(tiny_decoder(tok, hidden=16), str(narrow), tokenizer_dir=TINY_TOKENIZER_DIR)
    for name in (HEAD_WEIGHTS_FILE, HEAD_CONFIG_FILE):
        os.link(os.path.join(out, name), narrow / name)
    assert main(["predict-preferences", "--model", str(narrow), "--persona", str(pfile)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"alignx: error: {narrow}: preference head embed_dim 32 != the model's hidden_size 16"
    )

    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in os.listdir(out):
        if name not in (HEAD_WEIGHTS_FILE, HEAD_CONFIG_FILE):
            os.link(os.path.join(out, name), bare / name)
    assert main(["predict-preferences", "--model", str(bare), "--persona", str(pfile)]) == 1
    assert "an export of a PBA run that trained one" in capsys.readouterr().err
    missing = str(tmp_path / "nope")
    assert main(["predict-preferences", "--model", missing, "--persona", str(pfile)]) == 1
    assert capsys.readouterr().err.strip() == f"alignx: error: --model: model folder not found: {missing}"


def test_predict_preferences_names_a_checkpoint_or_workdir_and_the_export_that_makes_an_hf_folder(
    world, exported, tmp_path, capsys
):
    """An `alignx import` checkpoint (its head copied in) or a training workdir as --model: one line saying
    which it is and the `alignx export` that makes the HF folder predict-preferences reads (the checkpoint's
    line said only "no *.safetensors files", the workdir's that it held no preference head)."""
    from alignx_jax.cli import main

    out, _, _ = exported
    pfile = tmp_path / "persona.json"
    pfile.write_text(json.dumps({"Demographic Information": "A student who likes quick meals."}))
    ckpt = tmp_path / "ckpt"
    assert main(["import", "--hf", out, "--out", str(ckpt)]) == 0
    assert ph.has_head(str(ckpt))  # the import keeps the head: the head is not what is missing
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10" / "params").mkdir(parents=True)
    (workdir / "reference").mkdir()
    (workdir / "reference" / "config.json").write_text('{"model_type": "llama"}\n')
    capsys.readouterr()
    for model, what in ((ckpt, "an alignx model checkpoint"), (workdir, "a training workdir")):
        assert main(["predict-preferences", "--model", str(model), "--persona", str(pfile)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"alignx: error: --model {model}: {what}"), err
        assert f"`alignx export --checkpoint {model} --out HF_DIR` makes the HF folder" in err[0], err


def test_predict_preferences_counts_data_rows_with_no_persona_in_one_warning(
    world, exported, tmp_path, capsys
):
    """--data rows without comments, history pairs or demographics are predicted from BOS alone: they are
    predicted (a real file may hold a few; --persona refuses such a persona), and one line counts them."""
    from alignx_jax.cli import main

    out, _, _ = exported
    empty = {
        "User-Generated Content": [],
        "Pair-wise Comparative Feedback": [],
        "Demographic Information": "",
    }
    bare = [{**r, **empty} for r in world[3:5]]
    data = tmp_path / "rows.jsonl"
    for rows, warned in ((world[:3], []), ([*world[:3], *bare], [2])):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        jl = tmp_path / "p.jsonl"
        assert main(["predict-preferences", "--model", out, "--data", str(data), "--out", str(jl)]) == 0
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignx: warning:")]
        assert err == [
            f"alignx: warning: {data}: {n} of {len(rows)} rows have no persona the head reads (persona variant "
            "p: no comments, history pairs or demographics); their P~ is predicted from BOS alone"
            for n in warned
        ]
        assert len(jl.read_text().splitlines()) == len(rows)


def test_predict_preferences_json_summary_is_strict_json(world, exported, tmp_path, capsys):
    """A metric with nothing to count (non-neutral accuracy when every gold direction is neutral) is NaN:
    --json printed it as `NaN`, which is not JSON (jq, JSON.parse refuse it); it is null, as in eval's
    results, and the table still shows nan."""
    from alignx_jax.cli import main

    out, _, _ = exported
    data = tmp_path / "neutral.jsonl"
    data.write_text("".join(json.dumps({**r, "Preference Direction": [0.5] * 90}) + "\n" for r in world[:3]))

    def no_nan(constant):
        raise AssertionError(f"{constant} in the --json summary")

    argv = ["predict-preferences", "--model", out, "--data", str(data), "--out", str(tmp_path / "p.jsonl")]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=no_nan)
    assert summary["head"]["accuracy_non_neutral"] is None and summary["head"]["n"] == 3
    assert summary["heuristic"]["heuristic_head_accuracy_non_neutral"] is None
    assert main(argv) == 0
    assert "non-neutral accuracy nan" in capsys.readouterr().out


def test_predict_preferences_resolves_a_hub_id_as_eval_does(exported, world, tmp_path, monkeypatch, capsys):
    """predict-preferences --model resolves as eval and generate do (`presets.resolve_model_folder`): a cached
    hub id predicts as its snapshot folder does; an uncached one offline is the hub's one line (its own
    os.path.isdir check called any hub id a missing folder)."""
    from alignx_jax.cli import main
    from tests.test_hub import fill_hub_cache

    out, _, _ = exported
    persona = {k: world[0][k] for k in ("User-Generated Content", "Pair-wise Comparative Feedback")}
    pfile = tmp_path / "persona.json"
    pfile.write_text(json.dumps(persona))
    assert main(["predict-preferences", "--model", out, "--persona", str(pfile), "--json"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    fill_hub_cache(str(tmp_path / "hf_home" / "hub"), "tiny-org/pba", out)
    assert main(["predict-preferences", "--model", "tiny-org/pba", "--persona", str(pfile), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == local
    assert main(["predict-preferences", "--model", "tiny-org/absent", "--persona", str(pfile)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not in the Hugging Face cache" in err, err


def test_transformers_loads_policy_with_head_beside_it(exported):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    out, model, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = np.array([[1, 5, 9, 13]])
    ref = np.asarray(model(jnp.asarray(ids)))
    with torch.no_grad():
        got = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=2e-3)


# ----------------------------------------------------------------------------- the point of the head


@pytest.mark.slow
def test_head_beats_release_rule_on_held_out_users(tok):
    """Synthetic history TEXT shows the user's leaning while the item vectors are noisy: a head on
    (even random-backbone) features of the text beats the release's averaging rule on new users."""
    from alignx_jax.data.synth import generate_world
    from alignx_jax.pba.head_training import train_head_two_stage

    rows = generate_world(500, 1, seed=11).rows
    train, test = rows[:400], rows[400:]
    model = tiny_decoder(tok, hidden=256, layers=1)
    res = train_head_two_stage(
        model,
        tok,
        train,
        HeadConfig(embed_dim=256, hidden=64, max_persona_tokens=512),
        steps=400,
        batch_size=64,
        class_weights=(3, 1, 3),
        feature_batch_size=32,
    )
    pred = np.stack(predict.predict_preferences(model, res.head, tok, test, batch_size=32))
    gold = np.stack([r["Preference Direction"] for r in test])
    m, h = head_metrics(pred, gold), predict.heuristic_metrics(test)
    assert m["accuracy"] > h["heuristic_accuracy"], (m, h)
    assert m["macro_f1"] > h["heuristic_macro_f1"], (m, h)


@pytest.mark.parametrize("out", [False, True])
def test_predict_preferences_reads_data_before_the_model(out, tmp_path, capsys):
    """--data is read before anything of --model: a missing or empty one is its line, not the head-less
    model's, with --out or without."""
    from alignx_jax.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    extra = ["--out", str(tmp_path / "pred.jsonl")] if out else []
    for data, needle in ((tmp_path / "missing.jsonl", "no such file or folder"), (empty, "no rows")):
        assert main(["predict-preferences", "--model", str(model), "--data", str(data), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(data) in err[0] and needle in err[0], err
    assert not (tmp_path / "pred.jsonl").exists()


def test_predict_preferences_reads_the_persona_file_before_the_model(tmp_path, capsys):
    """--persona is read before --model resolves and loads, as --data is: a missing or malformed file was
    reported only after the model had loaded (or after a missing model's line)."""
    from alignx_jax.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for persona in (tmp_path / "missing.json", bad):
        for m in (model, tmp_path / "no-model"):
            assert main(["predict-preferences", "--model", str(m), "--persona", str(persona)]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and str(persona) in err[0] and "--model" not in err[0], err
            assert "preference head" not in err[0], err


def test_predict_preferences_refuses_an_unwritable_out_before_the_model(world, tmp_path, capsys):
    """An --out that cannot be written is its one line before the model loads (it came after the load, so
    after a missing head's line, or minutes of loading an 8B model)."""
    from alignx_jax.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in world[:2]))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "pred.jsonl"  # under a file: no folder can be made there
    assert main(["predict-preferences", "--model", str(model), "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}: cannot be written" in err[0], err


@pytest.mark.parametrize("target", ["notes", "data", "data_folder", "config"])
def test_predict_preferences_out_never_replaces_an_input_or_another_file(target, world, tmp_path, capsys):
    """--out replaces an earlier predictions file only: notes, the --data file itself, a file of a --data
    folder and the model's config.json are refused in one line naming --out and the file, before the model
    loads, and left byte-identical; an earlier predictions file passes the check (the head-less model fails
    next)."""
    from alignx_jax.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in world[:2]))
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "part.jsonl").write_bytes(data.read_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    inputs = {"data": data, "data_folder": folder / "part.jsonl", "config": model / "config.json"}
    out = {"notes": notes, **inputs}[target]
    given = folder if target == "data_folder" else data
    before = out.read_bytes()
    assert main(["predict-preferences", "--model", str(model), "--data", str(given), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}" in err[0] and out.read_bytes() == before, err
    earlier = tmp_path / "pred.jsonl"
    earlier.write_text(json.dumps({"index": 0, "direction": [0.5] * 90, "profile": ""}) + "\n")
    assert (
        main(["predict-preferences", "--model", str(model), "--data", str(data), "--out", str(earlier)]) == 1
    )
    err = capsys.readouterr().err
    assert "--out" not in err and "head" in err.lower(), err


def test_predict_preferences_refuses_a_split_folder_as_eval_does(world, exported, tmp_path, capsys):
    """--data on an `alignx data split` folder: read whole, its metrics would count the training half; one
    line naming the half to give, as eval's --benchmark says, before the model loads."""
    from alignx_jax.cli import main

    out, _, _ = exported
    split = tmp_path / "split"
    for half, rows in (("train", world[:3]), ("test", world[3:5])):
        (split / half).mkdir(parents=True)
        (split / half / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict-preferences", "--model", out, "--data", str(split)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name the one to annotate" in err[0] and f"{split}/test" in err[0], err
    assert main(["predict-preferences", "--model", out, "--data", str(split / "test")]) == 0
