"""Target topologies of `alignx plan` (`v5p-64`, `8xH100`, `N@SIZE`), the TPU compiler's own devices
for one (libtpu, no TPU needed), and which devices and compiler a plan uses."""

from __future__ import annotations

import dataclasses
import os
import re

from alignx_jax.errors import AlignXError, ConfigError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    num_devices: int  # chips (one JAX device each)
    bytes_per_device: int
    platform: str  # the real platform the plan stands in for: tpu | gpu | cpu
    # TPU: the chip grid as the TPU compiler's topology description names it (`v5:4x4x8`), '' otherwise
    tpu_topology: str = ""
    hosts: int = 1  # JAX processes: each holds its own part of every batch (`batch.check_pair_split`)


_TOPOLOGY_TABLE = {"v5p": 95 * GiB, "v5e": 16 * GiB, "v4": 32 * GiB, "v6e": 32 * GiB}
# the chips of each generation's largest slice (a whole pod): a mistyped count beyond it would have the
# plan make that many stand-in devices (a v5p-179200: minutes of grid search, then gigabytes of devices)
_MAX_CHIPS = {"v5p": 8960, "v5e": 256, "v4": 4096, "v6e": 256}
_GPU_TABLE = {"h100": 80 * GiB, "h200": 141 * GiB, "a100": 80 * GiB, "b200": 180 * GiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B|B)?\s*$", re.I)


def parse_bytes(text: str) -> int:
    """`80GiB`, `512MiB`, `1.5GB` (binary units either way) -> bytes; anything else, or a size under one
    byte (a device of 0 bytes would be planned against this machine's memory instead), is a ConfigError."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 512MiB)")
    unit = (m.group(2) or "B").upper().replace("I", "")
    size = int(float(m.group(1)) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": GiB, "TB": 1024**4}[unit])
    if size < 1:
        raise ConfigError(f"memory size {text!r} is under one byte; give a device's memory (e.g. 80GiB)")
    return size


def parse_topology(name: str | None) -> Topology:
    """`v5p-64` (TPU name counts TensorCores: 2 per chip for v4/v5p), `8xH100`, or `N@SIZE` (N devices
    of SIZE each, e.g. `8@2GiB`). None: this machine's devices."""
    if name is None:
        return Topology("local", 0, 0, "local")
    text = name.strip()
    m = re.fullmatch(r"(v5p|v4|v5e|v6e)-(\d+)", text, re.I)
    if m:
        gen, cores = m.group(1).lower(), int(m.group(2))
        chips = cores // 2 if gen in ("v5p", "v4") else cores  # v5e/v6e names count chips
        if chips < 1 or (gen in ("v5p", "v4") and cores % 2):
            raise ConfigError(
                f"topology {name!r}: a {gen} slice has an even number of TensorCores, 2 or more"
            )
        if chips > _MAX_CHIPS[gen]:
            largest = _MAX_CHIPS[gen] * (2 if gen in ("v5p", "v4") else 1)
            raise ConfigError(
                f"topology {name!r}: the largest {gen} slice is {gen}-{largest} ({_MAX_CHIPS[gen]} chips)"
            )
        if not _is_slice(gen, chips):  # a grid libtpu has no slice of (a 3-chip v5e, a 6-core v5p)
            raise ConfigError(
                f"topology {name!r}: no {gen} slice has {chips} chip{'s' * (chips != 1)}; "
                f"e.g. {_slice_names(gen)}"
            )
        # v4/v5p hosts drive 4 chips; v5e/v6e slices of up to 8 chips are one host, larger ones 4 chips a host
        hosts = max(1, chips // 4) if gen in ("v5p", "v4") or chips > 8 else 1
        return Topology(text, chips, _TOPOLOGY_TABLE[gen], "tpu", _tpu_grid(gen, chips), hosts)
    m = re.fullmatch(r"(\d+)x(h100|h200|a100|b200)", text, re.I)
    if m and int(m.group(1)) < 1:
        raise ConfigError(f"topology {name!r}: at least one GPU")
    if m:
        gpus = int(m.group(1))
        return Topology(text, gpus, _GPU_TABLE[m.group(2).lower()], "gpu", hosts=-(-gpus // 8))  # 8 a host
    m = re.fullmatch(r"(\d+)@(.+)", text)
    if m and int(m.group(1)) < 1:
        raise ConfigError(f"topology {name!r}: at least one device")
    if m:
        return Topology(text, int(m.group(1)), parse_bytes(m.group(2)), "cpu")
    m = re.fullmatch(r"(.+?)(x(?:h100|h200|a100|b200)|@.+)", text, re.I)
    if m:  # -8xH100, 1.5@16GiB: a count that is no whole number, not an unknown name
        raise ConfigError(
            f"topology {name!r}: the device count {m.group(1)!r} is not a whole number (e.g. 8xH100, 8@16GiB)"
        )
    raise ConfigError(
        f"unknown topology {name!r}: use v5p-64 (v4/v5e/v6e too), 8xH100 (h200/a100/b200), "
        "or N@SIZE such as 8@16GiB"
    )


def _is_slice(gen: str, chips: int) -> bool:
    """Whether a `gen` slice of `chips` chips exists: v4/v5p a host (2x2x1), 2x2x2, 2x2x4, 2x4x4, then the
    grids of `_tpu_grid` whose sides are multiples of 4 (so 64 chips a step); v5e/v6e one chip, or 2x2 and
    each grid doubling a side of the last (2x4, 4x4, ... 16x16)."""
    powers_of_two = chips & (chips - 1) == 0
    if gen in ("v5p", "v4"):
        return chips % 64 == 0 if chips >= 64 else powers_of_two and chips >= 4
    return powers_of_two and chips != 2


def _slice_names(gen: str) -> str:
    """A few slice names of `gen`, as its names count (TensorCores for v4/v5p, chips for v5e/v6e)."""
    if gen in ("v5p", "v4"):
        return ", ".join(f"{gen}-{2 * c}" for c in (4, 8, 16, 32, 64)) + ", then multiples of 128"
    return ", ".join(f"{gen}-{c}" for c in (1, 4, 8, 16, 32, 64, 128, 256))


def _tpu_grid(gen: str, chips: int) -> str:
    """The chip grid of a `gen` slice of `chips` chips as libtpu names it ('' when none is known):
    v4/v5p 3-D (`v5:4x4x8`, dimensions multiples of 4 from 64 chips up, as cubic as that allows),
    v5e/v6e 2-D (`v5e:16x16`)."""
    if gen in ("v5p", "v4"):
        triples = [
            (a, b, chips // (a * b))
            for a in range(1, chips + 1)
            for b in range(a, chips + 1)
            if chips % (a * b) == 0 and chips // (a * b) >= b
        ]
        if chips >= 64:
            triples = [t for t in triples if all(d % 4 == 0 for d in t)]
        if not triples:
            return ""
        a, b, c = min(triples, key=lambda t: (t[2], -t[0]))
        dims = (b, c, a) if a == 1 else (a, b, c)  # a host of 4 chips is 2x2x1
        return f"{'v5' if gen == 'v5p' else 'v4'}:{dims[0]}x{dims[1]}x{dims[2]}"
    pairs = [(a, chips // a) for a in range(1, chips + 1) if chips % a == 0 and chips // a >= a]
    a, b = min(pairs, key=lambda t: t[1])
    return f"{gen}:{a}x{b}"


def tpu_topology_devices(topology: Topology) -> tuple[list | None, str]:
    """The TPU compiler's own devices for `topology` (`jax.experimental.topologies`, built by libtpu
    without a TPU: ahead-of-time compilation for the real chips), or (None, why not)."""
    import importlib.util

    if topology.platform != "tpu" or not topology.tpu_topology:
        return None, f"{topology.name} is not a TPU topology"
    if importlib.util.find_spec("libtpu") is None:
        return None, "libtpu is not installed (pip install 'alignx-jax[tpu-plan]' adds the TPU compiler)"
    # only compiling, no chips to hold: several plans (and tests) may load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology.tpu_topology,
            chip_config_name="megacore" if topology.tpu_topology.startswith(("v4:", "v5:")) else "default",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
        )
        devices = list(desc.devices)
    except Exception as e:  # any libtpu failure: fall back to CPU stand-ins, saying why
        return None, f"libtpu could not describe {topology.tpu_topology}: {type(e).__name__}: {e}"
    if len(devices) != topology.num_devices:
        got = f"{len(devices)} devices for {topology.tpu_topology}"
        return None, f"libtpu described {got}, not {topology.num_devices}"
    return devices, ""


@dataclasses.dataclass(frozen=True)
class Compilation:
    """The devices a plan compiles on, what compiles for them, and why not the target's compiler."""

    devices: list
    compiled_by: str  # 'tpu topology' (the TPU compiler, libtpu) | 'cpu stand-ins' | 'gpu devices' ...
    notes: list[str]


def choose_compilation(topology: Topology, compiler: str, devices: list | None) -> Compilation:
    """compiler 'tpu': the TPU compiler on its topology description's devices; 'cpu': the CPU compiler on
    stand-ins (`devices`, else this process's); 'auto': the first where it can, else the second."""
    import jax

    if compiler not in ("auto", "tpu", "cpu"):
        raise ConfigError(f"plan.compiler={compiler!r}: use auto, tpu or cpu")
    tpu_devices, why = None, "plan.compiler=cpu"
    if devices is not None:
        why = "the devices were given"
    elif compiler != "cpu":
        tpu_devices, why = tpu_topology_devices(topology)
        if tpu_devices is None and compiler == "tpu":
            raise AlignXError(f"plan.compiler=tpu: {why}")
    all_devices = list(tpu_devices or (jax.devices() if devices is None else devices))
    n = topology.num_devices or len(all_devices)
    if len(all_devices) < n:
        raise AlignXError(
            f"plan for {topology.name} needs {n} devices, this process has {len(all_devices)} "
            "(run it through `alignx plan`, which provides stand-in CPU devices)"
        )
    devs = all_devices[:n]
    notes: list[str] = []
    if tpu_devices:
        compiled_by = "tpu topology"
    elif devs[0].platform == "cpu":
        compiled_by = "cpu stand-ins"
        if topology.platform in ("tpu", "gpu"):
            if topology.platform == "gpu":
                why = "JAX describes no GPU topology without GPUs"
            notes.append(
                f"compiled by the CPU compiler on {n} stand-in CPU devices, not the {topology.platform.upper()} "
                f"compiler: {why}. The CPU compiler's fusion, bf16 handling and buffer assignment differ, "
                "so the bytes are an estimate"
            )
    else:
        compiled_by = f"{devs[0].platform} devices"
    return Compilation(devs, compiled_by, notes)
