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
