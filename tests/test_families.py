"""Mistral, Qwen3, Gemma and Gemma 2 vs transformers: float32 logits (left padding, sliding windows, soft-capping),
KV-cache decoding, greedy generation, the import/export round trip that transformers loads, and (Llama and
Qwen2 too) the DPO and eval response log-probs in every batch layout."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alignx_jax.cli import main
from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.models import attention as attn
from alignx_jax.models import decoder as dec
from alignx_jax.models.decoder import DecoderConfig
from alignx_jax.models.hf import load_pretrained
from alignx_jax.models.safetensors_io import SafetensorsReader
from alignx_jax.sharding import variable_axes

T = 12
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _perturb(model, seed: int) -> None:
    """Random norm weights and biases (HF inits them to constants, which would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's (1 + w) norms get w around 0, the others around 1
                base = 0.0 if model.config.model_type in ("gemma", "gemma2") else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _hf_config(kind: str, **over):
    from transformers import Gemma2Config, GemmaConfig, MistralConfig, Qwen3Config

    from alignx_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    common = dict(
        vocab_size=len(tok),
        **TINY,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if kind == "mistral":  # Mistral-7B-Instruct-v0.2 style, with a window short enough to bite
        cfg = MistralConfig(**common, rope_theta=1e6, sliding_window=5, rms_norm_eps=1e-5)
    elif kind == "qwen3":  # q/k norms, an explicit head_dim != hidden / heads, a biased variant
        cfg = Qwen3Config(
            **common, head_dim=24, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True
        )
    elif kind == "gemma2":  # caps small enough to change the result; sliding on layer 0
        cfg = Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=5,
        )
    elif kind == "gemma":  # Gemma 7B style: (1 + w) norms, scaled embeddings, GELU-tanh, tied, no window
        cfg = GemmaConfig(**common, head_dim=24, attention_bias=True)
    else:
        raise ValueError(kind)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny(kind: str, out_dir: str, seed: int = 0, **over) -> str:
    from transformers import AutoModelForCausalLM

    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(kind, **over), dtype=torch.float32)
    _perturb(model, seed)
    model.save_pretrained(out_dir, max_shard_size="1MB")
    for name in os.listdir(TINY_TOKENIZER_DIR):
        shutil.copyfile(os.path.join(TINY_TOKENIZER_DIR, name), os.path.join(out_dir, name))
    return out_dir


KINDS = ["mistral", "mistral_nowindow", "qwen3", "gemma", "gemma2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "mistral": build_tiny("mistral", str(root / "mistral"), seed=2),
        "mistral_nowindow": build_tiny("mistral", str(root / "mistral0"), seed=3, sliding_window=None),
        "qwen3": build_tiny("qwen3", str(root / "qwen3"), seed=4),
        "gemma": build_tiny("gemma", str(root / "gemma"), seed=7),
        "gemma2": build_tiny("gemma2", str(root / "gemma2"), seed=5),
    }


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def models(checkpoints):
    return {k: (load_pretrained(p), _hf_model(p)) for k, p in checkpoints.items()}


def _left_padded(seqs, T, pad=5):
    ids = np.full((len(seqs), T), pad, np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
        mask[b, T - len(s) :] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _ref(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids)).long()).logits.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_with_left_padding(models, kind):
    ours, hf = models[kind]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(6, 4000, size=n) for n in (T, 7, 3)]
    ids, mask = _left_padded(seqs, T)
    logits = np.asarray(jax.jit(lambda i, m: ours(i, m))(ids, mask))
    assert logits.shape == (3, T, ours.cfg.vocab_size)
    errs = []
    for b, s in enumerate(seqs):  # transformers on the unpadded sequence (positions 0..n-1)
        errs.append(_rel(logits[b, T - len(s) :], _ref(hf, s[None])[0]))
    full = np.asarray(jax.jit(lambda i: ours(i))(ids[:2]))  # no padding, batched
    errs.append(_rel(full, _ref(hf, ids[:2])))
    print(f"{kind}: max relative logit error {max(errs):.2e}")
    assert max(errs) < 1e-4, errs


def test_family_features_bite(models):
    """The tiny configs exercise what they claim: the window, the caps, the q/k norms."""
    mistral, gemma, qwen3 = models["mistral"][0], models["gemma2"][0], models["qwen3"][0]
    assert mistral.cfg.sliding_window == 5 and mistral.cfg.window_cuts(T)
    assert models["mistral_nowindow"][0].cfg.sliding_window is None
    assert gemma.cfg.layer_is_sliding == (True, False) and gemma.cfg.sandwich_norms
    assert gemma.cfg.hidden_act == "gelu_pytorch_tanh" and gemma.cfg.attention_scale == pytest.approx(
        24**-0.5
    )
    assert qwen3.cfg.qk_norm and qwen3.cfg.head_dim == 24 and qwen3.cfg.qkv_bias and qwen3.cfg.o_bias
    assert qwen3.layers.attn.q_norm.scale.get_value().shape == (2, 24)
    ids = jnp.arange(6, 6 + T)[None]
    logits = np.asarray(gemma(ids))
    assert np.abs(logits).max() < 3.0 and np.abs(logits).max() > 2.0  # final cap 3 in force
    # without the window (or the attention cap) the logits differ: the tests above would notice
    for name, change in (("window", dict(sliding_window=None)), ("cap", dict(attn_logit_softcapping=None))):
        other = _with_cfg(gemma, gemma.cfg.replace(**change))
        assert _rel(other(ids), logits) > 1e-3, name


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_long_rows_and_unrolled_layers(checkpoints, models, kind):
    """150 tokens through the query-block kernel, window far shorter; unrolled layers agree."""
    _, hf = models[kind]
    ours = load_pretrained(checkpoints[kind], scan_layers=False)
    L = 150
    rng = np.random.default_rng(1)
    seqs = [rng.integers(6, 4000, size=n) for n in (L, 97)]
    ids, mask = _left_padded(seqs, L)
    logits = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(ours, ids, mask))
    for b, s in enumerate(seqs):
        assert _rel(logits[b, L - len(s) :], _ref(hf, s[None])[0]) < 1e-4


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_kv_cache_with_window_matches_full_forward(models, kind, per_layer):
    ours, _ = models[kind]
    rng = np.random.default_rng(1)
    seqs = [rng.integers(6, 4000, size=n) for n in (9, 5)]
    ids, mask = _left_padded(seqs, 9)
    extra = jnp.asarray(rng.integers(6, 4000, size=(2, 4)), jnp.int32)
    full = jax.jit(lambda i, m: ours(i, m))(
        jnp.concatenate([ids, extra], 1), jnp.concatenate([mask, jnp.ones_like(extra)], 1)
    )
    cache = ours.init_cache(2, 16)
    if per_layer:  # what generation runs: `prefill` into the empty stacked cache, then per-layer decoding
        step = nnx.jit(lambda m, i, k, c: m(i, k, cache=c, layer_params=m.layer_params(per_layer=True)))
        prefill = nnx.jit(lambda m, i, k, c: m.prefill(i, k, c))
        h, cache = prefill(ours, ids, mask, cache)
        logits = ours.cap_logits(jnp.einsum("btd,dv->btv", h, ours.output_embedding()))
        assert int(cache["index"]) == 9
        cache = ours.per_layer_cache(cache)
    else:
        step = nnx.jit(lambda m, i, k, c: m(i, k, cache=c))
        logits, cache = step(ours, ids, mask, cache)
    real = np.asarray(mask).astype(bool)
    assert _rel(np.asarray(logits)[real], np.asarray(full[:, :9])[real]) < 1e-5
    for t in range(4):
        logits, cache = step(ours, extra[:, t : t + 1], jnp.ones((2, 1), jnp.int32), cache)
        assert _rel(logits[:, 0], np.asarray(full[:, 9 + t])) < 1e-5


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers_generate(models, kind, per_layer):
    """`generate`'s greedy tokens, scanned and per-layer decoding, equal transformers' `generate` on each
    prompt alone: a 3-token prompt left-padded beside a 40-token one (across the 32-token bucket), and
    20 new tokens, far past the 5-token windows."""
    from alignx_jax.generate import generate

    ours, hf = models[kind]
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(6, 4000, size=n)] for n in (3, 40)]
    got = generate(ours, None, prompts, max_new_tokens=20, greedy=True, stop_ids=[9999], per_layer=per_layer)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert g == out[0, len(p) :].tolist()


def test_softcapped_attention_gradients_match_autodiff():
    """The custom-VJP kernel with a cap (blocked causal rows) vs plain autodiff of the formula."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    B, L, N, K, H = 2, 80, 4, 2, 8
    q = 2.0 * jax.random.normal(k1, (B, L, N, H))
    k = 2.0 * jax.random.normal(k2, (B, L, K, H))
    v = jax.random.normal(k3, (B, L, K, H))
    t = jnp.arange(L)
    allowed = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < 9)
    allowed = allowed[None] & (t >= 3)[None, None, :].repeat(B, 0)
    w = jax.random.normal(jax.random.key(1), (B, L, N, H))

    def plain(q, k, v):
        kk, vv = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        s = dec.softcap(jnp.einsum("btnh,bsnh->bnts", q, kk) * 0.3, 1.5)
        s = jnp.where(allowed[:, None], s, dec.MASK_MIN)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), vv)

    def kernel(q, k, v):
        return attn._attention_xla(q, k, v, dec.mask_bias(allowed), 0.3, True, 1.5)

    keep = (t >= 3)[None, :, None, None]  # fully masked query rows: no gradient either way

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w * keep)

    assert _rel(jax.jit(kernel)(q, k, v) * keep, plain(q, k, v) * keep) < 1e-5
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_yarn_rope_matches_transformers(tmp_path, spelling):
    """Qwen2.5/Qwen3's long-context YaRN RoPE (refused before) over 40 tokens, past the original
    context of 16: transformers' logits, as transformers 5 saves it and as Qwen's README spells it
    (`rope_theta` + `rope_scaling` with `type`); KV-cached decoding agrees with the full forward."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    src = build_tiny("qwen3", str(tmp_path / "yarn"), seed=6, rope_parameters={**yarn, "rope_theta": 1e6})
    if spelling == "rope_scaling":
        with open(os.path.join(src, "config.json")) as f:
            hf_cfg = json.load(f)
        hf_cfg.pop("rope_parameters")
        hf_cfg.update(rope_theta=1e6, rope_scaling={**yarn, "type": "yarn"})
        del hf_cfg["rope_scaling"]["rope_type"]
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(hf_cfg, f)
    ours = load_pretrained(src)
    assert dec.rope_attention_factor(ours.cfg) == pytest.approx(0.1 * np.log(4.0) + 1)
    ids = np.random.default_rng(2).integers(6, 4000, size=(1, 40))
    full = np.asarray(jax.jit(lambda i: ours(i))(jnp.asarray(ids, jnp.int32)))
    assert _rel(full, _ref(_hf_model(src), ids)) < 1e-5
    plain = _with_cfg(ours, ours.cfg.replace(rope_scaling=None))
    assert _rel(plain(jnp.asarray(ids, jnp.int32)), full) > 1e-3  # YaRN changes these logits
    step = nnx.jit(lambda m, i, k, c: m(i, k, cache=c))
    logits, cache = step(
        ours, jnp.asarray(ids[:, :36], jnp.int32), jnp.ones((1, 36), jnp.int32), ours.init_cache(1, 40)
    )
    for t in range(36, 40):
        logits, cache = step(
            ours, jnp.asarray(ids[:, t : t + 1], jnp.int32), jnp.ones((1, 1), jnp.int32), cache
        )
        assert _rel(logits[:, 0], full[:, t]) < 1e-5


def test_every_new_param_has_logical_axes(models):
    for ours, _ in models.values():
        for path, var in nnx.to_flat_state(nnx.state(ours)):
            axes = variable_axes(var)
            assert axes is not None and len(axes) == var.get_value().ndim, path
            if path[0] == "layers":
                assert axes[0] == "layers" and var.get_value().shape[0] == ours.cfg.num_hidden_layers
    gemma = models["gemma2"][0]
    assert variable_axes(gemma.layers.mlp_out_norm.scale) == ("layers", "norm")
    assert variable_axes(models["qwen3"][0].layers.attn.k_norm.scale) == ("layers", "norm")


def test_splash_refuses_a_window_it_cannot_mask(models):
    ours, _ = models["mistral"]
    model = _with_cfg(ours, ours.cfg.replace(attention_impl="splash"))
    with pytest.raises(ConfigError, match="sliding_window=5"):
        model._attention_impl(128, False, False)
    auto = _with_cfg(ours, ours.cfg.replace(attention_impl="auto"))
    assert auto._attention_impl(128, False, False) == "xla"
    gemma = models["gemma2"][0]
    for impl in ("splash", "cudnn", "auto"):  # attention soft-capping: the xla kernel
        assert (
            _with_cfg(gemma, gemma.cfg.replace(attention_impl=impl))._attention_impl(4, False, False) == "xla"
        )


def _with_cfg(model, cfg):
    """`model`'s weights under another config (same shapes)."""
    return nnx.merge(nnx.graphdef(dec.Decoder(cfg, rngs=nnx.Rngs(0))), nnx.state(model))


@pytest.mark.parametrize("kind", ["mistral", "qwen3", "gemma", "gemma2"])
def test_import_export_round_trip(checkpoints, tmp_path, kind):
    src = checkpoints[kind]
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", src, "--out", str(ckpt)]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--shard-size", "400KB"]) == 0
    a, b = SafetensorsReader(src), SafetensorsReader(str(out))
    assert set(a.entries) == set(b.entries)
    for name in a.entries:
        assert np.array_equal(np.asarray(a.get(name)), np.asarray(b.get(name))), name
    with open(os.path.join(src, "config.json")) as f, open(out / "config.json") as g:
        theirs, ours = json.load(f), json.load(g)
    # every value the source states comes back; where it leaves one unset (transformers 4.x writes
    # head_dim None and omits defaults) the export may state it: the logits below show it is the same model
    stated = {k for k, v in theirs.items() if v is not None}
    assert {k: ours.get(k) for k in stated} == {k: theirs[k] for k in stated}
    assert set(theirs) <= set(ours), set(theirs) - set(ours)  # no key dropped
    m1, m2 = _hf_model(src), _hf_model(str(out))
    ids = torch.arange(6, 20)[None]
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


MISTRAL_7B_V02 = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}


def test_config_mistral_7b_v02_round_trip():
    cfg = DecoderConfig.from_hf(MISTRAL_7B_V02)
    assert cfg.sliding_window is None and cfg.rope_theta == 1e6 and cfg.head_dim == 128
    assert not cfg.qkv_bias and not cfg.tie_word_embeddings
    assert cfg.to_hf() == {**MISTRAL_7B_V02, "head_dim": 128, "pad_token_id": None, "rope_scaling": None}
    v01 = DecoderConfig.from_hf({**MISTRAL_7B_V02, "sliding_window": 4096})
    assert v01.sliding_window == 4096 and v01.layer_is_sliding == (True,) * 32
    assert not v01.window_cuts(4096) and v01.window_cuts(4097)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_an_absent_tie_word_embeddings_is_transformers_default(family):
    """A config.json without the key: the family's transformers default (only Gemma2Config ties), or the
    file's lm_head.weight would be ignored."""
    import transformers

    default = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
    }[family]().tie_word_embeddings
    hf = {k: v for k, v in MISTRAL_7B_V02.items() if k not in ("tie_word_embeddings", "architectures")}
    assert DecoderConfig.from_hf({**hf, "model_type": family}).tie_word_embeddings == default


def test_gemma_released_gelu_is_the_tanh_approximation(checkpoints, models, tmp_path):
    """Gemma 7B's config.json says hidden_act "gelu" (refused as a model_type before): transformers'
    GemmaConfig reads it as gelu_pytorch_tanh, and so do we; (1 + w) norms, scaled embeddings, tied head."""
    src = tmp_path / "gemma"
    shutil.copytree(checkpoints["gemma"], src)
    with open(src / "config.json") as f:
        hf_cfg = json.load(f)
    with open(src / "config.json", "w") as f:
        json.dump({**hf_cfg, "hidden_act": "gelu"}, f)
    ours = load_pretrained(str(src))
    cfg = ours.cfg
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.tie_word_embeddings and cfg.qkv_bias and cfg.o_bias
    assert cfg.norm_plus_one and cfg.scale_embeddings and cfg.sliding_window is None
    assert (
        not cfg.sandwich_norms and cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    )
    ids = np.arange(6, 6 + T)[None]
    assert _rel(ours(jnp.asarray(ids)), _ref(_hf_model(str(src)), ids)) < 1e-4
    silu = _with_cfg(ours, cfg.replace(hidden_act="silu"))  # the activation shows in these logits
    assert _rel(silu(jnp.asarray(ids)), ours(jnp.asarray(ids))) > 1e-3


def test_gemma2_without_hidden_activation_is_gelu_tanh(checkpoints, models, tmp_path):
    """A Gemma 2 config.json with `hidden_act` but no `hidden_activation` (what transformers' Gemma2 MLP
    reads): Gemma2Config's default GELU-tanh, not silu (max logit difference 1.0 against transformers)."""
    import transformers

    src = tmp_path / "gemma2"
    shutil.copytree(checkpoints["gemma2"], src)
    with open(src / "config.json") as f:
        hf_cfg = json.load(f)
    hf_cfg.pop("hidden_activation")
    hf_cfg["hidden_act"] = "gelu_pytorch_tanh"
    with open(src / "config.json", "w") as f:
        json.dump(hf_cfg, f)
    ours = load_pretrained(str(src))
    assert ours.cfg.hidden_act == transformers.Gemma2Config().hidden_activation == "gelu_pytorch_tanh"
    ids = np.arange(6, 6 + T)[None]
    assert _rel(ours(jnp.asarray(ids)), _ref(_hf_model(str(src)), ids)) < 1e-4


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "gemma2", "hidden_activation": "relu"}, "unsupported hidden_activation"),
        ({"model_type": "gemma2", "use_bidirectional_attention": True}, "bidirectional"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"model_type": "gemma2", "sliding_window": 8, "layer_types": ["full_attention"]}, "layer_types"),
        ({"model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
            "quantization_config.quant_method='bitsandbytes'",
        ),
    ],
)
def test_family_config_errors(change, match):
    with pytest.raises(CheckpointError, match=match):
        DecoderConfig.from_hf({**MISTRAL_7B_V02, "architectures": None, **change})


def test_an_integer_weight_is_refused_not_cast(checkpoints, tmp_path):
    """An int8 tensor under a weight's name (bitsandbytes / compressed-tensors int8 files, the same shape as
    the float weight) is a one-line error naming it: cast to float it loaded as silent garbage."""
    from alignx_jax.models.safetensors_io import write_safetensors

    src = tmp_path / "int8"
    shutil.copytree(checkpoints["mistral"], src)
    name = "model.layers.0.self_attn.q_proj.weight"
    with open(src / "model.safetensors.index.json") as f:
        shard = str(src / json.load(f)["weight_map"][name])
    reader = SafetensorsReader(str(src))
    here = [n for n, e in reader.entries.items() if e[0] == shard]
    arrays = {n: np.array(reader.get(n)) for n in here}
    arrays[name] = np.clip(np.round(arrays[name] * 100), -127, 127).astype(np.int8)
    write_safetensors(shard, [(n, a.shape, a.dtype) for n, a in arrays.items()], iter(arrays.values()))
    with pytest.raises(CheckpointError, match=f"{name}' is int8, not floating point"):
        load_pretrained(str(src))


def test_gemma2_dpo_log_probs_apply_the_final_soft_cap(models):
    """The chunked DPO log-probs (full rows and the response window) and `alignx eval`'s scorer equal
    transformers' Gemma 2 log-probs, whose logits are soft-capped (cap 3.0 here: it changes them)."""
    from alignx_jax.batch import TwoRowBatch
    from alignx_jax.evaluate import SequenceScorer
    from alignx_jax.losses import scored_window
    from alignx_jax.train.step import model_pair_logps

    ours, hf = models["gemma2"]
    rng = np.random.default_rng(3)
    B, T = 2, 14
    ids = rng.integers(6, 4000, size=(2 * B, T)).astype(np.int32)
    loss = np.zeros((2 * B, T), np.int32)
    for r in range(2 * B):
        loss[r, 4 + r : T - r] = 1  # responses of different lengths
    with torch.no_grad():
        logits = hf(torch.tensor(ids).long()).logits.double()
    tgt = torch.tensor(ids[:, 1:]).long()[..., None]

    def summed(lg):
        tok = torch.log_softmax(lg, -1)[:, :-1].gather(-1, tgt)[..., 0].numpy()
        return (tok * loss[:, 1:]).sum(-1)

    want = summed(logits)
    # the uncapped logits (undo cap * tanh(x / cap)) give other log-probs: the cap matters here
    cap = ours.cfg.final_logit_softcapping
    assert np.abs(summed(cap * torch.atanh(logits / cap)) - want).max() > 1e-2
    pair = lambda x: x.reshape(2, B, T).swapaxes(0, 1)  # [B, 2, T]: chosen rows first
    mb = TwoRowBatch(  # one microbatch
        input_ids=pair(ids),
        attention_mask=np.ones((B, 2, T), np.int32),
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, 2, T)).copy(),
        loss_mask=pair(loss),
        pair_mask=np.ones((B,), np.int32),
    )
    full = np.asarray(model_pair_logps(ours, mb, chunk=5))
    win = np.asarray(model_pair_logps(ours, mb.replace(score_index=scored_window(mb.loss_mask, 4)), 3))
    expect = want.reshape(2, B).T
    np.testing.assert_allclose(full, expect, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(win, expect, rtol=1e-4, atol=1e-4)
    from alignx_jax.sharding import make_mesh

    scorer = SequenceScorer(ours, make_mesh(devices=jax.devices()[:1]))
    got = scorer(
        {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape).copy(),
            "loss_mask": loss,
        }
    )
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-4, atol=1e-4)


def _hf_response_logps(hf, examples) -> np.ndarray:
    """transformers' float64 log-softmax of each response token given its prompt, summed: `[n, 2]`."""
    out = np.zeros((len(examples), 2))
    for k, ex in enumerate(examples):
        for j, resp in enumerate((ex.chosen_ids, ex.rejected_ids)):
            ids = torch.tensor([ex.prompt_ids + resp])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits.double()[0, :-1], -1)
            tok = logp.gather(-1, ids[0, 1:, None])[:, 0].numpy()
            out[k, j] = tok[len(ex.prompt_ids) - 1 :].sum()
    return out


def _pair_layouts(seed: int):
    """Five random pairs (prompts of 3-11 tokens, responses of 2-9) and a dummy pair: the examples,
    their collated two-row batch, its shared-prompt rows and those packed several pairs to a row."""
    from alignx_jax.data import batching

    rng = np.random.default_rng(seed)
    draw = lambda lo, hi: [int(t) for t in rng.integers(6, 4000, size=int(rng.integers(lo, hi)))]
    examples = [
        batching.DPOExample(prompt_ids=draw(3, 12), chosen_ids=draw(2, 10), rejected_ids=draw(2, 10), index=i)
        for i in range(5)
    ]
    # one dummy pair, as a batch padded to a fixed size holds
    two = batching.collate(examples, buckets=(24, 32), pad_id=0, num_pairs=6)
    one = batching.share_prompt(two, buckets=(24, 32, 48), pad_id=0)
    return examples, two, one, batching.pack_pairs(one, groups=2, length=48, pad_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2"])
def test_dpo_and_eval_log_probs_match_transformers_in_every_layout(tiny_hf_checkpoints, models, kind):
    """Each family's summed response log-probs, as training reads them in every batch layout (two rows
    with the plain / chunked / response-window / compacted scoring, one shared-prompt row per pair,
    pairs packed several to a row, compacted too) and as `alignx eval` scores them (both layouts), equal
    transformers' per-token log-softmax on each pair's ids alone. The pairs are longer than the 5-token
    windows (Mistral on every layer, Gemma 2 on layer 0) and Gemma 2's caps bite (test_family_features_bite),
    so a window that crosses a packed pair's or a branch's edge, or a cap one path skips, shows here."""
    from alignx_jax import batch as bt
    from alignx_jax.evaluate import SequenceScorer
    from alignx_jax.sharding import make_mesh
    from alignx_jax.train.step import model_pair_logps

    if kind in models:
        ours, hf = models[kind]
    else:
        ours, hf = load_pretrained(tiny_hf_checkpoints[kind]), _hf_model(tiny_hf_checkpoints[kind])
    examples, two, one, packed = _pair_layouts(seed=4)
    B = two["pair_mask"].shape[0]
    assert packed["segment_ids"].max() >= 2  # rows hold several pairs: positions restart inside a row
    if ours.cfg.sliding_window is not None:
        assert all(ours.cfg.window_cuts(x["input_ids"].shape[1]) for x in (two, one, packed))
    want = _hf_response_logps(hf, examples)
    layouts = {
        "two rows": (bt.to_microbatches(two, 1), None),
        "two rows, chunked": (bt.to_microbatches(two, 1), 5),
        "response window": (bt.to_microbatches(two, 1, window=0), 3),
        "window, compacted": (bt.to_microbatches(two, 1, window=0, tokens=(2, 0)), None),
        "shared prompt": (bt.to_microbatches(one, 1), None),
        "shared, compacted": (bt.to_microbatches(one, 1, tokens=(1, 0)), 4),
        "packed": (bt.to_microbatches(packed, 1), 4),
        "packed, compacted": (bt.to_microbatches(packed, 1, tokens=(2, 0)), None),
    }
    got = {
        name: np.asarray(model_pair_logps(ours, x.microbatch(0), chunk))
        for name, (x, chunk) in layouts.items()
    }
    assert (
        layouts["window, compacted"][0].tokens is not None
        and layouts["packed, compacted"][0].tokens is not None
    )
    mesh = make_mesh(devices=jax.devices()[:1])
    for shared in (False, True):
        lp = SequenceScorer(ours, mesh, share_prompt=shared)(two)
        got[f"eval, share_prompt={shared}"] = np.stack([lp[:B], lp[B:]], axis=-1)
    for name, lp in got.items():
        np.testing.assert_allclose(lp[:5], want, rtol=1e-4, atol=1e-4, err_msg=name)
        assert (lp[5] == 0).all(), name  # the dummy pair scores nothing


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_windowed_log_prob_gradients_are_the_same_in_every_layout(models, kind):
    """The gradient training takes through the windowed, soft-capped attention (the custom-VJP kernel)
    is the two-row layout's in the shared-prompt and packed layouts, compacted or not."""
    from alignx_jax import batch as bt
    from alignx_jax.train.step import model_pair_logps

    ours, _ = models[kind]
    _, two, one, packed = _pair_layouts(seed=5)
    weight_B2 = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32)

    def grads(x, chunk=None):
        loss = lambda m: jnp.sum(model_pair_logps(m, x.microbatch(0), chunk) * weight_B2)
        return [np.asarray(g) for g in jax.tree.leaves(nnx.state(nnx.grad(loss)(ours)))]

    want = grads(bt.to_microbatches(two, 1))
    for name, x in {
        "window, compacted": bt.to_microbatches(two, 1, window=0, tokens=(2, 0)),
        "shared prompt": bt.to_microbatches(one, 1),
        "packed, compacted": bt.to_microbatches(packed, 1, tokens=(2, 0)),
    }.items():
        for a, b in zip(want, grads(x, chunk=3)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()), err_msg=name)
