"""LoRA (model.lora, models/lora.py): the adapted forward against merged kernels, the reference with
adapters off, an in-process LoRA DPO step, and a tiny `alignx train` + merged `alignx export`."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import run_cli
from flax import nnx

from alignx_jax import config_schema, train
from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.models import lora
from alignx_jax.models.compaction import TokenLayout
from alignx_jax.models.decoder import Decoder, DecoderConfig
from alignx_jax.sharding import variable_axes
from alignx_jax.train.state import LoraCodec, ParamsCodec
from alignx_jax.train.step import model_pair_logps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
CFG = DecoderConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def _lora_model(rank=4, alpha=8.0, random_b=True, **kw):
    m = Decoder(CFG.replace(lora_rank=rank, lora_alpha=alpha, **kw), rngs=nnx.Rngs(0))
    if random_b:
        rng = np.random.default_rng(1)
        for path, var in nnx.to_flat_state(nnx.state(m)):
            if path[-1] == "lora_b":
                var.set_value(jnp.asarray(0.2 * rng.standard_normal(var.get_value().shape), jnp.float32))
    return m


def _numpy_merged(m) -> Decoder:
    """A plain Decoder whose kernels are W + (alpha / r) A @ B, merged in NumPy (float64)."""
    pure = nnx.to_pure_dict(nnx.state(m))
    s = m.cfg.lora_alpha / m.cfg.lora_rank

    def go(node):
        if not isinstance(node, dict):
            return node
        out = {k: go(v) for k, v in node.items() if k not in ("lora_a", "lora_b")}
        if "lora_a" in node:
            w, a, b = (np.asarray(node[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
            L, r = a.shape[0], a.shape[-1]
            d = np.einsum("lir,lro->lio", a.reshape(L, -1, r), b.reshape(L, r, -1)).reshape(w.shape)
            out["kernel"] = jnp.asarray((w + s * d).astype(np.float32))
        return out

    plain = Decoder(CFG, rngs=nnx.Rngs(0))
    state = nnx.state(plain)
    nnx.replace_by_pure_dict(state, go(pure))
    nnx.update(plain, state)
    return plain


IDS = jnp.asarray(np.random.default_rng(0).integers(1, 97, size=(2, 12)), jnp.int32)


def test_new_adapters_leave_the_base_model_exactly():
    base = Decoder(CFG, rngs=nnx.Rngs(0))
    m = _lora_model(random_b=False)
    assert jnp.array_equal(base(IDS), m(IDS))  # B = 0, and the base weights are drawn as without LoRA
    a = m.layers.attn.o_proj.lora_a
    assert a.get_value().shape == (2, 4, 8, 4)
    assert variable_axes(a) == ("layers", "heads", "head_dim", None)
    assert variable_axes(m.layers.attn.o_proj.lora_b) == ("layers", None, "embed")


@pytest.mark.parametrize("scan", [True, False])
def test_lora_forward_equals_numpy_merged_kernels(scan):
    m = _lora_model(scan_layers=scan)
    ref = _numpy_merged(m)
    got, want = m(IDS), ref(IDS)
    assert float(jnp.max(jnp.abs(got - Decoder(CFG, rngs=nnx.Rngs(0))(IDS)))) > 1e-2  # adapters matter
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # models.lora.merged (the export path) agrees too
    np.testing.assert_allclose(np.asarray(lora.merged(m)(IDS)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_lora_gradients_match_autodiff_through_merged_kernels():
    """The adapter gradients through the fast matmul path (CPU custom VJP) and token compaction
    against plain autodiff of W + s A @ B."""
    m = _lora_model()
    codec = LoraCodec.of(m)
    adapters, base = codec.split(nnx.to_pure_dict(nnx.state(m)))
    s = m.cfg.lora_multiplier
    plain = ParamsCodec.of(Decoder(CFG, rngs=nnx.Rngs(0)))
    # one group of both rows' first 8 tokens (the rest padding): index [1, 16], slot [1, 24]
    kept = [r * 12 + t for r in range(2) for t in range(8)]
    index = jnp.asarray([kept], jnp.int32)
    slot = jnp.asarray([[kept.index(p) if p in kept else 16 for p in range(24)]], jnp.int32)
    mask = jnp.asarray(np.arange(12)[None].repeat(2, 0) < 8)

    def loss_lora(ad):
        h = codec.policy(ad, base).hidden_states(IDS, mask, tokens=TokenLayout(index, slot))
        return jnp.sum(h[:, :8] ** 2)

    def loss_merged(ad):
        merged = plain.module(lora.merged_params(lora.join(ad, base), s))
        return jnp.sum(merged.hidden_states(IDS, mask)[:, :8] ** 2)

    ga, gb = jax.grad(loss_lora)(adapters), jax.grad(loss_merged)(adapters)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        x, y = np.asarray(x), np.asarray(y)  # float32 sums in another order: relative to the largest
        assert np.max(np.abs(x - y)) <= 1e-2 * np.max(np.abs(y)), (np.max(np.abs(x - y)), np.max(np.abs(y)))


def _pair_batch(B=4, T=20, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 97, size=(2 * B, T)).astype(np.int32)
    attn = np.ones((2 * B, T), np.int32)
    loss = np.zeros((2 * B, T), np.int32)
    loss[:, 8:] = 1
    pos = np.tile(np.arange(T, dtype=np.int32), (2 * B, 1))
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "positions": pos,
        "pair_mask": np.ones((B,), np.int32),
    }


def test_reference_with_adapters_off_is_the_base_model():
    m = _lora_model()
    codec = LoraCodec.of(m)
    adapters, base = codec.split(nnx.to_pure_dict(nnx.state(m)))
    mb = jax.tree.map(lambda x: x[0], train.to_microbatches(_pair_batch(), 1))
    want = model_pair_logps(Decoder(CFG, rngs=nnx.Rngs(0)), mb, 7)
    for ref_model in (codec.reference(base, adapters), codec.reference(base)):
        assert jnp.array_equal(model_pair_logps(ref_model, mb, 7), want)
    assert float(jnp.max(jnp.abs(model_pair_logps(codec.policy(adapters, base), mb, 7) - want))) > 1e-3


def test_lora_dpo_step_trains_adapters_only():
    m = _lora_model(random_b=False)
    codec = LoraCodec.of(m)
    adapters, base = codec.split(nnx.to_pure_dict(nnx.state(m)))
    base0 = jax.tree.map(np.asarray, base)
    optim = ml_collections.ConfigDict(
        dict(
            lr=1e-2, warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0
        )
    )
    tx, _ = train.make_optimizer(optim, 10)
    loss_cfg = config_schema.default_config().loss  # the release's sigmoid DPO, reference on the fly
    loss_cfg.logps_chunk = 7
    step = jax.jit(train.make_train_step(codec, tx, loss_cfg, precomputed=False))
    batch = train.to_microbatches(_pair_batch(), 2)
    opt = tx.init(adapters)
    losses = []
    for _ in range(4):
        adapters, opt, met = step(adapters, opt, base, batch)
        losses.append(float(met["loss"]))
    np.testing.assert_allclose(losses[0], np.log(2.0), atol=1e-5)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(
        np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(base))
    )
    assert float(jnp.max(jnp.abs(adapters["layers"]["attn"]["q_proj"]["lora_b"]))) > 0


def test_lora_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown projection 'qproj'"):
        CFG.replace(lora_rank=4, lora_targets=("qproj",))
    with pytest.raises(ConfigError, match="rank=-1"):
        CFG.replace(lora_rank=-1)


@pytest.mark.slow
def test_lora_train_and_merged_export_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from alignx_jax.models import checkpoint, hf
    from tests.test_train import SMALL, _losses

    w, out = tmp_path / "w", tmp_path / "export"
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={w}",
            *SMALL,
            "--config.train.steps=6",
            "--config.model.lora.rank=4",
            "--config.model.lora.alpha=8",
            "--config.optim.lr=1e-2",
            "--config.checkpoint.every_steps=6",
        ]
    )
    assert r.returncode == 0, r.stderr
    losses = _losses(w)
    assert min(losses[5], losses[6]) < losses[1] - 1e-3, losses
    model = checkpoint.load_checkpoint(str(w))  # adapters from the step, base from W/reference
    assert model.cfg.lora_rank == 4 and model.cfg.lora_alpha == 8.0
    # the base weights are W/reference's, untouched by training
    base = hf.load_pretrained(str(w / "reference"))
    assert jnp.array_equal(
        model.layers.attn.q_proj.kernel.get_value(), base.layers.attn.q_proj.kernel.get_value()
    )
    r = run_cli(["export", "--checkpoint", str(w), "--out", str(out)])
    assert r.returncode == 0, r.stderr
    # the card of a LoRA run from scratch: its adapters, its steps, no base and no base generation config
    card = (out / "README.md").read_text()
    assert "LoRA rank 4, LoRA alpha 8, LoRA target modules q_proj/" in card and "steps 6" in card
    assert "randomly initialised" in card and "holds only the token ids" in card
    ids = np.arange(5, 25)[None]
    want = np.asarray(model(jnp.asarray(ids)))
    t = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = t(torch.as_tensor(ids)).logits.numpy()
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel < 1e-5, rel

    # --peft: the adapters alone under PEFT's names; PeftModel on the base (W/reference) = the merged export
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file

    adapter = tmp_path / "adapter"
    r = run_cli(["export", "--checkpoint", str(w), "--out", str(adapter), "--peft"])
    assert r.returncode == 0, r.stderr
    pc = json.loads((adapter / "adapter_config.json").read_text())
    assert (pc["r"], pc["lora_alpha"], pc["peft_type"]) == (4, 8.0, "LORA")
    assert set(pc["target_modules"]) == set(lora.LORA_TARGETS)
    assert os.path.isdir(pc["base_model_name_or_path"])  # no model.hf_path: the run's W/reference
    # the trained prompt format is recorded as a full export's is (it was left out of an adapter export)
    from alignx_jax.export import trained_prompt_format

    assert trained_prompt_format(str(adapter)) == trained_prompt_format(str(out)) is not None
    manifest = json.loads((adapter / "alignx_export.json").read_text())
    assert manifest["prompt_format"] == json.loads((out / "alignx_export.json").read_text())["prompt_format"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    hc = json.loads((out / "config.json").read_text())
    D, F = hc["hidden_size"], hc["intermediate_size"]
    N, H = hc["num_attention_heads"], hc.get("head_dim") or D // hc["num_attention_heads"]
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, D)
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, N * H)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (D, 4)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (F, 4)
    base_t = AutoModelForCausalLM.from_pretrained(str(w / "reference"), dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base_t, str(adapter)).eval()
    with torch.no_grad():
        got_peft = pm(torch.as_tensor(ids)).logits.numpy()
    assert np.max(np.abs(got_peft - got)) / np.max(np.abs(got)) < 1e-5
    # a run without LoRA has no adapters to write
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        hf.save_peft(base, str(tmp_path / "no"), base_model_name_or_path="x")


@pytest.mark.parametrize("source", ["hf", "checkpoint"])
def test_loaded_weights_get_new_seeded_adapters_and_compute_their_base(tiny_hf_checkpoints, tmp_path, source):
    """An HF folder or a plain model checkpoint holds no adapters: a model.lora load draws new ones (A
    random from the seed, B zeros), real arrays placed on the mesh, and the model computes its base."""
    from alignx_jax.models import checkpoint, hf
    from alignx_jax.sharding import make_mesh

    src = tiny_hf_checkpoints["llama"]
    if source == "checkpoint":
        path = str(tmp_path / "ckpt")
        checkpoint.save_checkpoint(hf.load_pretrained(src), path)

        def load(**kw):
            return checkpoint.load_checkpoint(path, dtype="float32", **kw)
    else:

        def load(**kw):
            return hf.load_pretrained(src, "float32", **kw)

    def adapters_of(m):
        return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(m)) if p[-1] in lora.LORA_KEYS}

    plain = load()
    m = load(mesh=make_mesh(fsdp=-1), lora_rank=4, adapter_seed=3)
    same, other = (
        adapters_of(load(lora_rank=4, adapter_seed=3)),
        adapters_of(load(lora_rank=4, adapter_seed=4)),
    )
    got = adapters_of(m)
    assert len(got) == 2 * len(lora.LORA_TARGETS)
    for p, x in got.items():
        assert isinstance(x, jax.Array) and x.dtype == jnp.float32, (p, type(x))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(same[p]))  # seeded
        if p[-1] == "lora_b":
            assert not np.any(np.asarray(x)), p
        else:
            assert np.any(np.asarray(x)) and not np.array_equal(np.asarray(x), np.asarray(other[p])), p
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 200, size=(2, 9)), jnp.int32)
    np.testing.assert_allclose(np.asarray(m(ids)), np.asarray(plain(ids)), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_lora_train_from_an_hf_folder_with_precomputed_reference(tiny_hf_checkpoints, tmp_path):
    """`alignx train` with model.lora on pretrained weights (the adapters are new) and the reference
    log-probs computed once before training: it trains the adapters and leaves the base as it was."""
    from tests.test_train import SMALL, _losses

    w = tmp_path / "w"
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={w}",
            *SMALL,
            f"--config.model.hf_path={tiny_hf_checkpoints['llama']}",
            "--config.model.init.enabled=false",
            "--config.train.steps=3",
            "--config.model.lora.rank=4",
            "--config.loss.reference=precomputed",
            "--config.optim.lr=1e-2",
            "--config.checkpoint.every_steps=3",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max_position_embeddings" not in r.stderr  # data.max_length=128 is within the model's 256
    losses = _losses(w)
    assert sorted(losses) == [1, 2, 3] and abs(losses[1] - np.log(2.0)) < 1e-4, losses  # B = 0 at step 1
    assert (w / "ref_logps.p0.npy").is_file()
    from alignx_jax.models import checkpoint, hf

    model = checkpoint.load_checkpoint(str(w))  # the step's adapters on W/reference's base
    base = hf.load_pretrained(tiny_hf_checkpoints["llama"])
    assert jnp.array_equal(
        model.layers.mlp.up_proj.kernel.get_value(), base.layers.mlp.up_proj.kernel.get_value()
    )
    assert float(jnp.max(jnp.abs(model.layers.mlp.up_proj.lora_b.get_value()))) > 0  # B moved from zeros


@pytest.mark.slow
def test_peft_export_of_a_hub_revision_names_the_revision(tiny_hf_checkpoints, tmp_path, monkeypatch):
    """A run on `model.hf_path=ORG/NAME@v1`: adapter_config.json names the base's revision, so
    `AutoPeftModelForCausalLM` puts the adapters on the weights they were trained on after the hub's main
    has moved to others (without it peft loads main)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from conftest import build_tiny_hf
    from peft import AutoPeftModelForCausalLM

    from alignx_jax.models import checkpoint
    from tests.test_hub import COMMIT, fill_hub_cache
    from tests.test_train import SMALL

    cache = str(tmp_path / "hf_home" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    fill_hub_cache(cache, "tiny-org/tiny", tiny_hf_checkpoints["llama"], refs=("v1",))
    moved = build_tiny_hf("llama", str(tmp_path / "moved"), seed=7)  # main: other weights, same shapes
    fill_hub_cache(cache, "tiny-org/tiny", moved, commit="f" * 40, refs=("main",))
    assert COMMIT != "f" * 40
    w, adapter = tmp_path / "w", tmp_path / "adapter"
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={w}",
            *SMALL,
            "--config.model.hf_path=tiny-org/tiny@v1",
            "--config.model.init.enabled=false",
            "--config.train.steps=2",
            "--config.model.lora.rank=4",
            "--config.optim.lr=1e-2",
            "--config.checkpoint.every_steps=2",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["export", "--checkpoint", str(w), "--out", str(adapter), "--peft"])
    assert r.returncode == 0, r.stderr
    pc = json.loads((adapter / "adapter_config.json").read_text())
    assert (pc["base_model_name_or_path"], pc["revision"]) == ("tiny-org/tiny", "v1")
    ids = np.arange(5, 25)[None]
    want = np.asarray(checkpoint.load_checkpoint(str(w))(jnp.asarray(ids)))  # the run's adapters on v1
    pm = AutoPeftModelForCausalLM.from_pretrained(
        str(adapter), cache_dir=cache, local_files_only=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        got = pm(torch.as_tensor(ids)).logits.numpy()
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def test_float32_export_of_a_bfloat16_base_keeps_the_adapters_unrounded(tiny_hf_checkpoints, tmp_path):
    """A bf16 base (model.param_dtype=bfloat16) trains `x @ W + s (x @ A) @ B` with the update unrounded, but
    its merged kernels were stored in W's bfloat16 before `--dtype float32` cast them: updates under W's
    rounding step were lost, and the float32 export computed another model than the one trained."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from alignx_jax.models.hf import load_pretrained, save_hf

    src = tiny_hf_checkpoints["llama"]
    model = load_pretrained(src, dtype="bfloat16", compute_dtype="float32", lora_rank=4)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    for path, var in flat.items():
        if path[-1] == "lora_b":  # small updates: a few of bf16's rounding steps of W at most
            b = var.get_value()
            var.set_value(jnp.asarray(1e-3 * rng.standard_normal(b.shape), b.dtype))
    ids = np.arange(5, 25)[None]
    want = np.asarray(model(jnp.asarray(ids)), np.float32)
    save_hf(model, str(tmp_path / "f32"), dtype="float32", tokenizer_dir=src)
    t = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = t(torch.as_tensor(ids)).logits.numpy()
    base = np.asarray(lora.adapters_off(model)(jnp.asarray(ids)), np.float32)
    moved = np.max(np.abs(want - base))
    assert moved > 1e-3, moved  # the adapters change the logits
    assert np.max(np.abs(got - want)) < 1e-3 * moved, (np.max(np.abs(got - want)), moved)


@pytest.mark.slow
def test_a_lora_workdir_as_hf_path_starts_from_its_trained_model(tmp_path):
    """`model.hf_path` = a LoRA run's workdir: the start (and DPO's reference, and W/reference) is that run's
    model, adapters folded in, and this run's adapters are new. Its adapters were kept over the bare base:
    the reference (adapters off) was the old base, and the export (W/reference, already merged, plus the
    adapters again) counted them twice."""
    from alignx_jax.models import checkpoint
    from tests.test_train import SMALL, _losses

    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    common = [*SMALL, "--config.model.lora.rank=4", "--config.model.lora.alpha=8"]
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w1}", *common, "--config.train.steps=2"]
        + ["--config.optim.lr=5e-2", "--config.checkpoint.every_steps=2"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w2}", *common, "--config.train.steps=1"]
        + [f"--config.model.hf_path={w1}", f"--config.model.tokenizer={w1 / 'reference'}"]
        + [
            "--config.model.init.enabled=false",
            "--config.optim.lr=1e-12",
            "--config.checkpoint.every_steps=1",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(_losses(w2)[1] - np.log(2.0)) < 1e-5  # policy = reference at the start
    ids = jnp.asarray(np.arange(5, 25)[None])
    want = np.asarray(checkpoint.load_checkpoint(str(w1))(ids))
    got = np.asarray(checkpoint.load_checkpoint(str(w2))(ids))
    assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))
