"""Hugging Face folders <-> Decoder params: the HF tensor names (`param_maps`), config.json,
`load_pretrained`, and the `save_hf` / `save_peft` exports.

Loading streams one tensor at a time from the safetensors files (memory-mapped) straight into
each device's shard of the target sharding, so host memory never holds the whole model twice.
HF stores one tensor per layer; we stack them on the leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax import paths
from alignx_jax.errors import CheckpointError
from alignx_jax.model_card import EXPORT_MANIFEST
from alignx_jax.models.config import transformers_config_name
from alignx_jax.models.decoder import Decoder, DecoderConfig
from alignx_jax.models.safetensors_io import SafetensorsReader, write_safetensors
from alignx_jax.sharding import Rules, model_shardings

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


# ---- name mapping --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """One of our params <-> HF tensor(s). `layered`: HF has one tensor per layer (`{i}` in hf_name)."""

    path: tuple[str, ...]
    hf_name: str
    layered: bool
    to_ours: Any  # (hf_tensor, cfg) -> our per-layer array
    to_hf: Any  # (our per-layer array, cfg) -> hf tensor
    hf_shape: Any = None  # our per-layer shape -> the HF tensor's shape

    def expected_hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.hf_shape(ours)) if self.hf_shape else tuple(ours)


def _t(x, cfg):
    return np.asarray(x).T


def param_maps(cfg: DecoderConfig) -> list[ParamMap]:
    """Every param of a model of `cfg` and the HF tensor(s) it maps to."""
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # HF Linear weights are [out, in]; ours are [in, out...] split into heads
    q_in = lambda w, c: np.asarray(w).T.reshape(D, N, H)
    kv_in = lambda w, c: np.asarray(w).T.reshape(D, K, H)
    q_out = lambda w, c: np.asarray(w).reshape(D, N * H).T
    kv_out = lambda w, c: np.asarray(w).reshape(D, K * H).T
    o_in = lambda w, c: np.asarray(w).T.reshape(N, H, D)
    o_out = lambda w, c: np.asarray(w).reshape(N * H, D).T
    same = lambda w, c: np.asarray(w)
    qb_in = lambda b, c: np.asarray(b).reshape(N, H)
    kb_in = lambda b, c: np.asarray(b).reshape(K, H)
    flat = lambda b, c: np.asarray(b).reshape(-1)
    rev = lambda s: s[::-1]
    heads_in = lambda s: (s[1] * s[2], s[0])
    heads_out = lambda s: (s[2], s[0] * s[1])
    heads_bias = lambda s: (s[0] * s[1],)

    def layer(ours: str, theirs: str, to_ours=same, to_hf=same, hf_shape=None) -> ParamMap:
        """layers.OURS (dotted) <-> model.layers.{i}.THEIRS, one HF tensor per layer."""
        return ParamMap(
            ("layers", *ours.split(".")), f"model.layers.{{i}}.{theirs}", True, to_ours, to_hf, hf_shape
        )

    maps = [
        ParamMap(("embed_tokens", "embedding"), "model.embed_tokens.weight", False, same, same),
        ParamMap(("norm", "scale"), "model.norm.weight", False, same, same),
        layer("attn.q_proj.kernel", "self_attn.q_proj.weight", q_in, q_out, heads_in),
        layer("attn.k_proj.kernel", "self_attn.k_proj.weight", kv_in, kv_out, heads_in),
        layer("attn.v_proj.kernel", "self_attn.v_proj.weight", kv_in, kv_out, heads_in),
        layer("attn.o_proj.kernel", "self_attn.o_proj.weight", o_in, o_out, heads_out),
        *(
            layer(f"mlp.{x}.kernel", f"mlp.{x}.weight", _t, _t, rev)
            for x in ("gate_proj", "up_proj", "down_proj")
        ),
        layer("input_norm.scale", "input_layernorm.weight"),
    ]
    # our pre-MLP norm is HF's post_attention_layernorm, or Gemma 2's pre_feedforward_layernorm (its
    # post_attention_layernorm normalises the attention output: our attn_out_norm)
    norms = {"post_attention_norm": "post_attention_layernorm"}
    if cfg.sandwich_norms:
        norms = {
            "post_attention_norm": "pre_feedforward_layernorm",
            "attn_out_norm": "post_attention_layernorm",
            "mlp_out_norm": "post_feedforward_layernorm",
        }
    maps += [layer(f"{ours}.scale", f"{theirs}.weight") for ours, theirs in norms.items()]
    if cfg.qk_norm:
        maps += [layer(f"attn.{x}_norm.scale", f"self_attn.{x}_norm.weight") for x in ("q", "k")]
    if cfg.qkv_bias:
        maps += [
            layer("attn.q_proj.bias", "self_attn.q_proj.bias", qb_in, flat, heads_bias),
            layer("attn.k_proj.bias", "self_attn.k_proj.bias", kb_in, flat, heads_bias),
            layer("attn.v_proj.bias", "self_attn.v_proj.bias", kb_in, flat, heads_bias),
        ]
    if cfg.o_bias:
        maps.append(layer("attn.o_proj.bias", "self_attn.o_proj.bias"))
    if not cfg.tie_word_embeddings:
        maps.append(ParamMap(("lm_head", "kernel"), "lm_head.weight", False, _t, _t, rev))
    return maps


# ---- config / folders -----------------------------------------------------------------------------


def read_hf_config(folder: str) -> dict[str, Any]:
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: malformed config.json (not a JSON object)")
    return cfg


def load_decoder_config(folder: str, **run_options: Any) -> DecoderConfig:
    """The DecoderConfig of an HF folder; every CheckpointError names the folder (or its config.json) once."""
    hf_config = read_hf_config(folder)  # its errors name the folder or the file already
    try:
        return DecoderConfig.from_hf(hf_config, **run_options)
    except CheckpointError as e:  # from_hf sees a dict only
        raise CheckpointError(f"{folder}: {e}") from None


def decoder_run_options(dtype: str, compute_dtype: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    return {"param_dtype": str(jnp.dtype(dtype)), "dtype": str(jnp.dtype(compute_dtype or dtype)), **extra}


def abstract_decoder(cfg: DecoderConfig) -> Decoder:
    """A Decoder whose params are ShapeDtypeStructs (no memory), for shapes and shardings."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def place_array(shape: tuple[int, ...], dtype, sharding, fill) -> jax.Array:
    """Build a global array shard by shard: `fill(index)` returns the host data of one slice.
    Replicas share one host buffer, so host memory holds at most one copy of this param."""
    by_index: dict[Any, list] = {}
    for dev, idx in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop, s.step) for s in idx)
        by_index.setdefault(key, [idx, []])[1].append(dev)
    shards = []
    for idx, devs in by_index.values():
        host = np.asarray(fill(idx), dtype=dtype)
        shards += [jax.device_put(host, d) for d in devs]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def unread_tensors(path: str, cfg: DecoderConfig) -> list[str]:
    """The tensors of the HF folder `path` that `load_pretrained` does not read for `cfg`, sorted, less
    those transformers drops too (RoPE's stored inv_freq buffers; the output head of a tied model)."""
    read = set()
    for m in param_maps(cfg):
        read |= {m.hf_name.format(i=i) for i in range(cfg.num_hidden_layers)} if m.layered else {m.hf_name}
    benign = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    return sorted(
        n
        for n in SafetensorsReader(path).entries
        if n not in read and n not in benign and not n.endswith("rotary_emb.inv_freq")
    )


def load_pretrained(
    path: str,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    *,
    compute_dtype: str | None = None,
    adapter_seed: int = 0,
    **run_options: Any,
) -> Decoder:
    """A HF llama/mistral/qwen2/qwen3/gemma/gemma2 folder -> Decoder with params in `dtype` (placed per `mesh`/`rules`, else on
    the default device). `compute_dtype` defaults to `dtype`; `run_options` go to DecoderConfig
    (remat, scan_layers, attention_impl, lora_*). With `lora_rank` the adapters are new ones drawn from
    `adapter_seed` (`models.lora.new_adapters`): the folder holds the base model only."""
    path = os.fspath(path)
    cfg = load_decoder_config(path, **decoder_run_options(dtype, compute_dtype, run_options))
    reader = SafetensorsReader(path)
    _check_output_head(path, cfg, reader)
    abstract = abstract_decoder(cfg)
    state = nnx.state(abstract)
    flat = dict(nnx.to_flat_state(state))
    shardings = dict(nnx.to_flat_state(model_shardings(state, mesh, rules))) if mesh is not None else None
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
    pdtype = cfg.params_dtype
    for m in param_maps(cfg):
        var = flat[m.path]
        shape = tuple(var.get_value().shape)
        sharding = shardings[m.path].get_value() if shardings is not None else default
        L = cfg.num_hidden_layers
        names = [m.hf_name.format(i=i) for i in range(L)] if m.layered else [m.hf_name]
        for name in names:
            if name not in reader:
                raise CheckpointError(f"{path}: missing tensor {name!r}")
            if not jnp.issubdtype(reader.dtype(name), jnp.floating):  # an int8 weight cast would be garbage
                raise CheckpointError(
                    f"{path}: tensor {name!r} is {np.dtype(reader.dtype(name)).name}, not floating point "
                    "(a quantized checkpoint?)"
                )
            want = m.expected_hf_shape(shape[1:] if m.layered else shape)
            if tuple(reader.shape(name)) != tuple(want):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(reader.shape(name))}, expected {list(want)}"
                )

        def fill(idx, m=m, names=names):
            if not m.layered:
                return m.to_ours(reader.get(names[0]), cfg)[idx]
            layers = range(*idx[0].indices(len(names)))
            # one layer's HF tensor at a time, cut to this shard, stacked
            return np.stack(
                [np.asarray(m.to_ours(reader.get(names[i]), cfg)[idx[1:]], dtype=pdtype) for i in layers]
            )

        var.set_value(place_array(shape, pdtype, sharding, fill))
    _check_finite(path, {m: flat[m.path].get_value() for m in param_maps(cfg)})
    if cfg.lora_rank:
        fill_new_adapters(abstract, cfg, flat, shardings, default, adapter_seed)
    return nnx.merge(nnx.graphdef(abstract), state)


def _check_output_head(path: str, cfg: DecoderConfig, reader: SafetensorsReader) -> None:
    """A tied model's folder whose config.json omits tie_word_embeddings, for a family transformers unties
    by default: one line saying so (not 'missing tensor'); transformers would draw a random head."""
    if cfg.tie_word_embeddings or "lm_head.weight" in reader or "model.embed_tokens.weight" not in reader:
        return
    if "tie_word_embeddings" in read_hf_config(path):  # untied on purpose: the missing tensor is the error
        return
    raise CheckpointError(
        f"{path}: no 'lm_head.weight' and config.json does not set tie_word_embeddings, which "
        f"{transformers_config_name(cfg.model_type)} defaults to false (transformers would load a random "
        'output head); if the head is embed_tokens, add "tie_word_embeddings": true to config.json'
    )


def fill_new_adapters(
    abstract: Decoder, cfg: DecoderConfig, flat: dict, shardings, default, seed: int
) -> None:
    """model.lora on files that hold the base model only: set each adapter variable in `flat` (the
    abstract decoder's flat state) to a new adapter (`models.lora.new_adapters`, drawn from `seed`),
    placed per `shardings` (flat like it; None: on `default`)."""
    from alignx_jax.models import lora

    for p, host in lora.new_adapters(abstract.layers, cfg, jax.random.key(seed)).items():
        var = flat[p]
        sharding = shardings[p].get_value() if shardings is not None else default
        var.set_value(place_array(host.shape, var.get_value().dtype, sharding, lambda idx, h=host: h[idx]))


def _check_finite(folder: str, values: dict[ParamMap, jax.Array]) -> None:
    """CheckpointError naming the first HF tensor that holds NaN/inf (checked on the devices, per layer)."""
    maps = list(values)
    flags = jax.jit(
        lambda xs: [
            jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) if m.layered else jnp.all(jnp.isfinite(x))
            for m, x in zip(maps, xs)
        ]
    )
    for m, ok in zip(maps, jax.device_get(flags([values[m] for m in maps]))):
        ok = np.atleast_1d(np.asarray(ok))
        if not ok.all():
            name = m.hf_name.format(i=int(np.flatnonzero(~ok)[0])) if m.layered else m.hf_name
            raise CheckpointError(
                f"{folder}: tensor {name!r} holds NaN/inf values (a diverged or corrupt model)"
            )


# ---- export -----------------------------------------------------------------------------------------


# a size unit's bytes, upper-cased: B, KB..TB decimal, KiB..TiB 1024-based
_SIZE_UNITS = {"B": 1, **{f"{p}B": 10 ** (3 * k) for k, p in enumerate("KMGT", 1)}}
_SIZE_UNITS.update({f"{p}IB": 2 ** (10 * k) for k, p in enumerate("KMGT", 1)})


def parse_size(size: str | int) -> int:
    """`--shard-size` in bytes, read as transformers' `convert_file_size_to_int` reads `max_shard_size`:
    5GB is 5 * 10**9, 5GiB 5 * 2**30 (either case), and a decimal unit ending in a lowercase b is bits
    (5Gb, 5gb: 5 * 10**9 // 8). Beyond it: TB/TiB, B (bytes; b bits), no unit (bytes), fractions (1.5GB)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"shard size {size!r} is not like 5GB or 200MB")
    unit = m.group(2) or "B"
    exact = Fraction(m.group(1)) * _SIZE_UNITS[unit.upper()]  # exact: 1.1GB is 1_100_000_000 bytes
    bits = unit.endswith("b") and unit[-2:-1].upper() != "I"  # transformers: GiB/gib are bytes either way
    size_bytes = int(exact // 8 if bits else exact)
    if size_bytes < 1:  # every tensor would go in a file of its own
        raise CheckpointError(f"shard size {size!r} is under one byte (e.g. 5GB, 200MB)")
    return size_bytes


def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def copy_tokenizer(src: str | None, out_dir: str) -> list[str]:
    """Copy the tokenizer files of `src` into `out_dir`, removing tokenizer files of another tokenizer
    there (an earlier import's chat_template.jinja would override this one's); returns their names."""
    if not src or not os.path.isdir(src):
        return []
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in TOKENIZER_FILES:
        if name not in names and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
    return names


# beside EXPORT_MANIFEST (defined in model_card, which reads an export's base for an import) while an
# upload (`alignx export --out gs://...`) is under way: the manifest of the export being uploaded, its
# files also those of the export it replaces; a folder with it and without EXPORT_MANIFEST is an
# unfinished upload
EXPORT_UPLOAD = "alignx_export.upload.json"


def read_export_manifest(folder: str, name: str = EXPORT_MANIFEST) -> dict[str, Any] | None:
    """The manifest of an exported folder (local or a URL), None when it has none (or an unreadable one)."""
    try:
        if paths.is_url(folder):  # an upload (`alignx export --out gs://...`), a bucket model folder
            manifest = json.loads((paths.path(folder) / name).read_text(encoding="utf-8"))
        else:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                manifest = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("files"), list)
    return manifest if ok else None


def write_export_manifest(
    folder: str,
    files: list[str],
    *,
    source: str | None = None,
    step: int | None = None,
    prompt_format: str | None = None,
    base_model: str | None = None,
) -> None:
    """`prompt_format`: the run's `data.prompt_format` (what `alignx eval`/`generate` default to, via
    `export.trained_prompt_format`), recorded when known; `base_model`: the base the model card names, so an
    `alignx import` of the folder records it as its base (`model_card.exported_base`), not the folder."""
    manifest = {
        "format": "alignx-export",
        "version": 1,
        "source": source,
        "step": step,
        "files": sorted(set(files) | {EXPORT_MANIFEST}),
    }
    if prompt_format:
        manifest["prompt_format"] = prompt_format
    if base_model:
        manifest["base_model"] = base_model
    with open(os.path.join(folder, EXPORT_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def list_in_export_manifest(folder: str, names: list[str]) -> None:
    """Add `names` to the files the export manifest of the local `folder` lists (files written into the
    export after it, e.g. `alignx demo`'s preference head), so a re-export over it replaces them as its
    own; CheckpointError when `folder` holds no manifest."""
    manifest = read_export_manifest(folder)
    if manifest is None:
        raise CheckpointError(f"{folder}: no {EXPORT_MANIFEST} to list {', '.join(names)} in")
    manifest["files"] = sorted(set(manifest["files"]) | set(names))
    # whole or as it was: a half-written manifest would read as none
    paths.write_all(
        {os.path.join(folder, EXPORT_MANIFEST): json.dumps(manifest, indent=2, sort_keys=True).encode()}
    )


def save_hf(
    model: Decoder,
    out_dir: str,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    tokenizer_dir: str | None = None,
    source: str | None = None,
    step: int | None = None,
    base_dir: str | None = None,
) -> list[str]:
    """Write a transformers-loadable folder: config.json, generation_config.json, safetensors shards
    with model.safetensors.index.json, the tokenizer files from `tokenizer_dir`, and the manifest
    (`EXPORT_MANIFEST`: `source`, `step` and the files written). Returns the names written.

    generation_config.json is `base_dir`'s (the base model's) byte for byte when it has one, else the
    token ids only: sampling settings belong to the model card and `alignx generate`, not to it.
    config.json's `dtype` (and `torch_dtype`, when the base config carries that older name) is the
    dtype of the saved tensors.

    Only files a previous export listed in its manifest are ever removed (its shards of another count);
    `alignx export` writes into a fresh folder and renames it into place (`cli_export`)."""
    from alignx_jax.models import lora

    # LoRA: W + (alpha / r) A @ B, the plain model's tensors; kept in float32 for a given dtype, so the sum is
    # rounded once, to that dtype (and checked against float16's range), not first to the base's
    model = lora.merged(model, jnp.float32 if dtype else None)
    cfg = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    previous = read_export_manifest(out_dir)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else None
    items = _hf_tensors(cfg, flat, out_dtype)
    weight_map = _write_shards(out_dir, cfg, flat, _shards(items, parse_size(shard_size)))
    total = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for *_, shape, dt in items)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    saved = {str(dt) for *_, dt in items}  # the tensors' dtype, as written
    _write_hf_configs(out_dir, cfg, saved.pop() if len(saved) == 1 else str(out_dtype or "float32"), base_dir)
    written = [
        *weight_map.values(),
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        *copy_tokenizer(tokenizer_dir, out_dir),
    ]
    for name in set((previous or {}).get("files", [])) - set(written) - {EXPORT_MANIFEST}:
        stale = os.path.join(out_dir, os.path.basename(str(name)))  # an earlier export's own file (a shard)
        if os.path.isfile(stale):
            os.remove(stale)
    write_export_manifest(out_dir, written, source=source, step=step)
    return sorted(set(written)) + [EXPORT_MANIFEST]


# one HF tensor to write: (HF name, its map, layer index or None, HF shape, dtype written)
_HFTensor = tuple[str, ParamMap, int | None, tuple[int, ...], np.dtype]


def _hf_tensors(cfg: DecoderConfig, flat: dict, out_dtype: np.dtype | None) -> list[_HFTensor]:
    """Every HF tensor of the model, sorted by name (as transformers writes them)."""
    items: list[_HFTensor] = []
    for m in param_maps(cfg):
        arr = flat[m.path].get_value()
        dt = out_dtype or np.dtype(arr.dtype)
        hf_shape = m.expected_hf_shape(arr.shape[1:] if m.layered else arr.shape)
        for i in range(cfg.num_hidden_layers) if m.layered else [None]:
            items.append((m.hf_name.format(i=i) if m.layered else m.hf_name, m, i, hf_shape, dt))
    return sorted(items, key=lambda t: t[0])


def _shards(items: list[_HFTensor], limit: int) -> list[list[_HFTensor]]:
    """`items` cut, in order, into shards of at most `limit` bytes (a larger tensor alone in its own)."""
    shards: list[list[_HFTensor]] = [[]]
    used = 0
    for it in items:
        nbytes = int(np.prod(it[3], dtype=np.int64)) * it[4].itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(it)
        used += nbytes
    return shards


def _cast_finite(x: np.ndarray, dt: np.dtype, name: str) -> np.ndarray:
    """`x` as `dt`; a value the cast turns into inf (float16 tops out at 65504) is an error, not a saved inf."""
    with np.errstate(over="ignore"):
        out = x.astype(dt)
    if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
        raise CheckpointError(
            f"{name}: holds values too large for {np.dtype(dt).name} (|x| up to {float(np.max(np.abs(x))):.4g}); "
            "export with --dtype bfloat16 or float32"
        )
    return out


def _write_shards(
    out_dir: str, cfg: DecoderConfig, flat: dict, shards: list[list[_HFTensor]]
) -> dict[str, str]:
    """The safetensors files, one param on the host at a time; returns the index's weight_map."""
    cache: dict[tuple[str, ...], np.ndarray] = {}

    def produce(shard):
        for _name, m, i, _, dt in shard:
            if m.path not in cache:  # one whole param on the host at a time
                cache.clear()
                cache[m.path] = _host(flat[m.path].get_value())
            src = cache[m.path] if i is None else cache[m.path][i]
            yield _cast_finite(np.asarray(m.to_hf(src, cfg)), dt, _name)

    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(
            os.path.join(out_dir, fname), [(n, s, d) for n, _, _, s, d in shard], produce(shard)
        )
        weight_map.update((name, fname) for name, *_ in shard)
    return weight_map


def _write_hf_configs(out_dir: str, cfg: DecoderConfig, saved_dtype: str, base_dir: str | None) -> None:
    """config.json (its `dtype`, and `torch_dtype` when the base config carries that older name, is the
    saved tensors' dtype) and generation_config.json (`base_dir`'s byte for byte, else the token ids)."""
    hf_cfg = cfg.to_hf()
    hf_cfg["dtype"] = saved_dtype
    if "torch_dtype" in hf_cfg:  # transformers < 4.56's name, kept from the base config: the same value
        hf_cfg["torch_dtype"] = saved_dtype
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    base_gen = os.path.join(base_dir, "generation_config.json") if base_dir else ""
    if base_gen and os.path.isfile(base_gen):
        shutil.copyfile(base_gen, os.path.join(out_dir, "generation_config.json"))
        return
    write_generation_config(out_dir, cfg.bos_token_id, hf_cfg["eos_token_id"], cfg.pad_token_id)


def write_generation_config(
    out_dir: str, bos_id: int | None, eos: int | list[int] | None, pad_id: int | None
) -> None:
    """`out_dir/generation_config.json` with the token ids only: `eos` an id, or a list (eos first, then the
    end-of-turn ids transformers' `generate` also stops at)."""
    gen = {"bos_token_id": bos_id, "eos_token_id": eos, "pad_token_id": pad_id}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2, sort_keys=True)


PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def save_peft(
    model: Decoder,
    out_dir: str,
    *,
    base_model_name_or_path: str,
    revision: str | None = None,
    dtype: str | None = None,
) -> list[str]:
    """Write a LoRA model's adapters as a PEFT adapter folder (`alignx export --peft`):
    adapter_config.json and adapter_model.safetensors with PEFT's names,
    `base_model.model.<HF module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`.

    `peft.PeftModel.from_pretrained(<the base model in transformers>, out_dir)` computes the merged
    export (`save_hf`): PEFT's `lora_alpha / r` is our multiplier. `revision`: the base's hub revision
    (PEFT's `revision`, which `AutoPeftModelForCausalLM` loads the base at). Returns the names written."""
    cfg = model.cfg
    if not cfg.lora_rank:
        raise CheckpointError("--peft: the checkpoint has no LoRA adapters (train with model.lora.rank > 0)")
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(np.float32)
    scale = float(model.lora_scale)  # 1.0 for a loaded model; anything else is folded into B
    rank = int(cfg.lora_rank)
    tensors: dict[str, np.ndarray] = {}
    targets = []
    for m in param_maps(cfg):
        if m.path[-1] != "kernel" or not m.layered or (*m.path[:-1], "lora_a") not in flat:
            continue
        a = _host(flat[(*m.path[:-1], "lora_a")].get_value())  # [L, *in, r]
        b = _host(flat[(*m.path[:-1], "lora_b")].get_value())  # [L, r, *out]
        ins, outs = int(np.prod(a.shape[1:-1])), int(np.prod(b.shape[2:]))
        # PEFT's factors multiply to HF's [out, in] weight: valid when the map is W.reshape(in, out).T
        probe = np.arange(ins * outs, dtype=np.float64).reshape(*a.shape[1:-1], *b.shape[2:])
        if not np.array_equal(np.asarray(m.to_hf(probe, cfg)), probe.reshape(ins, outs).T):
            raise CheckpointError(
                f"--peft: {m.hf_name} is not a plain linear map of our kernel; export merged"
            )
        module = "base_model.model." + m.hf_name.removesuffix(".weight")
        targets.append(m.path[-2])
        for i in range(cfg.num_hidden_layers):
            name = module.format(i=i)
            tensors[f"{name}.lora_A.weight"] = _cast_finite(
                a[i].reshape(ins, rank).T, out_dtype, f"{name}.lora_A"
            )
            tensors[f"{name}.lora_B.weight"] = _cast_finite(
                scale * b[i].reshape(rank, outs).T, out_dtype, f"{name}.lora_B"
            )
    names = sorted(tensors)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(
        os.path.join(out_dir, PEFT_WEIGHTS_FILE),
        [(n, tensors[n].shape, tensors[n].dtype) for n in names],
        (tensors[n] for n in names),
    )
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": rank,
        "lora_alpha": float(cfg.lora_alpha or 2 * rank),  # scaling lora_alpha / r = our multiplier
        "lora_dropout": 0.0,
        "target_modules": sorted(set(targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with open(os.path.join(out_dir, PEFT_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(peft_cfg, f, indent=2, sort_keys=True)
    return [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
