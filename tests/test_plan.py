"""`alignx plan`: topologies, presets, compiled memory vs a real train state, the does-not-fit error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
# short sequences and a small batch keep the compiles to seconds
SMALL = [
    "--config.data.max_length=128",
    "--config.data.buckets=(128,)",
    "--config.train.global_batch=4",
    "--config.train.micro_batch=2",
    "--config.loss.logps_chunk=64",
]


def test_parse_topology():
    from alignx_jax.errors import ConfigError
    from alignx_jax.plan import GiB, parse_topology

    t = parse_topology("v5p-64")
    assert (t.num_devices, t.bytes_per_device, t.platform) == (32, 95 * GiB, "tpu")
    t = parse_topology("8xH100")
    assert (t.num_devices, t.bytes_per_device, t.platform) == (8, 80 * GiB, "gpu")
    t = parse_topology("4@512MiB")
    assert (t.num_devices, t.bytes_per_device) == (4, 512 * 1024**2)
    assert parse_topology("2@1.5GiB").bytes_per_device == int(1.5 * GiB)
    assert parse_topology("2@.5GiB").bytes_per_device == GiB // 2
    assert [parse_topology(n).num_devices for n in ("v5p-17920", "v4-8192", "v5e-256")] == [8960, 4096, 256]
    with pytest.raises(ConfigError, match="unknown topology"):
        parse_topology("v9-12")
    for odd, says in (
        ("v5p-7", "even number of TensorCores"),
        ("v5e-512", "the largest v5e slice is v5e-256 "),
        ("v4-8200", "the largest v4 slice is v4-8192 "),
        ("v6e-257", "the largest v6e slice is v6e-256 "),
        ("v5p-179200", "the largest v5p slice is v5p-17920 "),  # a typo: 89600 stand-in devices
        ("0xH100", "at least one GPU"),
        ("0@1GiB", "one device"),
        ("2@0GiB", "under one byte"),  # not this machine's memory in its place
        ("2@0.1B", "under one byte"),
        ("2@1..5GiB", "cannot read a memory size"),  # not float()'s traceback
        ("2@.GiB", "cannot read a memory size"),
        # not 'unknown topology': the count is what is wrong
        ("-8xH100", "the device count '-8' is not a whole number"),
        ("1.5xH100", "the device count '1.5' is not a whole number"),
        ("-1@1GiB", "the device count '-1' is not a whole number"),
        ("8.0@1GiB", "the device count '8.0' is not a whole number"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_topology(odd)  # not a silent plan of 3 chips, or of this machine's devices
    # the hosts (JAX processes) each topology has: what `alignx train` there checks its batch split against
    hosts = {
        n: parse_topology(n).hosts
        for n in ("v5p-8", "v5p-64", "v5p-256", "v5e-8", "v5e-16", "8xH100", "64xH100", "4@1GiB")
    }
    assert hosts == {
        "v5p-8": 1,
        "v5p-64": 8,
        "v5p-256": 32,
        "v5e-8": 1,
        "v5e-16": 4,
        "8xH100": 1,
        "64xH100": 8,
        "4@1GiB": 1,
    }


def test_a_tpu_count_no_slice_has_is_refused():
    """`v5e-3` or `v5p-6` were planned on grids no TPU slice has (`v5e:1x3`, `v5:1x3x1`)."""
    from alignx_jax.errors import ConfigError
    from alignx_jax.plan import parse_topology

    for odd, says in (
        ("v5e-3", "'v5e-3': no v5e slice has 3 chips; e.g. v5e-1, v5e-4, v5e-8, "),
        ("v6e-2", "'v6e-2': no v6e slice has 2 chips; e.g. v6e-1, v6e-4, "),
        ("v5p-6", "'v5p-6': no v5p slice has 3 chips; e.g. v5p-8, v5p-16, "),
        ("v5p-2", "'v5p-2': no v5p slice has 1 chip; e.g. v5p-8, "),
        ("v4-24", "'v4-24': no v4 slice has 12 chips; e.g. v4-8, "),
        ("v5p-144", "'v5p-144': no v5p slice has 72 chips; .* then multiples of 128"),  # 4x4x4.5
    ):
        with pytest.raises(ConfigError, match=says) as e:
            parse_topology(odd)
        assert "\n" not in str(e.value)
    grids = {
        "v5e-1": "v5e:1x1",
        "v5e-4": "v5e:2x2",
        "v6e-32": "v6e:4x8",
        "v6e-128": "v6e:8x16",
        "v4-16": "v4:2x2x2",
        "v5p-32": "v5:2x2x4",
        "v5p-128": "v5:4x4x4",
        "v5p-384": "v5:4x4x12",
    }
    assert {n: parse_topology(n).tpu_topology for n in grids} == grids


def test_plan_refuses_a_batch_split_train_refuses_on_the_topologys_hosts():
    from jax.sharding import Mesh

    from alignx_jax.config import load_config
    from alignx_jax.errors import MeshError
    from alignx_jax.plan.planner import _batch_layout

    # stand-in meshes only need their shape: _batch_layout reads mesh.shape
    mesh = lambda d, f, t: Mesh(np.empty((d, f, t), dtype=object), ("data", "fsdp", "tensor"))
    cfg = load_config(TINY, ["--config.train.global_batch=8", "--config.train.micro_batch=4"])
    notes: list[str] = []
    assert _batch_layout(cfg, mesh(1, 32, 1), notes, hosts=1)["micro_batch"] == 4  # one host replicates
    assert "pairs replicated" in notes[0]
    with pytest.raises(
        MeshError, match="4 pairs do not split over the mesh's data\\*fsdp=32 batch shards of 8 hosts"
    ):
        _batch_layout(cfg, mesh(1, 32, 1), [], hosts=8)
    with pytest.raises(MeshError, match="mesh.tensor must not span hosts"):
        _batch_layout(cfg, mesh(1, 4, 8), [], hosts=8)
    cfg = load_config(TINY, ["--config.train.global_batch=64", "--config.train.micro_batch=32"])
    assert _batch_layout(cfg, mesh(1, 32, 1), [], hosts=8)["seqs_per_device"] == 2


def test_llama3_8b_preset_needs_no_weights():
    from alignx_jax.config import load_config
    from alignx_jax.plan import analytic_bytes, decoder_config_for

    cfg = load_config(
        os.path.join(ROOT, "configs", "llama3_8b_ica_gpu.py"), ["--config.model.hf_path=llama3-8b"]
    )
    d = decoder_config_for(cfg)
    assert (d.num_hidden_layers, d.hidden_size, d.num_key_value_heads, d.vocab_size) == (32, 4096, 8, 128256)
    assert d.dtype == "bfloat16" and d.remat == "full"
    p = analytic_bytes(d, seqs_per_device=2, seq_len=8192, shard=8, chunk=1024)["param_count"]
    assert abs(p - 8.03e9) / 8.03e9 < 0.01


def test_llama3_8b_lora_config_on_one_gpu():
    """configs/llama3_8b_ica_lora_gpu.py: rank-16 adapters (41.9M float32), a bf16 base, one device; the
    compiled plan (README: 60.29 GiB of 80) is minutes of CPU, so here the analytic budget is checked."""
    from alignx_jax.config import load_config
    from alignx_jax.plan import GiB, analytic_bytes, decoder_config_for, parse_topology

    cfg = load_config(os.path.join(ROOT, "configs", "llama3_8b_ica_lora_gpu.py"))
    d = decoder_config_for(cfg)
    assert (d.lora_rank, d.lora_multiplier, d.param_dtype, d.remat) == (16, 2.0, "bfloat16", "full")
    topo = parse_topology(cfg.plan.topology)
    assert (topo.num_devices, topo.bytes_per_device) == (1, 80 * GiB)
    a = analytic_bytes(d, seqs_per_device=2, seq_len=8192, shard=1, chunk=int(cfg.loss.logps_chunk))
    assert a["trainable_count"] == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert a["params"] == 4 * a["trainable_count"]
    assert a["reference"] == 2 * (a["param_count"] - a["trainable_count"])  # the bf16 base
    assert a["total"] < 40 * GiB


def _state_bytes_on_first_device(tree) -> int:
    import jax

    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def test_plan_matches_a_real_train_state():
    """Plan bytes vs the same config built for real (weights allocated, step compiled on arrays)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alignx_jax import sharding as shd
    from alignx_jax import train
    from alignx_jax.config import load_config
    from alignx_jax.plan import parse_topology, plan

    cfg = load_config(TINY, SMALL)
    report = plan(cfg, parse_topology("1@4GiB"))
    c = report["per_device_bytes"]
    assert report["fits"] and report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}

    # the real state, built the way run_training builds it
    mesh = shd.mesh_from_config(cfg.mesh, devices=jax.devices()[:1])
    rules = train.rules_from_config(cfg)
    tok, _ = train.load_tokenizer_for(cfg)
    policy = train.build_policy(cfg, tok, mesh, rules)
    codec = train.ParamsCodec.of(policy)
    params = nnx.to_pure_dict(nnx.state(policy))
    ref = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.dtype(cfg.model.dtype), copy=True), params)
    tx, _ = train.make_optimizer(cfg.optim, 10)
    opt_state = tx.init(params)
    real_state = _state_bytes_on_first_device((params, opt_state, ref))
    planned_state = c["params"] + c["optimizer"] + c["reference"]
    assert abs(planned_state - real_state) <= 0.01 * real_state + 1024, (planned_state, real_state)

    T = 128
    host = {
        k: np.zeros((2, 2, 2, T), np.int32) for k in ("input_ids", "attention_mask", "positions", "loss_mask")
    }
    host = train.TwoRowBatch(**host, pair_mask=np.ones((2, 2), np.int32))
    batch = train.put_batch(host, train.batch_shardings(host, mesh, rules))
    step = jax.jit(train.make_train_step(codec, tx, cfg.loss, precomputed=False), donate_argnums=(0, 1))
    with shd.use_mesh(mesh, rules):
        ma = step.lower(params, opt_state, ref, batch).compile().memory_analysis()
    real_total = (
        ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    )
    # stated factor: the plan's per-device total is within 1.25x of the real executable's
    assert real_total / 1.25 <= c["total"] <= real_total * 1.25, (c["total"], real_total)
    # the analytic estimate is rough but of the right order
    a = report["analytic_bytes"]["total"]
    assert c["total"] / 4 <= a <= c["total"] * 4, (a, c["total"])
    assert report["analytic_bytes"]["params"] == c["params"]


def test_lora_plan_trains_the_adapters_only():
    """model.lora: the step is lowered as `alignx train` runs it: float32 adapters (and their optimizer)
    trained, the base frozen in param_dtype (bfloat16 here) and passed as the reference."""
    from alignx_jax.config import load_config
    from alignx_jax.plan import parse_topology, plan

    cfg = load_config(TINY, [*SMALL, "--config.model.lora.rank=4", "--config.model.param_dtype=bfloat16"])
    report = plan(cfg, parse_topology("1@4GiB"))
    c, a = report["per_device_bytes"], report["analytic_bytes"]
    trained = [p for p in report["params"] if p["trainable"]]
    frozen = [p for p in report["params"] if not p["trainable"]]
    assert trained and all(p["name"].rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in trained)
    assert all(p["dtype"] == "float32" for p in trained) and all(p["dtype"] == "bfloat16" for p in frozen)
    n_adapters = sum(int(np.prod(p["shape"])) for p in trained)
    n_base = sum(int(np.prod(p["shape"])) for p in frozen)
    assert n_adapters == a["trainable_count"] and n_adapters + n_base == a["param_count"]
    assert c["params"] == 4 * n_adapters and c["reference"] == 2 * n_base == a["reference"]
    assert 8 * n_adapters <= c["optimizer"] <= 8 * n_adapters + 1024  # Adam's mu and nu (and a count)
    assert report["fits"] and report["lora_rank"] == 4 and any("LoRA rank 4" in n for n in report["notes"])


def test_plan_that_does_not_fit_fails_with_numbers(capsys, tmp_path):
    from alignx_jax.cli import main

    out = tmp_path / "plan.json"
    rc = main(["plan", "--config", TINY, *SMALL, "--topology", "1@1MiB", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "needs" in err and "1.0 MiB" in err and "temporaries" in err and "Traceback" not in err
    report = json.loads(out.read_text())  # the report is written even when it does not fit
    assert report["fits"] is False and report["per_device_bytes"]["total"] > 1024**2
    # a rerun onto its own earlier report replaces it
    out.write_text(json.dumps({**report, "fits": "earlier"}))
    assert main(["plan", "--config", TINY, *SMALL, "--topology", "1@1MiB", "--json", str(out)]) == 1
    capsys.readouterr()
    assert json.loads(out.read_text())["fits"] is False


@pytest.mark.parametrize("target", ["notes", "config", "hf_config"])
def test_json_never_replaces_an_input_or_another_file(target, capsys, tmp_path):
    """--json replaces an earlier plan report only: notes, the --config file and model.hf_path's
    config.json are refused in one line naming --json and the file, before anything compiles, and left
    byte-identical."""
    from alignx_jax.cli import main

    config = tmp_path / "cfg.py"
    config.write_bytes(open(TINY, "rb").read())
    base = os.path.join(os.path.dirname(TINY), "base.py")  # the config imports it from beside itself
    (tmp_path / "base.py").write_bytes(open(base, "rb").read())
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}\n')
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = {"notes": notes, "config": config, "hf_config": hf / "config.json"}[target]
    before = out.read_bytes()
    rc = main(["plan", "--config", str(config), *SMALL, f"--config.model.hf_path={hf}", "--json", str(out)])
    std, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and f"--json {out}" in lines[0], err
    assert out.read_bytes() == before and "fits" not in std


def test_json_that_is_a_folder_fails_before_the_compile(capsys, tmp_path):
    """--json naming a folder is one line before anything compiles (it was the rename's "Is a directory" after
    the compile, naming no flag)."""
    from alignx_jax.cli import main

    rc = main(["plan", "--config", TINY, *SMALL, "--topology", "1@1MiB", "--json", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1 and err.strip().splitlines() == [
        f"alignx: error: --json {tmp_path}: cannot be written (a folder, not a file)"
    ]
    assert "fits" not in out  # nothing planned


def test_a_bad_topology_names_the_flag_or_the_key(capsys):
    """`unknown topology 'v5p'` said neither whether --topology or the config's plan.topology held it."""
    from alignx_jax.cli import main

    for argv, where in (
        (["--topology", "v5p"], "--topology"),
        (["--config.plan.topology=v5p"], "plan.topology"),
    ):
        assert main(["plan", "--config", TINY, *SMALL, *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"alignx: error: {where}: unknown topology 'v5p': "), err


def test_empty_json_fails_before_the_compile(capsys):
    """`--json ""` (an unset shell variable) planned and wrote no report, without a word."""
    from alignx_jax.cli import main

    rc = main(["plan", "--config", TINY, *SMALL, "--topology", "1@1MiB", "--json", ""])
    out, err = capsys.readouterr()
    assert rc == 1 and err.strip().splitlines() == [
        "alignx: error: --json: an empty path; name the report file"
    ]
    assert "fits" not in out  # nothing planned


def test_unknown_model_path_is_a_config_error(capfd):
    from alignx_jax.cli import main

    rc = main(
        [
            "plan",
            "--config",
            os.path.join(ROOT, "configs", "llama3_8b_ica_gpu.py"),
            "--config.model.hf_path=/no/such/model",
            "--topology",
            "8xH100",
        ]
    )
    assert rc == 1 and "preset" in capfd.readouterr().err


@pytest.mark.parametrize(
    "override, says",
    [
        ("--config.loss.beta=-1", "loss.beta must be positive"),  # what train refuses is not planned
        ("--config.model.init.hidden_size=-64", "model.init.hidden_size must be positive"),
        ("--config.sharding.rules=(('embed','fsbp'),)", "unknown mesh axis 'fsbp'"),
    ],
)
def test_plan_refuses_what_train_refuses(capsys, override, says):
    from alignx_jax.cli import main

    assert main(["plan", "--config", TINY, override]) == 1
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_plan_reads_a_workdirs_model_and_a_config_arg_error_is_one_line(capsys, tmp_path):
    """A training workdir as model.hf_path plans W/reference's model (its config.json is the run's); a
    `file.py:arg` its get_config does not take is one line."""
    from alignx_jax.cli import main
    from alignx_jax.models.decoder import Decoder, DecoderConfig
    from alignx_jax.models.hf import save_hf

    w = tmp_path / "W"
    (w / "checkpoints").mkdir(parents=True)
    (w / "config.json").write_text(json.dumps({"model": {}, "data": {}}))
    cfg = DecoderConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
    )
    save_hf(Decoder(cfg, rngs=__import__("flax").nnx.Rngs(0)), str(w / "reference"))
    out = tmp_path / "p.json"
    assert main(["plan", "--config", TINY, f"--config.model.hf_path={w}", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["hidden_size"] == 48
    capsys.readouterr()
    assert main(["plan", "--config", f"{TINY}:quick"]) == 1
    assert "get_config() with 'quick' failed: TypeError" in capsys.readouterr().err


def test_chunked_attention_matches_xla():
    import jax
    import jax.numpy as jnp

    from alignx_jax.models import attention as attn

    B, T, N, K, H = 2, 64, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H))
    k = jax.random.normal(kk, (B, T, K, H))
    v = jax.random.normal(kv, (B, T, K, H))
    t = jnp.arange(T)
    mask = jnp.ones((B, T), bool).at[1, 50:].set(False)
    allowed = (t[None, :] <= t[:, None])[None] & mask[:, None, :]

    def full(q, k, v):
        return attn._attention_xla(q, k, v, allowed, 0.3)

    def chunked(q, k, v):
        return attn._attention_chunked(q, k, v, allowed, 0.3, chunk=16)

    np.testing.assert_allclose(chunked(q, k, v), full(q, k, v), atol=1e-5)
    g_full = jax.grad(lambda *a: jnp.sum(jnp.sin(full(*a))), argnums=(0, 1, 2))(q, k, v)
    g_chunk = jax.grad(lambda *a: jnp.sum(jnp.sin(chunked(*a))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_full, g_chunk):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_plan_cli_on_eight_stand_in_devices(tmp_path):
    """The CLI provides 8 fake CPU devices (fresh process) and FSDP splits the params 8 ways."""
    out = tmp_path / "plan8.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignx_jax",
            "plan",
            "--config",
            TINY,
            *SMALL,
            "--config.train.micro_batch=4",
            "--config.train.global_batch=8",
            "--topology",
            "8@1GiB",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["num_devices"] == 8 and rep["mesh"]["fsdp"] == 8
    emb = next(p for p in rep["params"] if p["name"] == "embed_tokens/embedding")
    assert emb["per_device_shape"] == [emb["shape"][0], emb["shape"][1] // 8]
    # per-device parameter bytes are the 1-device total split 8 ways (norm scales stay replicated)
    full = rep["analytic_bytes"]["param_count"] * 4
    assert full / 8 <= rep["per_device_bytes"]["params"] <= full / 8 * 1.05


def test_plan_of_a_joint_pba_config_counts_the_head():
    """The joint PBA step carries the preference head and a persona per pair: the plan compiles them."""
    from alignx_jax.config import load_config
    from alignx_jax.plan import parse_topology, plan

    pba = os.path.join(ROOT, "configs", "tiny_pba.py")
    with_head = plan(load_config(pba, SMALL), parse_topology("1@4GiB"))
    without = plan(load_config(pba, [*SMALL, "--config.pba.enabled=false"]), parse_topology("1@4GiB"))
    assert with_head["per_device_bytes"]["preference_head"] > 0
    assert without["per_device_bytes"]["preference_head"] == 0
    assert with_head["per_device_bytes"]["total"] > without["per_device_bytes"]["total"]
    assert any("joint PBA head" in n for n in with_head["notes"])


@pytest.mark.slow
def test_the_issue_command_plans_the_tpu_config_without_weights_or_flags(tmp_path):
    """`alignx plan --config=configs/llama3_8b_pba_tpu_v5p_64.py --json F`, as given: the config names
    its architecture (`model.preset`) and topology (`plan.topology`), so no path or flag is needed."""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignx_jax",
            "plan",
            "--config=" + os.path.join(ROOT, "configs", "llama3_8b_pba_tpu_v5p_64.py"),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["topology"] == "v5p-64" and rep["num_devices"] == 32 and rep["mesh"]["fsdp"] == 32
    assert rep["model"]["param_count"] > 8e9 and rep["seq_len"] == 8192 and rep["global_batch"] == 128
    total = rep["per_device_bytes"]["total"]
    assert 10 * 2**30 < total < 95 * 2**30  # fits the 95 GiB chip with room
    # CPU stand-ins: compiled with the chunked stand-in for splash, and says so (libtpu: splash itself)
    assert rep["compiler"] == "tpu topology" or any("splash" in n for n in rep["notes"])


def test_a_folder_holding_no_model_is_named_once_as_given(capsys, tmp_path):
    """model.hf_path naming a folder with no config.json and no reference/ was `DIR/reference: checkpoint
    folder not found: DIR/reference` (the folder twice, and one the user never named); a config.json the
    decoder cannot read names the folder once too."""
    from alignx_jax.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plan", "--config", TINY, f"--config.model.hf_path={empty}"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == f"alignx: error: model.hf_path={str(empty)!r}: no config.json and no reference/ (an HF model "
        "folder holds config.json, a training workdir its model in reference/)"
    )
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["plan", "--config", TINY, f"--config.model.hf_path={empty}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count(str(empty)) == 1 and "unsupported model_type 'bert'" in err, err


def test_unknown_preset_names_model_preset(capfd):
    from alignx_jax.cli import main

    rc = main(
        [
            "plan",
            "--config",
            os.path.join(ROOT, "configs", "llama3_8b_ica_gpu.py"),
            "--config.model.preset=llama9-1t",
            "--topology",
            "8xH100",
        ]
    )
    err = capfd.readouterr().err
    assert rc == 1 and "model.preset='llama9-1t' is neither a folder nor a preset" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("share", [True, False], ids=["share_prompt", "two_rows"])
def test_plan_lowers_the_step_train_runs(tmp_path, share):
    """`alignx plan`'s step is `alignx train`'s: for a loader batch of a tiny run (data.compact_tokens on,
    with and without data.share_prompt) the batch arguments and the lowered step are the same, and the
    plan's default worst-case batch has the layout the run builds."""
    import jax

    from alignx_jax import sharding as shd
    from alignx_jax.batch import SharedPromptBatch, TwoRowBatch, batch_shardings, put_batch
    from alignx_jax.config import load_config
    from alignx_jax.plan import lower_step, plan_batch
    from alignx_jax.train.loop import Trainer
    from alignx_jax.train.signals import StopFlag
    from alignx_jax.train.step import jit_train_step

    cfg = load_config(
        TINY,
        [
            f"--config.workdir={tmp_path / 'w'}",
            # rows padded past their length (so kept-token indices are in the batch) in either layout
            f"--config.data.max_length={128 if share else 96}",
            "--config.data.buckets=(128,256)",
            "--config.data.compact_tokens=8",
            f"--config.data.share_prompt={str(share).lower()}",
            "--config.data.synth_users=8",
            "--config.train.global_batch=4",
            "--config.train.micro_batch=2",
            "--config.loss.logps_chunk=64",
        ],
    )
    trainer, held = Trainer(cfg, StopFlag()), []
    try:
        trainer.set_up(held)
        trainer.open_data()
        trainer.build_state()
        coll, _ = next(trainer.loader)
        host, _ = trainer.builder(coll)
        batch = put_batch(host, batch_shardings(host, trainer.mesh, trainer.rules))
        step = jit_train_step(
            trainer.codec,
            trainer.tx,
            cfg,
            param_shardings=trainer.param_sh,
            opt_shardings=trainer.opt_sh,
            replicated=trainer.rep,
        )
        with shd.use_mesh(trainer.mesh, trainer.rules):
            train_text = step.lower(trainer.params, trainer.opt_state, trainer.ref_params, batch).as_text()
        planned = lower_step(cfg, trainer.mesh, trainer.rules, collated=coll)
        worst = plan_batch(cfg, trainer.mesh, trainer.rules)
        cfg.model.matmul_precision = "highest"  # train traces its step at the level; so does the plan
        highest = lower_step(cfg, trainer.mesh, trainer.rules, collated=coll)["lowered"].as_text()
        cfg.model.matmul_precision = "auto"  # a float32 model planned for a GPU: highest, as train runs there
        for_gpu = lower_step(cfg, trainer.mesh, trainer.rules, collated=coll, platform="gpu")[
            "lowered"
        ].as_text()
    finally:
        for lock in held:
            lock.release()

    def sig(tree):
        return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), x.sharding.spec), tree)

    # the layouts under test
    assert isinstance(batch, SharedPromptBatch if share else TwoRowBatch) and batch.tokens is not None
    assert sig(planned["batch"]) == sig(batch)
    assert sig(planned["params"]) == sig(trainer.params)
    assert planned["lowered"].as_text() == train_text
    assert "HIGHEST" not in train_text and "HIGHEST" in highest and "HIGHEST" in for_gpu
    # the worst case: the run's layout and fields (kept-token indices only where padding remains), same dtypes
    assert type(worst) is type(batch)
    same = jax.tree.map(
        lambda w, b: w.dtype == b.dtype, worst.replace(tokens=None), batch.replace(tokens=None)
    )
    assert all(jax.tree.leaves(same))


def test_share_prompt_worst_case_is_the_longest_kept_pair():
    """`alignx plan`'s shared-row worst case is the longest row a kept pair makes (a one-token prompt and
    two responses filling max_length: `batching.shared_row_bound`), not max_length + the reserve."""
    from alignx_jax.batch import worst_case_collated
    from alignx_jax.data import batching

    L, buckets = 128, (128, 200, 256)
    coll = worst_case_collated(2, max_length=L, buckets=buckets, pad_id=0)
    shared = batching.share_prompt(coll, buckets=buckets, pad_id=0)
    assert shared["input_ids"].shape == (2, 256)  # 255 tokens: past 200, where L + reserve(L) = 192 fit
    assert shared["attention_mask"].sum(axis=1).tolist() == [batching.shared_row_bound(L)] * 2 == [255] * 2
    assert shared["score_mask"].sum(axis=2).tolist() == [[L - 1, L - 1]] * 2  # each response + EOS
    # the same batch as two rows: rows of max_length, each response + EOS scoring L - 1 tokens
    assert coll["attention_mask"].sum(axis=1).tolist() == [L] * 4
    assert coll["loss_mask"].sum(axis=1).tolist() == [batching.response_bound(L)] * 4 == [L - 1] * 4


@pytest.mark.parametrize("L", [128, 100])
def test_worst_case_bounds_every_kept_pair_shape(L):
    """Every pair `_fit` keeps for training (each format and overflow; short and long prompts and
    responses, cut or not) makes step arrays no larger in any dimension than `alignx plan`'s worst case,
    in every layout, with and without kept tokens; the two-row logits window of a one-token prompt's
    long response (L - 1 scored tokens, past the reserve's L - reserve(L)) is the worst case's."""
    import jax

    from alignx_jax.batch import BatchBuilder, token_mask, worst_case_collated
    from alignx_jax.data import batching

    buckets, pairs = (128, 256), 4
    lengths = (1, 2, L // 2, L - 2, L, 3 * L)
    kept = []
    for fmt in ("chat", "paper", "release"):
        for overflow in ("truncate", "drop"):
            for p in lengths:
                for c in lengths:
                    for r in (1, c):
                        fit = dict(max_length=L, prompt_format=fmt, overflow=overflow, eval_mode=False)
                        got = batching._fit([1] * p, [2] * c, [3] * r, **fit)
                        if got is not None:
                            kept.append(batching.DPOExample(got[0], got[1] + [4], got[2] + [4]))
    assert max(len(ex.chosen_ids) for ex in kept) == batching.response_bound(L)
    worst = worst_case_collated(pairs, max_length=L, buckets=buckets, pad_id=0)
    layouts = [
        dict(share=share, packing=packing, compact=compact)
        for share, packing in ((False, False), (True, False), (True, True))
        for compact in (0, 8)
    ]
    for kw in layouts:
        builder = BatchBuilder(num_micro=2, buckets=buckets, pad_id=0, batch_shards=2, pack_length=256, **kw)
        plan, _ = builder(worst)
        plan_positions = token_mask(plan).shape[1] // 2 * token_mask(plan).shape[2]  # per group of rows
        windows = []
        for k in range(0, len(kept), pairs):
            step, _ = builder(
                batching.collate(kept[k : k + pairs], buckets=buckets, pad_id=0, num_pairs=pairs)
            )
            fits = jax.tree.map(
                lambda a, w: all(x <= y for x, y in zip(a.shape, w.shape, strict=True)),
                step.replace(tokens=None),
                plan.replace(tokens=None),
            )
            assert all(jax.tree.leaves(fits)), (kw, kept[k])
            if step.tokens is not None:  # the kept tokens per group: never more than the plan's positions
                assert step.tokens.token_index.shape[-1] <= plan_positions, (kw, kept[k])
            if not kw["share"]:
                windows.append(step.score_index.shape[-1])
        if not kw["share"]:  # the plan's window is the largest a kept pair reaches, not the reserve's
            assert max(windows) == plan.score_index.shape[-1], kw


def test_llama3_70b_preset_and_tpu_grids():
    from alignx_jax.config import load_config
    from alignx_jax.plan import PRESETS, analytic_bytes, decoder_config_for, parse_topology

    cfg = load_config(os.path.join(ROOT, "configs", "llama3_70b_pba_tpu_v5p_256.py"), [])
    d = decoder_config_for(cfg)  # model.preset = llama3-70b: no weights
    assert (d.num_hidden_layers, d.hidden_size, d.intermediate_size) == (80, 8192, 28672)
    assert (d.num_attention_heads, d.num_key_value_heads, d.head_dim, d.vocab_size) == (64, 8, 128, 128256)
    assert not d.tie_word_embeddings and PRESETS["llama3.1-70b"] is PRESETS["llama3-70b"]
    assert PRESETS["llama3-70b"]["rope_scaling"] == PRESETS["llama3-8b"]["rope_scaling"]
    p = analytic_bytes(d, seqs_per_device=2, seq_len=8192, shard=128, chunk=1024)["param_count"]
    assert abs(p - 70.55e9) / 70.55e9 < 0.01
    # the chip grids libtpu's topology descriptions name (as MaxText's accelerator table)
    grids = {"v5p-8": "v5:2x2x1", "v5p-64": "v5:2x4x4", "v5p-256": "v5:4x4x8", "v5p-640": "v5:4x4x20"}
    grids.update({"v4-512": "v4:4x8x8", "v5e-256": "v5e:16x16", "v6e-8": "v6e:2x4"})
    for name, grid in grids.items():
        t = parse_topology(name)
        assert t.tpu_topology == grid and t.platform == "tpu", name
    assert parse_topology("64xH100").tpu_topology == ""


def _libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def test_plan_says_which_compiler_and_why_it_fell_back(monkeypatch):
    """Without libtpu (or with compiler cpu) a TPU topology is compiled on CPU stand-ins: the report's
    `compiler` says so and a note says why; compiler tpu then fails instead."""
    import importlib.util

    from alignx_jax.config import load_config
    from alignx_jax.errors import AlignXError
    from alignx_jax.plan import Topology, format_report, plan, tpu_topology_devices

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else find(n, *a))
    topo = Topology("v5p-8", 1, 4 * 2**30, "tpu", "v5:2x2x1")  # one stand-in device is enough here
    devices, why = tpu_topology_devices(topo)
    assert devices is None and "libtpu is not installed" in why
    rep = plan(load_config(TINY, SMALL), topo)
    assert rep["compiler"] == "cpu stand-ins"
    assert any("not the TPU compiler" in n and "libtpu is not installed" in n for n in rep["notes"])
    assert "compiled on cpu stand-ins" in format_report(rep)
    rep = plan(load_config(TINY, [*SMALL, "--config.plan.compiler=cpu"]), topo)
    assert rep["compiler"] == "cpu stand-ins" and any("plan.compiler=cpu" in n for n in rep["notes"])
    with pytest.raises(AlignXError, match="plan.compiler=tpu: libtpu is not installed"):
        plan(load_config(TINY, SMALL), topo, compiler="tpu")
    # a CPU topology is no fallback: no note
    rep = plan(load_config(TINY, SMALL), Topology("1@4GiB", 1, 4 * 2**30, "cpu"))
    assert rep["compiler"] == "cpu stand-ins" and not any("stand-in CPU devices" in n for n in rep["notes"])


@pytest.mark.skipif(not _libtpu(), reason="needs libtpu (pip install 'alignx-jax[tpu-plan]'); no TPU needed")
def test_plan_compiles_with_the_tpu_compiler_where_libtpu_is_installed():
    from alignx_jax.config import load_config
    from alignx_jax.plan import parse_topology, plan, tpu_topology_devices

    topo = parse_topology("v5p-8")  # 4 chips, one host
    devices, why = tpu_topology_devices(topo)
    assert devices is not None and len(devices) == 4 and devices[0].platform == "tpu", why
    rep = plan(load_config(TINY, SMALL), topo)
    assert rep["compiler"] == "tpu topology" and rep["num_devices"] == 4
    assert 0 < rep["per_device_bytes"]["total"] < topo.bytes_per_device
    assert not any("not the TPU compiler" in n for n in rep["notes"])


@pytest.mark.skipif(not _libtpu(), reason="needs libtpu (pip install 'alignx-jax[tpu-plan]'); no TPU needed")
def test_tpu_plan_traces_the_tpu_code_paths():
    """Traced for TPU topology devices from a CPU process, the model takes the target's paths
    (`sharding.target_platform`): the compiled splash kernel, not its interpret mode."""
    from alignx_jax import sharding as shd
    from alignx_jax.config import load_config
    from alignx_jax.plan import decoder_config_for, lower_step, parse_topology, tpu_topology_devices
    from alignx_jax.train.state import rules_from_config

    devices, why = tpu_topology_devices(parse_topology("v5p-8"))
    assert devices is not None, why
    over = ["--config.model.attention_impl=splash", "--config.model.init.head_dim=128"]
    cfg = load_config(TINY, SMALL + over)
    mesh = shd.mesh_from_config(cfg.mesh, devices=devices)
    low = lower_step(cfg, mesh, rules_from_config(cfg), decoder_config_for(cfg))
    assert "tpu_custom_call" in low["lowered"].as_text()


def test_plan_reports_the_larger_of_the_longest_and_the_reserve_response_programs(monkeypatch):
    """Another logits window is another step program, and memory is not monotone in it (the 70B TPU
    config's reserve-length window took more than the longest one on CPU stand-ins): the plan compiles
    both where their shapes differ and reports the larger; one shape compiles once."""
    import jax

    from alignx_jax.config import load_config
    from alignx_jax.plan import parse_topology, planner

    compiled = []
    real = planner._compiled_bytes

    def counted(analysis, low):
        report = dict(real(analysis, low))
        report["total"] += 10**9 if not compiled else 0  # the first (longest responses) made the larger
        compiled.append(jax.tree.map(lambda a: a.shape, low["batch"]))
        return report

    monkeypatch.setattr(planner, "_compiled_bytes", counted)
    rep = planner.plan(load_config(TINY, SMALL), parse_topology("1@4GiB"))
    assert len(compiled) == 2 and compiled[0].score_index[-1] > compiled[1].score_index[-1], compiled
    assert rep["per_device_bytes"]["total"] > 10**9  # the larger one
    assert any("the larger is reported" in n for n in rep["notes"])
    compiled.clear()
    # no logits window: both batches have one shape, one program
    whole = planner.plan(
        load_config(TINY, [*SMALL, "--config.loss.logits_on_responses=false"]), parse_topology("1@4GiB")
    )
    assert len(compiled) == 1 and not any("the larger is reported" in n for n in whole["notes"])
