"""Logical axis rules, meshes, and sharded loading on 8 fake CPU devices (in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from conftest import cli_env

from alignx_jax import sharding as sh
from alignx_jax.errors import MeshError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_constrain_is_identity_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert sh.active_mesh() is None
    assert sh.constrain(x, ("activation_batch", "activation_length", "activation_embed")) is x


def test_single_device_mesh_and_errors():
    mesh = sh.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == 1
    assert sh.make_mesh(fsdp=-1).shape["fsdp"] == len(jax.devices())
    with pytest.raises(MeshError, match=r"needs 8 devices, but 1 are available"):
        sh.make_mesh(2, 2, 2)
    with pytest.raises(MeshError, match="at most one axis may be -1"):
        sh.make_mesh(-1, -1)


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from alignx_jax import sharding as sh
    from alignx_jax.errors import MeshError
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.models.checkpoint import load_checkpoint, save_checkpoint

    src, work = sys.argv[1], sys.argv[2]
    out = {}
    out["devices"] = len(jax.devices())
    out["rest"] = dict(sh.make_mesh(data=2, fsdp=-1, tensor=2).shape)
    try:
        sh.make_mesh(3, 1, 2)
    except MeshError as e:
        out["mesh_error"] = str(e)
    mesh = sh.make_mesh(2, 2, 2)
    out["spec_drop"] = str(sh.logical_to_spec(("kv_heads", "embed"), mesh, shape=(3, 64)))
    out["spec_batch"] = str(sh.logical_to_spec(("activation_batch", None), mesh))
    ref = load_pretrained(src)
    model = load_pretrained(src, mesh=mesh)
    specs = {"/".join(map(str, p)): str(v.get_value().sharding.spec)
             for p, v in nnx.to_flat_state(nnx.state(model))}
    out["specs"] = specs
    out["q_shards"] = len({(s.index[1].start, s.index[2].start) for s in
                          model.layers.attn.q_proj.kernel.get_value().addressable_shards})
    ids = jnp.asarray(np.random.default_rng(0).integers(6, 4000, size=(4, 10)), jnp.int32)
    mask = jnp.ones((4, 10), jnp.int32).at[0, :3].set(0)
    with sh.use_mesh(mesh):
        logits = nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask)
    want = np.asarray(ref(ids, mask))
    got = np.asarray(logits)
    keep = np.asarray(mask).astype(bool)
    out["rel"] = float(np.abs(got[keep] - want[keep]).max() / np.abs(want).max())
    out["logits_spec"] = str(logits.sharding.spec)
    # shard_model moves a single-device model; orbax restores straight into shardings
    moved = sh.shard_model(load_pretrained(src), mesh)
    out["moved_spec"] = str(moved.embed_tokens.embedding.get_value().sharding.spec)
    save_checkpoint(ref, work)
    again = load_checkpoint(work, mesh=mesh)
    out["restored_spec"] = str(again.layers.mlp.up_proj.kernel.get_value().sharding.spec)
    out["restored_equal"] = bool(np.array_equal(np.asarray(again.layers.mlp.up_proj.kernel.get_value()),
                                                np.asarray(ref.layers.mlp.up_proj.kernel.get_value())))
    abstract = nnx.eval_shape(lambda: type(ref)(ref.cfg, rngs=nnx.Rngs(0)))
    shard_tree = sh.model_shardings(abstract, mesh)
    out["abstract_spec"] = str(dict(nnx.to_flat_state(shard_tree))[("lm_head", "kernel")].get_value().spec)
    print("RESULT" + json.dumps(out))
""")


def test_sharded_load_on_fake_2x2x2_mesh(tiny_hf_checkpoints, tmp_path):
    env = cli_env(devices=8)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny_hf_checkpoints["llama"], str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # jax 0.8 prints a spec as PartitionSpec(...), later ones as P(...)
    out = json.loads(proc.stdout.split("RESULT", 1)[1].replace("PartitionSpec(", "P("))
    assert out["devices"] == 8
    assert out["rest"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert "needs 6 devices, but 8 are available" in out["mesh_error"]
    assert out["spec_drop"] == "P(None, 'fsdp')"  # 3 kv heads do not split over tensor=2
    assert out["spec_batch"] == "P(('data', 'fsdp'), None)"
    specs = out["specs"]
    assert specs["layers/attn/q_proj/kernel"] == "P(None, 'fsdp', 'tensor', None)"
    assert specs["layers/mlp/down_proj/kernel"] == "P(None, 'tensor', 'fsdp')"
    assert specs["embed_tokens/embedding"] == "P('tensor', 'fsdp')"
    assert specs["norm/scale"] == "P(None,)"
    assert out["q_shards"] == 4  # fsdp x tensor distinct pieces
    assert out["rel"] < 1e-5
    assert out["logits_spec"] == "P(('data', 'fsdp'), None, 'tensor')"
    assert out["moved_spec"] == "P('tensor', 'fsdp')"
    assert out["restored_spec"] == "P(None, 'fsdp', 'tensor')" and out["restored_equal"]
    assert out["abstract_spec"] == "P('fsdp', 'tensor')"


def test_flax_tooling_reads_the_logical_axes():
    """The params' logical names are flax's own `out_sharding` metadata: flax's `get_partition_spec`
    under `logical_axis_rules` (an independent reader) gives the mesh axes our rules give."""
    from flax import nnx

    from alignx_jax.models.decoder import Decoder, DecoderConfig

    cfg = DecoderConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
    )
    state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))  # built with no mesh
    mesh = jax.sharding.AbstractMesh((2, 2, 2), sh.MESH_AXES)  # every axis > 1: no rule is dropped
    flat = nnx.to_flat_state(state)
    with nnx.logical_axis_rules(list(sh.DEFAULT_RULES)):
        theirs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    assert len(flat) > 5
    for path, var in flat:
        ours = sh.logical_to_spec(sh.variable_axes(var), mesh)
        assert tuple(theirs[path].get_value()) == tuple(ours), path
    names = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))  # no rules: the names themselves
    assert tuple(names[("embed_tokens", "embedding")].get_value()) == ("vocab", "embed")
