"""The trainer's loss menu (issue #20): orpo, simpo, ipo_sum and reference-free DPO in the train step,
TRL metric names, the W&B writer; the release PBA profile (issue #19) and the export's prompt format.

Each first-step loss is written out here from the papers' formulas, on log-probs of a plain forward
(`Decoder.__call__` logits, full log-softmax) of the initial model, not by the code under test.
"""

from __future__ import annotations

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from alignx_jax import config_schema, train
from alignx_jax.config import load_config
from alignx_jax.errors import ConfigError
from alignx_jax.losses import token_logps_from_logits
from alignx_jax.models.decoder import Decoder, DecoderConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
TINY_PBA = os.path.join(ROOT, "configs", "tiny_pba.py")
VOCAB = 97


def _model():
    cfg = DecoderConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return Decoder(cfg, rngs=nnx.Rngs(0))


def _batch(B=4, T=24, seed=0):
    """2B rows, chosen first; responses of different lengths (the length-averaged losses see it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(2 * B, T)).astype(np.int32)
    attn = np.zeros((2 * B, T), np.int32)
    loss = np.zeros((2 * B, T), np.int32)
    for r in range(2 * B):
        p, n = int(rng.integers(3, 8)), int(rng.integers(4, T - 8))
        attn[r, : p + n] = 1
        loss[r, p : p + n] = 1
    pos = np.where(attn == 1, np.arange(T)[None], 0).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "positions": pos,
        "pair_mask": np.ones((B,), np.int32),
    }


def _loss_cfg(**kw):
    """The schema's `loss` section with a small logps chunk and `kw` set."""
    c = config_schema.default_config().loss
    c.update({"logps_chunk": 7, **kw})
    return c


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _expected_first_loss(kind, beta, pc, pr, nc, nr, gamma_beta_ratio=0.25):
    """The formulas, at step 1 (policy = reference, so h = 0 for the reference-using kinds)."""
    mc, mr = pc / nc, pr / nr
    if kind == "orpo":  # -m(y_w) - beta log s(log odds(y_w) - log odds(y_l))
        odds = lambda m: m - np.log1p(-np.exp(m))
        per = -mc - beta * _log_sigmoid(odds(mc) - odds(mr))
    elif kind == "simpo":  # -log s(beta (m(y_w) - m(y_l)) - gamma_beta_ratio * beta)
        per = -_log_sigmoid(beta * (mc - mr) - gamma_beta_ratio * beta)
    elif kind == "ipo_sum":  # (h - 1 / (2 beta))^2 on summed log-probs, h = 0 against the copy
        per = (0.0 - 1.0 / (2.0 * beta)) ** 2 * np.ones_like(pc)
    elif kind == "sigmoid_free":  # reference-free DPO: -log s(beta (log pi(y_w) - log pi(y_l)))
        per = -_log_sigmoid(beta * (pc - pr))
    else:
        raise ValueError(kind)
    return float(np.mean(per))


CASES = {
    "orpo": dict(type="orpo", beta=0.1),
    "simpo": dict(type="simpo", beta=2.0),
    "ipo_sum": dict(type="ipo_sum", beta=0.1),
    "sigmoid_free": dict(type="sigmoid", beta=0.1, reference="none"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_menu_first_step_matches_the_formula_and_loss_falls(case):
    model = _model()
    codec = train.ParamsCodec.of(model)
    params = nnx.to_pure_dict(nnx.state(model))
    b = _batch()
    logits = model(b["input_ids"], b["attention_mask"], b["positions"])
    lp = np.asarray(token_logps_from_logits(logits, b["input_ids"], b["loss_mask"]), np.float64)
    ntok = b["loss_mask"][:, 1:].sum(-1).astype(np.float64)
    B = b["pair_mask"].shape[0]
    cfg = _loss_cfg(**CASES[case])
    want = _expected_first_loss(case, cfg.beta, lp[:B], lp[B:], ntok[:B], ntok[B:])
    optim = ml_collections.ConfigDict(
        dict(
            lr=3e-3, warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0
        )
    )
    tx, _ = train.make_optimizer(optim, 10)
    needs_ref = train.step.reference_needed(cfg)
    assert needs_ref == (case == "ipo_sum")
    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), params) if needs_ref else None
    # reference-free kinds run without reference params, even with loss.reference=on_the_fly (orpo/simpo)
    step = jax.jit(train.make_train_step(codec, tx, cfg, precomputed=False))
    batch = train.to_microbatches(b, 2)
    p, o = params, tx.init(params)
    seen = []
    for _ in range(4):
        p, o, m = step(p, o, ref, batch)
        seen.append(float(m["loss"]))
    np.testing.assert_allclose(seen[0], want, rtol=1e-4, atol=1e-4)
    assert seen[-1] < seen[0] - 1e-4, seen
    # TRL's names; the rewards of the length-averaged kinds are beta * mean log-probs
    for k in ("rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/chosen", "logits/rejected"):
        assert np.isfinite(float(m[k])), k
    if case in ("orpo", "simpo"):
        _, _, m0 = step(params, tx.init(params), ref, batch)
        np.testing.assert_allclose(
            float(m0["rewards/chosen"]), cfg.beta * np.mean(lp[:B] / ntok[:B]), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(float(m0["logps/rejected"]), np.mean(lp[B:]), rtol=1e-4, atol=1e-4)


def test_logits_metric_is_the_mean_logit_over_response_tokens():
    model = _model()
    codec = train.ParamsCodec.of(model)
    params = nnx.to_pure_dict(nnx.state(model))
    b = _batch(seed=2)
    logits = np.asarray(model(b["input_ids"], b["attention_mask"], b["positions"]), np.float64)
    B = b["pair_mask"].shape[0]
    mask = b["loss_mask"][:, 1:].astype(bool)  # token t is predicted at position t - 1
    pos_mean = logits[:, :-1].mean(-1)
    want_c, want_r = pos_mean[:B][mask[:B]].mean(), pos_mean[B:][mask[B:]].mean()
    optim = ml_collections.ConfigDict(
        dict(
            lr=1e-3, warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0
        )
    )
    tx, _ = train.make_optimizer(optim, 10)
    step = jax.jit(train.make_train_step(codec, tx, _loss_cfg(reference="none"), precomputed=False))
    _, _, m = step(params, tx.init(params), None, train.to_microbatches(b, 2))
    np.testing.assert_allclose(float(m["logits/chosen"]), want_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(m["logits/rejected"]), want_r, rtol=1e-4, atol=1e-5)


def test_config_accepts_the_menu_and_reference_none():
    for kind in ("sigmoid", "cdpo", "robust", "hinge", "ipo", "ipo_sum", "orpo", "simpo"):
        train.validate_config(load_config(TINY, ["--config.workdir=/tmp/x", f"--config.loss.type={kind}"]))
    cfg = load_config(TINY, ["--config.workdir=/tmp/x", "--config.loss.reference=none"])
    train.validate_config(cfg)
    assert not train.step.reference_needed(cfg.loss)
    cfg = load_config(TINY, ["--config.workdir=/tmp/x", "--config.loss.type=simpo"])
    assert cfg.loss.gamma_beta_ratio == 0.25 and not train.step.reference_needed(cfg.loss)
    with pytest.raises(ConfigError, match="gamma_beta_ratio"):
        train.validate_config(
            load_config(TINY, ["--config.workdir=/tmp/x", "--config.loss.gamma_beta_ratio=-1"])
        )


def test_eval_reports_the_trl_named_means():
    from alignx_jax.evaluate import reward_stats

    outs = [
        {
            "correct": True,
            "logp_chosen": -1.0,
            "logp_rejected": -3.0,
            "ref_logp_chosen": -2.0,
            "ref_logp_rejected": -2.0,
        },
        {
            "correct": False,
            "logp_chosen": -4.0,
            "logp_rejected": -2.0,
            "ref_logp_chosen": -2.0,
            "ref_logp_rejected": -2.0,
        },
    ]
    got = reward_stats(outs, 0.5)
    assert got["rewards/accuracies"] == 0.5
    assert got["rewards/chosen"] == pytest.approx(0.5 * (1.0 - 2.0) / 2)  # 0.5 * mean(+1, -2)
    assert got["rewards/margins"] == pytest.approx(0.5 * ((1.0 + 1.0) + (-2.0 - 0.0)) / 2)
    assert got["logps/rejected"] == pytest.approx(-2.5)
    assert reward_stats([{"correct": True}], 0.1) == {}


# ----------------------------------------------------------------------------- W&B writer


def test_wandb_project_without_wandb_is_one_line_error(tmp_path, monkeypatch):
    from alignx_jax.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError) as e:
        MetricsWriter(str(tmp_path / "w"), wandb_project="proj")
    msg = str(e.value)
    assert "\n" not in msg and "train.wandb_project='proj'" in msg and "pip install wandb" in msg


def test_wandb_writer_logs_the_train_scalars(tmp_path, monkeypatch):
    from alignx_jax.metrics import MetricsWriter, read_metrics

    calls = {"log": [], "init": None, "finished": False}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    w = MetricsWriter(str(tmp_path / "w"), tensorboard=False, wandb_project="proj", wandb_config={"a": 1})
    w.write(1, {"loss": 0.5, "rewards/accuracies": 1.0, "note": "x"})
    w.close()
    assert calls["init"]["project"] == "proj" and calls["init"]["config"] == {"a": 1}
    assert calls["log"] == [(1, {"train/loss": 0.5, "train/rewards/accuracies": 1.0})]
    assert calls["finished"]
    assert read_metrics(str(tmp_path / "w"))[0]["rewards/accuracies"] == 1.0
    # one W&B run per workdir: its id is stored in W/wandb_id.txt and a resumed run passes it again
    run_id = calls["init"]["id"]
    assert calls["init"]["resume"] == "allow" and run_id.isalnum()
    assert (tmp_path / "w" / "wandb_id.txt").read_text().strip() == run_id
    MetricsWriter(str(tmp_path / "w"), tensorboard=False, wandb_project="proj", resume_step=1).close()
    assert calls["init"]["id"] == run_id and calls["init"]["resume"] == "allow"
    MetricsWriter(str(tmp_path / "other"), tensorboard=False, wandb_project="proj").close()
    assert calls["init"]["id"] != run_id


# ----------------------------------------------------------------------------- release PBA profile


def test_release_pba_config_validates():
    cfg = load_config(
        os.path.join(ROOT, "configs", "llama3_8b_pba_tpu_v5p_64.py"),
        ["--config.workdir=/tmp/x", "--config.model.hf_path=/m", "--config.data.train=/d"],
    )
    assert cfg.pba.preference == "history"
    train.validate_config(cfg)
    assert not config_schema.uses_predicted(cfg)


def _vec(**dims):
    v = [0.5] * 90
    for k, x in dims.items():
        v[int(k[1:])] = x
    return v


def test_trainer_example_renders_the_sampled_history_profile():
    """`Trainer.example` with pba.preference=history: the row's profile text is
    `profile_text(sampled_preference(...))` of the history it sampled, not the golden direction's."""
    from alignx_jax.data import persona
    from alignx_jax.data import prompts as prompts_lib
    from alignx_jax.tokenizer import load_tokenizer
    from alignx_jax.train.loop import Trainer

    cfg = load_config(TINY_PBA, ["--config.workdir=/tmp/x", "--config.pba.preference=history"])
    trainer = Trainer.__new__(Trainer)  # only what example() reads
    trainer.cfg, trainer.tokenizer = cfg, load_tokenizer()
    trainer.persona_length, trainer.use_predicted, trainer.rows_truncated = None, False, 0
    row = {
        "prompt": "Why is the sky blue?",
        "chosen": "Because of Rayleigh scattering.",
        "rejected": "No idea.",
        "Preference Direction": _vec(d5=1.0),  # golden: a dimension no history item has
        persona.UGC_FIELD: [
            {"prompt": "Best pizza?", "comment": "Pineapple.", "Preference Direction": _vec(d0=1.0)},
            {"prompt": "Cats or dogs?", "comment": "Cats.", "Preference Direction": _vec(d0=1.0, d1=0.0)},
        ],
        persona.PAIR_FIELD: [
            {
                "prompt": "Relax?",
                "chosen": "Walk.",
                "rejected": "Work.",
                "Preference Direction": _vec(d1=0.0),
            },
        ],
    }
    golden_text = persona.profile_text(_vec(d5=1.0))
    checked = 0
    for index in range(12):
        ex = trainer.example(row, persona.row_rng(7, (0, index)), index)
        ugc, pairs = persona.sample_history(row, persona.row_rng(7, (0, index)), cfg.data.persona)
        sampled = persona.sampled_preference(ugc, pairs)
        if sampled is None:
            continue
        text = persona.profile_text(sampled[0])
        assert text == sampled[1] and text != golden_text
        view = {**row, persona.UGC_FIELD: ugc, persona.PAIR_FIELD: pairs}
        want = prompts_lib.prompt_ids(
            trainer.tokenizer,
            view,
            method="pba",
            persona=cfg.data.persona,
            profile=text,
            fmt=cfg.data.prompt_format,
        )
        assert list(ex.prompt_ids) == list(want)
        checked += 1
    assert checked >= 3


# ----------------------------------------------------------------------------- whole runs (in process)


def _run(args):
    from alignx_jax import cli

    return cli.main(["train", *args])


SMALL = [
    "--config.model.init.hidden_size=32",
    "--config.model.init.intermediate_size=64",
    "--config.model.init.head_dim=8",
    "--config.data.synth_users=4",
    "--config.data.max_length=256",
    "--config.data.buckets=(256,)",
    "--config.loss.logps_chunk=64",
    "--config.train.global_batch=4",
    "--config.train.micro_batch=4",
    "--config.train.steps=2",
    "--config.train.progress=false",
]


def test_reference_free_pba_history_release_run_exports_its_prompt_format(tmp_path, capsys):
    """One tiny run: PBA with the history profile, the release format, ORPO (no reference kept: the
    config says on_the_fly); TRL metric names in metrics.jsonl; the export records `release`, so
    `alignx eval` of the export defaults to `paper` even once the workdir is gone."""
    import shutil

    from alignx_jax import cli
    from alignx_jax import evaluate as ev
    from alignx_jax.metrics import read_metrics

    w = tmp_path / "w"
    code = _run(
        [
            f"--config={TINY_PBA}",
            f"--config.workdir={w}",
            *SMALL,
            "--config.pba.preference=history",
            "--config.pba.max_persona_tokens=256",
            "--config.data.prompt_format=release",
            "--config.loss.type=orpo",
        ]
    )
    assert code == 0, capsys.readouterr().err
    recs = read_metrics(str(w))
    assert [r["step"] for r in recs] == [1, 2]
    for k in ("loss", "grad_norm", "learning_rate", "rewards/accuracies", "rewards/margins", "logits/chosen"):
        assert isinstance(recs[0][k], float), k
    assert "reward_accuracy" not in recs[0]
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(w), "--out", str(out)]) == 0
    manifest = json.loads((out / "alignx_export.json").read_text())
    assert manifest["prompt_format"] == "release"
    shutil.rmtree(w)  # the manifest alone says how the model was trained
    assert ev.default_prompt_format(str(out), None) == "paper"
