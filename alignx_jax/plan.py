"""`alignx plan`: compile the real train step ahead of time for a topology and report memory per device.

    alignx plan --config configs/llama3_8b_ica_gpu.py [--config.model.hf_path=llama3-8b] [--topology 8xH100] [--json OUT]

The model is built abstractly (`nnx.eval_shape`: shapes and logical axes, no weights), placed on
the config's mesh over *stand-in* devices (fake CPU devices via
`--xla_force_host_platform_device_count`, one per chip of the topology), and the step that
`alignx train` jits (`train.make_train_step`, same shardings, same donation) is lowered and
compiled. XLA's buffer assignment (`compiled.memory_analysis()`) gives the bytes one device needs:
arguments (params, optimizer state, reference, batch) + outputs - donated aliases + temporaries
(activations, gradients, gathered weights). An analytic estimate is printed beside it. A step
that does not fit the topology's memory per device is an AlignXError with the numbers.

`model.hf_path` may be an HF folder / `alignx import` checkpoint, or a built-in preset name
(`llama3-8b`, `qwen2.5-7b`, `smollm2`, see PRESETS) so that no weights are needed to plan; with hf_path ''
the config's `model.preset` is planned. The topology is `--topology`, else the config's
`plan.topology`, else this machine's devices.

Caveats (stand-in devices are CPUs): the CPU compiler's fusion and bf16 handling differ from TPU
and GPU, and the flash kernels (cuDNN on GPU, Pallas splash on TPU) cannot compile for CPU stand-ins
(splash's interpret mode is a test path), so such configs are compiled with the query-chunked XLA
attention (`attention_impl='chunked'`, an upper bound on the flash kernel's memory) and the report
says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import ml_collections

from alignx_jax.config import load_config
from alignx_jax.errors import AlignXError, ConfigError

GiB = 1024**3
_CHILD_ENV = "ALIGNX_PLAN_CHILD"

# Built-in HF config.json descriptions (public model cards), for planning without weights.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(  # Llama-3.1-8B(-Instruct)
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        hidden_act="silu",
    ),
    "qwen2.5-7b": dict(  # Qwen2.5-7B(-Instruct)
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        hidden_act="silu",
    ),
    "smollm2": dict(  # SmolLM2-135M-Instruct, the shipped real model (alignx_jax.real_model; as its GGUF states it)
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        attention_bias=False,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        hidden_act="silu",
    ),
}
PRESETS["llama3.1-8b"] = PRESETS["llama3-8b"]
# Llama-3.1-70B(-Instruct): the 8B's card (vocabulary, RoPE, tokens) at these sizes
PRESETS["llama3-70b"] = dict(
    PRESETS["llama3-8b"],
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
)
PRESETS["llama3.1-70b"] = PRESETS["llama3-70b"]


# ----------------------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    num_devices: int  # chips (one JAX device each)
    bytes_per_device: int
    platform: str  # the real platform the plan stands in for: tpu | gpu | cpu
    # TPU: the chip grid as the TPU compiler's topology description names it (`v5:4x4x8`), '' otherwise
    tpu_topology: str = ""


_TOPOLOGY_TABLE = {"v5p": 95 * GiB, "v5e": 16 * GiB, "v4": 32 * GiB, "v6e": 32 * GiB}
_GPU_TABLE = {"h100": 80 * GiB, "h200": 141 * GiB, "a100": 80 * GiB, "b200": 180 * GiB}
_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*$", re.I)


def parse_bytes(text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 512MiB)")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": GiB, "TB": 1024**4}[unit])


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
        if chips < 1:
            raise ConfigError(f"topology {name!r}: too few cores")
        return Topology(text, chips, _TOPOLOGY_TABLE[gen], "tpu", _tpu_grid(gen, chips))
    m = re.fullmatch(r"(\d+)x(h100|h200|a100|b200)", text, re.I)
    if m:
        return Topology(text, int(m.group(1)), _GPU_TABLE[m.group(2).lower()], "gpu")
    m = re.fullmatch(r"(\d+)@(.+)", text)
    if m:
        return Topology(text, int(m.group(1)), parse_bytes(m.group(2)), "cpu")
    raise ConfigError(
        f"unknown topology {name!r}: use v5p-64 (v4/v5e/v6e too), 8xH100 (h200/a100/b200), "
        "or N@SIZE such as 8@16GiB"
    )


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


# ----------------------------------------------------------------------------- model description


def decoder_config_for(cfg: ml_collections.ConfigDict):
    """The DecoderConfig a run of `cfg` trains, without loading weights."""
    from alignx_jax.models.decoder import DecoderConfig
    from alignx_jax.train.state import init_hf_config, load_tokenizer_for, run_options

    opts = dict(run_options(cfg), dtype=str(cfg.model.dtype), param_dtype=str(cfg.model.param_dtype))
    key = "model.hf_path" if cfg.model.hf_path else "model.preset"  # the one named in an error
    path = str(cfg.model.hf_path) or str(cfg.model.preset)
    if path:
        if path.lower() in PRESETS:
            return DecoderConfig.from_hf(dict(PRESETS[path.lower()]), **opts)
        if os.path.isdir(path):
            from alignx_jax.models import hf

            folder = path
            if not os.path.isfile(os.path.join(folder, "config.json")):  # training workdir
                folder = os.path.join(path, "reference")
            return hf.load_decoder_config(folder, **opts)
        raise ConfigError(f"{key}={path!r} is neither a folder nor a preset ({', '.join(sorted(PRESETS))})")
    if not cfg.model.init.enabled:
        raise ConfigError(
            "model.hf_path is '': pass an HF folder or a preset, e.g. "
            "--config.model.hf_path=llama3-8b (or set model.preset)"
        )
    init = cfg.model.init
    vocab = int(init.vocab_size)
    if vocab == -1:
        tok, _ = load_tokenizer_for(cfg)
        vocab = len(tok)
    return DecoderConfig.from_hf(init_hf_config(init, vocab), **opts)


# ----------------------------------------------------------------------------- analytic estimate


def analytic_bytes(dcfg, *, seqs_per_device: int, seq_len: int, shard: int, chunk: int) -> dict[str, int]:
    """A back-of-envelope per-device budget (the compiled numbers are the authority).

    shard: how many ways params are split (fsdp * tensor). Activations assume per-layer remat when
    `dcfg.remat != 'none'` (only the layer inputs are kept); attention scores are [T, T] per head
    for the XLA attention, [ATTENTION_CHUNK, T] for the chunked one (and the flash stand-in).
    """
    D, F, L, V = dcfg.hidden_size, dcfg.intermediate_size, dcfg.num_hidden_layers, dcfg.vocab_size
    N, K, H = dcfg.num_attention_heads, dcfg.num_key_value_heads, dcfg.head_dim
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F + 2 * D
    P = L * per_layer + V * D * (1 if dcfg.tie_word_embeddings else 2) + D
    pb = int(dcfg.params_dtype.itemsize)
    cb = int(dcfg.compute_dtype.itemsize)
    s, T = seqs_per_device, seq_len
    params = P * pb // shard
    opt = 2 * P * 4 // shard  # Adam mu and nu in float32
    ref = P * cb // shard
    grads = 2 * P * 4 // shard  # accumulator + this microbatch's gradients
    r, A = int(getattr(dcfg, "lora_rank", 0) or 0), P  # A: the trained params' count
    if r:  # LoRA: float32 adapters train; the frozen base (param_dtype) is the reference too
        io = {"q_proj": (D, N * H), "k_proj": (D, K * H), "v_proj": (D, K * H), "o_proj": (N * H, D)}
        io.update(gate_proj=(D, F), up_proj=(D, F), down_proj=(F, D))
        A = L * sum(r * (i + o) for t, (i, o) in io.items() if t in dcfg.lora_targets)
        ref, params = params, A * 4 // shard
        opt = grads = 2 * A * 4 // shard
        P += A
    gathered = (
        2 * per_layer * cb + 2 * V * D * cb
    )  # one layer (double-buffered) + embedding/head, all-gathered
    act_layer_in = s * T * D * cb
    from alignx_jax.models.decoder import ATTENTION_CHUNK

    blocked = ("chunked", "cudnn", "splash")  # kernels that hold at most [chunk, T] scores per head
    rows = min(T, ATTENTION_CHUNK) if dcfg.attention_impl in blocked and T % ATTENTION_CHUNK == 0 else T
    attn = s * N * rows * T * (4 + cb + 4)  # f32 scores, probs, f32 score gradients
    layer_work = s * T * (6 * D + 3 * F) * cb + attn
    if dcfg.remat != "none":
        acts = L * act_layer_in + layer_work
    else:
        acts = L * (s * T * (6 * D + 3 * F) * cb + attn // 2)
    c = min(chunk or T, T)
    logits = 2 * s * c * V * 4
    temps = grads + gathered + acts + logits
    return {
        "params": params,
        "optimizer": opt,
        "reference": ref,
        "temporaries": temps,
        "total": params + opt + ref + temps,
        "param_count": P,
        "trainable_count": A,
    }


# ----------------------------------------------------------------------------- the plan


def _opt_shardings(opt_state_abs: Any, param_sh_by_path: dict[tuple, Any], replicated) -> Any:
    """Optimizer leaves mirror params (Adam mu/nu): give each the sharding of the param it shadows."""
    import jax

    def one(path, leaf):
        keys = []
        for k in reversed(path):
            if isinstance(k, jax.tree_util.DictKey):
                keys.append(k.key)
            else:
                break
        key = tuple(reversed(keys))
        sh = param_sh_by_path.get(key)
        if sh is not None and tuple(sh[1]) == tuple(leaf.shape):
            return sh[0]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state_abs)


def _shard_bytes(sds: Any) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(sds):
        shape = (
            leaf.sharding.shard_shape(leaf.shape)
            if getattr(leaf, "sharding", None) is not None
            else leaf.shape
        )
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def plan_batch(cfg: ml_collections.ConfigDict, mesh, rules, *, collated: dict[str, Any] | None = None) -> Any:
    """The step's batch argument (a `batch.StepBatch`) of `jax.ShapeDtypeStruct`s with their shardings:
    `collated` (a loader batch; default `batch.worst_case_collated`, the longest rows the config keeps)
    through the run's own `batch.BatchBuilder`, so share_prompt / packing / compact_tokens / the joint
    head's persona shape the plan exactly as they shape `alignx train`'s step."""
    import jax
    import numpy as np

    from alignx_jax.batch import BatchBuilder, batch_shardings, worst_case_collated
    from alignx_jax.train.schema import joint_head

    joint = joint_head(cfg)
    builder = BatchBuilder.from_config(cfg, mesh, 0, head=joint)
    if collated is None:
        collated = worst_case_collated(
            int(cfg.train.global_batch),
            max_length=int(cfg.data.max_length),
            buckets=builder.buckets,
            pad_id=0,
            share=builder.share,
            # (a persona longer than the largest bucket is a ConfigError of `alignx train`; plan the largest)
            persona_tokens=min(int(cfg.pba.max_persona_tokens), max(builder.buckets)) if joint else None,
        )
    host, _ = builder(collated)
    from alignx_jax.train.step import reference_needed

    if cfg.loss.reference == "precomputed" and reference_needed(cfg.loss):  # as the loop adds it (its rows)
        host = host.replace(ref_logps=np.zeros((builder.num_micro, host.pair_mask.shape[1], 2), np.float32))
    return jax.tree.map(
        lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
        host,
        batch_shardings(host, mesh, rules),
    )


def lower_step(
    cfg: ml_collections.ConfigDict, mesh, rules, dcfg=None, *, collated: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Lower the step `alignx train` jits for `cfg` (`train.step.jit_train_step`: same shardings, same
    donation) on abstract params, optimizer state, reference and `plan_batch`. Returns the lowered
    computation and its abstract arguments ('params', 'opt_state', 'reference', 'batch')."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from alignx_jax import sharding as shd
    from alignx_jax.models import preference_head as ph
    from alignx_jax.models.decoder import Decoder
    from alignx_jax.train.schema import joint_head
    from alignx_jax.train.state import (
        HeadCodec,
        LoraCodec,
        ParamsCodec,
        make_head_optimizer,
        make_optimizer,
    )
    from alignx_jax.train.step import jit_train_step

    dcfg = dcfg or decoder_config_for(cfg)
    abs_model = nnx.eval_shape(lambda: Decoder(dcfg, rngs=nnx.Rngs(0)))
    lora_on = bool(dcfg.lora_rank)
    codec = (LoraCodec if lora_on else ParamsCodec).of(abs_model)
    params_abs = nnx.to_pure_dict(nnx.state(abs_model))
    param_sh = nnx.to_pure_dict(shd.model_shardings(nnx.state(abs_model), mesh, rules))
    rep = NamedSharding(mesh, PartitionSpec())

    def with_sh(x, sh, dtype=None):
        return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sh)

    if lora_on:
        # as `alignx train` splits them: the adapters train (with the optimizer), the frozen base in
        # param_dtype is `ref_params` (the policy's base and, adapters off, the reference)
        (params_abs, base_abs), (param_sh, base_sh) = codec.split(params_abs), codec.split(param_sh)
        ref_in = jax.tree.map(with_sh, base_abs, base_sh)
    else:
        ref_in = jax.tree.map(lambda x, sh: with_sh(x, sh, dcfg.compute_dtype), params_abs, param_sh)
    params_in = jax.tree.map(with_sh, params_abs, param_sh)
    # the run's own schedule length (its constants are part of the step); 1000 for epoch-based runs
    total_steps = int(cfg.train.steps) if int(cfg.train.steps) > 0 else 1000
    tx, _ = make_optimizer(cfg.optim, total_steps, int(cfg.model.frozen_layers))
    opt_abs = jax.eval_shape(tx.init, params_abs)
    flat_sh = {tuple(k.key for k in path): sh for path, sh in jax.tree_util.tree_leaves_with_path(param_sh)}
    by_path = {
        tuple(k.key for k in path): (flat_sh[tuple(k.key for k in path)], leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params_abs)
    }
    opt_sh = _opt_shardings(opt_abs, by_path, rep)
    opt_in = jax.tree.map(with_sh, opt_abs, opt_sh)

    from alignx_jax.train.step import reference_needed

    # no reference copy: precomputed log-probs, or a reference-free loss (as `alignx train` keeps none)
    precomputed = cfg.loss.reference == "precomputed" or not reference_needed(cfg.loss)
    head_codec = head_tx = None
    head_b = 0
    joint = joint_head(cfg)
    if joint:
        # joint PBA: the preference head's params and optimizer, and the persona the backbone reads
        # for it beside every pair, are part of the step
        hcfg = ph.HeadConfig.from_config(cfg.pba, dcfg.hidden_size, persona_variant=cfg.data.persona)
        abs_head = nnx.eval_shape(lambda: ph.PreferenceHead(hcfg, rngs=nnx.Rngs(0)))
        head_codec, head_tx = HeadCodec.of(abs_head), make_head_optimizer(cfg.pba)
        head_abs = HeadCodec.params(abs_head)
        head_sh = nnx.to_pure_dict(shd.model_shardings(nnx.state(abs_head, nnx.Param), mesh, rules))
        head_opt_abs = jax.eval_shape(head_tx.init, head_abs)
        head_in = jax.tree.map(with_sh, head_abs, head_sh)
        head_opt_in = jax.tree.map(lambda x: with_sh(x, rep), head_opt_abs)
        head_b = _shard_bytes(head_in) + _shard_bytes(head_opt_in)
        params_in, opt_in = {"policy": params_in, "head": head_in}, {"policy": opt_in, "head": head_opt_in}
        param_sh = {"policy": param_sh, "head": head_sh}
        opt_sh = {"policy": opt_sh, "head": jax.tree.map(lambda _: rep, head_opt_abs)}
    batch_in = plan_batch(cfg, mesh, rules, collated=collated)
    jitted = jit_train_step(
        codec,
        tx,
        cfg,
        param_shardings=param_sh,
        opt_shardings=opt_sh,
        replicated=rep,
        head_codec=head_codec,
        head_tx=head_tx,
    )
    with shd.use_mesh(mesh, rules):
        lowered = jitted.lower(params_in, opt_in, None if precomputed and not lora_on else ref_in, batch_in)
    return {
        "lowered": lowered,
        "params": params_in,
        "opt_state": opt_in,
        "reference": ref_in,
        "batch": batch_in,
        "head_bytes": head_b,
        "precomputed": precomputed and not lora_on,  # LoRA keeps its base (the policy's) either way
        "joint": joint,
        "lora": lora_on,
    }


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
    from alignx_jax.models.decoder import ATTENTION_CHUNK
    from alignx_jax.train.state import rules_from_config

    topology = topology or parse_topology(None)
    notes: list[str] = []
    compiler = str(compiler or cfg.plan.compiler or "auto").lower()
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
    per_device_limit = topology.bytes_per_device or _local_device_bytes(devs)
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

    dcfg = decoder_config_for(cfg)
    impl = dcfg.attention_impl
    flash_kernel = impl in ("cudnn", "splash") or (impl == "auto" and topology.platform in ("gpu", "tpu"))
    if devs[0].platform == "cpu" and flash_kernel:
        # the flash kernel keeps O(T) per head; the chunked XLA attention O(chunk * T): an upper bound
        kind = "Pallas splash" if impl == "splash" or topology.platform == "tpu" else "cuDNN flash"
        notes.append(
            f"attention_impl={impl!r} ({kind}) cannot compile for CPU stand-ins: "
            f"compiled with attention_impl='chunked' ({ATTENTION_CHUNK} query rows per block), "
            "an upper bound on the flash kernel's memory"
        )
        dcfg = dcfg.replace(attention_impl="chunked")
    mesh = shd.mesh_from_config(cfg.mesh, devices=devs)
    rules = rules_from_config(cfg)

    gb = int(cfg.train.global_batch)
    mb = int(cfg.train.micro_batch or gb)
    if gb <= 0 or mb <= 0 or gb % mb:
        raise ConfigError(f"train.global_batch={gb} must be a positive multiple of train.micro_batch={mb}")
    num_micro = gb // mb
    T = int(cfg.data.max_length)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if mb % batch_ways:
        notes.append(f"train.micro_batch={mb} does not divide over data*fsdp={batch_ways}: pairs replicated")

    t0 = time.perf_counter()
    # traced under the mesh: the model picks the target's code paths (sharding.target_platform)
    low = lower_step(cfg, mesh, rules, dcfg)
    lowered, params_in, opt_in, ref_in, batch_in = (
        low["lowered"],
        low["params"],
        low["opt_state"],
        low["reference"],
        low["batch"],
    )
    head_b, precomputed, joint = low["head_bytes"], low["precomputed"], low["joint"]
    if low["lora"]:
        notes.append(
            f"LoRA rank {dcfg.lora_rank} on {', '.join(dcfg.lora_targets)}: params and optimizer are the "
            f"adapters' (float32); 'reference' is the frozen base ({dcfg.param_dtype}), which is also the "
            "reference with the adapters off"
        )
    if joint:
        P = batch_in.head.persona_ids.shape[-1]
        notes.append(
            f"joint PBA head: its params + optimizer ({head_b} bytes per device) and a "
            f"{P}-token persona per pair are in the compiled step"
        )
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    ma = compiled.memory_analysis()

    arg, out, alias, temp = (
        int(ma.argument_size_in_bytes),
        int(ma.output_size_in_bytes),
        int(ma.alias_size_in_bytes),
        int(ma.temp_size_in_bytes),
    )
    code = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
    pol = (lambda t: t["policy"]) if joint else (lambda t: t)
    params_b, opt_b = _shard_bytes(pol(params_in)), _shard_bytes(pol(opt_in))
    ref_b = 0 if precomputed else _shard_bytes(ref_in)
    batch_b = _shard_bytes(batch_in)
    per_device_total = arg + out - alias + temp
    compiled_report = {
        "params": params_b,
        "optimizer": opt_b,
        "reference": ref_b,
        "batch": batch_b,
        "preference_head": head_b,
        "arguments": arg,
        "outputs": out,
        "aliased": alias,
        "temporaries": temp,
        "generated_code": code,
        "total": per_device_total,
    }
    seqs_per_device = max(1, 2 * mb // batch_ways) if mb % batch_ways == 0 else 2 * mb
    shard_ways = mesh.shape["fsdp"] * mesh.shape["tensor"]
    estimate = analytic_bytes(
        dcfg, seqs_per_device=seqs_per_device, seq_len=T, shard=shard_ways, chunk=int(cfg.loss.logps_chunk)
    )

    param_table = []
    listed = [(params_in, True)] + ([(ref_in, False)] if low["lora"] else [])  # LoRA: adapters, then base
    for tree, trainable in listed:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            param_table.append(
                {
                    "name": "/".join(str(k.key) for k in path),
                    "shape": list(leaf.shape),
                    "dtype": str(leaf.dtype),
                    "spec": str(leaf.sharding.spec),
                    "per_device_shape": list(leaf.sharding.shard_shape(leaf.shape)),
                    "trainable": trainable,
                }
            )
    report = {
        "topology": topology.name,
        "platform": topology.platform,
        "num_devices": n,
        "stand_in": devs[0].platform,
        "compiler": compiled_by,  # 'tpu topology' (the TPU compiler, libtpu) | 'cpu stand-ins' | 'gpu devices' ...
        "bytes_per_device_limit": per_device_limit,
        "mesh": dict(mesh.shape),
        "model": {"param_count": estimate["param_count"], **dataclasses.asdict(dcfg)},
        "seq_len": T,
        "global_batch": gb,
        "micro_batch": mb,
        "num_micro": num_micro,
        "seqs_per_device_per_micro": seqs_per_device,
        "remat": dcfg.remat,
        "scan_layers": dcfg.scan_layers,
        "lora_rank": int(dcfg.lora_rank),
        "per_device_bytes": compiled_report,
        "analytic_bytes": estimate,
        "fits": per_device_total <= per_device_limit,
        "headroom_bytes": per_device_limit - per_device_total,
        "lower_seconds": round(t_lower, 2),
        "compile_seconds": round(t_compile, 2),
        "params": param_table,
        "notes": notes,
    }
    return report


def _local_device_bytes(devs) -> int:
    stats = devs[0].memory_stats() if hasattr(devs[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:  # CPU: the host's memory shared by its devices
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, len(devs))
    except (ValueError, OSError):
        return 0


def _gib(b: int) -> str:
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB // 4 else f"{b / 1024**2:.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
    c, a = r["per_device_bytes"], r["analytic_bytes"]
    m = r["model"]
    lines = [
        f"topology {r['topology']}: {r['num_devices']} devices ({r['platform']}, compiled on "
        f"{r.get('compiler', r['stand_in'] + ' stand-ins')}), limit {_gib(r['bytes_per_device_limit'])} per device",
        f"mesh {r['mesh']}; model {m['param_count'] / 1e9:.2f}B params, {m['num_hidden_layers']} layers, "
        f"dtype {m['dtype']}/{m['param_dtype']}, remat {r['remat']}, scan {r['scan_layers']}",
        f"batch: {r['global_batch']} pairs = {r['num_micro']} x {r['micro_batch']}, seq {r['seq_len']}, "
        f"{r['seqs_per_device_per_micro']} sequences per device per micro-step",
        f"compile: lower {r['lower_seconds']}s, compile {r['compile_seconds']}s",
        "per device          compiled      analytic",
        f"  params        {_gib(c['params']):>12}  {_gib(a['params']):>12}",
        f"  optimizer     {_gib(c['optimizer']):>12}  {_gib(a['optimizer']):>12}",
        f"  {'base(frozen)' if r.get('lora_rank') else 'reference':<12}  {_gib(c['reference']):>12}  "
        f"{_gib(a['reference']):>12}",
        f"  batch         {_gib(c['batch']):>12}",
        f"  temporaries   {_gib(c['temporaries']):>12}  {_gib(a['temporaries']):>12}",
        f"  total         {_gib(c['total']):>12}  {_gib(a['total']):>12}",
        f"fits: {'yes' if r['fits'] else 'NO'} (headroom {_gib(r['headroom_bytes'])})",
    ]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def _print_params(r: dict[str, Any]) -> str:
    return "\n".join(
        f"  {p['name']:<40} {str(tuple(p['shape'])):<26} {p['spec']:<40} -> {tuple(p['per_device_shape'])}"
        for p in r["params"]
    )


# ----------------------------------------------------------------------------- CLI


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # older/newer jax: assume the worst
        return "jax" in sys.modules


def _provide_devices(n: int) -> bool:
    """Make sure this process will see >= n CPU devices. False when jax already started with fewer
    (the caller then re-runs the command in a child process)."""
    if _backends_initialized():
        import jax

        return jax.device_count() >= n
    flags, have = [], 1
    for f in os.environ.get("XLA_FLAGS", "").split():
        if f.startswith("--xla_force_host_platform_device_count="):
            have = int(f.split("=", 1)[1])  # never lower a count someone else asked for
        else:
            flags.append(f)
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={max(n, have)}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_platforms", "cpu")
    return True


def cli_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, getattr(args, "overrides", []) or [])
    name = args.topology or str(cfg.plan.topology) or None  # --topology, else the config's
    topo = parse_topology(name)
    if topo.num_devices and not _provide_devices(topo.num_devices):
        if os.environ.get(_CHILD_ENV):
            raise AlignXError(f"could not provide {topo.num_devices} stand-in devices for {topo.name}")
        argv = [
            sys.executable,
            "-m",
            "alignx_jax",
            "plan",
            "--config",
            args.config_path,
            *(getattr(args, "overrides", []) or []),
            "--topology",
            name,
        ]
        if args.json:
            argv += ["--json", args.json]
        if getattr(args, "compiler", None):
            argv += ["--compiler", args.compiler]
        if getattr(args, "verbose", False):
            argv.append("--verbose")
        env = dict(os.environ, **{_CHILD_ENV: "1"})
        env.pop("XLA_FLAGS", None)
        env.pop("JAX_PLATFORMS", None)
        return subprocess.call(argv, env=env)
    report = plan(cfg, topo, compiler=getattr(args, "compiler", None))
    print(format_report(report))
    if getattr(args, "verbose", False):
        print(_print_params(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
    if not report["fits"]:
        c = report["per_device_bytes"]
        raise AlignXError(
            f"{args.config_path}: the train step needs {_gib(c['total'])} per device on {report['topology']} "
            f"but a device has {_gib(report['bytes_per_device_limit'])} (params {_gib(c['params'])}, optimizer "
            f"{_gib(c['optimizer'])}, reference {_gib(c['reference'])}, temporaries {_gib(c['temporaries'])}); "
            "lower train.micro_batch, enable model.remat, shorten data.max_length or use more devices"
        )
    return 0
