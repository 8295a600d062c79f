"""Held-out evaluation during training (`train.eval_every`, `data.eval`): the `eval/` records of a tiny
in-process run, and one evaluation checked against a plain forward and the DPO formulas."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli

from alignx_jax import train
from alignx_jax.config import load_config
from alignx_jax.errors import ConfigError
from alignx_jax.train import loop
from alignx_jax.train.signals import StopFlag
from alignx_jax.train.step import jit_eval_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
SMALL = [  # tests/test_train.py's tiny run: 32 synthetic rows, hidden 32, one 128-token bucket
    "--config.model.init.hidden_size=32",
    "--config.model.init.intermediate_size=64",
    "--config.model.init.head_dim=8",
    "--config.data.synth_users=8",
    "--config.data.max_length=128",
    "--config.data.buckets=(128,)",
    "--config.loss.logps_chunk=64",
    "--config.train.global_batch=8",
    "--config.train.micro_batch=4",
    "--config.train.progress=false",
]
NAMES = (
    "eval/rewards/accuracies",
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/rewards/margins",
    "eval/logps/chosen",
    "eval/logps/rejected",
    "eval/loss",
    "eval/accuracy",
    "eval/pairs",
)
N_EVAL = 11  # one full batch of 8 and one padded with 5 dummy pairs


def _row(i: int, rng: np.random.Generator) -> dict:
    def d():
        return rng.choice([0.0, 0.5, 1.0], size=90).tolist()

    return {
        "prompt": f"held-out post {i}",
        "chosen": f"a kind and careful answer {i}",
        "rejected": f"no {i}",
        "Preference Direction": d(),
        "Demographic Information": f"I am {20 + i} years old.",
        "User-Generated Content": [{"prompt": f"ugc {i}", "comment": "comment", "Preference Direction": d()}],
        "Pair-wise Comparative Feedback": [
            {"prompt": f"pair {i}", "chosen": "c", "rejected": "r", "Preference Direction": d()}
        ],
    }


def _eval_file(tmp_path) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([_row(i, rng) for i in range(N_EVAL)]))
    return str(path)


def _cfg(tmp_path, *extra):
    return load_config(TINY, [f"--config.workdir={tmp_path}/w", *SMALL, "--config.train.steps=4", *extra])


def _records(tmp_path):
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_eval_rows_every_n_steps(tmp_path):
    cfg = _cfg(tmp_path, "--config.train.eval_every=2", f"--config.data.eval={_eval_file(tmp_path)}")
    assert loop.run_training(cfg) == 0
    evals = [r for r in _records(tmp_path) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(NAMES) <= set(r), r
        assert r["eval/pairs"] == N_EVAL
        assert 0.0 <= r["eval/rewards/accuracies"] <= 1.0
        assert r["eval/accuracy"] == r["eval/rewards/accuracies"]
        assert np.isfinite(r["eval/loss"])
    assert evals[0]["eval/loss"] != evals[1]["eval/loss"]  # the params moved between the two


def test_no_eval_rows_when_off(tmp_path):
    assert loop.run_training(_cfg(tmp_path, "--config.train.steps=2")) == 0
    assert not any(k.startswith("eval/") for r in _records(tmp_path) for k in r)


def _plain_logps(codec, params_list, pairs):
    """Summed log-probs of each response after its prompt by a plain forward (no masks, no chunking, no
    packing): every prompt+response row right-padded to one length and run as one batch, so the causal
    forward is compiled once (jit) rather than run op by op per example; right padding only adds positions
    after each response, which a causal decoder's earlier logits never see. -> one [len(pairs)] array of
    log-probs per (params, which) in `params_list` x ('chosen', 'rejected') order."""
    rows = [(p, r) for p, c, rj in pairs for r in (c, rj)]
    width = max(len(p) + len(r) for p, r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = p + r

    @jax.jit
    def forward(params, ids):
        return jax.nn.log_softmax(codec.module(params)(ids).astype(jnp.float32), axis=-1)

    out = []
    for params in params_list:
        logp = np.asarray(forward(params, jnp.asarray(ids)))
        sums = []
        for i, (p, r) in enumerate(rows):
            pos = np.arange(len(p) - 1, len(p) + len(r) - 1)
            sums.append(float(logp[i, pos, np.asarray(r)].sum()))
        out += [np.asarray(sums[0::2]), np.asarray(sums[1::2])]
    return out


def test_evaluation_matches_a_plain_forward(tmp_path):
    """One evaluation at params moved off the reference, against the DPO sigmoid formulas per pair."""
    cfg = _cfg(tmp_path, "--config.train.eval_every=2", f"--config.data.eval={_eval_file(tmp_path)}")
    t = loop.Trainer(cfg, StopFlag())
    held: list = []
    try:
        t.set_up(held)
        t.open_data()
        t.build_state()
        key = iter(jax.random.split(jax.random.key(1), 1000))
        t.params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(key), p.shape, p.dtype), t.params)
        t.eval_fn = jit_eval_step(t.codec, cfg)
        got = t.evaluate_held_out()
        beta = float(cfg.loss.beta)
        pairs = []
        for i in range(N_EVAL):
            ex = t.example(t.eval_source[i], None, i)  # held-out rows: the whole history, as alignx eval
            pairs.append((list(ex.prompt_ids), list(ex.chosen_ids), list(ex.rejected_ids)))
        pc, pr, ref_c, ref_r = _plain_logps(t.codec, [t.params, t.ref_params], pairs)
    finally:
        for lock in held:
            lock.release()
    rc, rr = beta * (pc - ref_c), beta * (pr - ref_r)
    want = {
        "eval/logps/chosen": pc.mean(),
        "eval/logps/rejected": pr.mean(),
        "eval/rewards/chosen": rc.mean(),
        "eval/rewards/rejected": rr.mean(),
        "eval/rewards/margins": (rc - rr).mean(),
        "eval/rewards/accuracies": (rc > rr).mean(),
        "eval/loss": np.mean(-np.log(1.0 / (1.0 + np.exp(-(rc - rr))))),
        "eval/pairs": N_EVAL,
    }
    assert 0.0 < want["eval/rewards/accuracies"] < 1.0 or want["eval/rewards/margins"] != 0.0
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-4, atol=2e-4, err_msg=name)
    assert got["eval/accuracy"] == got["eval/rewards/accuracies"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--config.train.eval_every=2"], "needs --config.data.eval"),
        (["--config.train.eval_every=2", "--config.data.eval=/no/such/eval.json"], "no such file"),
        (["--config.train.eval_every=-1"], "eval_every must be >= 0"),
    ],
)
def test_eval_config_errors(tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        train.validate_config(_cfg(tmp_path, *extra))


def test_eval_with_precomputed_reference_is_refused(tmp_path):
    cfg = _cfg(
        tmp_path,
        "--config.train.eval_every=2",
        f"--config.data.eval={_eval_file(tmp_path)}",
        "--config.loss.reference=precomputed",
    )
    with pytest.raises(ConfigError, match="on_the_fly or none"):
        train.validate_config(cfg)


def test_data_eval_without_eval_every_is_a_warning_not_silently_unused(tmp_path):
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={tmp_path}/w", *SMALL, "--config.train.steps=1"]
        + ["--config.data.eval=/no/such/eval.json"]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "alignx train: warning: data.eval=/no/such/eval.json is not read: train.eval_every=0" in r.stderr
    ), r.stderr[-2000:]
