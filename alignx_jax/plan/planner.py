"""`plan`: lower and compile `cfg`'s train step for a topology and report its bytes per device."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ml_collections

from alignx_jax.errors import ConfigError, MeshError
from alignx_jax.hardware import local_device_bytes
from alignx_jax.plan.lowering import lower_step
from alignx_jax.plan.memory import analytic_bytes, shard_bytes
from alignx_jax.plan.presets import decoder_config_for
from alignx_jax.plan.topology import Topology, choose_compilation, parse_topology


def _attention_for_stand_ins(dcfg, devs: list, topology: Topology, notes: list[str]):
    """A flash kernel (cuDNN, Pallas splash) cannot compile for CPU stand-ins: the chunked XLA attention."""
    from alignx_jax.models.decoder import ATTENTION_CHUNK

    impl = dcfg.attention_impl
    flash_kernel = impl in ("cudnn", "splash") or (impl == "auto" and topology.platform in ("gpu", "tpu"))
    if devs[0].platform != "cpu" or not flash_kernel:
        return dcfg
    # the flash kernel keeps O(T) per head; the chunked XLA attention O(chunk * T): an upper bound
    kind = "Pallas splash" if impl == "splash" or topology.platform == "tpu" else "cuDNN flash"
    notes.append(
        f"attention_impl={impl!r} ({kind}) cannot compile for CPU stand-ins: "
        f"compiled with attention_impl='chunked' ({ATTENTION_CHUNK} query rows per block), "
        "an upper bound on the flash kernel's memory"
    )
    return dcfg.replace(attention_impl="chunked")


def _batch_layout(cfg: ml_collections.ConfigDict, mesh, notes: list[str], hosts: int = 1) -> dict[str, int]:
    """Pairs per step and micro-step, sequence length, and the ways the batch splits over devices. On
    several hosts, what `alignx train` refuses there (`batch.check_pair_split`) is refused here too."""
    gb = int(cfg.train.global_batch)
    mb = int(cfg.train.micro_batch or gb)
    if gb <= 0 or mb <= 0 or gb % mb:
        raise ConfigError(f"train.global_batch={gb} must be a positive multiple of train.micro_batch={mb}")
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if hosts > 1 and batch_ways % hosts:
        raise MeshError(
            f"the mesh's data*fsdp={batch_ways} batch shards do not split over the topology's {hosts} hosts: make "
            f"mesh.data*mesh.fsdp a multiple of {hosts} (mesh.tensor must not span hosts)"
        )
    if hosts > 1 and mb % batch_ways:
        raise MeshError(
            f"a microbatch's {mb} pairs do not split over the mesh's data*fsdp={batch_ways} batch shards of "
            f"{hosts} hosts; make train.micro_batch a multiple of {batch_ways}"
        )
    if mb % batch_ways:
        notes.append(f"train.micro_batch={mb} does not divide over data*fsdp={batch_ways}: pairs replicated")
    return {
        "global_batch": gb,
        "micro_batch": mb,
        "num_micro": gb // mb,
        "seq_len": int(cfg.data.max_length),
        "seqs_per_device": max(1, 2 * mb // batch_ways) if mb % batch_ways == 0 else 2 * mb,
    }


def _step_notes(low: dict[str, Any], dcfg) -> list[str]:
    """What the lowered step holds beyond a plain policy: LoRA's split, the joint PBA head."""
    notes = []
    if low["lora"]:
        notes.append(
            f"LoRA rank {dcfg.lora_rank} on {', '.join(dcfg.lora_targets)}: params and optimizer are the "
            f"adapters' (float32); 'reference' is the frozen base ({dcfg.param_dtype}), which is also the "
            "reference with the adapters off"
        )
    if low["joint"]:
        P = low["batch"].head.persona_ids.shape[-1]
        notes.append(
            f"joint PBA head: its params + optimizer ({low['head_bytes']} bytes per device) and a "
            f"{P}-token persona per pair are in the compiled step"
        )
    return notes


def _compiled_bytes(ma: Any, low: dict[str, Any]) -> dict[str, int]:
    """XLA's buffer assignment (`memory_analysis`) beside the step arguments' own shards."""
    arg, out, alias, temp = (
        int(ma.argument_size_in_bytes),
        int(ma.output_size_in_bytes),
        int(ma.alias_size_in_bytes),
        int(ma.temp_size_in_bytes),
    )
    pol = (lambda t: t["policy"]) if low["joint"] else (lambda t: t)
    return {
        "params": shard_bytes(pol(low["params"])),
        "optimizer": shard_bytes(pol(low["opt_state"])),
        "reference": 0 if low["precomputed"] else shard_bytes(low["reference"]),
        "batch": shard_bytes(low["batch"]),
        "preference_head": low["head_bytes"],
        "arguments": arg,
        "outputs": out,
        "aliased": alias,
        "temporaries": temp,
        "generated_code": int(getattr(ma, "generated_code_size_in_bytes", 0) or 0),
        "total": arg + out - alias + temp,
    }


def _param_table(low: dict[str, Any]) -> list[dict[str, Any]]:
    """Every parameter: name, shape, dtype, partition spec, per-device shape, whether it trains."""
    import jax

    table = []
    listed = [(low["params"], True)] + (
        [(low["reference"], False)] if low["lora"] else []
    )  # LoRA: adapters, then base
    for tree, trainable in listed:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            table.append(
                {
                    "name": "/".join(str(k.key) for k in path),
                    "shape": list(leaf.shape),
                    "dtype": str(leaf.dtype),
                    "spec": str(leaf.sharding.spec),
                    "per_device_shape": list(leaf.sharding.shard_shape(leaf.shape)),
                    "trainable": trainable,
                }
            )
    return table


def _planned_responses(cfg: ml_collections.ConfigDict) -> tuple[int | None, int]:
    """The response lengths the plan compiles the step for: the longest a kept pair holds
    (`batching.response_bound`) and the length the reserve cuts a long pair's responses to, which most
    real batches' logits window is (a window program of its own, at times the larger one)."""
    from alignx_jax.data import batching

    return None, batching.reserve(int(cfg.data.max_length)) + 1


def plan(
    cfg: ml_collections.ConfigDict,
    topology: Topology | None = None,
    *,
    devices: list | None = None,
    compiler: str | None = None,
) -> dict[str, Any]:
    """Compile `cfg`'s train step for `topology` on the devices of this process; return the report.

    compiler (default the config's `plan.compiler`): 'tpu' compiles a TPU topology with the TPU
    compiler itself, on the devices of its topology description (`tpu_topology_devices`: libtpu
    installed, no TPU needed); 'cpu' with the CPU compiler on stand-in devices; 'auto' the first where
    it can, else the second, with a note saying why. The stand-ins: at least `topology.num_devices`
    JAX devices (see `cli_plan`, which provides them), or `devices`.
    """
    import jax
    import optax  # noqa: F401  (optax state types in the abstract optimizer state)

    from alignx_jax import sharding as shd
    from alignx_jax.train.state import rules_from_config

    topology = topology or parse_topology(None)
    comp = choose_compilation(topology, str(compiler or cfg.plan.compiler or "auto").lower(), devices)
    devs, notes = comp.devices, list(comp.notes)
    per_device_limit = topology.bytes_per_device or local_device_bytes(devs)
    dcfg = _attention_for_stand_ins(decoder_config_for(cfg, topology.platform), devs, topology, notes)
    mesh = shd.mesh_from_config(cfg.mesh, devices=devs)
    rules = rules_from_config(cfg)
    layout = _batch_layout(cfg, mesh, notes, topology.hosts)

    platform = None if topology.platform == "local" else topology.platform
    low, compiled_report, t_lower, t_compile, windows = None, None, 0.0, 0.0, []
    for response in _planned_responses(cfg):
        t0 = time.perf_counter()
        # traced under the mesh: the model picks the target's code paths (sharding.target_platform)
        candidate = lower_step(cfg, mesh, rules, dcfg, response=response, platform=platform)
        t_lower += time.perf_counter() - t0
        shapes = jax.tree.map(lambda a: a.shape, candidate["batch"])
        if any(shapes == seen for seen, _ in windows):  # the same step program: compiled already
            continue
        t0 = time.perf_counter()
        report = _compiled_bytes(candidate["lowered"].compile().memory_analysis(), candidate)
        t_compile += time.perf_counter() - t0
        windows.append((shapes, report["total"]))
        if compiled_report is None or report["total"] > compiled_report["total"]:
            low, compiled_report = candidate, report
    notes += _step_notes(low, dcfg)
    if len(windows) > 1:
        notes.append(
            f"compiled the step for the longest responses a pair keeps and for responses of the length the "
            f"reserve cuts to (other logits windows, other programs: memory is not monotone in the window); "
            f"the larger is reported ({', '.join(f'{t / 2**30:.2f}' for _, t in windows)} GiB)"
        )
    estimate = analytic_bytes(
        dcfg,
        seqs_per_device=layout["seqs_per_device"],
        seq_len=layout["seq_len"],
        shard=mesh.shape["fsdp"] * mesh.shape["tensor"],
        chunk=int(cfg.loss.logps_chunk),
    )
    return {
        "topology": topology.name,
        "platform": topology.platform,
        "num_devices": len(devs),
        "stand_in": devs[0].platform,
        "compiler": comp.compiled_by,
        "bytes_per_device_limit": per_device_limit,
        "mesh": dict(mesh.shape),
        "model": {"param_count": estimate["param_count"], **dataclasses.asdict(dcfg)},
        "seq_len": layout["seq_len"],
        "global_batch": layout["global_batch"],
        "micro_batch": layout["micro_batch"],
        "num_micro": layout["num_micro"],
        "seqs_per_device_per_micro": layout["seqs_per_device"],
        "remat": dcfg.remat,
        "scan_layers": dcfg.scan_layers,
        "lora_rank": int(dcfg.lora_rank),
        "per_device_bytes": compiled_report,
        "analytic_bytes": estimate,
        "fits": compiled_report["total"] <= per_device_limit,
        "headroom_bytes": per_device_limit - compiled_report["total"],
        "lower_seconds": round(t_lower, 2),
        "compile_seconds": round(t_compile, 2),
        "params": _param_table(low),
        "notes": notes,
    }
