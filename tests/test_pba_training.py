"""PBA's preference head wired into training and export: the joint step (in-process, tiny), the
import/export round trip, and `alignx train/export/eval` end to end (the CLI's `main`, slow; the SIGTERM'd
run in a process of its own)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import cli_env, run_cli
from flax import nnx

from alignx_jax import config_schema, train
from alignx_jax.config import load_config
from alignx_jax.errors import ConfigError
from alignx_jax.models import preference_head as ph
from alignx_jax.models.decoder import Decoder, DecoderConfig
from alignx_jax.pba import predict, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PBA = os.path.join(ROOT, "configs", "tiny_pba.py")


# ----------------------------------------------------------------------------- in-process joint step


def _tiny_model(seed=0, vocab=97):
    cfg = DecoderConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def _batch(B=4, T=24, P=16, vocab=97, seed=0, dummies=0):
    """A collated-layout PBA batch: 2B rows (chosen first), persona ids [B, P], directions [B, 90]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(2 * B, T)).astype(np.int32)
    attn = np.zeros((2 * B, T), np.int32)
    loss = np.zeros((2 * B, T), np.int32)
    for r in range(2 * B):
        p, n = int(rng.integers(3, 8)), int(rng.integers(4, T - 8))
        attn[r, : p + n] = 1
        loss[r, p : p + n] = 1
    pmask = np.zeros((B, P), np.int32)
    for r in range(B):
        pmask[r, : int(rng.integers(4, P + 1))] = 1
    pair_mask = np.ones((B,), np.int32)
    if dummies:
        pair_mask[-dummies:] = 0
        for r in (*range(B - dummies, B), *range(2 * B - dummies, 2 * B)):
            attn[r] = 0
            attn[r, 0] = 1
            loss[r] = 0
        pmask[B - dummies :] = 0
        pmask[B - dummies :, 0] = 1
    pos = np.where(attn == 1, np.arange(T)[None], 0).astype(np.int32)
    # the persona decides the direction (a learnable map): dims follow the first persona token's parity
    persona = rng.integers(1, vocab, size=(B, P)).astype(np.int32)
    direction = np.full((B, 90), 0.5, np.float32)
    direction[:, :30] = (persona[:, :1] % 2).astype(np.float32)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "positions": pos,
        "pair_mask": pair_mask,
        "persona_ids": persona,
        "persona_mask": pmask,
        "direction": direction,
    }


def _loss_cfg():
    """The schema's `loss` section (the release's sigmoid DPO) with a small logps chunk."""
    c = config_schema.default_config().loss
    c.logps_chunk = 7
    return c


def _pba_cfg(**kw):
    c = load_config(TINY_PBA).pba
    c.unlock()
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def joint():
    """Initial params/opt state of a tiny policy + head, and jitted joint steps for a few pba settings."""
    model = _tiny_model()
    codec = train.ParamsCodec.of(model)
    policy = nnx.to_pure_dict(nnx.state(model))
    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), policy)
    head = ph.PreferenceHead(ph.HeadConfig(embed_dim=32, hidden=16, max_persona_tokens=16), rngs=nnx.Rngs(1))
    hcodec = train.HeadCodec.of(head)
    optim = ml_collections.ConfigDict(
        {
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "min_lr_ratio": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "clip": 1.0,
        }
    )
    tx, _ = train.make_optimizer(optim, 10)
    pba = {
        "sg": _pba_cfg(stop_gradient=True, weight=1.0),
        "w0": _pba_cfg(stop_gradient=True, weight=0.0),
        "full": _pba_cfg(stop_gradient=False, weight=1.0),
    }
    htx = train.make_head_optimizer(_pba_cfg(lr=3e-2))  # a fast head: 15 steps must show learning
    steps = {
        name: jax.jit(
            train.make_train_step(
                codec, tx, _loss_cfg(), precomputed=False, head_codec=hcodec, head_tx=htx, pba_cfg=c
            )
        )
        for name, c in pba.items()
    }
    steps["dpo"] = jax.jit(train.make_train_step(codec, tx, _loss_cfg(), precomputed=False))
    params = {"policy": policy, "head": train.HeadCodec.params(head)}
    opt = {"policy": tx.init(policy), "head": htx.init(params["head"])}
    return dict(params=params, opt=opt, ref=ref, steps=steps, tx=tx)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_to_microbatches_carries_persona_and_direction():
    b = _batch(B=4, P=12, dummies=1)
    mb = train.to_microbatches(b, 2, T=30, head=True, P=16)
    assert mb.head.persona_ids.shape == (2, 2, 16) and mb.head.persona_mask.shape == (2, 2, 16)
    assert mb.head.direction.shape == (2, 2, 90) and mb.input_ids.shape == (2, 2, 2, 30)
    for k in range(4):
        m, j = divmod(k, 2)
        np.testing.assert_array_equal(mb.head.persona_ids[m, j, :12], b["persona_ids"][k])
        assert not mb.head.persona_mask[m, j, 12:].any()
        np.testing.assert_array_equal(mb.head.direction[m, j], b["direction"][k])
    no_dir = {k: v for k, v in b.items() if k != "direction"}
    with pytest.raises(Exception, match="direction"):
        train.to_microbatches(no_dir, 2, head=True)
    assert train.to_microbatches(b, 2).head is None  # ICA/none runs: unchanged layout


def test_stop_gradient_joint_step_moves_policy_exactly_like_weight_0(joint):
    batch = train.to_microbatches(_batch(dummies=1, seed=1), 2, head=True)
    p_sg, _, m_sg = joint["steps"]["sg"](_copy(joint["params"]), _copy(joint["opt"]), joint["ref"], batch)
    p_w0, _, m_w0 = joint["steps"]["w0"](_copy(joint["params"]), _copy(joint["opt"]), joint["ref"], batch)
    for a, b in zip(jax.tree.leaves(p_sg["policy"]), jax.tree.leaves(p_w0["policy"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(m_sg["grad_norm"]) == float(m_w0["grad_norm"]) > 0
    # the weighted head learns; at weight 0 it gets no gradient (only AdamW's decay moves it, ~lr * wd)
    assert _max_diff(p_sg["head"], joint["params"]["head"]) > 1e-3
    assert _max_diff(p_w0["head"], joint["params"]["head"]) < 1e-5
    assert float(m_sg["head_grad_norm"]) > 0 and float(m_w0["head_grad_norm"]) == 0.0
    np.testing.assert_allclose(
        float(m_sg["total_loss"]), float(m_sg["loss"]) + float(m_sg["head_loss"]), rtol=1e-6
    )
    np.testing.assert_allclose(float(m_w0["total_loss"]), float(m_w0["loss"]), rtol=1e-6)
    assert float(m_sg["pairs"]) == 3.0


@pytest.mark.slow
def test_stop_gradient_matches_plain_dpo_and_its_absence_pulls_the_policy(joint):
    batch = train.to_microbatches(_batch(dummies=1, seed=1), 2, head=True)
    p_sg, _, m_sg = joint["steps"]["sg"](_copy(joint["params"]), _copy(joint["opt"]), joint["ref"], batch)
    p_full, _, _ = joint["steps"]["full"](_copy(joint["params"]), _copy(joint["opt"]), joint["ref"], batch)
    policy = joint["params"]["policy"]
    p_dpo, _, m_dpo = joint["steps"]["dpo"](_copy(policy), joint["tx"].init(policy), joint["ref"], batch)
    # a plain DPO step is a different program: equal up to float reassociation
    assert _max_diff(p_sg["policy"], p_dpo) < 1e-6
    np.testing.assert_allclose(float(m_sg["grad_norm"]), float(m_dpo["grad_norm"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_sg["loss"]), float(m_dpo["loss"]), atol=1e-6)
    assert _max_diff(p_full["policy"], p_sg["policy"]) > 1e-7


def test_joint_head_metrics_do_not_depend_on_microbatching(joint):
    b = _batch(B=4, dummies=1, seed=2)
    step = joint["steps"]["sg"]
    _, _, m1 = step(
        _copy(joint["params"]), _copy(joint["opt"]), joint["ref"], train.to_microbatches(b, 1, head=True)
    )
    _, _, m2 = step(
        _copy(joint["params"]), _copy(joint["opt"]), joint["ref"], train.to_microbatches(b, 2, head=True)
    )
    for k in ("head_loss", "head_accuracy", "head_accuracy_non_neutral", "loss", "total_loss"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-6)
    # against the head's own metrics on the 3 real rows, computed directly
    model = train.ParamsCodec.of(_tiny_model()).module(joint["params"]["policy"])
    head = _head_like(joint["params"]["head"])
    logits = head(
        model.hidden_states(jnp.asarray(b["persona_ids"][:3]), jnp.asarray(b["persona_mask"][:3])),
        jnp.asarray(b["persona_mask"][:3]),
    )
    labels = ph.direction_to_labels(b["direction"][:3])
    hit = np.asarray(jnp.argmax(logits, -1)) == labels
    np.testing.assert_allclose(float(m1["head_accuracy"]), hit.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m1["head_accuracy_non_neutral"]), hit[labels != 1].mean(), rtol=1e-6)
    want = float(ph.head_loss(logits, b["direction"][:3], class_weights=(1.0, 1.0, 1.0), normalizer=3 * 90))
    np.testing.assert_allclose(float(m1["head_loss"]), want, rtol=1e-5)


def _head_like(head_params):
    head = ph.PreferenceHead(ph.HeadConfig(embed_dim=32, hidden=16, max_persona_tokens=16), rngs=nnx.Rngs(1))
    return train.HeadCodec.of(head).module(head_params)


def test_head_codec_rebuilds_the_head_from_its_params_alone():
    head = ph.PreferenceHead(ph.HeadConfig(embed_dim=32, hidden=16, max_persona_tokens=16), rngs=nnx.Rngs(1))
    feats_BD = jax.random.normal(jax.random.key(0), (4, 32))
    params = jax.tree.map(lambda x: x + 0.5, train.HeadCodec.params(head))  # not the codec's own values
    rebuilt = train.HeadCodec.of(head).module(params)
    np.testing.assert_array_equal(np.asarray(rebuilt.w_in[...]), np.asarray(params["w_in"]))
    nnx.update(head, params)
    np.testing.assert_array_equal(np.asarray(rebuilt.classify(feats_BD)), np.asarray(head.classify(feats_BD)))
    # the codec carries no state beside the params: a head that had some is refused, not half rebuilt
    head.counter = nnx.BatchStat(jnp.zeros(()))
    with pytest.raises(ValueError, match="Non-exhaustive"):
        train.HeadCodec.of(head)


def test_joint_steps_reduce_the_head_loss(joint):
    step = joint["steps"]["sg"]
    params, opt = _copy(joint["params"]), _copy(joint["opt"])
    batches = [train.to_microbatches(_batch(seed=10 + i), 2, head=True) for i in range(3)]
    first = None
    for t in range(15):
        params, opt, m = step(params, opt, joint["ref"], batches[t % 3])
        first = float(m["head_loss"]) if first is None else first
    assert float(m["head_loss"]) < 0.6 * first, (first, float(m["head_loss"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.pba.mode=both", "pba.mode='both'"),
        ("--config.pba.preference=oracle", "pba.preference='oracle'"),
        ("--config.pba.mix_predicted=1.5", "pba.mix_predicted"),
        ("--config.pba.focal_gamma=-1.0", "pba.focal_gamma must be >= 0 and finite, got -1.0"),
        ("--config.pba.focal_gamma=nan", "pba.focal_gamma must be >= 0 and finite, got nan"),
        ("--config.pba.focal_gamma=inf", "pba.focal_gamma must be >= 0 and finite, got inf"),
        ("--config.pba.lr=nan", "pba.lr must be positive and finite, got nan"),
        ("--config.pba.weight_decay=-1.0", "pba.weight_decay must be >= 0 and finite"),
        ("--config.pba.max_persona_tokens=2048", "pba.max_persona_tokens=2048 exceeds"),
        # a negative weight trained the head away from its class; all zeros left it untrained, silently
        ("--config.pba.class_weights=1.0,-1.0,1.0", "pba.class_weights must be finite and >= 0 with one"),
        ("--config.pba.class_weights=0,0,0", "pba.class_weights must be finite and >= 0 with one above 0"),
        ("--config.pba.weight=nan", "pba.weight must be >= 0 and finite, got nan"),
        ("--config.pba.weight=-1.0", "pba.weight must be >= 0 and finite, got -1.0"),
        # the joint head's gradient is weight x CE: it was exported untrained, its P~ used by eval
        ("--config.pba.weight=0.0", "pba.weight=0 with pba.mode=joint leaves the preference head untrained"),
    ],
)
def test_validate_config_pba_errors(override, message):
    cfg = load_config(TINY_PBA, ["--config.workdir=/tmp/x", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.validate_config(cfg)


@pytest.mark.parametrize("preference", ["golden", "predicted", "mix"])
def test_validate_config_accepts_pba_preferences(preference):
    train.validate_config(
        load_config(
            TINY_PBA,
            [
                "--config.workdir=/tmp/x",
                f"--config.pba.preference={preference}",
                "--config.pba.mode=two_stage",
            ],
        )
    )


# ----------------------------------------------------------------------------- import / export round trip


def test_import_then_export_keeps_the_head_bit_exact(tmp_path):
    from alignx_jax import export
    from alignx_jax.models import checkpoint, hf
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer()
    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    src = str(tmp_path / "src")
    hf.save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), src, tokenizer_dir=TINY_TOKENIZER_DIR)
    head = ph.PreferenceHead(
        ph.HeadConfig(embed_dim=32, hidden=16, pooling="last", max_persona_tokens=64), rngs=nnx.Rngs(3)
    )
    ph.save_head(head, None, src)
    ck, out = str(tmp_path / "ck"), str(tmp_path / "out")
    export.cli_import(argparse.Namespace(hf=src, out=ck, dtype="float32"))
    assert checkpoint.resolve_checkpoint(ck).head_dir == ck
    # the head's safetensors file does not make the orbax checkpoint look like an HF folder: generate (and a
    # run's model.hf_path) load its params/, eval points to export (they read the missing HF weights)
    from alignx_jax.errors import CheckpointError
    from alignx_jax.generate import load_model_and_tokenizer
    from alignx_jax.models.safetensors_io import NOT_MODEL_WEIGHTS, holds_safetensors

    assert ph.HEAD_WEIGHTS_FILE in NOT_MODEL_WEIGHTS
    assert holds_safetensors(src) and not holds_safetensors(ck)
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):  # not "missing tensor ..."
        hf.load_pretrained(ck)
    model, _ = load_model_and_tokenizer(ck)
    assert model.cfg.hidden_size == 32
    export.cli_export(argparse.Namespace(checkpoint=ck, step=None, out=out, dtype=None, shard_size="5GB"))
    for name in (ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE):
        assert open(os.path.join(src, name), "rb").read() == open(os.path.join(out, name), "rb").read(), name
    # a policy without a head exports without one, even into a folder that had a stale head
    os.remove(os.path.join(ck, ph.HEAD_WEIGHTS_FILE))
    export.cli_export(argparse.Namespace(checkpoint=ck, step=None, out=out, dtype=None, shard_size="5GB"))
    assert not ph.has_head(out) and not os.path.exists(os.path.join(out, ph.HEAD_CONFIG_FILE))


def test_import_rejects_a_head_of_another_width(tmp_path):
    from alignx_jax import export
    from alignx_jax.errors import CheckpointError
    from alignx_jax.models import hf
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer()
    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    src = str(tmp_path / "src")
    hf.save_hf(Decoder(cfg, rngs=nnx.Rngs(0)), src, tokenizer_dir=TINY_TOKENIZER_DIR)
    ph.save_head(ph.PreferenceHead(ph.HeadConfig(embed_dim=48, hidden=8), rngs=nnx.Rngs(0)), None, src)
    with pytest.raises(CheckpointError, match="embed_dim 48"):
        export.cli_import(argparse.Namespace(hf=src, out=str(tmp_path / "ck"), dtype="float32"))
    assert not os.path.exists(tmp_path / "ck")


# ----------------------------------------------------------------------------- CLI end to end (slow)

SMALL = [
    "--config.model.init.hidden_size=32",
    "--config.model.init.intermediate_size=64",
    "--config.model.init.head_dim=8",
    "--config.data.max_length=128",
    "--config.data.buckets=(128,)",
    "--config.loss.logps_chunk=64",
    "--config.train.global_batch=8",
    "--config.train.micro_batch=4",
    "--config.train.progress=false",
    "--config.pba.max_persona_tokens=128",
]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in (json.loads(line) for line in f)}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pba_synth") / "users"
    r = run_cli(["synth", "--out", str(out), "--users", "8", "--pairs-per-user", "4", "--seed", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out)


def _restore_head_item(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "head")
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(path)


@pytest.mark.slow
def test_joint_train_export_eval_end_to_end(tmp_path, synth_data):
    w = tmp_path / "joint"
    r = run_cli(
        [
            "train",
            f"--config={TINY_PBA}",
            f"--config.workdir={w}",
            f"--config.data.train={synth_data}",
            *SMALL,
            "--config.train.steps=8",
            "--config.checkpoint.every_steps=4",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(w)
    assert sorted(recs) == list(range(1, 9))
    for k in ("head_loss", "head_accuracy", "head_accuracy_non_neutral", "total_loss", "loss", "grad_norm"):
        assert k in recs[8], k
    assert recs[8]["head_loss"] < 0.85 * recs[1]["head_loss"], (recs[1]["head_loss"], recs[8]["head_loss"])
    for s in (4, 8):
        assert (w / "checkpoints" / str(s) / "head").is_dir()

    out = tmp_path / "hf"
    r = run_cli(["export", "--checkpoint", str(w), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / ph.HEAD_WEIGHTS_FILE).exists() and (out / ph.HEAD_CONFIG_FILE).exists()
    head, hcfg = ph.load_head(str(out))
    assert ph.head_training(str(out)) == "joint"  # how it was fit, recorded from the run's pba.mode
    assert hcfg.embed_dim == 32 and hcfg.max_persona_tokens == 128 and hcfg.persona_variant == "p"
    stored = _restore_head_item(w, 8)
    for name, arr in stored.items():
        np.testing.assert_array_equal(np.asarray(getattr(head, name).get_value()), np.asarray(arr))
    # transformers still loads the policy folder unchanged (the head files are ignored)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))

    res = tmp_path / "eval.json"
    r = run_cli(
        [
            "eval",
            "--model",
            str(out),
            "--method",
            "pba",
            "--preference",
            "predicted",
            "--benchmark",
            f"alignx={synth_data}",
            "--persona",
            "p",
            "--limit",
            "8",
            "--max-length",
            "256",
            "--out",
            str(res),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    block = json.loads(res.read_text())["preference_head"]
    agree = block["agreement_with_golden"]["alignx/p"]
    for k in ("accuracy", "accuracy_non_neutral", "macro_f1", "heuristic_accuracy", "heuristic_macro_f1"):
        assert 0.0 <= agree[k] <= 1.0, (k, agree)
    # pooled over everything scored: the head's numbers beside the release rule's, on the same rows
    for k in ("accuracy", "macro_f1", "heuristic_accuracy", "heuristic_macro_f1"):
        assert 0.0 <= block[k] <= 1.0, (k, block)
    assert block["n"] == 8
    assert block["config"]["embed_dim"] == 32


@pytest.mark.slow
def test_two_stage_with_predicted_profiles(tmp_path, synth_data):
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.tokenizer import load_tokenizer
    from tests.test_preference_head import full_loss

    w = tmp_path / "two"
    r = run_cli(
        [
            "train",
            f"--config={TINY_PBA}",
            f"--config.workdir={w}",
            f"--config.data.train={synth_data}",
            *SMALL,
            "--config.train.steps=3",
            "--config.checkpoint.every_steps=2",
            "--config.pba.mode=two_stage",
            "--config.pba.preference=mix",
            "--config.pba.mix_predicted=0.5",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "first-stage preference head" in r.stderr
    pred = np.load(w / stages.PREDICTED_FILE)
    assert pred.shape == (32, 90) and set(np.unique(pred)) <= {0.0, 0.5, 1.0}
    assert not (w / "checkpoints" / "2" / "head").exists() and (w / "checkpoints" / "3" / "head").is_dir()
    recs = _records(w)
    assert "head_loss" in recs[3] and "head_accuracy" in recs[3] and "head_loss" not in recs[2]

    out = tmp_path / "hf"
    r = run_cli(["export", "--checkpoint", str(w), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    head, hcfg = ph.load_head(str(out))
    assert ph.head_training(str(out)) == "two_stage"
    # the fitted head beats a fresh one on the frozen final policy's features
    from alignx_jax.data.schema import load_rows

    rows, _ = load_rows(synth_data)
    model = load_pretrained(str(out), dtype="float32")
    feats = predict.persona_features(
        model,
        load_tokenizer(str(out)),
        rows,
        pooling=hcfg.pooling,
        variant=hcfg.persona_variant,
        max_tokens=hcfg.max_persona_tokens,
    )
    fresh = ph.PreferenceHead(hcfg, rngs=nnx.Rngs(0))
    assert full_loss(head, feats, rows) < 0.8 * full_loss(fresh, feats, rows)


@pytest.mark.slow
def test_two_stage_resumed_at_its_last_step_without_a_head_is_refused(tmp_path, synth_data):
    """pba.mode=two_stage fits the head after the last step: a run stopped at step 1 and resumed with
    train.steps=1 ran no step and said done with no head to export; now one line, W/config.json kept."""
    import shutil

    w = tmp_path / "two"
    args = [
        "train",
        f"--config={TINY_PBA}",
        f"--config.workdir={w}",
        f"--config.data.train={synth_data}",
        *SMALL,
        "--config.checkpoint.every_steps=1",
        "--config.pba.mode=two_stage",
    ]
    r = run_cli([*args, "--config.train.steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (w / "checkpoints" / "2" / "head").is_dir() and not (w / "checkpoints" / "1" / "head").exists()
    shutil.rmtree(w / "checkpoints" / "2")  # as a run stopped after step 1
    r = run_cli([*args, "--config.train.steps=1"])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("alignx: error:"), r.stderr[-3000:]
    assert "checkpoints/1: step 1 has no preference head" in last and "train.steps above 1" in last, last
    assert json.loads((w / "config.json").read_text())["train"]["steps"] == 2
    r = run_cli([*args, "--config.train.steps=2"])
    assert r.returncode == 0 and (w / "checkpoints" / "2" / "head").is_dir(), r.stderr[-3000:]


@pytest.mark.slow
def test_joint_sigterm_resume_is_exact(tmp_path, synth_data):
    args = [
        f"--config.data.train={synth_data}",
        *SMALL,
        "--config.train.steps=6",
        "--config.checkpoint.every_steps=100",
    ]
    full = tmp_path / "full"
    r = run_cli(["train", f"--config={TINY_PBA}", f"--config.workdir={full}", *args])
    assert r.returncode == 0, r.stderr[-3000:]
    want = _records(full)

    part = tmp_path / "part"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alignx_jax",
            "train",
            f"--config={TINY_PBA}",
            f"--config.workdir={part}",
            *args,
        ],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    metrics = part / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(_records(part))
    assert 2 <= stopped < 6 and (part / "checkpoints" / str(stopped) / "head").is_dir()
    r = run_cli(["train", f"--config={TINY_PBA}", f"--config.workdir={part}", *args])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    got = _records(part)
    assert sorted(got) == list(range(1, 7))
    for s in range(1, 7):
        for k in ("loss", "head_loss", "head_accuracy"):
            assert abs(got[s][k] - want[s][k]) < 1e-5, (s, k, got[s][k], want[s][k])
    a, b = _restore_head_item(full, 6), _restore_head_item(part, 6)
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-5, atol=1e-6)


def _train_on_rows_without_a_direction(tmp_path, synth_data, *overrides):
    """(the rows, W, the finished process) of a 2-step tiny PBA train on rows whose directions are gone."""
    from alignx_jax.data.schema import load_rows

    rows, _ = load_rows(synth_data)
    data = tmp_path / "no_direction.jsonl"
    data.write_text("".join(json.dumps(dict(r, **{"Preference Direction": None})) + "\n" for r in rows))
    w = tmp_path / "w"
    args = [f"--config={TINY_PBA}", f"--config.workdir={w}", f"--config.data.train={data}", *SMALL]
    return rows, w, run_cli(["train", *args, "--config.train.steps=2", *overrides])


def test_two_stage_on_rows_without_a_direction_is_refused_before_the_first_step(tmp_path, synth_data):
    # the head is fit after the last step: found there, the steps (and the last one's checkpoint) were lost
    rows, w, r = _train_on_rows_without_a_direction(tmp_path, synth_data, "--config.pba.mode=two_stage")
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("alignx: error:")]
    assert err == [
        f"alignx: error: pba.mode=two_stage: none of the {len(rows)} training rows the head is fit on "
        "(pba.head_rows) has a 'Preference Direction' to learn from; use data with one, or pba.enabled=false"
    ], r.stderr[-2000:]
    assert not (w / "metrics.jsonl").exists() and not (w / "checkpoints").exists()


@pytest.mark.parametrize("preference", ["predicted", "mix"])
def test_predicted_profiles_from_rows_without_a_direction_are_refused_in_setup(
    tmp_path, synth_data, preference
):
    # the first-stage head has nothing to learn from: it failed after the reference was written, worded
    # as "two-stage head training" whatever pba.mode said
    rows, w, r = _train_on_rows_without_a_direction(
        tmp_path, synth_data, "--config.pba.enabled=false", f"--config.pba.preference={preference}"
    )
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("alignx: error:")]
    assert err == [
        f"alignx: error: pba.preference={preference}: none of the {len(rows)} training rows the head is fit "
        "on (pba.head_rows) has a 'Preference Direction' to learn from; use data with one, or "
        "pba.preference=golden or history"
    ], r.stderr[-2000:]
    assert not (w / "reference").exists() and not (w / stages.PREDICTED_FILE).exists()


@pytest.mark.parametrize("fraction, predicted", [(0.0, False), (0.25, True), (1.0, True)])
def test_mix_fits_a_first_stage_head_only_when_some_row_renders_its_profile(fraction, predicted):
    # pba.mix_predicted=0 renders every row's golden profile: the first-stage head (a persona pass over
    # every training row) was fit and its P~ never read
    cfg = load_config(
        TINY_PBA,
        ["--config.workdir=/tmp/x", "--config.pba.preference=mix", f"--config.pba.mix_predicted={fraction}"],
    )
    assert config_schema.uses_predicted(cfg) is predicted
    cfg.train.eval_every, cfg.data.eval = 2, ROOT  # held-out scoring reads golden profiles only
    if predicted:
        with pytest.raises(ConfigError, match="renders predicted profiles of training rows only"):
            train.validate_config(cfg)
    else:
        train.validate_config(cfg)
