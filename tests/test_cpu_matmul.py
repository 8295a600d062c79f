"""`model.cpu_matmul`: which library XLA's CPU backend calls for matrix products (YNNPACK or oneDNN), the
rule `auto` follows, that the choice reaches every compiled program of a model, and that oneDNN's products
give the plain computation's numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignx_jax import hardware, train
from alignx_jax.errors import ConfigError
from alignx_jax.models.decoder import Decoder, DecoderConfig
from tests.test_train import _batch, _loss_cfg

ONEDNN = "__onednn_fusion"  # the fusion kind XLA gives a product handed to oneDNN


@pytest.mark.parametrize(
    "choice, dtype, width, vendor, avx512, backend, want",
    [
        ("auto", "float32", 576, "GenuineIntel", True, "cpu", "onednn"),
        ("auto", "float32", 256, "GenuineIntel", True, "cpu", "onednn"),
        ("auto", "float32", 255, "GenuineIntel", True, "cpu", "ynnpack"),  # make demo's narrow model
        ("auto", "bfloat16", 576, "GenuineIntel", True, "cpu", "ynnpack"),  # bf16 products: YNNPACK is faster
        ("auto", "float32", 576, "AuthenticAMD", True, "cpu", "ynnpack"),  # not verified there
        ("auto", "float32", 576, "GenuineIntel", False, "cpu", "ynnpack"),  # nor without AVX-512
        ("onednn", "bfloat16", 64, "GenuineIntel", True, "cpu", "onednn"),  # a named library is taken as is
        ("onednn", "float32", 576, "AuthenticAMD", False, "cpu", None),  # refused: it hung or crashed there
        ("ynnpack", "float32", 576, "GenuineIntel", True, "cpu", "ynnpack"),
        ("auto", "float32", 576, "GenuineIntel", True, "gpu", ""),  # a CPU-only choice
        ("onednn", "float32", 576, "AuthenticAMD", False, "tpu", ""),
    ],
)
def test_library_rule(monkeypatch, choice, dtype, width, vendor, avx512, backend, want):
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(hardware, "cpu_has_avx512", lambda: avx512)
    monkeypatch.setattr(hardware, "onednn_dots_available", lambda: True)
    assert hardware.cpu_matmul_library(choice, dtype, width, backend) == want
    # generation's few-row products: auto keeps YNNPACK, a named library is taken as is
    decode = hardware.cpu_matmul_library(choice, dtype, width, backend, decode=True)
    assert decode == ("ynnpack" if choice == "auto" and want == "onednn" else want)
    assert hardware.compiler_options(want) == (hardware.ONEDNN_DOTS if want == "onednn" else {})


def test_on_an_unverified_cpu_a_named_onednn_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(hardware, "cpu_has_avx512", lambda: False)
    cfg = _model("onednn", width=32).cfg
    if jax.default_backend() == "cpu":
        with pytest.raises(ConfigError) as e:
            cfg.compiler_options()
        msg = str(e.value)
        assert msg.startswith("model.cpu_matmul=onednn: XLA's oneDNN products are enabled on Intel CPUs with")
        assert "(AuthenticAMD, no AVX-512)" in msg and msg.endswith("use auto or ynnpack")
        assert "\n" not in msg
    assert _model("auto", width=576).cfg.compiler_options() == {}  # auto stays on YNNPACK


def test_without_onednn_auto_falls_back_and_a_named_onednn_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(hardware, "cpu_has_avx512", lambda: True)
    monkeypatch.setattr(hardware, "onednn_dots_available", lambda: False)
    assert hardware.cpu_matmul_library("auto", "float32", 576, "cpu") == "ynnpack"
    assert hardware.cpu_matmul_library("onednn", "float32", 576, "cpu") is None
    cfg = _model("onednn", width=32).cfg
    if jax.default_backend() == "cpu":
        with pytest.raises(ConfigError, match="model.cpu_matmul=onednn: this jaxlib") as e:
            cfg.compiler_options()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'blas' is not one of auto, ynnpack, onednn"):
        hardware.cpu_matmul_library("blas", "float32", 576, "cpu")


def test_decoder_config_refuses_an_unknown_library():
    with pytest.raises(ConfigError, match="cpu_matmul 'mkl' is not one of auto, ynnpack, onednn"):
        _model("mkl", width=32)


def test_this_jaxlib_has_onednn_dots():
    # the pinned jaxlib's XLA carries oneDNN; if an upgrade drops it, auto quietly stays on YNNPACK
    assert hardware.onednn_dots_available()


def _model(cpu_matmul: str, width: int = 256, seed: int = 0) -> Decoder:
    cfg = DecoderConfig(
        vocab_size=97,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=width // 4,
        cpu_matmul=cpu_matmul,
    )
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def _optimizer():
    import ml_collections

    optim = dict(lr=1e-3, warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    return train.make_optimizer(ml_collections.ConfigDict({**optim, "clip": 1.0}), 10)[0]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler choice")
def test_onednn_train_step_equals_the_ynnpack_step(monkeypatch):
    """One DPO step (forward, backward, AdamW update) compiled with each library, from the same weights."""
    # as on a CPU where oneDNN is enabled; this model's small products ran on the EPYC that refuses it too
    monkeypatch.setattr(hardware, "onednn_refusal", lambda: None)
    out = {}
    batch = train.to_microbatches(_batch(B=4, T=24, seed=3), 2)
    tx = _optimizer()
    for library in ("ynnpack", "onednn"):
        model = _model(library)
        codec = train.ParamsCodec.of(model)
        assert codec.compiler_options == (hardware.ONEDNN_DOTS if library == "onednn" else None)
        params = nnx.to_pure_dict(nnx.state(model))
        ref = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        step = jax.jit(
            train.make_train_step(codec, tx, _loss_cfg(), precomputed=False),
            compiler_options=codec.compiler_options,
        )
        opt = tx.init(params)
        text = step.lower(params, opt, ref, batch).compile().as_text()
        assert (ONEDNN in text) == (library == "onednn")
        out[library] = step(params, opt, ref, batch)
    (pa, _, ma), (pb, _, mb) = out["ynnpack"], out["onednn"]
    for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-4, atol=1e-6)
    # AdamW's first update is ~lr * sign(g): summation-order noise shows only on near-zero gradients
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler choice")
def test_every_program_of_a_model_is_compiled_with_its_options(monkeypatch):
    """An option XLA refuses, given as the model's: the train step, the held-out step, the reference pass,
    the scorer, the preference head's persona features and generation each fail to compile on it, so each
    takes the model's options."""
    import ml_collections

    from alignx_jax.evaluate import scoring
    from alignx_jax.generate import generate
    from alignx_jax.models.preference_head import pooled_features
    from alignx_jax.sharding import make_mesh
    from alignx_jax.train import step as step_lib

    bad = {"xla_cpu_no_such_option": True}
    monkeypatch.setattr(DecoderConfig, "compiler_options", lambda self, decode=False: dict(bad))
    model = _model("auto", width=32)
    codec = train.ParamsCodec.of(model)
    assert codec.compiler_options == bad
    params = nnx.to_pure_dict(nnx.state(model))
    rows = _batch(B=4, T=24, seed=3)
    batch = train.to_microbatches(rows, 2)
    cfg = ml_collections.ConfigDict({"loss": _loss_cfg().to_dict(), "pba": {}})
    tx = _optimizer()
    refused = "No such compile option: 'xla_cpu_no_such_option'"
    with pytest.raises(Exception, match=refused):
        step_lib.jit_train_step(codec, tx, cfg, param_shardings=None, opt_shardings=None, replicated=None)(
            params, tx.init(params), params, batch
        )
    with pytest.raises(Exception, match=refused):
        step_lib.jit_eval_step(codec, cfg)(params, params, batch)
    with pytest.raises(Exception, match=refused):
        step_lib.jit_ref_logps(codec, cfg.loss)(params, batch)
    with pytest.raises(Exception, match=refused):
        scoring.SequenceScorer(model, make_mesh(data=-1))(rows)
    with pytest.raises(Exception, match=refused):
        pooled_features(model, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32), "mean")
    with pytest.raises(Exception, match=refused):
        generate(model, None, [[1, 2, 3]], max_new_tokens=2, greedy=True, stop_ids=[0])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler choice")
def test_an_uncacheable_onednn_program_runs_without_a_cache_warning(tmp_path, monkeypatch):
    """XLA cannot serialize a oneDNN program into the persistent compilation cache; the commands' cache says
    nothing about it (the program still runs, and compiles again next time)."""
    import warnings

    from alignx_jax.compile_cache import use_compile_cache

    use_compile_cache(str(tmp_path))
    # every program is written to the cache (the tests' session cache skips quick compiles)
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 47)), jnp.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        use_compile_cache(str(tmp_path))  # its filter holds under the default action too
        fn = jax.jit(lambda a: jnp.tanh(a @ a.T), compiler_options=hardware.ONEDNN_DOTS)
        try:
            got = fn(x)
        finally:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    np.testing.assert_allclose(
        np.asarray(got), np.tanh(np.asarray(x) @ np.asarray(x).T), rtol=1e-5, atol=1e-5
    )
    assert ONEDNN in fn.lower(x).compile().as_text()
    assert not [w for w in seen if "onednn" in str(w.message)], [str(w.message) for w in seen]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler choice")
def test_eval_and_generate_take_cpu_matmul_from_the_command_line(tiny_hf_checkpoints, tmp_path):
    """`alignx eval|generate --cpu-matmul`: oneDNN's scores and greedy tokens are YNNPACK's."""
    import json
    import os

    from conftest import run_cli

    psoups = os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "benchmarks", "p-soups", "student_phd.json"
    )
    if not os.path.isfile(psoups):
        pytest.skip("P-SOUPS file not available")
    llama = tiny_hf_checkpoints["llama"]
    bench = ["--benchmark", f"p-soups={psoups}", "--limit", "4", "--max-length", "256"]
    refusal = hardware.onednn_refusal()
    if refusal is not None:  # this CPU: the command refuses oneDNN in one line, before any work
        r = run_cli(
            ["eval", "--model", llama, "--cpu-matmul", "onednn", *bench, "--out", tmp_path / "o.json"]
        )
        assert r.returncode != 0 and not (tmp_path / "o.json").exists()
        assert f"--cpu-matmul onednn: {refusal}; use auto or ynnpack" in r.stderr, r.stderr
    scores, tokens = {}, {}
    for library in ("ynnpack", "onednn") if refusal is None else ("ynnpack",):
        per = tmp_path / f"{library}.jsonl"
        args = ["--model", llama, "--cpu-matmul", library]
        r = run_cli(["eval", *args, *bench, "--per-example", per, "--out", tmp_path / f"{library}.json"])
        assert r.returncode == 0, r.stderr
        scores[library] = [json.loads(line) for line in per.read_text().splitlines()]
        r = run_cli(
            [
                "generate",
                *args,
                "--prompt",
                "Tell me about owls",
                "--max-new-tokens",
                "6",
                "--greedy",
                "--json",
            ]
        )
        assert r.returncode == 0, r.stderr
        tokens[library] = json.loads(r.stdout.strip().splitlines()[0])["token_ids"]
    assert len(scores["ynnpack"]) == 4 and len(tokens["ynnpack"]) == 6
    if refusal is None:
        assert tokens["onednn"] == tokens["ynnpack"]
        assert len(scores["onednn"]) == 4
        for a, b in zip(scores["ynnpack"], scores["onednn"]):
            for k in ("logp_chosen", "logp_rejected"):
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5)
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        run_cli(["generate", "--model", llama, "--cpu-matmul", "mkl", "--prompt", "Hi"])
    assert e.value.code == 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler choice")
@pytest.mark.parametrize("command", ["eval", "generate --prompt", "generate --benchmark"])
def test_a_refused_cpu_matmul_flag_names_the_flag_before_the_model_loads(
    command, tiny_hf_checkpoints, tmp_path, monkeypatch
):
    """`alignx eval|generate --cpu-matmul onednn` where this host refuses oneDNN: one line naming the flag
    (the model's own check names a training config's `model.cpu_matmul`), before any model loads or any
    output is written."""
    import os

    from conftest import run_cli

    from alignx_jax.models import hf

    monkeypatch.setattr(hardware, "onednn_refusal", lambda: "not on this test's CPU")
    monkeypatch.setattr(hf, "load_pretrained", lambda *a, **kw: pytest.fail("the model was loaded"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    psoups = os.path.join(root, "..", "shared", "benchmarks", "p-soups", "student_phd.json")
    bench = ["--benchmark", f"p-soups={psoups}"]
    args = {
        "eval": ["eval", *bench, "--out", tmp_path / "r.json"],
        "generate --prompt": ["generate", "--prompt", "Hi"],
        "generate --benchmark": ["generate", *bench, "--out", tmp_path / "gen.jsonl"],
    }[command]
    r = run_cli([*args, "--model", tiny_hf_checkpoints["llama"], "--cpu-matmul", "onednn"])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "alignx: error: --cpu-matmul onednn: not on this test's CPU; use auto or ynnpack\n"
    assert os.listdir(tmp_path) == []


def test_train_config_key_is_checked_in_one_line_and_reaches_the_decoder():
    import os

    from alignx_jax.config import load_config
    from alignx_jax.train import validate_config
    from alignx_jax.train.state import run_options

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")
    cfg = load_config(tiny, ["--config.workdir=/tmp/x", "--config.model.cpu_matmul=mkl"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert "model.cpu_matmul='mkl': expected one of auto, ynnpack, onednn" in str(e.value)
    assert "\n" not in str(e.value)
    cfg = load_config(tiny, ["--config.workdir=/tmp/x", "--config.model.cpu_matmul=onednn"])
    assert run_options(cfg)["cpu_matmul"] == "onednn"


def test_a_plan_for_another_platform_leaves_this_hosts_cpu_matmul_out():
    import os

    from alignx_jax.config import load_config
    from alignx_jax.plan.presets import decoder_config_for

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")
    cfg = load_config(tiny, ["--config.workdir=/tmp/x", "--config.model.cpu_matmul=onednn"])
    assert decoder_config_for(cfg, platform="tpu").cpu_matmul == "ynnpack"
    assert decoder_config_for(cfg, platform="cpu").cpu_matmul == "onednn"
