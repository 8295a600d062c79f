"""Decoder vs transformers (float32 logits, left padding), config mapping, scan/remat, cache, packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.models import attention as attn
from alignx_jax.models.decoder import Decoder, DecoderConfig, rope_attention_factor, rope_inv_freq
from alignx_jax.models.hf import load_pretrained
from alignx_jax.sharding import variable_axes

T = 12


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _left_padded(seqs, T, pad=5):
    ids = np.full((len(seqs), T), pad, np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
        mask[b, T - len(s) :] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def models(tiny_hf_checkpoints):
    return {k: (load_pretrained(p), _hf_model(p)) for k, p in tiny_hf_checkpoints.items()}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers_with_left_padding(models, kind):
    ours, hf = models[kind]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(6, 4000, size=n) for n in (T, 7, 3)]
    ids, mask = _left_padded(seqs, T)
    logits = np.asarray(jax.jit(lambda i, m: ours(i, m))(ids, mask))
    assert logits.shape == (3, T, ours.cfg.vocab_size)
    for b, s in enumerate(seqs):
        with torch.no_grad():  # transformers on the unpadded sequence (positions 0..n-1)
            ref = hf(torch.tensor(s[None]).long()).logits[0].numpy()
        assert _rel(logits[b, T - len(s) :], ref) < 1e-4
    # and without padding, batched
    full = np.asarray(jax.jit(lambda i: ours(i))(ids[:1]))
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids[:1])).long()).logits.numpy()
    assert _rel(full, ref) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_long_rows_match_transformers(models, kind):
    """150 tokens: the causal attention runs in query blocks (64, 64, 22) against key prefixes."""
    ours, hf = models[kind]
    L = 150
    assert len(attn._row_blocks(L, L, True)) == 3
    rng = np.random.default_rng(1)
    seqs = [rng.integers(6, 4000, size=n) for n in (L, 97)]
    ids, mask = _left_padded(seqs, L)
    logits = np.asarray(jax.jit(lambda i, m: ours(i, m))(ids, mask))
    for b, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor(s[None]).long()).logits[0].numpy()
        assert _rel(logits[b, L - len(s) :], ref) < 1e-4


def test_hidden_states_times_output_embedding_is_logits(models):
    for ours, _ in models.values():
        ids = jnp.arange(6, 16)[None]
        h, logits = nnx.jit(lambda m, i: (m.hidden_states(i), m(i)))(ours, ids)
        assert h.shape == (1, 10, ours.cfg.hidden_size)
        assert _rel(h @ ours.output_embedding(), logits) < 1e-6
    llama, qwen = models["llama"][0], models["qwen2"][0]
    assert llama.lm_head is not None and qwen.lm_head is None  # untied vs tied head
    np.testing.assert_array_equal(qwen.output_embedding(), qwen.embed_tokens.embedding.get_value().T)


@pytest.mark.slow  # three gradient compilations
def test_scan_unrolled_and_remat_agree(tiny_hf_checkpoints, models):
    """Unrolled + remat('dots') and scanned + remat('full') give the scanned model's loss and grads."""
    base = models["llama"][0]
    ids, mask = _left_padded([np.arange(6, 6 + T), np.arange(20, 27)], T)

    def loss(m):
        return jnp.sum(jax.nn.log_softmax(m(ids, mask))[..., 7] * mask)

    la, ga = nnx.jit(nnx.value_and_grad(loss))(base)
    for options in (dict(scan_layers=False, remat="dots"), dict(remat="full")):
        other = load_pretrained(tiny_hf_checkpoints["llama"], **options)
        lb, gb = nnx.jit(nnx.value_and_grad(loss))(other)
        assert abs(float(la) - float(lb)) <= 1e-5 * abs(float(la)), options
        for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            assert _rel(b, a) < 1e-4, options  # relative to the tensor's scale: summation order differs


@pytest.mark.parametrize("per_layer", [False, True])
def test_kv_cache_matches_full_forward(models, per_layer):
    """The stacked cache (scanned layers) and the per-layer one (`layer_params(per_layer=True)`,
    what CPU decoding uses) against the forward pass without a cache."""
    ours, _ = models["qwen2"]
    rng = np.random.default_rng(1)
    seqs = [rng.integers(6, 4000, size=n) for n in (9, 5)]
    ids, mask = _left_padded(seqs, 9)
    extra = jnp.asarray(rng.integers(6, 4000, size=(2, 4)), jnp.int32)
    full = jax.jit(lambda i, m: ours(i, m))(
        jnp.concatenate([ids, extra], 1), jnp.concatenate([mask, jnp.ones_like(extra)], 1)
    )
    cache = ours.init_cache(2, 16, per_layer=per_layer)
    if per_layer:
        assert len(cache["k"]) == ours.cfg.num_hidden_layers and cache["k"][0].shape == (2, 2, 16, 16)
    step = nnx.jit(
        lambda m, i, k, c: m(
            i, k, cache=c, layer_params=m.layer_params(per_layer=True) if per_layer else None
        )
    )
    logits, cache = step(ours, ids, mask, cache)
    real = np.asarray(mask).astype(bool)  # pad rows attend to nothing: their logits are arbitrary
    assert _rel(np.asarray(logits)[real], np.asarray(full[:, :9])[real]) < 1e-5
    for t in range(4):  # one token at a time, same compiled step
        logits, cache = step(ours, extra[:, t : t + 1], jnp.ones((2, 1), jnp.int32), cache)
        real = np.asarray(full[:, 9 + t])
        assert _rel(logits[:, 0], real) < 1e-5
    assert int(cache["index"]) == 13


def test_segment_ids_isolate_packed_sequences(models):
    ours, _ = models["llama"]
    a, b = jnp.arange(6, 13), jnp.arange(100, 105)
    packed = jnp.concatenate([a, b])[None]
    seg = jnp.asarray([[1] * 7 + [2] * 5])
    pos = jnp.asarray([list(range(7)) + list(range(5))])
    fwd = nnx.jit(lambda m, i, p, s: m(i, positions_BT=p, segment_ids_BT=s))
    out = fwd(ours, packed, pos, seg)
    alone = nnx.jit(lambda m, i: m(i))
    assert _rel(out[0, :7], alone(ours, a[None])[0]) < 1e-5
    assert _rel(out[0, 7:], alone(ours, b[None])[0]) < 1e-5
    # without segments the second sequence sees the first: different logits
    assert _rel(fwd(ours, packed, pos, jnp.ones_like(seg))[0, 7:], alone(ours, b[None])[0]) > 1e-3


def test_segment_ids_without_positions_restart_positions_per_segment(tiny_hf_checkpoints):
    # bfloat16 cos/sin round differently at other absolute positions (float32 RoPE is shift-invariant)
    ours = load_pretrained(tiny_hf_checkpoints["llama"], compute_dtype="bfloat16")
    packed = jnp.concatenate([jnp.arange(6, 13), jnp.arange(100, 105), jnp.zeros(3, jnp.int32)])[None]
    mask = jnp.asarray([[1] * 12 + [0] * 3])
    seg = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 3])  # padding after the two sequences, as pack_pairs
    pos = jnp.asarray([list(range(7)) + list(range(5)) + [0] * 3])
    fwd = nnx.jit(
        lambda m, i, a, p, s: m.hidden_states(i, a, positions_BT=p, segment_ids_BT=s).astype(jnp.float32)
    )
    given = fwd(ours, packed, mask, pos, seg)
    assert _rel(fwd(ours, packed, mask, None, seg)[0, :12], given[0, :12]) < 1e-4
    # the check can fail: positions numbered across the row give other states
    assert _rel(fwd(ours, packed, mask, jnp.arange(15)[None], seg)[0, 7:12], given[0, 7:12]) > 1e-3


def test_branch_ids_without_positions_continue_each_branch_from_the_prefix(tiny_hf_checkpoints):
    # share_prompt's layout, two pairs packed in a row: prompt, chosen, rejected, each pair a segment
    ours = load_pretrained(tiny_hf_checkpoints["llama"], compute_dtype="bfloat16")
    ids = jnp.concatenate([jnp.arange(6, 19), jnp.arange(100, 109), jnp.zeros(3, jnp.int32)])[None]
    mask = jnp.asarray([[1] * 22 + [0] * 3])
    seg = jnp.asarray([[1] * 13 + [2] * 9 + [0] * 3])
    branch = jnp.asarray([[0] * 5 + [1] * 4 + [2] * 4 + [0] * 3 + [1] * 3 + [2] * 3 + [0] * 3])
    # each response's positions continue from its prompt's end, as share_prompt passes them
    pos = jnp.asarray([list(range(9)) + list(range(5, 9)) + list(range(6)) + list(range(3, 6)) + [0] * 3])
    fwd = nnx.jit(
        lambda m, i, a, p, s, b: m.hidden_states(
            i, a, positions_BT=p, segment_ids_BT=s, branch_ids_BT=b
        ).astype(jnp.float32)
    )
    given = fwd(ours, ids, mask, pos, seg, branch)
    assert _rel(fwd(ours, ids, mask, None, seg, branch)[0, :22], given[0, :22]) < 1e-4
    assert _rel(fwd(ours, ids[:, :13], None, None, None, branch[:, :13])[0], given[0, :13]) < 1e-4
    # the check can fail: positions numbered across both branches give the rejected branch other states
    across = jnp.asarray([list(range(13)) + list(range(9)) + [0] * 3])
    assert _rel(fwd(ours, ids, mask, across, seg, branch)[0, 9:13], given[0, 9:13]) > 1e-3


def test_every_param_has_logical_axes(models):
    for ours, _ in models.values():
        for path, var in nnx.to_flat_state(nnx.state(ours)):
            axes = variable_axes(var)
            assert axes is not None and len(axes) == var.get_value().ndim, path
            assert set(axes) <= {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}
            if path[0] == "layers":
                assert axes[0] == "layers" and var.get_value().shape[0] == ours.cfg.num_hidden_layers


def test_bfloat16_compute_is_close(tiny_hf_checkpoints, models):
    f32 = models["llama"][0]
    bf16 = load_pretrained(tiny_hf_checkpoints["llama"], compute_dtype="bfloat16")
    ids = jnp.arange(6, 18)[None]
    fwd = nnx.jit(lambda m, i: m(i))
    out = fwd(bf16, ids)
    assert out.dtype == jnp.bfloat16
    assert bf16.embed_tokens.embedding.get_value().dtype == jnp.float32  # params stay float32
    assert _rel(out.astype(jnp.float32), fwd(f32, ids)) < 5e-2


# ---- config mapping -------------------------------------------------------------------------------

LLAMA31 = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "attention_bias": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}


def test_config_round_trip_legacy_rope_keys():
    cfg = DecoderConfig.from_hf(LLAMA31)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (128, 8, 500000.0)
    assert cfg.rope_scaling_dict["rope_type"] == "llama3" and not cfg.qkv_bias
    assert cfg.eos_token_id == (128001, 128008, 128009)
    hash(cfg)  # static under jit
    back = cfg.to_hf()
    assert back == {**LLAMA31, "head_dim": 128, "pad_token_id": None}


def test_config_qwen2_and_rope_parameters():
    hf = {
        "model_type": "qwen2",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
    }
    cfg = DecoderConfig.from_hf(hf, dtype="bfloat16", remat="full")
    assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings and cfg.head_dim == 16
    assert cfg.rope_theta == 1e6 and cfg.compute_dtype == jnp.bfloat16 and cfg.remat == "full"
    out = cfg.to_hf()
    assert out["rope_parameters"] == hf["rope_parameters"] and "head_dim" not in out
    assert out["use_sliding_window"] is False and out["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "gpt2"}, "unsupported model_type"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "unsupported architecture"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "unsupported rope type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
        ({"rope_scaling": {"type": "linear"}}, "lacks 'factor'"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}},
            "partial_rotary",
        ),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"hidden_size": "big"}, "malformed"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(CheckpointError, match=match):
        DecoderConfig.from_hf({**LLAMA31, **change})
    bad = dict(LLAMA31)
    del bad["vocab_size"]
    with pytest.raises(CheckpointError, match="vocab_size"):
        DecoderConfig.from_hf(bad)
    with pytest.raises(ConfigError, match="remat"):
        DecoderConfig.from_hf(LLAMA31, remat="sometimes")


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        LLAMA31["rope_scaling"],
        {k: v for k, v in LLAMA31["rope_scaling"].items() if k != "original_max_position_embeddings"},
        YARN,  # Qwen2.5's long-context setting
        {**YARN, "type": "yarn", "rope_type": None},  # as Qwen's README spells it
        {**YARN, "attention_factor": 1.25, "beta_fast": 16, "beta_slow": 2, "truncate": False},
        {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5},
        {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 8192},
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    """inv_freq and the cos/sin factor against transformers' own RoPE init (YaRN's factor is not 1)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if scaling and scaling.get("rope_type", "") is None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_type"}
    hf = {**LLAMA31, "rope_scaling": scaling}
    cfg = DecoderConfig.from_hf(hf)
    ours, factor = rope_inv_freq(cfg), rope_attention_factor(cfg)
    hcfg = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    rope_type = hcfg.rope_parameters["rope_type"]
    if rope_type == "default":
        ref, ref_factor = 1.0 / (500000.0 ** (np.arange(0, 128, 2, dtype=np.float32) / 128)), 1.0
    else:
        ref, ref_factor = ROPE_INIT_FUNCTIONS[rope_type](hcfg, "cpu")
        ref = ref.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert factor == pytest.approx(ref_factor, rel=1e-12)
    if rope_type == "yarn":  # the scaling does something here
        plain = rope_inv_freq(cfg.replace(rope_scaling=None))
        assert not np.allclose(ours, plain) and factor != 1.0


def test_rope_scaling_is_parsed_once_for_every_reader():
    """`DecoderConfig.rope`: the type under either spelling, and the pretraining context defaulting to
    max_position_embeddings (transformers' rule), which rope_inv_freq and YaRN's null factor both read."""
    cfg = DecoderConfig.from_hf({**LLAMA31, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (cfg.rope.rope_type, cfg.rope.original_max_position_embeddings) == ("linear", 131072.0)
    assert cfg.rope.settings == {"type": "linear", "factor": 2.0}
    assert DecoderConfig.from_hf({**LLAMA31, "rope_scaling": None}).rope.rope_type == "default"
    yarn = DecoderConfig.from_hf(
        {
            **LLAMA31,
            "rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 8192},
        }
    )
    assert yarn.rope.original_max_position_embeddings == 8192.0
    assert rope_attention_factor(yarn) == pytest.approx(0.1 * np.log(131072 / 8192) + 1)


def test_random_init_shapes():
    cfg = DecoderConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        qkv_bias=True,
    )
    m = Decoder(cfg, rngs=nnx.Rngs(0))
    assert m.layers.attn.k_proj.kernel.get_value().shape == (3, 32, 1, 8)
    assert m.layers.attn.q_proj.bias.get_value().shape == (3, 4, 8)
    out = nnx.jit(lambda m, i: m(i))(m, jnp.zeros((2, 5), jnp.int32))
    assert out.shape == (2, 5, 50) and bool(jnp.all(jnp.isfinite(out)))


def test_chunked_attention_equals_xla():
    from alignx_jax.models import attention as attn

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (2, 8, 4, 16))
    k = jax.random.normal(k2, (2, 8, 2, 16))
    v = jax.random.normal(k3, (2, 8, 2, 16))
    t = jnp.arange(8)
    allowed = (t[None, :] <= t[:, None])[None] & jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1]] * 2, bool)[:, None, :]
    want = attn._attention_xla(q, k, v, allowed, 0.25)
    got = jax.jit(lambda *a: attn._attention_chunked(*a, 0.25, chunk=4))(q, k, v, allowed)
    assert _rel(got, want) < 1e-6
