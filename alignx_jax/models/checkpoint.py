"""Orbax model checkpoints: a model checkpoint folder (HF config.json + orbax params/) or a training
workdir's step, resolved (`resolve_checkpoint`), saved (`save_checkpoint`) and restored
(`load_checkpoint`, `load_checkpoint_head`) with their saved checksums verified."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alignx_jax import paths
from alignx_jax.errors import CheckpointError
from alignx_jax.models.decoder import Decoder
from alignx_jax.models.hf import (
    abstract_decoder,
    copy_tokenizer,
    decoder_run_options,
    fill_new_adapters,
    load_decoder_config,
    load_pretrained,
    read_hf_config,
)
from alignx_jax.models.safetensors_io import SafetensorsReader
from alignx_jax.sharding import Rules, model_shardings


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a model's pieces live: HF config (+ tokenizer) folder and the orbax params folder.

    `head_dir`: the PBA preference head, when the checkpoint has one: for a training workdir the
    orbax `W/checkpoints/<step>/head` item (its HeadConfig is in that step's meta), for a model
    checkpoint the folder holding `preference_head.safetensors` + `preference_head_config.json`.
    """

    config_dir: str
    params_dir: str
    tokenizer_dir: str | None
    step: int | None = None
    head_dir: str | None = None


def has_tokenizer(folder: str) -> bool:
    return any(
        paths.path(os.path.join(folder, n)).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    )


def _refuse_step_folder(path: str) -> None:
    """A CheckpointError naming the workdir and step where `path` is a training workdir's W/checkpoints/N."""
    step_dir = path.rstrip("/")
    ckpts = os.path.dirname(step_dir)
    workdir = os.path.dirname(ckpts)
    name = os.path.basename(step_dir)
    # a step folder holds params/ but its config and tokenizer are W/reference's
    if (
        os.path.basename(ckpts) == "checkpoints"
        and name.isdigit()
        and paths.path(workdir).joinpath("reference").is_dir()
    ):
        raise CheckpointError(
            f"{path}: a saved step of the training workdir {workdir}, not a checkpoint on its own; name the "
            f"workdir (`alignx export --checkpoint {workdir} --step {int(name)}`)"
        )


def is_checkpoint_layout(path: str) -> bool:
    """Whether the local model folder `path` is this project's (a model checkpoint's params/ or a training
    workdir's checkpoints/), which `load_checkpoint` reads; any other model folder is a HF one
    (`hf.load_pretrained`)."""
    return os.path.isdir(os.path.join(path, "params")) or os.path.isdir(os.path.join(path, "checkpoints"))


def check_model_folder(path: str) -> dict[str, Any]:
    """The CheckpointError its loader gives the local model folder `path` when it holds no model (no
    config.json, no weights), without loading it; else the model's config.json (the architecture)."""
    if is_checkpoint_layout(path):
        return read_hf_config(resolve_checkpoint(path).config_dir)
    hf_config = read_hf_config(path)
    SafetensorsReader(path)  # reads only the headers
    return hf_config


def resolve_checkpoint(path: str, step: int | None = None) -> ResolvedCheckpoint:
    """A model checkpoint `DIR` (config.json + params/) or a training workdir `W`
    (W/checkpoints/<step>/params, W/reference for config and tokenizer; latest step by default)."""
    path = paths.absolute(path) if paths.is_url(path) else os.fspath(path)  # a gs:// workdir stays a URL
    isdir = lambda p: paths.path(p).is_dir()
    if not isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    ckpts = os.path.join(path, "checkpoints")
    if isdir(ckpts):
        steps = sorted(int(p.name) for p in paths.path(ckpts).iterdir() if p.name.isdigit())
        if not steps:
            raise CheckpointError(f"{ckpts}: no saved steps")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{ckpts}: no step {step} (have {', '.join(map(str, steps))})")
        ref = os.path.join(path, "reference")
        if not paths.path(os.path.join(ref, "config.json")).is_file():
            raise CheckpointError(f"{path}: training workdir without reference/config.json")
        params = os.path.join(ckpts, str(step), "params")
        if not isdir(params):
            raise CheckpointError(f"{os.path.join(ckpts, str(step))}: no params/")
        head = os.path.join(ckpts, str(step), "head")
        return ResolvedCheckpoint(
            ref, params, ref if has_tokenizer(ref) else None, step, head if isdir(head) else None
        )
    if step is not None:
        raise CheckpointError(f"{path}: --step applies to training workdirs only (no checkpoints/ here)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        _refuse_step_folder(path)
        raise CheckpointError(f"{path}: no config.json (not a model checkpoint or training workdir)")
    if not os.path.isdir(os.path.join(path, "params")):
        raise CheckpointError(
            f"{path}: no params/ (not a model checkpoint; use `alignx import` for HF folders)"
        )
    from alignx_jax.models.preference_head import has_head

    return ResolvedCheckpoint(
        path,
        os.path.join(path, "params"),
        path if has_tokenizer(path) else None,
        head_dir=path if has_head(path) else None,
    )


def save_checkpoint(model: Decoder, out_dir: str, *, tokenizer_dir: str | None = None) -> None:
    """`out_dir/config.json` (HF), tokenizer files, `out_dir/params/` (orbax, pure dict of params)."""
    import orbax.checkpoint as ocp

    from alignx_jax.models import lora

    model = lora.merged(model)  # a model checkpoint holds the plain model (adapters folded in)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.cfg.to_hf(), f, indent=2, sort_keys=True)
    copy_tokenizer(tokenizer_dir, out_dir)
    from alignx_jax.checkpointing import digests

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sums, bad = digests(params)
    if bad:
        raise CheckpointError(f"{out_dir}: not saved: {bad[0]} holds NaN/inf values")
    sidecar = os.path.join(out_dir, CHECKSUMS_FILE)
    if os.path.exists(sidecar):  # dropped first: a rewrite cut half-way is never checked against old sums
        os.remove(sidecar)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "params"), params, force=True)
        ckptr.wait_until_finished()
    paths.write_all({sidecar: json.dumps(sums, indent=1, sort_keys=True).encode("utf-8")})


CHECKSUMS_FILE = "params.checksums.json"  # beside a model checkpoint's params/: `checkpointing.digests`


def _saved_param_checksums(res: ResolvedCheckpoint) -> dict[str, str] | None:
    """The digests saved with a checkpoint's params (training step meta, or a model checkpoint's sidecar)."""
    from alignx_jax.checkpointing import saved_checksums

    if res.step is not None:
        return saved_checksums(
            os.path.dirname(os.path.dirname(paths.absolute(res.params_dir))), res.step, "params"
        )
    path = os.path.join(os.path.dirname(paths.absolute(res.params_dir)), CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def _params_metadata(params_dir: str) -> tuple[Any, set]:
    """A params folder's orbax metadata tree and the dtypes of its arrays (no array is read)."""
    import orbax.checkpoint as ocp

    # before orbax's first read: its log filters (a training step's params folder is not "missing" metadata)
    from alignx_jax.checkpointing import MetadataFailure, first_line

    # orbax reads the tree without it as an empty one: no stored dtype, so no checksum would be checked
    if not paths.path(os.path.join(params_dir, "_METADATA")).is_file():
        raise CheckpointError(f"{params_dir}/_METADATA: not found (a damaged checkpoint)")
    quiet = MetadataFailure()
    logging.getLogger("absl").addFilter(quiet)  # orbax logs its failure as a warning and goes on
    try:
        meta = ocp.StandardCheckpointer().metadata(params_dir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        stored = {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}
    except Exception as e:  # a half-written or foreign folder
        raise CheckpointError(
            f"{params_dir}: unreadable orbax checkpoint ({type(e).__name__}: {first_line(e)})"
        ) from None
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    if not stored:
        raise CheckpointError(f"{params_dir}: unreadable orbax checkpoint (orbax read no array's metadata)")
    return tree, stored


def _default_dtype(stored: set) -> str:
    """What a checkpoint loads in when no dtype is given: the stored one, float32 when it holds several."""
    return str(next(iter(stored))) if len(stored) == 1 else "float32"


def default_dtype(path: str, step: int | None = None) -> str:
    """The dtype `load_checkpoint(path, step)` loads in when given none, read from the metadata alone."""
    res = resolve_checkpoint(path, step)
    return _default_dtype(_params_metadata(paths.absolute(res.params_dir))[1])


def has_lora_adapters(res: ResolvedCheckpoint) -> bool:
    """Whether the resolved checkpoint's params hold LoRA adapters, read from the metadata alone."""
    from alignx_jax.models import lora

    return lora.infer_options(_params_metadata(paths.absolute(res.params_dir))[0]) is not None


def load_checkpoint(
    path: str,
    step: int | None = None,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    compute_dtype: str | None = None,
    adapter_seed: int = 0,
    **run_options: Any,
) -> Decoder:
    """A model checkpoint or training workdir -> Decoder (params restored straight to their sharding).
    `dtype` None keeps the stored param dtype. A `lora_rank` run option on a checkpoint without adapters
    gives new ones drawn from `adapter_seed` (`models.lora.new_adapters`)."""
    import orbax.checkpoint as ocp

    # before orbax's first read: its log filters (a training step's params folder is not "missing" metadata)
    from alignx_jax.checkpointing import (
        cast_like,
        collect_orphans,
        first_line,
        in_stored_dtypes,
        stored_dtypes,
        verify_tree,
    )

    res = resolve_checkpoint(path, step)
    params_dir = paths.absolute(res.params_dir)  # orbax reads gs:// itself
    tree, stored = _params_metadata(params_dir)
    if dtype is None:
        dtype = _default_dtype(stored)
    from alignx_jax.models import lora

    lora_opts = lora.infer_options(tree)
    base = None
    if lora_opts is not None:  # a model.lora run: its rank/targets from the tree, alpha from W/config.json
        saved = {}
        if res.step is not None:
            from alignx_jax.workdir import read_saved_config

            saved = read_saved_config(os.path.dirname(res.config_dir)) or {}
        lora_opts["lora_alpha"] = float(((saved.get("model") or {}).get("lora") or {}).get("alpha", 0.0))
        run_options = {**lora_opts, **run_options}
        if isinstance(tree, dict) and "embed_tokens" not in tree:  # adapters only: the base is W/reference
            base = load_pretrained(
                res.config_dir, dtype, mesh, rules, compute_dtype=compute_dtype, **run_options
            )
    cfg = load_decoder_config(res.config_dir, **decoder_run_options(dtype, compute_dtype, run_options))
    abstract = abstract_decoder(cfg)
    state = nnx.state(abstract, nnx.Param)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
    shard_tree = model_shardings(state, mesh, rules) if mesh is not None else None
    target = nnx.to_pure_dict(state)
    # the stored part: the adapters alone (base from W/reference), the base alone (new adapters), or all
    part = 0 if base is not None else 1 if cfg.lora_rank and lora_opts is None else None
    if part is not None:
        target = lora.split(target)[part]
    shard_pure = (
        nnx.to_pure_dict(shard_tree) if shard_tree is not None else jax.tree.map(lambda _: default, target)
    )
    if part is not None and shard_tree is not None:
        shard_pure = lora.split(shard_pure)[part]
    # restore each array in its stored dtype (orbax casts otherwise unsafely, and the saved digests are of
    # the stored bits), cast after it is verified
    abstract_target = in_stored_dtypes(
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shard_pure),
        stored_dtypes(tree),
    )
    why = None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, abstract_target)
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e)}"
    if why is not None:
        collect_orphans()
        raise CheckpointError(f"{params_dir}: cannot restore params ({why})")
    verify_tree(restored, _saved_param_checksums(res), params_dir)
    cast = cast_like(restored, target)
    if cast is not restored:  # a weight float16 cannot hold is an inf now: named, as a saved one is
        verify_tree(cast, None, params_dir)
    restored = cast
    if base is not None:
        restored = lora.join(restored, lora.split(nnx.to_pure_dict(nnx.state(base, nnx.Param)))[1])
    elif part == 1:  # the restore below sets the base only
        shard_flat = dict(nnx.to_flat_state(shard_tree)) if shard_tree is not None else None
        fill_new_adapters(abstract, cfg, dict(nnx.to_flat_state(state)), shard_flat, default, adapter_seed)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(nnx.graphdef(abstract), state)
    return model


def load_checkpoint_head(res: ResolvedCheckpoint):
    """The preference head of a resolved checkpoint as (PreferenceHead, HeadConfig), or None."""
    from alignx_jax.models import preference_head as ph

    if res.head_dir is None:
        return None
    if res.step is None:  # a model checkpoint keeps the exported files as they are
        return ph.load_head(res.head_dir)
    import orbax.checkpoint as ocp

    from alignx_jax.checkpointing import read_meta

    ckpts = os.path.dirname(os.path.dirname(paths.absolute(res.head_dir)))  # a gs:// run stays a URL
    meta = read_meta(ckpts, res.step)
    if "head_config" not in meta:
        raise CheckpointError(f"{ckpts}/{res.step}: a head/ item but no head_config in its meta")
    fields = {f.name for f in dataclasses.fields(ph.HeadConfig)}
    hcfg = ph.HeadConfig(**{k: v for k, v in meta["head_config"].items() if k in fields})
    head = ph.PreferenceHead(hcfg, rngs=nnx.Rngs(0))
    state = nnx.state(head, nnx.Param)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=default), nnx.to_pure_dict(state)
    )
    from alignx_jax.checkpointing import collect_orphans, first_line, saved_checksums, verify_tree

    why = None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(paths.absolute(res.head_dir), target)  # orbax reads gs:// itself
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e)}"
    if why is not None:
        collect_orphans()
        raise CheckpointError(f"{res.head_dir}: cannot restore the preference head ({why})")
    verify_tree(restored, saved_checksums(ckpts, res.step, "head"), res.head_dir)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(head, state)
    return head, hcfg


def check_import_target(out: str, overwrite: bool) -> None:
    """`alignx import --out`: absent, empty or holding only what an import writes (an earlier import,
    or one cut short); any other folder only with `overwrite` (the files an import does not write are kept).
    An import replaces config.json, the tokenizer files and generation_config.json: in a folder of the
    user's (an HF model folder, say) those are theirs."""
    from alignx_jax.model_card import BASE_INFO
    from alignx_jax.models import preference_head as ph
    from alignx_jax.models.hf import TOKENIZER_FILES

    if not out:
        raise CheckpointError("--out: an empty path; name the checkpoint folder")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out}: is a file, not a folder")
    if not os.path.lexists(out):  # a folder that cannot be made fails now, not after the model is read
        try:
            paths.check_writable(out)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise CheckpointError(f"--out {out}: cannot be written ({e.strerror or e}{where})") from None
    if overwrite or not os.path.isdir(out):
        return
    written = {"config.json", "generation_config.json", BASE_INFO, ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE}
    written |= set(TOKENIZER_FILES)
    # params/, its checksums and orbax's temporary folders
    names = os.listdir(out)
    foreign = sorted(n for n in names if n not in written and not n.startswith("params"))
    if names and not any(n == BASE_INFO or n.startswith("params") for n in names):
        foreign = sorted(names)  # an import writes BASE_INFO first: without it, not even a cut-short import
    if foreign:
        raise CheckpointError(
            f"--out {out}: not empty and not an alignx checkpoint (holds {paths.listing(foreign)}); pass "
            "--overwrite to write "
            "into it (its other files are kept), or choose an empty folder"
        )


def remove_head_files(out_dir: str) -> None:
    from alignx_jax.models import preference_head as ph

    for name in (ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE):  # a stale head would pair with the wrong policy
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
