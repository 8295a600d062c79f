"""model.frozen_layers: the bottom blocks and the input embedding take no gradient and no update,
and the trainable blocks get exactly the gradient of the plain computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from alignx_jax import train
from alignx_jax.errors import ConfigError
from alignx_jax.models.decoder import Decoder, DecoderConfig
from alignx_jax.train.state import LoraCodec, ParamsCodec


def _cfg(frozen: int, scan: bool = True, tied: bool = True) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=tied,
        frozen_layers=frozen,
        scan_layers=scan,
        remat="full",
    )


def _grads(cfg: DecoderConfig, state, ids_BT):
    graphdef = nnx.graphdef(Decoder(cfg, rngs=nnx.Rngs(0)))

    def loss(params):
        model = nnx.merge(graphdef, params)
        logits_BTV = model(ids_BT).astype(jnp.float32)
        return jnp.mean(jax.nn.log_softmax(logits_BTV)[..., 3])

    value, g = jax.value_and_grad(loss)(state)
    return value, nnx.to_pure_dict(g)


@pytest.mark.parametrize("scan,tied", [(True, True), (False, False)])
def test_frozen_layers_gradients_match_the_plain_computation_above_the_cut(scan, tied):
    ids_BT = jnp.asarray(np.random.default_rng(0).integers(1, 61, size=(2, 12)), jnp.int32)
    state = nnx.state(Decoder(_cfg(0, scan, tied), rngs=nnx.Rngs(1)))
    v_full, g_full = _grads(_cfg(0, scan, tied), state, ids_BT)
    v_frozen, g_frozen = _grads(_cfg(3, scan, tied), state, ids_BT)
    np.testing.assert_allclose(v_frozen, v_full, rtol=1e-6)  # the forward pass is unchanged
    for path, g in jax.tree_util.tree_leaves_with_path(g_frozen["layers"]):
        full = jax.tree_util.tree_leaves_with_path(g_full["layers"])
        ref = {jax.tree_util.keystr(p): x for p, x in full}[jax.tree_util.keystr(path)]
        assert np.abs(np.asarray(g[:3])).max() == 0.0, path  # frozen blocks
        np.testing.assert_allclose(np.asarray(g[3:]), np.asarray(ref[3:]), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g_frozen["embed_tokens"]["embedding"])).max() == 0.0
    assert np.abs(np.asarray(g_full["embed_tokens"]["embedding"])).max() > 0.0
    np.testing.assert_allclose(
        np.asarray(g_frozen["norm"]["scale"]), np.asarray(g_full["norm"]["scale"]), rtol=1e-5, atol=1e-7
    )
    if not tied:  # an untied output layer sits above every block: it trains
        assert np.abs(np.asarray(g_frozen["lm_head"]["kernel"])).max() > 0.0


def test_optimizer_leaves_frozen_params_unchanged_even_with_weight_decay():
    optim = ml_collections.ConfigDict(
        {
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "min_lr_ratio": 1.0,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.1,
            "clip": 1.0,
        }
    )
    params = nnx.to_pure_dict(nnx.state(Decoder(_cfg(2), rngs=nnx.Rngs(0))))
    grads = jax.tree.map(jnp.ones_like, params)
    tx, _ = train.make_optimizer(optim, 10, frozen_layers=2)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(new["layers"])):
        np.testing.assert_array_equal(np.asarray(a[:2]), np.asarray(b[:2]))
        assert not np.array_equal(np.asarray(a[2:]), np.asarray(b[2:]))
    np.testing.assert_array_equal(
        np.asarray(params["embed_tokens"]["embedding"]), np.asarray(new["embed_tokens"]["embedding"])
    )


def test_frozen_layers_must_leave_a_trainable_block():
    with pytest.raises(ConfigError, match="frozen_layers=4"):
        _cfg(4)


def _codec_and_params(lora: bool):
    """(codec, trained params, ref_params) of a 4-block model whose bottom 2 blocks are frozen."""
    cfg = _cfg(2).replace(vocab_size=97, lora_rank=4 if lora else 0, lora_alpha=8.0)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model))
    if lora:
        codec = LoraCodec.of(model)
        return (codec, *codec.split(params))
    return ParamsCodec.of(model), params, jax.tree.map(lambda x: jnp.array(x, copy=True), params)


@pytest.mark.parametrize("lora", [False, True])
def test_hidden_states_with_the_reference_equal_each_models_own_pass(lora):
    codec, params, ref_params = _codec_and_params(lora)
    # a policy that differs from the reference above the cut, the same below it
    params = {**params, "layers": jax.tree.map(lambda a: a.at[2:].add(0.05), params["layers"])}
    policy = codec.policy(params, ref_params)
    reference = codec.reference(ref_params, params)
    ids_BT = jnp.asarray(np.random.default_rng(4).integers(1, 97, size=(3, 10)), jnp.int32)
    h, h_ref = policy.hidden_states(ids_BT, reference=reference)
    np.testing.assert_allclose(np.asarray(h), np.asarray(policy.hidden_states(ids_BT)), rtol=1e-6, atol=1e-6)
    want_ref = reference.hidden_states(ids_BT)
    np.testing.assert_allclose(np.asarray(h_ref), np.asarray(want_ref), rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(h - h_ref))) > 1e-3  # the two really differ above the cut
    plain = Decoder(_cfg(0).replace(vocab_size=97), rngs=nnx.Rngs(3))  # no frozen blocks to share
    with pytest.raises(ValueError, match="frozen_layers is 0"):
        plain.hidden_states(ids_BT, reference=plain)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("layout", ["two_rows", "shared_prompt"])
def test_on_the_fly_reference_on_the_frozen_blocks_equals_a_separate_reference_pass(lora, layout):
    """loss.reference=on_the_fly with frozen blocks runs the reference inside the policy's pass
    (`step._reference_on_trunk`); its step equals the precomputed one, whose log-probs come from a
    separate whole pass of the reference (`make_ref_logps_fn`)."""
    from tests.test_train import _batch, _loss_cfg, _shared_prompt_batches

    codec, params, ref_params = _codec_and_params(lora)
    optim = ml_collections.ConfigDict(
        dict(
            lr=1e-2, warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0
        )
    )
    tx, _ = train.make_optimizer(optim, 10, frozen_layers=2)
    fly = jax.jit(train.make_train_step(codec, tx, _loss_cfg(), precomputed=False))
    pre = jax.jit(train.make_train_step(codec, tx, _loss_cfg(), precomputed=True))
    ref_fn = jax.jit(train.make_ref_logps_fn(codec, _loss_cfg()))
    o = tx.init(params)
    params, o, m0 = fly(params, o, ref_params, train.to_microbatches(_batch(seed=5), 2))
    np.testing.assert_allclose(float(m0["loss"]), np.log(2.0), atol=1e-5)  # policy == reference at first
    if layout == "two_rows":
        batch = train.to_microbatches(_batch(seed=6, dummies=1), 2)
    else:
        batch = train.to_microbatches(_shared_prompt_batches(seed=7)[1], 2)
    lp, _ = ref_fn(ref_params, batch.replace(slot=np.zeros((2, 2), np.int32)))
    pa, _, ma = fly(params, o, ref_params, batch)
    pb, _, mb = pre(params, o, ref_params, batch.replace(ref_logps=np.asarray(lp)))  # LoRA: the base
    assert abs(float(ma["loss"]) - np.log(2.0)) > 1e-4  # the policy has moved off the reference
    for k in ("loss", "rewards/margins", "rewards/chosen", "grad_norm", "logps/chosen", "logits/chosen"):
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
