"""`ALIGNX_ALLOCATOR`: which processes re-execute with mimalloc preloaded, and that it keeps XLA's step
temporaries (the page faults of BENCHMARKS.md §9) where glibc hands them back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignx_jax import allocator
from alignx_jax.errors import AlignXError

LIB = "/site/cmeel.prefix/lib/libmimalloc.so.3"
GIB = 2**30


def _plan(choice="auto", cpu_job=True, env=None, library=LIB, accelerator=None, memory=24 * GIB):
    return allocator.plan(choice, cpu_job, env or {}, library, accelerator, memory)


def test_auto_preloads_mimalloc_into_cpu_jobs_only():
    new = _plan(env={"PATH": "/bin", "LD_PRELOAD": "/x/libfoo.so"})
    assert new["LD_PRELOAD"] == f"{LIB}:/x/libfoo.so"  # ahead of the user's own preloads, which stay
    assert new["PATH"] == "/bin" and new[allocator.EXECED] == "1"
    assert new["MIMALLOC_PURGE_DELAY"] == "-1" and new["MIMALLOC_ALLOW_THP"] == "0"
    assert new["MIMALLOC_ARENA_RESERVE"] == new["MIMALLOC_ARENA_MAX_OBJECT_SIZE"] == "24GiB"
    # rounded up: one arena holds it all
    assert _plan(memory=23 * GIB + 5)["MIMALLOC_ARENA_RESERVE"] == "24GiB"
    assert _plan(cpu_job=False) is None  # `alignx data ...` gains nothing
    assert _plan(accelerator="jax_cuda12_plugin") is None
    assert _plan(library=None) is None  # the wheel is missing: the system allocator, no error


def test_explicit_choices_and_what_wins():
    assert _plan("system") is None
    forced = _plan("mimalloc", cpu_job=False, accelerator="libtpu")
    assert forced["LD_PRELOAD"] == LIB
    with pytest.raises(
        AlignXError, match=r"ALIGNX_ALLOCATOR=mimalloc: the cmeel-mimalloc wheel is not installed"
    ):
        _plan("mimalloc", library=None)
    with pytest.raises(
        AlignXError, match=r"ALIGNX_ALLOCATOR='jemalloc': expected one of auto, mimalloc, system"
    ):
        _plan("jemalloc")
    # the user's MIMALLOC_* settings win; a process already re-executed (or already preloading any mimalloc)
    # is left alone, so a refused preload cannot loop
    assert _plan(env={"MIMALLOC_PURGE_DELAY": "100"})["MIMALLOC_PURGE_DELAY"] == "100"
    assert _plan(env={allocator.EXECED: "1"}) is None
    assert _plan(env={"LD_PRELOAD": "/usr/lib/libmimalloc.so.2"}) is None


def test_accelerator_plugin_reads_jax_platforms_first():
    assert allocator.accelerator_plugin({"JAX_PLATFORMS": "cpu"}) is None
    assert allocator.accelerator_plugin({"JAX_PLATFORMS": "cuda,cpu"}) == "JAX_PLATFORMS=cuda,cpu"


def test_cli_command_picks_the_job_kind(monkeypatch):
    seen = []
    monkeypatch.setattr(allocator, "reexec", lambda choice, cpu_job: seen.append((choice, cpu_job)))
    monkeypatch.setenv(allocator.ENV, "system")
    allocator.preload_for_cli(["train", "--config", "c.py"])
    monkeypatch.delenv(allocator.ENV)
    allocator.preload_for_cli(["data", "check", "f.json"])
    allocator.preload_for_cli(["--help"])
    allocator.preload_for_cli(["demo", "--out", "d"])
    assert seen == [("system", True), ("auto", False), ("auto", False), ("auto", True)]


def _env_without_allocator_settings() -> dict[str, str]:
    """This environment less any allocator choice, preload or mimalloc setting: each test sets its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIMALLOC_", "ALIGNX_ALLOCATOR"))}
    env.pop("LD_PRELOAD", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


needs_wheel = pytest.mark.skipif(
    allocator.mimalloc_library() is None or not sys.platform.startswith("linux"),
    reason="the cmeel-mimalloc wheel is not installed",
)

# one XLA program whose temporary (a 256 MB product, past glibc's mmap threshold) is freed after each call
_PROBE = r"""
import json, resource, sys
from alignx_jax import allocator
allocator.reexec(sys.argv[1], cpu_job=True)
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)
x, w, v = jnp.ones((8192, 64)), jnp.ones((64, 8192)) / 64, jnp.ones((8192, 8))
f(x, w, v).block_until_ready()
faults = []
for _ in range(12):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"allocator": allocator.active(), "faults": faults}))
"""


@needs_wheel
def test_mimalloc_keeps_xla_temporaries_that_glibc_faults_in_again(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = dict(_env_without_allocator_settings(), GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    out = {}
    for choice in ("system", "mimalloc"):
        proc = subprocess.run(
            [sys.executable, str(script), choice], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[choice] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["system"]["allocator"] == "system" and out["mimalloc"]["allocator"] == "mimalloc"
    # glibc: each call maps its 256 MB again (65k pages), every time. mimalloc reuses the arena's pages; a call
    # faults in a new block only when the previous call's temporary is freed late (a loaded machine: up to 4
    # calls at the start under xdist -n 2, or one mid-run after six quiet calls), and the arena keeps that block
    system, kept = out["system"]["faults"], out["mimalloc"]["faults"]
    assert min(system) > 30_000, out
    assert sum(f < 1_000 for f in kept) >= len(kept) // 2, out
    assert sum(kept) < sum(system) / 3, out


@needs_wheel
def test_alignx_reexecutes_itself_with_the_preload(tmp_path):
    env = _env_without_allocator_settings()
    # `alignx generate` with a missing checkpoint fails at once, after the re-execution
    args = ["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]
    # `python -m alignx_jax ARGS`, printing the preload its final process ran with
    probe = (
        "import os, runpy, sys; sys.argv[0] = 'alignx'; import atexit; "
        "atexit.register(lambda: print('PRELOAD=' + os.environ.get('LD_PRELOAD', ''), file=sys.stderr)); "
        # the kernel's own word on whether mimalloc turned huge pages off for the process
        "atexit.register(lambda: print([ln.strip() for ln in open('/proc/self/status') if ln.startswith('THP_')], "
        "file=sys.stderr)); "
        "runpy.run_module('alignx_jax', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "alignx: error:" in proc.stderr
    assert f"PRELOAD={allocator.mimalloc_library()}" in proc.stderr
    if "THP_enabled" in Path("/proc/self/status").read_text():  # Linux 5.0 and later say it
        assert "'THP_enabled:\\t0'" in proc.stderr, proc.stderr[-2000:]
    env[allocator.ENV] = "system"
    proc = subprocess.run(
        [sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "PRELOAD=\n" in proc.stderr, proc.stderr[-2000:]
