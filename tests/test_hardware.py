"""`alignx_jax.hardware`: the CPU's speed flags and the compute dtype `auto` picks, through the config,
`alignx train`, `alignx eval|generate --dtype auto` and `alignx plan`."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TEST_XLA_FLAGS, run_cli

from alignx_jax import hardware
from alignx_jax.config import load_config
from alignx_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 {extra}
processor\t: 1
cpu family\t: 7
model\t\t: 1
flags\t\t: fpu
"""


def test_cpu_features_reads_family_model_and_the_speed_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO.format(extra="amx_bf16 amx_tile sha_ni"))
    assert hardware.cpu_features(str(f)) == {
        "cpu_family": 6,
        "model": 207,
        "flags": ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f"],
    }
    assert hardware.cpu_model(str(f)) == "Intel(R) Xeon(R) Processor"
    assert hardware.cpu_vendor(str(f)) == "GenuineIntel"
    assert hardware.cpu_vendor(str(tmp_path / "absent")) == ""
    assert hardware.cpu_features(str(tmp_path / "absent")) == {}


def test_available_memory_reads_meminfo(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    assert hardware.available_memory_bytes(str(info)) == 20000000 * 1024
    info.write_text("MemTotal:       24000000 kB\n")
    assert hardware.available_memory_bytes(str(info)) is None
    assert hardware.available_memory_bytes(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(
    "name, backend, amx, want",
    [
        ("float32", "gpu", True, "float32"),  # a named dtype is never changed
        ("bfloat16", "cpu", False, "bfloat16"),
        ("auto", "gpu", False, "bfloat16"),
        ("auto", "tpu", False, "bfloat16"),
        ("auto", "accelerator", False, "bfloat16"),
        ("auto", "cpu", True, "bfloat16"),
        ("auto", "cpu", False, "float32"),
    ],
)
def test_resolve_dtype(monkeypatch, name, backend, amx, want):
    monkeypatch.setattr(hardware, "bf16_fast_cpu", lambda: "CPU with AMX" if amx else None)
    assert hardware.resolve_dtype(name, backend) == want


@pytest.mark.parametrize(
    "name, dtype, backend, want",
    [
        ("auto", "float32", "gpu", "highest"),  # TF32 by default
        ("auto", "float32", "tpu", "highest"),  # one bfloat16 pass by default
        ("auto", "float32", "cpu", "default"),  # full float32 already
        ("auto", "bfloat16", "gpu", "default"),  # nothing to round
        ("auto", "float16", "tpu", "default"),
        ("high", "float32", "cpu", "high"),  # a named level is never changed
        ("default", "float32", "gpu", "default"),
    ],
)
def test_resolve_matmul_precision(name, dtype, backend, want):
    assert hardware.resolve_matmul_precision(name, dtype, backend) == want


def test_matmul_precision_is_read_when_a_program_is_traced():
    """The level reaches the traced products, and a jitted function traced outside the block is traced
    again inside it (jit's cache keys carry the level), not reused at the default."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: jnp.einsum("ij,jk->ik", a, b))
    x = jnp.ones((4, 4), jnp.float32)

    def precisions(fn):
        return [
            e.params.get("precision") for e in jax.make_jaxpr(fn)(x, x).jaxpr.eqns[0].params["jaxpr"].eqns
        ]

    assert f(x, x).shape == (4, 4) and precisions(f) == [None]
    with hardware.matmul_precision("auto", "float32", "gpu") as level:
        assert level == "highest"
        assert precisions(f) == [(jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)]
        assert "HIGHEST" in f.lower(x, x).as_text()
    with hardware.matmul_precision("auto", "float32", "cpu") as level:
        assert level == "default" and precisions(f) == [None]
    assert precisions(f) == [None]  # the block's level ends with it
    # a level set around the block (as JAX_DEFAULT_MATMUL_PRECISION does) is undone by `default`
    with jax.default_matmul_precision("high"), hardware.matmul_precision("default", "float32", "gpu"):
        assert precisions(f) == [(jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)]


@pytest.mark.parametrize(
    "vendor, flags, want",
    [
        ("GenuineIntel", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "CPU with AMX"),
        ("GenuineIntel", "avx2 avx512f avx512_bf16", None),  # Xeon model 207 without AMX: bf16 0.56x
        ("AuthenticAMD", "avx2 avx512f avx512_bf16", "AMD CPU with AVX-512-BF16"),  # Zen 4: 1.6x
        ("AuthenticAMD", "avx2", None),  # Zen 3
        ("AuthenticAMD", "avx2 avx512f", None),
    ],
)
def test_bf16_fast_cpu_reads_vendor_and_flags(tmp_path, vendor, flags, want):
    info = tmp_path / "cpuinfo"
    info.write_text(
        f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu {flags}\n"
    )
    assert hardware.bf16_fast_cpu(str(info)) == want


def test_auto_on_this_machine_follows_its_cpu():
    import jax

    fast = hardware.bf16_fast_cpu() is not None
    want = "bfloat16" if jax.default_backend() != "cpu" or fast else "float32"
    assert hardware.resolve_dtype("auto") == want
    assert hardware.describe_auto(want).startswith(f"auto -> {want} (")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.dtype=fp8", "model.dtype='fp8': expected one of float32, bfloat16, float16, auto"),
        ("--config.model.param_dtype=auto", "model.param_dtype='auto': expected one of float32"),
    ],
)
def test_config_refuses_an_unknown_dtype_in_one_line(override, message):
    from alignx_jax.train import validate_config

    cfg = load_config(TINY, ["--config.workdir=/tmp/x", override])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_with_concrete_dtype_copies_the_config(monkeypatch, capsys):
    from alignx_jax.train import setup

    monkeypatch.setattr(setup, "resolve_dtype", lambda name: "float32" if name == "auto" else name)
    cfg = load_config(TINY, ["--config.workdir=/tmp/x", "--config.model.dtype=auto"])
    got = setup.with_concrete_dtype(cfg, say=True)
    assert got.model.dtype == "float32" and cfg.model.dtype == "auto"  # the caller's config is untouched
    assert "model.dtype auto -> float32" in capsys.readouterr().err
    explicit = load_config(TINY, ["--config.workdir=/tmp/x"])
    assert setup.with_concrete_dtype(explicit) is explicit


def test_plan_resolves_auto_for_its_target_platform():
    from alignx_jax.plan import decoder_config_for
    from alignx_jax.plan.topology import parse_topology

    cfg = load_config(
        TINY, ["--config.workdir=/tmp/x", "--config.model.dtype=auto", "--config.model.preset=smollm2"]
    )
    for name in ("v5p-8", "8xH100"):
        assert decoder_config_for(cfg, parse_topology(name).platform).dtype == "bfloat16"
    here = hardware.resolve_dtype("auto")
    assert decoder_config_for(cfg, parse_topology(None).platform).dtype == here  # 'local': this machine
    assert decoder_config_for(cfg).dtype == here


def test_train_with_auto_dtype_says_what_it_picked_and_keeps_auto_in_the_workdir(tmp_path):
    from tests.test_train import SMALL

    w = tmp_path / "w"
    small = [*SMALL, "--config.train.steps=1"]
    r = run_cli(["train", f"--config={TINY}", f"--config.workdir={w}", *small, "--config.model.dtype=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    picked = hardware.resolve_dtype("auto")
    assert f"alignx train: model.dtype auto -> {picked}" in r.stderr
    assert json.load(open(w / "config.json"))["model"]["dtype"] == "auto"  # the next machine picks its own
    # `--dtype auto` of scoring and generation is accepted by the CLI
    from alignx_jax.cli import build_parser

    for cmd in (
        ["eval", "--model", "m", "--benchmark", "p-soups=f", "--out", "o.json"],
        ["generate", "--model", "m"],
    ):
        assert build_parser().parse_args([*cmd, "--dtype", "auto"]).dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--checkpoint", "c", "--out", "o", "--dtype", "auto"])


def test_train_says_a_matmul_precision_other_than_default_and_refuses_an_unknown_one(tmp_path, monkeypatch):
    """The level is the one JAX reads when the train step is traced, and the log says it."""
    import jax

    from alignx_jax.train import step
    from tests.test_train import SMALL

    seen, original = [], step.model_pair_logps

    def spy(*a, **k):
        seen.append(jax.config.jax_default_matmul_precision)  # read at trace time
        return original(*a, **k)

    monkeypatch.setattr(step, "model_pair_logps", spy)

    w = tmp_path / "w"
    small = [*SMALL, "--config.train.steps=1"]
    r = run_cli(
        ["train", f"--config={TINY}", f"--config.workdir={w}", *small, "--config.model.matmul_precision=high"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "alignx train: model.matmul_precision high" in r.stderr
    assert seen and set(seen) == {"high"}
    r = run_cli(
        [
            "train",
            f"--config={TINY}",
            f"--config.workdir={w}2",
            *small,
            "--config.model.matmul_precision=tf32",
        ]
    )
    assert r.returncode == 1
    assert "model.matmul_precision='tf32': expected one of auto, default, high, highest" in r.stderr


def test_fast_cpu_compile_probe_refuses_a_flag_this_xla_does_not_know(monkeypatch):
    monkeypatch.setattr(hardware, "FAST_CPU_COMPILE", "--xla_cpu_no_such_flag_anywhere=false")
    hardware.fast_cpu_compile_flags.cache_clear()
    try:
        assert hardware.fast_cpu_compile_flags() == ()
    finally:
        hardware.fast_cpu_compile_flags.cache_clear()


def test_fast_cpu_compile_keeps_the_users_setting_and_a_started_backend(monkeypatch):
    name = hardware.FAST_CPU_COMPILE.split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"--xla_dump_hlo_as_text {name}=true")
    assert hardware.use_fast_cpu_compile() is False
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_hlo_as_text {name}=true"
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_hlo_as_text")
    import jax

    jax.devices()  # this process's backend has started: its flags can no longer change
    assert hardware.use_fast_cpu_compile() is False
    assert os.environ["XLA_FLAGS"] == "--xla_dump_hlo_as_text"


def test_fast_cpu_compile_is_set_before_jax_starts_and_jax_then_runs():
    import subprocess
    import sys

    script = (
        "import os; from alignx_jax import hardware as h; on = h.use_fast_cpu_compile(); "
        "import jax, jax.numpy as jnp; print(on, os.environ['XLA_FLAGS'], float(jax.jit(jnp.sum)(jnp.ones(3))))"
    )
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want = bool(TEST_XLA_FLAGS)  # the controller's probe of this XLA
    assert out.stdout.split() == ([str(want)] + ([hardware.FAST_CPU_COMPILE] if want else []) + ["3.0"])
