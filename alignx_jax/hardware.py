"""What this machine computes fast: the CPU's model and extensions, and the compute dtype `auto` picks;
how much host memory is free (`available_memory_bytes`, for choices that copy weights); and the XLA flag
that compiles small CPU programs faster (`use_fast_cpu_compile`).

`model.dtype = "auto"` (and `alignx eval|generate --dtype auto`) is bfloat16 on GPUs and TPUs and on CPUs
with AMX, float32 on other CPUs, where a bf16 product runs slower than a float32 one even with AVX-512-BF16
(BENCHMARKS.md, "float32 or bf16 depends on the CPU").
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from typing import Any

AUTO = "auto"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# the CPU flags that decide float32 vs bf16 speed; reported by every benchmark beside the model name
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CPUINFO = "/proc/cpuinfo"


def cpu_model(path: str = CPUINFO) -> str:
    """The CPU's model name (`platform.processor()` where there is no /proc/cpuinfo)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features(path: str = CPUINFO) -> dict[str, Any]:
    """Family, model and the `SPEED_FLAGS` the CPU has ({} where there is no /proc/cpuinfo): one model
    name covers VMs with and without AMX exposed."""
    out: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = (s.strip() for s in line.partition(":"))
                name = key.replace(" ", "_")
                if key in ("cpu family", "model") and name not in out:  # the first processor's
                    out[name] = int(value)
                elif key == "flags":
                    out["flags"] = sorted(set(value.split()) & set(SPEED_FLAGS))
                    break
    except (OSError, ValueError):
        pass
    return out


@functools.cache
def _cpu_has_amx() -> bool:
    return "amx_bf16" in cpu_features().get("flags", ())


def resolve_dtype(name: str, backend: str | None = None) -> str:
    """A compute dtype name, with `auto` made concrete for `backend` (default: JAX's default backend)."""
    if name != AUTO:
        return name
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if _cpu_has_amx() else "float32"


def describe_auto(resolved: str) -> str:
    """Why `auto` became `resolved` here, for the one log line of a run."""
    import jax

    backend = jax.default_backend()
    if backend != "cpu":
        return f"auto -> {resolved} ({backend})"
    return f"auto -> {resolved} (CPU {'with' if _cpu_has_amx() else 'without'} AMX)"


def available_memory_bytes(path: str = "/proc/meminfo") -> int | None:
    """Host memory available to a new allocation without swapping (`MemAvailable`); None where the
    system does not say."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def backends_initialized() -> bool:
    """Whether JAX has started its backends (after which XLA_FLAGS and the device count are fixed)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # older/newer jax: assume the worst
        return "jax" in sys.modules


# XLA's CPU fusion emitters (its default) compile each fused loop for longer than its older loop emitters;
# a tiny model's step compiles for longer than it runs (BENCHMARKS.md §6, compiling tiny programs)
FAST_CPU_COMPILE = "--xla_cpu_use_fusion_emitters=false"


@functools.cache
def fast_cpu_compile_flags() -> tuple[str, ...]:
    """(FAST_CPU_COMPILE,) when this jaxlib's XLA accepts it, else (): probed once in a subprocess, since
    XLA refuses to start on a flag it does not know."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env=dict(os.environ, XLA_FLAGS=FAST_CPU_COMPILE, JAX_PLATFORMS="cpu"),
        capture_output=True,
        timeout=300,
    )
    return (FAST_CPU_COMPILE,) if probe.returncode == 0 else ()


def use_fast_cpu_compile() -> bool:
    """Add FAST_CPU_COMPILE to this process's XLA_FLAGS (a CPU-only flag: GPU/TPU programs are unchanged).
    Only before JAX starts its backends, which read XLA_FLAGS once; a setting of the flag in XLA_FLAGS
    already is the user's and wins. Returns whether the flag is in effect."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    name = FAST_CPU_COMPILE.split("=", 1)[0]
    given = [f for f in flags if f.split("=", 1)[0] == name]
    if given:
        return given[-1] == FAST_CPU_COMPILE
    if backends_initialized() or not fast_cpu_compile_flags():
        return False
    os.environ["XLA_FLAGS"] = " ".join([*flags, FAST_CPU_COMPILE])
    return True
