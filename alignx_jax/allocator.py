"""The host memory allocator of the jobs that run XLA on a CPU (`ALIGNX_ALLOCATOR`).

XLA's CPU client allocates each execution's temporaries with `malloc` and frees them when it ends. glibc hands
blocks that large back to the kernel, so every training step faults all of its temporaries in again and the
kernel zeroes them, a large share of a step's CPU time (BENCHMARKS.md §9). mimalloc (the
PyPI wheel `cmeel-mimalloc`), preloaded with one address-space arena as large as the host's memory, with
purging off and without transparent huge pages, keeps the freed pages and hands them to the next step, whatever
its shape.

An allocator is chosen when a process starts, so `alignx` re-executes itself once with `LD_PRELOAD` set
(`preload_for_cli`, before anything else is imported; the process id stays the same). `ALIGNX_ALLOCATOR`:

- `auto` (the default): mimalloc for the commands that run a model (`CPU_COMMANDS`) where JAX will run on the
  CPU (no GPU/TPU plugin installed, or `JAX_PLATFORMS=cpu`) and the wheel is installed; else the system's;
- `mimalloc`: mimalloc for every command (a one-line error where the wheel is missing);
- `system`: the C library's `malloc`.

`MIMALLOC_*` variables that are already set win over the ones set here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

from alignx_jax.errors import AlignXError

ENV = "ALIGNX_ALLOCATOR"
CHOICES = ("auto", "mimalloc", "system")
MIMALLOC_WHEEL = "cmeel-mimalloc"
# set in the re-executed process: never re-execute twice, even where the loader refused the preload
EXECED = "ALIGNX_ALLOCATOR_EXECED"
# the sub-commands that compile and run XLA programs on the host; data commands gain nothing
CPU_COMMANDS = frozenset({"train", "eval", "generate", "demo", "predict-preferences"})
# JAX's accelerator plugins: where one is installed, jobs run on the accelerator and host memory is not the cost
ACCELERATOR_MODULES = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)


def mimalloc_library() -> str | None:
    """The path of the mimalloc shared library that the `cmeel-mimalloc` wheel installed (None without it)."""
    try:
        files = importlib.metadata.distribution(MIMALLOC_WHEEL).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    # the versioned name, e.g. libmimalloc.so.3: the unversioned one is a development link
    names = sorted((f for f in files if f.name.startswith("libmimalloc.so.")), key=lambda f: len(f.name))
    for f in names:
        path = str(f.locate())
        if os.path.exists(path):
            return os.path.realpath(path)
    return None


def accelerator_plugin(env: Mapping[str, str] = os.environ) -> str | None:
    """What makes JAX run on an accelerator here: `JAX_PLATFORMS` naming one first, or an installed plugin
    module (None: a CPU job)."""
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return None if platforms[0] == "cpu" else f"JAX_PLATFORMS={env['JAX_PLATFORMS']}"
    for name in ACCELERATOR_MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def mimalloc_settings(memory_bytes: int) -> dict[str, str]:
    """mimalloc's options for XLA's pattern of multi-GB blocks freed and taken again every step."""
    gib = f"{max(1, -(-memory_bytes // 2**30))}GiB"
    return {
        # one arena for the whole job: with several 4 GiB arenas, steps of two shapes in turn fragmented
        # them until the host ran out of memory (BENCHMARKS.md §9)
        "MIMALLOC_ARENA_RESERVE": gib,
        # blocks above the default 2 GiB would bypass the arena and go back to the kernel at every free
        "MIMALLOC_ARENA_MAX_OBJECT_SIZE": gib,
        # never return freed pages: a purged page is faulted in again by the next step
        "MIMALLOC_PURGE_DELAY": "-1",
        # no transparent huge pages for this process (and its children): where the kernel compacts memory on
        # a huge-page fault, the arena's growth stalled a step for 13-58 s of kernel time, mid-run too
        # (BENCHMARKS.md §9)
        "MIMALLOC_ALLOW_THP": "0",
    }


def plan(
    choice: str,
    cpu_job: bool,
    env: Mapping[str, str],
    library: str | None,
    accelerator: str | None,
    memory_bytes: int,
) -> dict[str, str] | None:
    """The environment to re-execute this process with, or None to keep it as it is (pure: the inputs say
    what the host has)."""
    if choice not in CHOICES:
        raise AlignXError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "system" or env.get(EXECED):
        return None
    if library is None:
        if choice == "mimalloc":
            raise AlignXError(
                f"{ENV}=mimalloc: the {MIMALLOC_WHEEL} wheel is not installed (pip install {MIMALLOC_WHEEL}, "
                f"or {ENV}=system)"
            )
        return None
    if choice == "auto" and (not cpu_job or accelerator is not None):
        return None
    preloaded = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    if any(os.path.basename(p).startswith("libmimalloc") for p in preloaded):
        return None
    new = dict(env)
    for key, value in mimalloc_settings(memory_bytes).items():
        new.setdefault(key, value)
    new["LD_PRELOAD"] = ":".join([library, *preloaded])
    new[EXECED] = "1"
    return new


def reexec(choice: str, cpu_job: bool) -> None:
    """Re-execute this process (same interpreter and arguments) with the allocator `choice` picks, if that
    is not the one it runs with; returns only when nothing needs to change."""
    if choice in CHOICES and (not sys.platform.startswith("linux") or not sys.executable):
        return  # LD_PRELOAD is the Linux loader's; an embedded interpreter cannot be re-executed
    new = plan(choice, cpu_job, os.environ, mimalloc_library(), accelerator_plugin(), total_memory_bytes())
    if new is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], new)


def configured() -> str:
    """The choice `ALIGNX_ALLOCATOR` makes (unset or empty: auto)."""
    return os.environ.get(ENV) or "auto"


def preload_for_cli(argv: Sequence[str]) -> None:
    """`alignx`'s choice for the sub-command in `argv` (`ALIGNX_ALLOCATOR`, default auto)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    reexec(configured(), cpu_job=command in CPU_COMMANDS)


def active() -> str:
    """The allocator this process runs with: `mimalloc` where its library is mapped, else `system`."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            return "mimalloc" if any("libmimalloc" in line for line in f) else "system"
    except OSError:
        return "system"
