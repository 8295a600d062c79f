"""The DPO train step (tiny) and the `alignx train` contracts (the CLI's `main`, slow; a process of its own
where the contract needs one: a signal, eight devices)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import cli_env, run_cli, save_tiny_hf
from flax import nnx

from alignx_jax import allocator, config_schema, train
from alignx_jax.config import load_config
from alignx_jax.models.decoder import Decoder, DecoderConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")


# ----------------------------------------------------------------------------- in-process step tests


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


def _batch(B=4, T=24, vocab=97, seed=0, dummies=0):
    """A collated-layout batch (2B rows, chosen first) with random prompts/responses."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(2 * B, T)).astype(np.int32)
    attn = np.zeros((2 * B, T), np.int32)
    loss = np.zeros((2 * B, T), np.int32)
    for r in range(2 * B):
        p, n = int(rng.integers(3, 8)), int(rng.integers(4, T - 8))
        attn[r, : p + n] = 1
        loss[r, p : p + n] = 1
    pair_mask = np.ones((B,), np.int32)
    if dummies:
        pair_mask[-dummies:] = 0
        for r in (*range(B - dummies, B), *range(2 * B - dummies, 2 * B)):
            attn[r] = 0
            attn[r, 0] = 1
            loss[r] = 0
    pos = np.where(attn == 1, np.arange(T)[None], 0).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "positions": pos,
        "pair_mask": pair_mask,
    }


def _loss_cfg(**kw):
    """The schema's `loss` section (the release's sigmoid DPO) with a small logps chunk and `kw` set."""
    c = config_schema.default_config().loss
    c.update({"logps_chunk": 7, **kw})
    return c


def _setup(lr=1e-2):
    model = _tiny_model()
    codec = train.ParamsCodec.of(model)
    params = nnx.to_pure_dict(nnx.state(model))
    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    optim = ml_collections.ConfigDict(
        {
            "lr": lr,
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
    return codec, params, ref, tx


def _tensorboard_scalars(folder) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the event files under `folder` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(folder.iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_to_microbatches_keeps_pairs_together():
    b = _batch(B=4, T=16)
    mb = train.to_microbatches(b, 2, T=20)
    assert isinstance(mb, train.TwoRowBatch)
    assert mb.input_ids.shape == (2, 2, 2, 20) and mb.pair_mask.shape == (2, 2)
    for k in range(4):  # pair k: chosen row k, rejected row 4 + k
        m, j = divmod(k, 2)
        np.testing.assert_array_equal(mb.input_ids[m, j, 0, :16], b["input_ids"][k])
        np.testing.assert_array_equal(mb.input_ids[m, j, 1, :16], b["input_ids"][4 + k])
    assert (mb.attention_mask[..., 16:] == 0).all() and (mb.loss_mask[..., 16:] == 0).all()


def test_schedule_warmup_cosine_to_floor():
    optim = ml_collections.ConfigDict(
        {
            "lr": 1.0,
            "warmup_ratio": 0.1,
            "min_lr_ratio": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "clip": 1.0,
        }
    )
    _, sched = train.make_optimizer(optim, 100)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 0.1, rtol=1e-6)
    assert 0.1 < float(sched(55)) < 1.0


@pytest.fixture(scope="module")
def steps():
    """One set of jitted functions for the module (compiling is the slow part on CPU)."""
    codec, params, ref, tx = _setup()
    return dict(
        codec=codec,
        params=params,
        ref=ref,
        tx=tx,
        fly=jax.jit(train.make_train_step(codec, tx, _loss_cfg(), precomputed=False)),
        pre=jax.jit(train.make_train_step(codec, tx, _loss_cfg(), precomputed=True)),
        ref_fn=jax.jit(train.make_ref_logps_fn(codec, _loss_cfg())),
    )


def test_first_step_loss_is_log2_and_params_move(steps):
    params, ref, tx, step = steps["params"], steps["ref"], steps["tx"], steps["fly"]
    batch = train.to_microbatches(_batch(dummies=1), 2)
    p1, o1, m = step(params, tx.init(params), ref, batch)
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), atol=1e-5)
    assert float(m["pairs"]) == 3.0  # the dummy pair is not counted
    assert abs(float(m["rewards/margins"])) < 1e-5 and float(m["grad_norm"]) > 0
    delta = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    assert delta > 1e-4
    # the second step sees a policy that differs from the reference
    _, _, m2 = step(p1, o1, ref, batch)
    assert abs(float(m2["loss"]) - np.log(2.0)) > 1e-4


def test_grad_accumulation_matches_one_big_batch(steps):
    params, ref, tx, step = steps["params"], steps["ref"], steps["tx"], steps["fly"]
    b = _batch(B=4, dummies=1, seed=3)
    o = tx.init(params)
    # one step to make policy != reference, then compare M=1 vs M=2 from the same state
    params, o, _ = step(params, o, ref, train.to_microbatches(_batch(B=4, seed=4), 2))
    pa, _, ma = step(params, o, ref, train.to_microbatches(b, 1))
    pb, _, mb = step(params, o, ref, train.to_microbatches(b, 2))
    for k in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "logps/chosen", "logits/chosen"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v): summation-order noise in near-zero grads shows at ~1e-6
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_precomputed_reference_equals_on_the_fly(steps):
    params, ref, tx, fly, pre = steps["params"], steps["ref"], steps["tx"], steps["fly"], steps["pre"]
    o = tx.init(params)
    params, o, _ = fly(params, o, ref, train.to_microbatches(_batch(seed=5), 2))
    batch = train.to_microbatches(_batch(seed=6), 2)
    lp, _ = steps["ref_fn"](ref, batch.replace(slot=np.zeros((2, 2), np.int32)))
    pa, _, ma = fly(params, o, ref, batch)
    pb, _, mb = pre(params, o, None, batch.replace(ref_logps=np.asarray(lp)))
    np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]), atol=1e-5)
    np.testing.assert_allclose(float(mb["rewards/margins"]), float(ma["rewards/margins"]), atol=1e-5)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_pair_logps_matches_full_logits(steps):
    codec, params = steps["codec"], steps["params"]
    b = _batch(B=2, seed=7)
    mb = train.to_microbatches(b, 1).microbatch(0)
    got = train.pair_logps(codec, params, mb, chunk=5)
    model = codec.module(params)
    logits = model(b["input_ids"], b["attention_mask"], b["positions"])
    from alignx_jax.losses import token_logps_from_logits

    want = token_logps_from_logits(logits, b["input_ids"], b["loss_mask"])
    np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(want[:2]), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got[:, 1]), np.asarray(want[2:]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.micro_batch=3", "multiple of train.micro_batch"),
        ("--config.loss.type=kto", "loss.type='kto'"),
        ("--config.loss.reference=cached", "loss.reference"),
        ("--config.data.max_length=4096", "largest of data.buckets"),
        ("--config.data.compact_tokens=-1", "data.compact_tokens=-1"),
        ("--config.checkpoint.every_steps=0", "checkpoint.every_steps must be at least 1, got 0"),
        ("--config.checkpoint.keep=-1", "checkpoint.keep must be at least 1, got -1"),
        ("--config.train.log_every=0", "train.log_every must be at least 1"),
        ("--config.optim.lr=nan", "optim.lr must be positive, got nan"),
        ("--config.optim.warmup_ratio=nan", "optim.warmup_ratio must be in [0, 1], got nan"),
        ("--config.optim.warmup_ratio=-0.5", "optim.warmup_ratio must be in [0, 1], got -0.5"),
        ("--config.optim.min_lr_ratio=-1", "optim.min_lr_ratio must be in [0, 1], got -1"),
        ("--config.optim.b2=1", "optim.b2 must be in [0, 1), got 1"),
        ("--config.optim.eps=0", "optim.eps must be positive and finite, got 0"),
        ("--config.optim.clip=nan", "optim.clip must be >= 0 and finite (0 = no clipping), got nan"),
        ("--config.optim.weight_decay=inf", "optim.weight_decay must be >= 0 and finite, got inf"),
        ("--config.loss.beta=nan", "loss.beta must be positive, got nan"),
        ("--config.model.init.hidden_size=-64", "model.init.hidden_size must be positive, got -64"),
        ("--config.data.max_length=0", "data.max_length must be at least 4, got 0"),
        ("--config.train.seed=-1", "train.seed must be >= 0, got -1"),
        ("--config.data.synth_seed=-3", "data.synth_seed must be >= 0, got -3"),
        ("--config.model.init.seed=-1", "model.init.seed must be >= 0, got -1"),
        ("--config.data.synth_pairs_per_user=0", "data.synth_pairs_per_user must be at least 1"),
        ("--config.data.synth_users=1", "data.synth_users must be at least 2"),
        (
            "--config.model.init.max_position_embeddings=0",
            "model.init.max_position_embeddings must be positive, got 0",
        ),
        ("--config.model.init.vocab_size=-2", "model.init.vocab_size must be positive (or -1"),
        ("--config.model.init.head_dim=7", "model.init.head_dim must be even (rotary embeddings"),
        ("--config.model.init.rope_theta=0", "model.init.rope_theta must be positive and finite, got 0.0"),
        ("--config.model.init.rope_theta=inf", "model.init.rope_theta must be positive and finite, got inf"),
        (
            "--config.model.init.rms_norm_eps=nan",
            "model.init.rms_norm_eps must be positive and finite, got nan",
        ),
        (
            "--config.model.init.rms_norm_eps=-1",
            "model.init.rms_norm_eps must be positive and finite, got -1.0",
        ),
        (
            "--config.model.init.rms_norm_eps=0",
            "model.init.rms_norm_eps must be positive and finite, got 0.0",
        ),
        ("--config.model.init.model_type=lama", "model.init.model_type='lama' is not one of llama, mistral"),
        ("--config.loss.logps_chunk=-1", "loss.logps_chunk must be >= 0"),
        ("--config.loss.label_smoothing=1.5", "loss.label_smoothing must be in"),
        ("--config.loss.sft_weight=-1.0", "loss.sft_weight must be >= 0"),
        ("--config.loss.sft_weight=inf", "loss.sft_weight must be >= 0 and finite (0 = none), got inf"),
        ("--config.loss.gamma_beta_ratio=nan", "loss.gamma_beta_ratio must be >= 0 and finite, got nan"),
        ("--config.loss.gamma_beta_ratio=inf", "loss.gamma_beta_ratio must be >= 0 and finite, got inf"),
        ("--config.loss.gamma_beta_ratio=-1", "loss.gamma_beta_ratio must be >= 0 and finite, got -1.0"),
        (
            "--config.data.pack_length=100",
            "data.pack_length=100: 0",
        ),
        (
            "--config.model.init.num_key_value_heads=3",
            "model.init.num_attention_heads=4 must be a multiple of model.init.num_key_value_heads=3",
        ),
        ("--config.sharding.rules=(('embd','fsdp'),)", "unknown logical axis 'embd'"),
        ("--config.sharding.rules=(('embed','fsbp'),)", "'embed' -> unknown mesh axis 'fsbp'"),
    ],
)
def test_validate_config_errors(override, message):
    from alignx_jax.errors import ConfigError

    cfg = load_config(TINY, ["--config.workdir=/tmp/x", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.validate_config(cfg)


def test_length_groups_without_shuffle_is_refused():
    """The loader groups the shuffled order only: data.length_groups with data.shuffle=false did nothing."""
    from alignx_jax.errors import ConfigError

    cfg = load_config(
        TINY, ["--config.workdir=/tmp/x", "--config.data.length_groups=4", "--config.data.shuffle=false"]
    )
    with pytest.raises(ConfigError, match="data.length_groups regroups the shuffled order"):
        train.validate_config(cfg)


def test_validate_config_requires_workdir_and_inputs():
    from alignx_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="workdir"):
        train.validate_config(load_config(TINY))
    real = os.path.join(ROOT, "configs", "llama3_8b_ica_gpu.py")
    with pytest.raises(ConfigError, match="model.hf_path"):
        train.validate_config(load_config(real, ["--config.workdir=/tmp/x"]))
    with pytest.raises(ConfigError, match="data.train"):
        train.validate_config(load_config(real, ["--config.workdir=/tmp/x", "--config.model.hf_path=/m"]))


# ----------------------------------------------------------------------------- CLI

# a tiny run: 32 synthetic rows, hidden 32, one 128-token bucket (one compilation)
SMALL = [
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


def _alignx(args, devices, timeout=600):
    """`alignx ARGS` as a process of its own with `devices` CPU devices (run_cli runs the rest in this one)."""
    return subprocess.run(
        [sys.executable, "-m", "alignx_jax", *args],
        env=cli_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs}


def test_bad_config_key_is_one_line_exit_1(tmp_path):
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={tmp_path}/w", "--config.train.stesp=3"])
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("alignx: error:") and "train.stesp" in lines[0], (
        r.stderr
    )
    assert "Traceback" not in r.stderr


def test_a_random_model_smaller_than_the_tokenizer_is_one_line_not_a_nan_loss(tmp_path):
    # ids past the embedding table read NaN: the run stopped with "non-finite loss ... lower optim.lr"
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={tmp_path}/w", "--config.model.init.vocab_size=100"]
    )
    assert r.returncode == 1, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("alignx: error:")]
    assert len(err) == 1 and "model.init.vocab_size=100 is smaller than the tokenizer's" in err[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w" / "checkpoints").exists()


def test_impossible_mesh_is_one_line_exit_1(tmp_path):
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={tmp_path}/w",
            "--config.mesh.data=3",
            "--config.mesh.fsdp=1",
        ]
    )
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("alignx: error: mesh data=3"), r.stderr


@pytest.mark.slow
def test_train_writes_workdir_and_8_device_mesh_matches_1_device(tmp_path):
    # rows of 256 for pairs of at most 128 tokens: token compaction (data.compact_tokens, on by
    # default) keeps about half of them, in one group of rows on 1 device and 4 (one per batch shard) on 8
    steps = ["--config.train.steps=3", "--config.checkpoint.every_steps=3", "--config.data.buckets=(256,)"]
    one = tmp_path / "one"
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={one}",
            *SMALL,
            *steps,
            "--config.mesh.data=1",
            "--config.mesh.fsdp=1",
            "--config.mesh.tensor=1",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    eight = tmp_path / "eight"
    r = _alignx(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={eight}",
            *SMALL,
            *steps,
            "--config.mesh.data=2",
            "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2",
        ],
        devices=8,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # that process ran as `alignx` runs: re-executed with mimalloc preloaded where the wheel is installed
    expect = "mimalloc" if allocator.mimalloc_library() and allocator.configured() != "system" else ""
    assert f"alignx train: host allocator {expect}" in r.stderr, r.stderr[-3000:]
    a, b = _losses(one), _losses(eight)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose(a[1], np.log(2.0), atol=1e-5)
    for s in a:
        assert abs(a[s] - b[s]) < 1e-3, (s, a[s], b[s])
    assert len(set(a.values())) == 3  # the loss moves
    # workdir layout: resolved config, reference HF folder with tokenizer, metrics, TB events, checkpoint
    cfg = json.load(open(one / "config.json"))
    assert cfg["workdir"] == str(one) and cfg["train"]["steps"] == 3
    ref = one / "reference"
    assert (ref / "config.json").exists() and (ref / "tokenizer.json").exists()
    assert list(ref.glob("*.safetensors"))
    tb = _tensorboard_scalars(one / "tensorboard")  # TensorBoard has each step's loss, as the JSONL does
    assert {step: v for step, tag, v in tb if tag == "train/loss"} == pytest.approx(a, abs=1e-6)
    assert (one / "checkpoints" / "3" / "params").is_dir() and (one / "checkpoints" / "3" / "meta").is_dir()
    rec = [json.loads(line) for line in open(one / "metrics.jsonl")][-1]
    for k in (
        "loss",
        "rewards/accuracies",
        "learning_rate",
        "grad_norm",
        "tokens_per_sec",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "rows_dropped",
        "rows_truncated",
        "padding_fraction",
        "computed_padding_fraction",
        "host/page_faults",
        "host/kernel_seconds",
    ):
        assert k in rec, k
    assert rec["host/page_faults"] >= 0 and 0 <= rec["host/kernel_seconds"] < 60
    # data.compact_tokens (the default): the token-wise layers compute at most the batch's padding share
    assert 0.0 <= rec["computed_padding_fraction"] < 0.5 * rec["padding_fraction"]
    # the training checkpoint exports through `alignx export --checkpoint W`
    r = run_cli(["export", "--checkpoint", str(one), "--out", str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").exists()


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
    steps = ["--config.train.steps=7", "--config.checkpoint.every_steps=100"]
    full = tmp_path / "full"
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={full}", *SMALL, *steps])
    assert r.returncode == 0, r.stderr[-3000:]
    want = _losses(full)

    part = tmp_path / "part"
    cmd = [
        sys.executable,
        "-m",
        "alignx_jax",
        "train",
        f"--config={TINY}",
        f"--config.workdir={part}",
        *SMALL,
        *steps,
    ]
    proc = subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
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
    assert "SIGTERM" in err and "resume" in err
    stopped = max(_losses(part))
    assert 2 <= stopped < 7
    assert (part / "checkpoints" / str(stopped)).is_dir()

    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={part}", *SMALL, *steps])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    got = _losses(part)
    assert sorted(got) == list(range(1, 8))
    for s in range(1, 8):
        assert abs(got[s] - want[s]) < 1e-4, (s, got[s], want[s])


@pytest.mark.slow
def test_precomputed_reference_run_matches_on_the_fly(tmp_path):
    steps = ["--config.train.steps=2", "--config.checkpoint.every_steps=100"]
    runs = {}
    for mode in ("on_the_fly", "precomputed"):
        w = tmp_path / mode
        r = run_cli(
            [
                "train",
                f"--config={TINY}",
                f"--config.workdir={w}",
                *SMALL,
                *steps,
                f"--config.loss.reference={mode}",
            ]
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[mode] = _losses(w)
    assert (tmp_path / "precomputed" / "ref_logps.p0.npy").exists()
    for s in (1, 2):
        assert abs(runs["precomputed"][s] - runs["on_the_fly"][s]) < 1e-5


@pytest.mark.parametrize(
    "layout",
    [[], ["--config.data.share_prompt=true", "--config.data.buckets=(256,)"]],
    ids=["two_rows", "shared"],
)
def test_precomputed_reference_reuses_a_later_epochs_pairs(tmp_path, layout):
    # 32 rows, batch 8, 8 steps: epoch 2 holds the same pairs (method none: no per-epoch persona
    # sample) in other batches, so its reference log-probs are reused, not computed; every step's
    # loss must still equal the on-the-fly reference's, which recomputes them
    steps = ["--config.train.steps=8", "--config.checkpoint.every_steps=100", "--config.data.method=none"]
    runs, err = {}, {}
    for mode in ("on_the_fly", "precomputed"):
        w = tmp_path / mode
        r = run_cli(
            ["train", f"--config={TINY}", f"--config.workdir={w}", *SMALL, *steps, *layout]
            + [f"--config.loss.reference={mode}"]
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[mode], err[mode] = _losses(w), r.stderr
    assert "reference log-probs of 8 steps, 4 computed (4 reused" in err["precomputed"]
    for s in range(1, 9):
        assert abs(runs["precomputed"][s] - runs["on_the_fly"][s]) < 1e-5, s


@pytest.mark.parametrize("history,computed", [("fixed", 4), ("all", 4), ("sample", 8)])
def test_ica_history_modes_and_reference_reuse(tmp_path, history, computed):
    # ICA's prompt holds its history sample: a fresh one per epoch ('sample') makes epoch 2's pairs new
    # tokens, one per row ('fixed') or the whole history ('all') repeats them, so they are reused
    steps = ["--config.train.steps=8", "--config.checkpoint.every_steps=100", "--config.data.method=ica"]
    w = tmp_path / history
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", *SMALL, *steps]
        + ["--config.loss.reference=precomputed", f"--config.data.history={history}"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"reference log-probs of 8 steps, {computed} computed ({8 - computed} reused" in r.stderr
    assert all(np.isfinite(v) for v in _losses(w).values())


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(tmp_path):
    w = tmp_path / "nan"
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={w}",
            *SMALL,
            "--config.train.steps=3",
            "--config.checkpoint.every_steps=1",
            "--config.optim.lr=1e30",
            "--config.optim.clip=0.0",
        ]
    )
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("alignx: error: non-finite loss") and "at step" in last, r.stderr[-2000:]
    assert (w / "checkpoints" / "1").is_dir()


@pytest.mark.slow
def test_train_from_hf_folder_copies_reference(tmp_path):
    from alignx_jax.models.hf import save_hf
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
        max_position_embeddings=64,  # under the run's data.max_length=128: a warning, not an error
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    src = tmp_path / "hf"
    save_hf(Decoder(cfg, rngs=nnx.Rngs(3)), str(src), tokenizer_dir=TINY_TOKENIZER_DIR)
    # model.tokenizer: the same vocabulary, another tokenizer_config.json (what the export must ship)
    tok_dir = tmp_path / "tok"
    shutil.copytree(TINY_TOKENIZER_DIR, tok_dir)
    tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "model_max_length": 77}))
    w = tmp_path / "w"
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={w}",
            *SMALL,
            f"--config.model.hf_path={src}",
            f"--config.model.tokenizer={tok_dir}",
            "--config.model.dtype=bfloat16",
            "--config.train.steps=2",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    warning = (
        "alignx train: warning: data.max_length=128 exceeds the model's max_position_embeddings=64: rows "
        "that long use positions it was not trained at"
    )
    assert r.stderr.count(warning) == 1, r.stderr[-3000:]
    losses_ = _losses(w)
    # bf16 policy vs bf16 reference: same weights, but the two forwards fuse differently in bf16
    np.testing.assert_allclose(losses_[1], np.log(2.0), atol=2e-4)
    assert losses_[2] != losses_[1]
    copied = sorted(p.name for p in (w / "reference").iterdir())
    assert copied == sorted([p.name for p in src.iterdir()] + ["alignx_base.json"])
    assert (w / "reference" / "model-00001-of-00001.safetensors").read_bytes() == (
        src / "model-00001-of-00001.safetensors"
    ).read_bytes()
    ref_tok = (w / "reference" / "tokenizer_config.json").read_bytes()
    assert ref_tok == (tok_dir / "tokenizer_config.json").read_bytes()  # model.tokenizer's, not hf_path's
    base = json.loads((w / "reference" / "alignx_base.json").read_text())
    assert base["base_model"] == str(src)  # absolute: an export from another directory still finds it


def test_train_from_an_imported_checkpoint_keeps_the_bases_stop_tokens(tmp_path):
    """W/reference of a run from an imported checkpoint (and so its export, and `alignx generate --model W`)
    keeps the base's generation_config.json, whose eos ids may name a stop token config.json's do not
    (Gemma-2's <end_of_turn>); it was rebuilt from config.json's eos id alone."""
    src = tmp_path / "hf"
    cfg = save_tiny_hf(src, seed=3, max_position_embeddings=256)
    greedy = ["--prompt", "Hi", "--greedy", "--max-new-tokens", "8", "--json", "--prompt-format", "chat"]

    def generated(model) -> list[int]:
        r = run_cli(["generate", "--model", model, *greedy])
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)["token_ids"]

    base = generated(src)
    k = next(i for i, t in enumerate(base) if i > 0 and t not in base[:i])  # not its first token
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": [cfg.eos_token_id, base[k]]}
    (src / "generation_config.json").write_text(json.dumps(gen, indent=1))
    assert run_cli(["import", "--hf", src, "--out", tmp_path / "ckpt"]).returncode == 0
    w = tmp_path / "w"
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={w}",
            *SMALL,
            f"--config.model.hf_path={tmp_path / 'ckpt'}",
            "--config.optim.lr=1e-12",  # the policy stays the base: its greedy tokens are the base's
            "--config.train.steps=2",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    want = (src / "generation_config.json").read_bytes()
    assert (w / "reference" / "generation_config.json").read_bytes() == want
    assert generated(w) == base[: k + 1]  # stopped at the base's extra stop token
    assert run_cli(["export", "--checkpoint", w, "--out", tmp_path / "out"]).returncode == 0
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == want


def test_metrics_writer_appends_and_drops_steps_after_resume_point(tmp_path):
    from alignx_jax.metrics import MetricsWriter, read_metrics

    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for s in (1, 2, 3):
        w.write(s, {"loss": 0.5 * s, "bad": float("nan")})
    w.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    assert read_metrics(str(tmp_path))[0]["bad"] == "nan"
    w = MetricsWriter(str(tmp_path), tensorboard=False, resume_step=2)
    w.write(3, {"loss": 9.0})
    w.close()
    recs = read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[-1]["loss"] == 9.0
    assert not MetricsWriter(str(tmp_path / "off"), enabled=False).enabled
    assert not (tmp_path / "off").exists()


# ----------------------------------------------------------------------------- shared-prompt layout


def _shared_prompt_batches(B=4, dummies=1, seed=11, vocab=97):
    """The same pairs in the two-row layout and in batching.share_prompt's one-row layout."""
    from alignx_jax.data import batching

    rng = np.random.default_rng(seed)
    exs = [
        batching.DPOExample(
            prompt_ids=[int(x) for x in rng.integers(3, vocab, int(rng.integers(2, 12)))],
            chosen_ids=[int(x) for x in rng.integers(3, vocab, int(rng.integers(1, 9)))] + [2],
            rejected_ids=[int(x) for x in rng.integers(3, vocab, int(rng.integers(1, 9)))] + [2],
        )
        for _ in range(B - dummies)
    ]
    two = batching.collate(exs, buckets=(16, 24, 32), pad_id=0, num_pairs=B)
    one = batching.share_prompt(two, buckets=(16, 24, 32, 48), pad_id=0)
    return two, one


def test_share_prompt_layout_gives_the_two_row_log_probs(steps):
    codec, params = steps["codec"], steps["params"]
    two, one = _shared_prompt_batches()
    assert one["input_ids"].shape[0] == two["input_ids"].shape[0] // 2 and one["score_index"].shape[:2] == (
        4,
        2,
    )
    want = train.pair_logps(codec, params, train.to_microbatches(two, 1).microbatch(0), chunk=None)
    got = train.pair_logps(codec, params, train.to_microbatches(one, 1).microbatch(0), chunk=3)
    np.testing.assert_allclose(np.asarray(got)[:3], np.asarray(want)[:3], rtol=1e-5, atol=1e-4)
    assert (np.asarray(got)[3] == 0).all()  # the dummy pair scores nothing
    # each prompt's tokens are counted (and run) once instead of twice
    from alignx_jax.data import batching

    prompts = sum(int(np.flatnonzero(two["loss_mask"][k])[0]) for k in range(3))
    assert batching.padding_stats(one)["real_tokens"] == batching.padding_stats(two)["real_tokens"] - prompts


def test_share_prompt_train_step_equals_two_row_step():
    codec, params, ref, tx = _setup()
    step = jax.jit(train.make_train_step(codec, tx, _loss_cfg(sft_weight=0.5), precomputed=False))
    two, one = _shared_prompt_batches(seed=12)
    o = tx.init(params)
    params, o, _ = step(params, o, ref, train.to_microbatches(two, 2))  # policy != reference from here
    pa, _, ma = step(params, o, ref, train.to_microbatches(two, 2))
    pb, _, mb = step(params, o, ref, train.to_microbatches(one, 2))
    for k in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-4, atol=1e-5)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)


def test_packed_pairs_give_the_same_log_probs_and_step(steps):
    from alignx_jax.data import batching

    codec, params, ref, tx = steps["codec"], steps["params"], steps["ref"], steps["tx"]
    _, one = _shared_prompt_batches(B=8, dummies=1, seed=13)
    packed = batching.pack_pairs(one, groups=2, length=48, pad_id=0)
    n_rows = packed["input_ids"].shape[0]
    assert n_rows < 8 and n_rows % 2 == 0  # fewer rows than pairs, the same count per group
    # pairs of group g sit in group g's rows; a row's segments are 1, 2, ... in order
    assert (packed["score_row"][:4] < n_rows // 2).all() and (packed["score_row"][4:] >= n_rows // 2).all()
    for row in range(n_rows):
        segs = packed["segment_ids"][row][packed["attention_mask"][row] == 1]
        assert (np.diff(segs) >= 0).all() and segs[0] == 1
    want = train.pair_logps(codec, params, train.to_microbatches(one, 1).microbatch(0), chunk=None)
    got = train.pair_logps(codec, params, train.to_microbatches(packed, 1).microbatch(0), chunk=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    # and a whole step, with the packing cut per microbatch (2 microbatches = 2 groups)
    step = steps["fly"]
    o = tx.init(params)
    pa, _, ma = step(params, o, ref, train.to_microbatches(one, 2))
    pb, _, mb = step(params, o, ref, train.to_microbatches(packed, 2))
    for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "logits/chosen"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, atol=1e-5)
    # Adam's first update is ~lr * sign(g): summation-order noise in near-zero gradients shows at
    # ~1e-5 on a few elements (lr 1e-2); a wrong mask or offset moves them by ~lr
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-4)


def test_pack_pairs_rejects_a_pair_longer_than_the_row():
    from alignx_jax.data import batching

    _, one = _shared_prompt_batches(B=4, dummies=0, seed=14)
    with pytest.raises(ValueError, match="does not fit a packed row"):
        batching.pack_pairs(one, groups=1, length=4, pad_id=0)


def test_a_run_whose_every_row_is_dropped_is_an_error(tmp_path):
    """data.overflow=drop with a max length no row fits: a warning at the first empty step, then one
    error line (exit 1) instead of a run that trained on nothing and said done."""
    w = tmp_path / "w"
    fit_nothing = [
        "--config.data.max_length=16",
        "--config.data.buckets=(16,)",
        "--config.loss.logps_chunk=16",
        "--config.data.overflow=drop",
    ]
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", *SMALL, *fit_nothing, "--config.train.steps=2"]
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "warning: step 1 had no pair" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("alignx: error:") and "no step of this run had a pair" in last, r.stderr[-2000:]
    # nothing saved: a checkpoint of no training would make the same command's rerun say done (exit 0)
    assert not list((w / "checkpoints").glob("*")), sorted((w / "checkpoints").iterdir())
    again = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", *SMALL, *fit_nothing, "--config.train.steps=2"]
    )
    assert again.returncode == 1 and "no step of this run had a pair" in again.stderr, again.stderr[-2000:]


def test_steps_without_pairs_are_counted_over_a_resume(tmp_path):
    """The end-of-run count of steps that kept no pair is the whole run's: saved with each checkpoint, so
    a run resumed part way says what the uninterrupted run says (it counted the resumed invocation's
    alone); a checkpoint saved before the count was kept resumes counting from 0."""
    from alignx_jax.checkpointing import META_DIGEST, meta_digest

    # one pair a step, some rows longer than max_length: some steps keep no pair
    some_dropped = [
        "--config.data.max_length=192",
        "--config.data.buckets=(192,)",
        "--config.loss.logps_chunk=64",
        "--config.data.overflow=drop",
        "--config.train.global_batch=1",
        "--config.train.micro_batch=1",
    ]

    def train_to(w, steps):
        r = run_cli(
            ["train", f"--config={TINY}", f"--config.workdir={w}", *SMALL, *some_dropped]
            + [f"--config.train.steps={steps}"]
        )
        assert r.returncode == 0, r.stderr[-3000:]
        counts = re.findall(r"warning: (\d+) steps had no pair", r.stderr)
        return int(counts[0]) if counts else 0

    whole = train_to(tmp_path / "whole", 8)
    first = train_to(tmp_path / "split", 4)
    assert 0 < first < whole < 8, (first, whole)  # steps with and without pairs on both sides of step 4
    assert train_to(tmp_path / "split", 8) == whole
    # an older checkpoint: its meta without the count (and its digest made again)
    old = tmp_path / "old"
    assert train_to(old, 4) == first
    meta_file = old / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("steps_without_pairs") == first
    meta.pop(META_DIGEST)
    meta_file.write_text(json.dumps({**meta, META_DIGEST: meta_digest(meta)}))
    assert train_to(old, 8) == whole - first


def test_too_few_synthetic_rows_for_a_batch_is_refused_before_the_workdir(tmp_path):
    """data.train '' with data.synth_users x data.synth_pairs_per_user under one global batch: refused in
    one line naming the keys before W/data (and the lock, the fingerprint) is written; it failed after."""
    w = tmp_path / "w"
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", "--config.data.synth_users=4"]
        + ["--config.data.synth_pairs_per_user=2", "--config.train.global_batch=16"]
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("alignx: error:"), r.stderr[-2000:]
    assert "data.synth_users x data.synth_pairs_per_user = 8 synthetic rows" in lines[-1], lines[-1]
    assert "train.global_batch=16" in lines[-1] and not w.exists()


def test_twins_with_an_odd_batch_or_synthetic_rows_is_refused_before_the_workdir(tmp_path):
    """data.twins with an odd batch per process: one line naming the keys before the workdir is taken; the
    loader refused it after W held its lock and data."""
    w, rows = tmp_path / "w", tmp_path / "twins.json"
    rows.write_text("[]")  # refused before it is read
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", "--config.data.twins=true"]
        + ["--config.train.global_batch=3", "--config.train.micro_batch=1", f"--config.data.train={rows}"]
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1] == (
        "alignx: error: data.twins: train.global_batch=3 makes batches of 3 pairs per process, an odd number "
        "(rows 2k and 2k+1 are twins and share a batch); make it even"
    ), r.stderr[-2000:]
    assert not w.exists()
    # synthetic users (data.train '') are no twins: the loader refused them once W held them
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={w}", "--config.data.twins=true"])
    assert r.stderr.strip().splitlines()[-1] == (
        "alignx: error: data.twins needs a file of twins (`alignx data contrast --twins`) as data.train; "
        "data.train '' makes synthetic users, whose rows are no twins"
    ), r.stderr[-2000:]
    assert not w.exists()


@pytest.mark.parametrize(
    "given, words",
    [
        ("--config.data.train={missing}", "{missing}: no such file or folder"),
        ("--config.model.tokenizer={missing}", "model.tokenizer: folder not found: {missing}"),
    ],
    ids=["data.train", "model.tokenizer"],
)
def test_a_missing_input_path_is_refused_before_the_workdir(tmp_path, given, words):
    """A data.train or model path that names nothing: the loader's one line, now before the workdir is
    taken (a new workdir was left holding only its lock)."""
    w, missing = tmp_path / "w", str(tmp_path / "nope")
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={w}", given.format(missing=missing)])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and words.format(missing=missing) in last, r.stderr[-2000:]
    assert not w.exists()


@pytest.mark.parametrize("key", ["model.hf_path", "model.tokenizer"])
@pytest.mark.parametrize("given", ["a file", "an empty folder"])
def test_a_model_path_that_is_no_model_folder_is_refused_before_the_workdir(tmp_path, key, given):
    """A file, or a folder without tokenizer files, as a model path: the loader's one line, before the
    workdir is taken (a new workdir was left holding only its lock). An empty model.hf_path folder is
    refused as no model first (check_input_paths), before its tokenizer is loaded."""
    w, bad = tmp_path / "w", tmp_path / "m"
    if given == "a file":
        bad.write_text("not a model")
        words = f"{key}: folder not found: {bad}"
    else:
        bad.mkdir()
        words = f"{bad}: no config.json" if key == "model.hf_path" else f"{bad}: no tokenizer files"
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={w}", f"--config.{key}={bad}"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and words in lines[-1], r.stderr[-2000:]
    assert len(lines) == 1 and not w.exists(), r.stderr[-2000:]


@pytest.mark.parametrize(
    "holds, words",
    [
        ((), "{m}: no config.json"),
        (("config.json",), "{m}: no *.safetensors files"),
        (("params/",), "{m}: no config.json (not a model checkpoint or training workdir)"),
    ],
    ids=["tokenizer files only", "no weights", "params/ without config.json"],
)
def test_a_model_folder_of_tokenizer_files_is_refused_before_the_workdir(tmp_path, holds, words):
    """A model.hf_path folder with tokenizer files (its tokenizer loads) but no model: the model loader's
    line, before the workdir is taken (it failed building the policy and left W holding its lock)."""
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR

    w, m = tmp_path / "w", tmp_path / "m"
    shutil.copytree(TINY_TOKENIZER_DIR, m)
    for name in holds:
        (m / name).mkdir() if name.endswith("/") else (m / name).write_text("{}")
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={w}", f"--config.model.hf_path={m}"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1] == f"alignx: error: {words.format(m=m)}", r.stderr[-2000:]
    assert len(lines) == 1 and not w.exists(), r.stderr[-2000:]


def test_frozen_layers_past_a_loaded_models_depth_is_refused_before_the_workdir(tmp_path):
    """model.frozen_layers at or above the model.hf_path model's num_hidden_layers: one line naming the key,
    from its config.json before the workdir is taken (the model build refused it after, W holding its
    lock and data)."""

    m, w = tmp_path / "m", tmp_path / "w"
    save_tiny_hf(m)
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", f"--config.model.hf_path={m}"]
        + ["--config.model.frozen_layers=2"]
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1] == (
        f"alignx: error: model.frozen_layers=2 must be below the num_hidden_layers=2 of model.hf_path={m}"
    ), r.stderr[-2000:]
    assert len(lines) == 1 and not w.exists(), r.stderr[-2000:]


def test_model_paths_resolve_after_the_job_is_joined(tmp_path, monkeypatch):
    """train.distributed=true: the job is joined before model.hf_path resolves (preparing smollm2 or
    converting a .gguf runs JAX, and jax.distributed.initialize must come before any computation)."""
    from alignx_jax import distributed
    from alignx_jax.errors import ConfigError
    from alignx_jax.models import presets

    calls = []

    def join(*a, **k):
        calls.append("join")
        raise ConfigError("stopped here")

    monkeypatch.setattr(distributed, "initialize", join)
    monkeypatch.setattr(presets, "resolve_model_path", lambda path, **k: calls.append("resolve") or path)
    w = tmp_path / "w"
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", "--config.model.hf_path=smollm2"]
        + ["--config.train.distributed=true"]
    )
    assert r.returncode == 1 and r.stderr.strip().endswith("stopped here"), r.stderr[-2000:]
    assert calls == ["join"] and not w.exists()


def test_fewer_rows_than_a_batch_is_one_line_naming_the_config_keys(tmp_path):
    """A data.train smaller than one global batch: the loader's message named its own arguments
    (pairs_per_batch, drop_remainder), which no --config flag sets."""
    from alignx_jax.data.synth import generate_world

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(generate_world(4, 2, seed=0).rows[0]) + "\n")
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={tmp_path}/w", *SMALL, "--config.train.steps=1"]
        + [f"--config.data.train={data}"]
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == (
        f"alignx: error: {data}: 1 training rows make no full batch of train.global_batch=8 pairs; "
        "lower train.global_batch or add rows"
    ), r.stderr[-2000:]


def test_resuming_on_changed_data_names_the_checkpoint_and_the_data(tmp_path):
    from alignx_jax.data.synth import generate_world

    rows = generate_world(8, 4, seed=0).rows
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "train",
        f"--config={TINY}",
        f"--config.workdir={tmp_path}/w",
        *SMALL,
        f"--config.data.train={data}",
    ]
    r = run_cli([*args, "--config.train.steps=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # a row less
    r = run_cli([*args, "--config.train.steps=2"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"alignx: error: {tmp_path}/w/checkpoints/1 with data.train={data}: cannot resume the data loader: "
        f"saved num_rows={len(rows)} but this run has {len(rows) - 1}"
    ), r.stderr[-2000:]


def test_resuming_past_the_asked_steps_is_refused_before_the_config_is_rewritten(tmp_path):
    """train.steps under the checkpoint's step: it said "resuming (step 4 of 2)", "done, 4 steps" and
    recorded train.steps=2 in W/config.json beside step 4's weights; now one line, config.json kept. The
    same steps again (a finished run rerun) still says done."""
    w = tmp_path / "w"
    args = ["train", f"--config={TINY}", f"--config.workdir={w}", *SMALL, "--config.checkpoint.every_steps=2"]
    r = run_cli([*args, "--config.train.steps=4"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli([*args, "--config.train.steps=2"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("alignx: error:"), r.stderr[-2000:]
    assert f"{w}/checkpoints/4: step 4 is past this run's 2 steps (train.steps=2)" in lines[-1], lines[-1]
    assert "train.steps >= 4" in lines[-1] and "done" not in r.stderr, r.stderr[-2000:]
    assert json.loads((w / "config.json").read_text())["train"]["steps"] == 4
    r = run_cli([*args, "--config.train.steps=4"])
    assert r.returncode == 0 and "done, 4 steps" in r.stderr, r.stderr[-2000:]


def _one_pba_step(tmp_path, data):
    """One tiny PBA step on `data` (in file order, two rows a batch), the finished process."""
    pba = os.path.join(ROOT, "configs", "tiny_pba.py")
    return run_cli(
        ["train", f"--config={pba}", f"--config.workdir={tmp_path}/w", *SMALL, "--config.train.steps=1"]
        + [f"--config.data.train={data}", "--config.data.shuffle=false", "--config.train.global_batch=2"]
        + ["--config.train.micro_batch=2", "--config.pba.max_persona_tokens=128"]
    )


def test_a_pba_row_without_a_profile_names_its_file_and_row(tmp_path):
    """A row PBA cannot render a profile for fails naming the file it is in and its row there."""
    from alignx_jax.data.synth import generate_world

    rows = generate_world(4, 2, seed=0).rows
    folder = tmp_path / "data"
    folder.mkdir()
    keep = ("prompt", "chosen", "rejected")  # the benchmark shape: no profile, direction or history
    (folder / "a.jsonl").write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows[:3]))
    (folder / "b.jsonl").write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows[3:6]))
    r = _one_pba_step(tmp_path, folder)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"alignx: error: {folder / 'a.jsonl'}, row 0: PBA needs a profile"), r.stderr[
        -2000:
    ]


def test_a_blank_pba_profile_is_worded_as_eval_and_generate_word_it(tmp_path):
    """A blank `profile` failed training as `FILE, row N: field 'profile': is empty` (the loop's own
    rewording of persona.row_profile's error) where eval and generate say `FILE, row N, field 'profile':
    ...`: one wording, the owner's."""
    from alignx_jax.data.persona import row_profile
    from alignx_jax.data.synth import generate_world
    from alignx_jax.errors import DataError

    rows = generate_world(2, 2, seed=0).rows
    keep = ("prompt", "chosen", "rejected")  # the benchmark shape: the profile is the only P~
    data = [{**{k: r[k] for k in keep}, "profile": "  " if i == 1 else "Concise"} for i, r in enumerate(rows)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    with pytest.raises(DataError) as owner:
        row_profile(data[1], file=str(path), index=1)
    r = _one_pba_step(tmp_path, path)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"alignx: error: {owner.value}", r.stderr[-2000:]
    assert str(owner.value).startswith(f"{path}, row 1, field 'profile': is empty")


def test_a_resumed_writer_purges_the_tensorboard_steps_after_its_checkpoint(tmp_path):
    """A run killed after its checkpoint at step 2 logged steps 3-4; the resumed run logs them again: its
    event file starts with TensorBoard's purge marker at step 3 (SessionLog START), so the killed run's
    3-4 are hidden instead of shown twice (metrics.jsonl is cut back the same way)."""
    import struct

    from tensorboardX.proto import event_pb2

    from alignx_jax.metrics import MetricsWriter

    first = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": float(step)})
    first.close()
    time.sleep(1.1)  # a second event file (their names carry the second)
    second = MetricsWriter(str(tmp_path), resume_step=2)
    second.write(3, {"loss": 30.0})
    second.close()
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert len(files) == 2
    data, i, starts = files[-1].read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        if event.HasField("session_log"):
            starts.append((event.step, event.session_log.status))
        i += 12 + n + 4
    assert starts == [(3, event_pb2.SessionLog.START)]
    assert [r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))] == [1.0, 2.0, 30.0]


def test_tensorboard_events_are_on_disk_at_each_flush_and_a_second_writer_keeps_the_first_file(tmp_path):
    """The trainer flushes at each checkpoint save: a kill after it must leave TensorBoard every step up to
    the checkpoint, which the resumed run does not log again (tensorboardX's writer queued them for a thread
    that wrote every 2 minutes, its flush() not waiting for it). A resume in the same second opened a file of
    the same name and truncated the first run's events."""
    from alignx_jax.metrics import MetricsWriter

    first = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
        first.write(step, {"loss": float(step)})
    first.flush()  # the checkpoint of step 3; not closed: the run is killed
    assert sorted(_tensorboard_scalars(tmp_path / "tensorboard")) == [
        (1, "train/loss", 1.0),
        (2, "train/loss", 2.0),
        (3, "train/loss", 3.0),
    ]
    second = MetricsWriter(str(tmp_path), resume_step=3)  # no sleep: the same second
    second.write(4, {"loss": 4.0})
    second.close()
    assert [(s, v) for s, tag, v in _tensorboard_scalars(tmp_path / "tensorboard")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
    ]


def test_a_skipped_steps_nonfinite_loss_is_a_nan_scalar_in_tensorboard_as_in_the_jsonl(tmp_path):
    """A step skipped for a non-finite loss (nan_policy=skip) was logged in metrics.jsonl with "nan" strings
    and left out of TensorBoard: TensorBoard gets the NaN (and inf) as scalars, so the two have the same steps."""
    from alignx_jax.metrics import MetricsWriter

    w = MetricsWriter(str(tmp_path))
    w.write(1, {"loss": 0.5, "skipped_nonfinite_steps": 0})
    w.write(2, {"loss": np.float32("nan"), "grad_norm": float("inf"), "skipped_nonfinite_steps": 1})
    w.close()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert recs[1] == {"step": 2, "loss": "nan", "grad_norm": "inf", "skipped_nonfinite_steps": 1}
    tb = sorted(_tensorboard_scalars(tmp_path / "tensorboard"))
    assert [(step, tag) for step, tag, _ in tb] == [
        (1, "train/loss"),
        (1, "train/skipped_nonfinite_steps"),
        (2, "train/grad_norm"),
        (2, "train/loss"),
        (2, "train/skipped_nonfinite_steps"),
    ]
    assert tb[2][2] == float("inf") and np.isnan(tb[3][2]) and tb[4][2] == 1.0


def test_a_progress_bar_into_a_log_file_redraws_rarely_and_log_every_past_the_steps_logs_the_last(tmp_path):
    """stderr a pipe (a job's log): the train bar redrew every step twice (update, then set_postfix's own
    redraw), each one more carriage-return line in the log; now at most every PIPE_PROGRESS_SECONDS, plus
    its first and last state. train.log_every past the run's steps logs the last step, once."""
    w = tmp_path / "W"
    args = [a for a in SMALL if not a.startswith("--config.train.progress")]
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", *args, "--config.train.steps=6"]
        + ["--config.checkpoint.every_steps=6", "--config.train.log_every=100"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    draws = [d for d in re.split(r"[\r\n]", r.stderr) if d.startswith("train:")]
    assert 2 <= len(draws) <= 3 and "6/6" in draws[-1] and "loss=" in draws[-1], draws
    recs = [json.loads(line) for line in open(w / "metrics.jsonl")]
    assert [rec["step"] for rec in recs] == [6]
    for key in ("loss", "grad_norm", "learning_rate", "rewards/accuracies", "tokens_per_sec", "step_time"):
        assert isinstance(recs[0][key], float) and np.isfinite(recs[0][key]), (key, recs[0])
    tb = {tag: (step, v) for step, tag, v in _tensorboard_scalars(w / "tensorboard")}
    assert tb["train/loss"] == (6, pytest.approx(recs[0]["loss"], abs=1e-6))


def test_progress_bars_of_every_command_redraw_rarely_into_a_file_and_often_on_a_terminal():
    """`progress_bar` is the bar of train, eval, generate, predict-preferences and the demo."""
    import io

    from alignx_jax.metrics import PIPE_PROGRESS_SECONDS, progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, term = io.StringIO(), Terminal()
    with progress_bar(total=500, desc="x", file=log) as a, progress_bar(total=500, desc="x", file=term) as b:
        for _ in range(500):
            a.update(1)
            b.update(1)
            time.sleep(0.0005)
    assert a.mininterval == PIPE_PROGRESS_SECONDS and b.mininterval == 0.1
    assert log.getvalue().count("\r") <= 3 < term.getvalue().count("\r"), (log.getvalue(), term.getvalue())
