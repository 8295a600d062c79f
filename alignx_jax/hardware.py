"""What this machine computes fast: the CPU's model and extensions, and the compute dtype `auto` picks;
how much host memory is free (`available_memory_bytes`, for choices that copy weights); the XLA flag
that compiles small CPU programs faster (`use_fast_cpu_compile`); and the library XLA's CPU backend calls for
matrix products (`cpu_matmul_library`, `model.cpu_matmul`).

`model.dtype = "auto"` (and `alignx eval|generate --dtype auto`) is bfloat16 on GPUs and TPUs, on CPUs
with AMX and on AMD CPUs with AVX-512-BF16, float32 on other CPUs, where a bf16 product runs slower than a
float32 one (an Intel CPU with AVX-512-BF16 but no AMX; BENCHMARKS.md, "float32 or bf16 depends on the CPU").

`model.matmul_precision = "auto"` (and `--matmul-precision auto`) multiplies a float32 model's matrices in full
float32 on a GPU or TPU too, where JAX's default product rounds float32 inputs (to TensorFloat-32 on an NVIDIA
GPU, to one bfloat16 pass on a TPU): float32 then means what it means on a CPU and in transformers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

AUTO = "auto"
CPU_MATMULS = (AUTO, "ynnpack", "onednn")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# `jax.default_matmul_precision` levels a run may ask for; auto: `resolve_matmul_precision`
MATMUL_PRECISIONS = (AUTO, "default", "high", "highest")
# the CPU flags that decide float32 vs bf16 speed; reported by every benchmark beside the model name
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(key: str, path: str) -> str | None:
    """The first processor's `key` line of /proc/cpuinfo (None where there is no such line or file)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model(path: str = CPUINFO) -> str:
    """The CPU's model name (`platform.processor()` where there is no /proc/cpuinfo)."""
    return _cpuinfo_field("model name", path) or platform.processor() or platform.machine()


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


@functools.cache  # asked at every generate / persona-features call: read /proc/cpuinfo once
def cpu_vendor(path: str = CPUINFO) -> str:
    """The CPU's `vendor_id` (GenuineIntel, AuthenticAMD; '' where there is no /proc/cpuinfo)."""
    return _cpuinfo_field("vendor_id", path) or ""


@functools.cache  # asked by every resolve_dtype / describe_auto: read /proc/cpuinfo once
def bf16_fast_cpu(path: str = CPUINFO) -> str | None:
    """Why a bf16 product beats a float32 one on this CPU (None where it does not): AMX tiles, or an AMD
    core's AVX-512-BF16 dot (Zen 4: 1.6x the float32 product); an Intel core's without AMX ran at 0.56x."""
    flags = cpu_features(path).get("flags", ())
    if "amx_bf16" in flags:
        return "CPU with AMX"
    if "avx512_bf16" in flags and cpu_vendor(path) == "AuthenticAMD":
        return "AMD CPU with AVX-512-BF16"
    return None


@functools.cache
def cpu_has_avx512() -> bool:
    return "avx512f" in cpu_features().get("flags", ())


def resolve_dtype(name: str, backend: str | None = None) -> str:
    """A compute dtype name, with `auto` made concrete for `backend` (default: JAX's default backend)."""
    if name != AUTO:
        return name
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if bf16_fast_cpu() else "float32"


def resolve_matmul_precision(name: str, dtype: str, backend: str | None = None) -> str:
    """A `MATMUL_PRECISIONS` name with `auto` made concrete for a model computing in `dtype` (resolved, not
    `auto`) on `backend` (default: JAX's default backend): `highest` for float32 off the CPU, whose default
    product rounds float32 inputs (a float32 model's logits then drift visibly from transformers',
    BENCHMARKS.md §8), else `default` (a CPU multiplies float32 in full; bf16/fp16
    inputs have nothing to round; the preference head's float32 products ask for `highest` themselves)."""
    if name != AUTO:
        return name
    if dtype != "float32":
        return "default"
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "highest" if backend != "cpu" else "default"


@contextlib.contextmanager
def matmul_precision(name: str, dtype: str, backend: str | None = None) -> Iterator[str]:
    """Trace the block's programs at `resolve_matmul_precision(name, dtype, backend)` (it is yielded); JAX reads
    the level when a program is traced, and jit's cache keys carry it, so a program traced outside is not reused."""
    import jax

    level = resolve_matmul_precision(name, dtype, backend)
    if level == "default" and jax.config.jax_default_matmul_precision is None:
        yield level  # nothing to set: the programs trace exactly as without the block
        return
    with jax.default_matmul_precision(level):  # also undoes a level JAX_DEFAULT_MATMUL_PRECISION set
        yield level


def describe_auto(resolved: str) -> str:
    """Why `auto` became `resolved` here, for the one log line of a run."""
    import jax

    backend = jax.default_backend()
    if backend != "cpu":
        return f"auto -> {resolved} ({backend})"
    return f"auto -> {resolved} ({bf16_fast_cpu() or 'CPU without AMX, not an AMD one with AVX-512-BF16'})"


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


# XLA's CPU backend hands matrix products to YNNPACK by default; these compiler options hand each product to
# oneDNN instead, one oneDNN call per dot: XLA's grouping of several dots into one oneDNN graph
# (LIBRARY_FUSION_TYPE_DOT) fails to compile a DPO step's backward pass (BENCHMARKS.md §7)
ONEDNN_DOTS: dict[str, Any] = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_experimental_ynn_fusion_type": "",
}
# `auto` takes oneDNN for float32 models at least this wide on Intel CPUs, where its products beat YNNPACK's;
# narrower (make demo's 64-wide model) and bf16 steps ran slower with it (BENCHMARKS.md §7)
ONEDNN_MIN_WIDTH = 256


@functools.cache
def onednn_dots_available() -> bool:
    """Whether this jaxlib's XLA compiles a product with `ONEDNN_DOTS` (an unknown option fails the compile,
    a Python error rather than a crash, so the check runs in this process)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    try:
        jax.jit(jnp.dot).lower(x, x).compile(compiler_options=ONEDNN_DOTS)
    except Exception:  # any refusal means: not on this jaxlib
        return False
    return True


def onednn_refusal() -> str | None:
    """Why `model.cpu_matmul=onednn` cannot run on this host, or None where it can: this jaxlib must hand
    products to oneDNN, and the CPU must be of the kind it was verified on (Intel with AVX-512); on an AMD
    EPYC with AVX2 XLA's oneDNN batched products hung or corrupted the heap (BENCHMARKS.md §7)."""
    if not onednn_dots_available():
        return "this jaxlib's XLA CPU backend cannot hand products to oneDNN"
    if cpu_vendor() != "GenuineIntel" or not cpu_has_avx512():
        cpu = f"{cpu_vendor() or 'unknown vendor'}, {'' if cpu_has_avx512() else 'no '}AVX-512"
        return (
            f"XLA's oneDNN products are enabled on Intel CPUs with AVX-512 only, not on this one ({cpu}): "
            "on an AMD EPYC with AVX2 its batched products hung or crashed (BENCHMARKS.md §7)"
        )
    return None


def cpu_matmul_refusal(choice: str, backend: str | None = None) -> str | None:
    """Why `choice` cannot be this host's CPU matmul library (`cpu_matmul_library` answers None), or None
    where it can, or where it does not apply (off the CPU)."""
    if choice != "onednn":
        return None
    if backend is None:
        import jax

        backend = jax.default_backend()
    return onednn_refusal() if backend == "cpu" else None


def cpu_matmul_library(
    choice: str, dtype: str, width: int, backend: str | None = None, *, decode: bool = False
) -> str | None:
    """The library XLA's CPU backend calls for the products of a `dtype` model of hidden size `width`:
    'ynnpack' or 'onednn'; '' off the CPU (the choice is CPU-only); None when `choice` is 'onednn' and
    `onednn_refusal()` says why it cannot be. `auto`: oneDNN for float32 models of width >= ONEDNN_MIN_WIDTH
    where it may run (Intel CPUs with AVX-512, where it was measured faster), YNNPACK otherwise and for
    `decode` programs (KV-cache generation, whose few-row products ran slower in oneDNN: BENCHMARKS.md §7)."""
    if choice not in CPU_MATMULS:
        raise ValueError(f"cpu matmul library {choice!r} is not one of {', '.join(CPU_MATMULS)}")
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return ""
    if choice == AUTO:
        wide_f32 = dtype == "float32" and width >= ONEDNN_MIN_WIDTH and not decode
        return "onednn" if wide_f32 and onednn_refusal() is None else "ynnpack"
    if choice == "onednn" and onednn_refusal() is not None:
        return None
    return choice


def compiler_options(library: str | None) -> dict[str, Any]:
    """The per-compilation XLA options (`jax.jit(..., compiler_options=)`) of `cpu_matmul_library`'s answer."""
    return dict(ONEDNN_DOTS) if library == "onednn" else {}


def local_device_bytes(devs) -> int:
    """Memory of one of `devs`: the accelerator's own (`memory_stats`), else on CPU the host's shared by
    them; 0 when neither is known."""
    stats = devs[0].memory_stats() if hasattr(devs[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:  # CPU: the host's memory shared by its devices
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, len(devs))
    except (ValueError, OSError):
        return 0
