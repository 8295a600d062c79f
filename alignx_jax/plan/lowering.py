"""Lower the step `alignx train` jits on abstract arguments: params, optimizer state, reference and
batch as `jax.ShapeDtypeStruct`s with the run's shardings (no weights, no devices' memory)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from alignx_jax import hardware
from alignx_jax.plan.memory import shard_bytes
from alignx_jax.plan.presets import decoder_config_for


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


def plan_batch(
    cfg: ml_collections.ConfigDict,
    mesh,
    rules,
    *,
    collated: dict[str, Any] | None = None,
    response: int | None = None,
) -> Any:
    """The step's batch argument (a `batch.StepBatch`) of `jax.ShapeDtypeStruct`s with their shardings:
    `collated` (a loader batch; default `batch.worst_case_collated`, the longest rows the config keeps)
    through the run's own `batch.BatchBuilder`, so share_prompt / packing / compact_tokens / the joint
    head's persona shape the plan exactly as they shape `alignx train`'s step."""
    import jax
    import numpy as np

    from alignx_jax.batch import BatchBuilder, batch_shardings, worst_case_collated
    from alignx_jax.config_schema import joint_head

    joint = joint_head(cfg)
    builder = BatchBuilder.from_config(cfg, mesh, 0, head=joint)
    if collated is None:
        collated = worst_case_collated(
            int(cfg.train.global_batch),
            max_length=int(cfg.data.max_length),
            buckets=builder.buckets,
            pad_id=0,
            # (a persona longer than the largest bucket is a ConfigError of `alignx train`; plan the largest)
            persona_tokens=min(int(cfg.pba.max_persona_tokens), max(builder.buckets)) if joint else None,
            response=response,
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


@dataclasses.dataclass
class _Abstract:
    """One trained model's abstract step arguments and their shardings (the policy, or the joint head)."""

    codec: Any
    tx: Any
    params: Any
    opt_state: Any
    param_shardings: Any
    opt_shardings: Any


def _with_sharding(x, sh, dtype=None):
    import jax

    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sh)


def _abstract_policy(cfg: ml_collections.ConfigDict, mesh, rules, dcfg, rep) -> tuple[_Abstract, Any]:
    """The policy's abstract params and optimizer state (the adapters' for LoRA) and the reference
    argument (the frozen base for LoRA, else a compute-dtype copy of the params)."""
    import jax
    from flax import nnx

    from alignx_jax import sharding as shd
    from alignx_jax.models.decoder import Decoder
    from alignx_jax.train.state import LoraCodec, ParamsCodec, make_optimizer

    abs_model = nnx.eval_shape(lambda: Decoder(dcfg, rngs=nnx.Rngs(0)))
    codec = (LoraCodec if dcfg.lora_rank else ParamsCodec).of(abs_model)
    params_abs = nnx.to_pure_dict(nnx.state(abs_model))
    param_sh = nnx.to_pure_dict(shd.model_shardings(nnx.state(abs_model), mesh, rules))
    if dcfg.lora_rank:
        # as `alignx train` splits them: the adapters train (with the optimizer), the frozen base in
        # param_dtype is `ref_params` (the policy's base and, adapters off, the reference)
        (params_abs, base_abs), (param_sh, base_sh) = codec.split(params_abs), codec.split(param_sh)
        ref_in = jax.tree.map(_with_sharding, base_abs, base_sh)
    else:
        ref_in = jax.tree.map(lambda x, sh: _with_sharding(x, sh, dcfg.compute_dtype), params_abs, param_sh)
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
    params_in = jax.tree.map(_with_sharding, params_abs, param_sh)
    opt_in = jax.tree.map(_with_sharding, opt_abs, opt_sh)
    return _Abstract(codec, tx, params_in, opt_in, param_sh, opt_sh), ref_in


def _abstract_head(cfg: ml_collections.ConfigDict, mesh, rules, dcfg, rep) -> _Abstract:
    """Joint PBA: the preference head's abstract params and optimizer state (replicated)."""
    import jax
    from flax import nnx

    from alignx_jax import sharding as shd
    from alignx_jax.models import preference_head as ph
    from alignx_jax.pba.head_training import head_config
    from alignx_jax.train.state import HeadCodec, make_head_optimizer

    hcfg = head_config(cfg, dcfg.hidden_size)
    abs_head = nnx.eval_shape(lambda: ph.PreferenceHead(hcfg, rngs=nnx.Rngs(0)))
    head_codec, head_tx = HeadCodec.of(abs_head), make_head_optimizer(cfg.pba)
    head_abs = HeadCodec.params(abs_head)
    head_sh = nnx.to_pure_dict(shd.model_shardings(nnx.state(abs_head, nnx.Param), mesh, rules))
    head_opt_abs = jax.eval_shape(head_tx.init, head_abs)
    head_in = jax.tree.map(_with_sharding, head_abs, head_sh)
    head_opt_in = jax.tree.map(lambda x: _with_sharding(x, rep), head_opt_abs)
    opt_sh = jax.tree.map(lambda _: rep, head_opt_abs)
    return _Abstract(head_codec, head_tx, head_in, head_opt_in, head_sh, opt_sh)


def lower_step(
    cfg: ml_collections.ConfigDict,
    mesh,
    rules,
    dcfg=None,
    *,
    collated: dict[str, Any] | None = None,
    response: int | None = None,
    platform: str | None = None,
) -> dict[str, Any]:
    """Lower the step `alignx train` jits for `cfg` (`train.step.jit_train_step`: same shardings, same
    donation) on abstract params, optimizer state, reference and `plan_batch`. Returns the lowered
    computation and its abstract arguments ('params', 'opt_state', 'reference', 'batch'). `platform`: the
    one the plan is for (a topology's, where CPU devices stand in for it; default: the mesh's devices').
    `response`: `plan_batch`'s responses of that many tokens (default the longest a run keeps)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from alignx_jax import sharding as shd
    from alignx_jax.config_schema import joint_head
    from alignx_jax.train.step import jit_train_step, reference_needed

    dcfg = dcfg or decoder_config_for(cfg)
    lora_on = bool(dcfg.lora_rank)
    rep = NamedSharding(mesh, PartitionSpec())
    policy, ref_in = _abstract_policy(cfg, mesh, rules, dcfg, rep)
    # no reference copy: precomputed log-probs, or a reference-free loss (as `alignx train` keeps none)
    precomputed = cfg.loss.reference == "precomputed" or not reference_needed(cfg.loss)
    params_in, opt_in, param_sh, opt_sh = (
        policy.params,
        policy.opt_state,
        policy.param_shardings,
        policy.opt_shardings,
    )
    head, head_b, joint = None, 0, joint_head(cfg)
    if joint:
        # joint PBA: the preference head's params and optimizer, and the persona the backbone reads
        # for it beside every pair, are part of the step
        head = _abstract_head(cfg, mesh, rules, dcfg, rep)
        head_b = shard_bytes(head.params) + shard_bytes(head.opt_state)
        params_in, opt_in = (
            {"policy": params_in, "head": head.params},
            {"policy": opt_in, "head": head.opt_state},
        )
        param_sh = {"policy": param_sh, "head": head.param_shardings}
        opt_sh = {"policy": opt_sh, "head": head.opt_shardings}
    batch_in = plan_batch(cfg, mesh, rules, collated=collated, response=response)
    jitted = jit_train_step(
        policy.codec,
        policy.tx,
        cfg,
        param_shardings=param_sh,
        opt_shardings=opt_sh,
        replicated=rep,
        head_codec=None if head is None else head.codec,
        head_tx=None if head is None else head.tx,
    )
    # at the precision `alignx train` traces the step with on the platform planned for
    platform = platform or str(mesh.devices.flat[0].platform)
    precision = hardware.matmul_precision(str(cfg.model.matmul_precision), str(dcfg.dtype), platform)
    with shd.use_mesh(mesh, rules), precision:
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
