"""`model.attention_impl=splash`: the Pallas splash kernel (interpret mode on CPU) against the XLA
attention, in the attention call, through the decoder with padding / packing / compaction, and on an
8-device mesh (shard_map) against one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignx_jax.config import load_config
from alignx_jax.data import batching
from alignx_jax.errors import ConfigError
from alignx_jax.models import compaction
from alignx_jax.models import decoder as dec
from alignx_jax.train import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_splash_attention_matches_xla_values_and_grads():
    B, T, N, K, H = 2, 128, 4, 2, 8
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q, w = jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kw, (B, T, N, H))
    k, v = jax.random.normal(kk, (B, T, K, H)), jax.random.normal(kv, (B, T, K, H))
    real = np.ones((B, T), bool)
    real[0, :37] = False  # left padding
    real[1, 101:] = False  # right padding
    t = jnp.arange(T)
    allowed = (t[None, :] <= t[:, None])[None] & jnp.asarray(real)[:, None, :]
    seg = jnp.asarray(real.astype(np.int32))
    keep = jnp.asarray(real)[:, :, None, None]  # padding queries' outputs are never used

    def loss(impl, mask):
        return lambda q, k, v: jnp.sum(dec.attention(q, k, v, mask, impl, causal=True) * w * keep)

    bias, seg = dec.AttentionMask(bias_BTS=dec.mask_bias(allowed)), dec.AttentionMask(segment_BT=seg)
    want = dec.attention(q, k, v, bias, "xla", causal=True)
    got = dec.attention(q, k, v, seg, "splash")
    np.testing.assert_allclose(np.asarray(got * keep), np.asarray(want * keep), atol=2e-6)
    g_want = jax.grad(loss("xla", bias), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss("splash", seg), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_want, g_got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def _model(impl, **options):
    cfg = dec.DecoderConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attention_impl=impl,
    )
    return dec.Decoder(cfg.replace(**options), rngs=nnx.Rngs(0))


def _rows(B=4, T=128):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 97, (B, T)), jnp.int32)
    m = np.ones((B, T), np.int32)
    m[0, :30] = 0  # left-padded
    m[1, 90:] = 0  # right-padded
    m[2, 64:] = 0
    seg = np.ones((B, T), np.int32)
    seg[3, 50:] = 2  # two packed sequences in one row
    return ids, m, seg


@pytest.mark.parametrize("compact", [False, True])
def test_decoder_with_splash_matches_xla(compact):
    ids, m, seg = _rows()
    tokens = None
    if compact:
        out = batching.compact_index(m[None], 2)
        tokens = compaction.TokenLayout(jnp.asarray(out["token_index"][0]), jnp.asarray(out["token_slot"][0]))
    w = jax.random.normal(jax.random.key(1), (*m.shape, 32)) * jnp.asarray(m)[..., None]

    def loss(model):
        h = model.hidden_states(ids, jnp.asarray(m), None, segment_ids_BT=jnp.asarray(seg), tokens=tokens)
        return jnp.sum(h * w)

    la, ga = nnx.value_and_grad(loss)(_model("xla"))
    lb, gb = nnx.value_and_grad(loss)(_model("splash"))
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(nnx.state(gb))):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def test_splash_falls_back_where_it_cannot_run_and_refuses_branches():
    model = _model("splash")
    assert model._attention_impl(128, cached=False, branches=False) == "splash"
    assert model._attention_impl(100, cached=False, branches=False) == "xla"  # not a multiple of 128
    assert model._attention_impl(128, cached=True, branches=False) == "xla"  # KV-cache decoding
    with pytest.raises(ConfigError, match="branch mask"):
        model._attention_impl(128, cached=False, branches=True)
    # off TPU and GPU, auto is the xla kernel
    assert _model("auto")._attention_impl(128, cached=False, branches=False) == "xla"
    with pytest.raises(ConfigError, match="multiple of 128"):
        dec.splash_block(200)


def test_auto_takes_cudnn_on_a_gpu_where_it_applies(monkeypatch):
    """`auto` on a GPU: cuDNN flash attention for a half-precision model without a KV cache, the xla
    kernel otherwise (float32 inputs, decoding, a head_dim cuDNN does not tile); splash on a TPU."""
    monkeypatch.setattr(dec, "target_platform", lambda: "gpu")
    model, bf16 = _model("auto"), _model("auto", dtype="bfloat16")
    assert bf16._attention_impl(100, cached=False, branches=True) == "cudnn"
    assert bf16._attention_impl(1, cached=True, branches=False) == "xla"
    assert model._attention_impl(100, cached=False, branches=False) == "xla"  # float32
    wide = _model("auto", dtype="bfloat16", head_dim=160)
    assert wide._attention_impl(100, cached=False, branches=False) == "xla"
    monkeypatch.setattr(dec, "target_platform", lambda: "tpu")
    assert bf16._attention_impl(128, cached=False, branches=False) == "splash"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            [
                "--config.data.share_prompt=true",
                "--config.data.buckets=(1024,2048)",
                "--config.data.max_length=512",
            ],
            "branch mask",
        ),
        (["--config.data.buckets=(200,1024)", "--config.data.max_length=512"], r"data.buckets \[200\]"),
    ],
)
def test_config_check_names_what_splash_cannot_do(override, message):
    cfg = load_config(
        os.path.join(ROOT, "configs", "tiny_cpu.py"),
        ["--config.workdir=/tmp/x", "--config.model.attention_impl=splash", *override],
    )
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


SHARDED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp
    from flax import nnx
    from alignx_jax import sharding as sh
    from tests.test_splash import _model, _rows
    ids, m, seg = _rows()
    w = jax.random.normal(jax.random.key(1), (*m.shape, 32)) * jnp.asarray(m)[..., None]
    model = _model("splash")
    gdef, state = nnx.split(model)
    def loss(st):
        h = nnx.merge(gdef, st).hidden_states(ids, jnp.asarray(m), None, segment_ids_BT=jnp.asarray(seg))
        return jnp.sum(h * w)
    one_l, one_g = jax.jit(jax.value_and_grad(loss))(state)
    with sh.use_mesh(sh.make_mesh(2, 2, 2)):  # batch over data x fsdp, heads over tensor
        txt = jax.jit(jax.value_and_grad(loss)).lower(state).as_text()
        l, g = jax.jit(jax.value_and_grad(loss))(state)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(one_g), jax.tree.leaves(g)))
    print(json.dumps({"one": float(one_l), "eight": float(l), "grad_diff": diff,
                      "scale": max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(one_g)),
                      "shard_map": any(s in txt for s in ("manual_computation", "shmap", "shard_map", "Manual"))}))
""")


def test_splash_on_an_8_device_mesh_matches_one_device(tmp_path):
    # imported here: SHARDED imports this module in a process without tests/ on its path
    from conftest import cli_env

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = cli_env(devices=8)
    r = subprocess.run(
        [sys.executable, str(script), ROOT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["shard_map"]  # the kernel runs per shard, not on gathered activations
    np.testing.assert_allclose(res["eight"], res["one"], rtol=1e-5)
    assert res["grad_diff"] <= 1e-5 * res["scale"], res
