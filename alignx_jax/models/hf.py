"""Hugging Face safetensors <-> Decoder params, orbax model checkpoints, `alignx import/export`.

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
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from alignx_jax import paths
from alignx_jax.errors import CheckpointError
from alignx_jax.models.decoder import Decoder, DecoderConfig
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

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# ---- safetensors, read lazily and written as a stream ------------------------------------------


class SafetensorsReader:
    """Every tensor of a HF folder (single file or sharded index), memory-mapped on demand."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files")
        self.entries: dict[str, tuple[str, int, Any, tuple[int, ...]]] = {}
        for name in files:
            self._read_header(os.path.join(folder, name))

    def _read_header(self, path: str) -> None:
        """Every tensor's (file, offset, dtype, shape), checked against the file's size: a truncated or
        malformed file is a CheckpointError naming it here, not a failed memory map later."""
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n < 2 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        base = 8 + n
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = (
                    meta["dtype"],
                    tuple(int(d) for d in meta["shape"]),
                    meta["data_offsets"],
                )
            except (TypeError, KeyError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry") from None
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype]).itemsize
            if end - start != nbytes or start < 0:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has data_offsets [{start}, {end}] for {nbytes} bytes "
                    f"of {dtype} {list(shape)}"
                )
            if base + end > size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {key!r} ends at byte {base + end}, the file has "
                    f"{size} (an interrupted download or copy?)"
                )
            self.entries[key] = (path, base + start, _ST_DTYPES[dtype], shape)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][3]

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
        path, offset, dtype, shape = self.entries[name]
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _write_safetensors(
    path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]], produce: Iterator[np.ndarray]
) -> None:
    """Write a safetensors file whose header is known up front; tensor data comes one at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _ST_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format asks for an 8-byte aligned data section
    try:
        with open(path, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for (name, shape, dtype), arr in zip(tensors, produce):
                arr = np.ascontiguousarray(arr, dtype=dtype)
                assert arr.shape == tuple(shape), (name, arr.shape, shape)
                f.write(arr.tobytes())
    except OSError as e:  # a full disk: name the file (a failed write() carries no file name)
        raise OSError(e.errno, e.strerror, e.filename or path) from None


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
    L = "model.layers.{i}."
    rev = lambda s: s[::-1]
    heads_in = lambda s: (s[1] * s[2], s[0])
    heads_out = lambda s: (s[2], s[0] * s[1])
    heads_bias = lambda s: (s[0] * s[1],)
    maps = [
        ParamMap(("embed_tokens", "embedding"), "model.embed_tokens.weight", False, same, same),
        ParamMap(("norm", "scale"), "model.norm.weight", False, same, same),
        ParamMap(
            ("layers", "attn", "q_proj", "kernel"), L + "self_attn.q_proj.weight", True, q_in, q_out, heads_in
        ),
        ParamMap(
            ("layers", "attn", "k_proj", "kernel"),
            L + "self_attn.k_proj.weight",
            True,
            kv_in,
            kv_out,
            heads_in,
        ),
        ParamMap(
            ("layers", "attn", "v_proj", "kernel"),
            L + "self_attn.v_proj.weight",
            True,
            kv_in,
            kv_out,
            heads_in,
        ),
        ParamMap(
            ("layers", "attn", "o_proj", "kernel"),
            L + "self_attn.o_proj.weight",
            True,
            o_in,
            o_out,
            heads_out,
        ),
        ParamMap(("layers", "mlp", "gate_proj", "kernel"), L + "mlp.gate_proj.weight", True, _t, _t, rev),
        ParamMap(("layers", "mlp", "up_proj", "kernel"), L + "mlp.up_proj.weight", True, _t, _t, rev),
        ParamMap(("layers", "mlp", "down_proj", "kernel"), L + "mlp.down_proj.weight", True, _t, _t, rev),
        ParamMap(("layers", "input_norm", "scale"), L + "input_layernorm.weight", True, same, same),
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
    maps += [
        ParamMap(("layers", ours, "scale"), L + f"{theirs}.weight", True, same, same)
        for ours, theirs in norms.items()
    ]
    if cfg.qk_norm:
        maps += [
            ParamMap(
                ("layers", "attn", f"{x}_norm", "scale"), L + f"self_attn.{x}_norm.weight", True, same, same
            )
            for x in ("q", "k")
        ]
    if cfg.qkv_bias:
        maps += [
            ParamMap(
                ("layers", "attn", "q_proj", "bias"),
                L + "self_attn.q_proj.bias",
                True,
                qb_in,
                flat,
                heads_bias,
            ),
            ParamMap(
                ("layers", "attn", "k_proj", "bias"),
                L + "self_attn.k_proj.bias",
                True,
                kb_in,
                flat,
                heads_bias,
            ),
            ParamMap(
                ("layers", "attn", "v_proj", "bias"),
                L + "self_attn.v_proj.bias",
                True,
                kb_in,
                flat,
                heads_bias,
            ),
        ]
    if cfg.o_bias:
        maps.append(
            ParamMap(("layers", "attn", "o_proj", "bias"), L + "self_attn.o_proj.bias", True, same, same)
        )
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
    try:
        return DecoderConfig.from_hf(read_hf_config(folder), **run_options)
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(folder) else f"{folder}: {msg}") from None


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


def load_pretrained(
    path: str,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    *,
    compute_dtype: str | None = None,
    **run_options: Any,
) -> Decoder:
    """A HF llama/mistral/qwen2/qwen3/gemma2 folder -> Decoder with params in `dtype` (placed per `mesh`/`rules`, else on
    the default device). `compute_dtype` defaults to `dtype`; `run_options` go to DecoderConfig
    (remat, scan_layers, attention_impl)."""
    path = os.fspath(path)
    cfg = load_decoder_config(path, **decoder_run_options(dtype, compute_dtype, run_options))
    reader = SafetensorsReader(path)
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
    return nnx.merge(nnx.graphdef(abstract), state)


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


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"shard size {size!r} is not like 5GB or 200MB")
    unit = (m.group(2) or "B").upper().replace("IB", "B")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def copy_tokenizer(src: str | None, out_dir: str) -> list[str]:
    """Copy the tokenizer files of `src` into `out_dir`; returns their names."""
    if not src or not os.path.isdir(src):
        return []
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
    return names


EXPORT_MANIFEST = "alignx_export.json"  # in every exported folder: what wrote it and the files it wrote


def read_export_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of an exported folder, None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, EXPORT_MANIFEST), encoding="utf-8") as f:
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
) -> None:
    """`prompt_format`: the run's `data.prompt_format` (what `alignx eval`/`generate` default to, via
    `evaluate.trained_prompt_format`), recorded when known."""
    manifest = {
        "format": "alignx-export",
        "version": 1,
        "source": source,
        "step": step,
        "files": sorted(set(files) | {EXPORT_MANIFEST}),
    }
    if prompt_format:
        manifest["prompt_format"] = prompt_format
    with open(os.path.join(folder, EXPORT_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


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

    model = lora.merged(model)  # LoRA: W + (alpha / r) A @ B, the plain model's tensors
    cfg = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    previous = read_export_manifest(out_dir)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else None
    # the list of HF tensors, in HF order (per layer, then globals)
    items: list[tuple[str, ParamMap, int | None, tuple[int, ...], np.dtype]] = []
    for m in param_maps(cfg):
        arr = flat[m.path].get_value()
        dt = out_dtype or np.dtype(arr.dtype)
        per_layer = arr.shape[1:] if m.layered else arr.shape
        hf_shape = m.expected_hf_shape(per_layer)
        for i in range(cfg.num_hidden_layers) if m.layered else [None]:
            items.append((m.hf_name.format(i=i) if m.layered else m.hf_name, m, i, hf_shape, dt))
    order = {n: k for k, n in enumerate(sorted(n for n, *_ in items))}
    items.sort(key=lambda t: order[t[0]])
    limit = parse_size(shard_size)
    shards: list[list] = [[]]
    used = 0
    for it in items:
        nbytes = int(np.prod(it[3], dtype=np.int64)) * it[4].itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(it)
        used += nbytes

    cache: dict[tuple[str, ...], np.ndarray] = {}

    def produce(shard):
        for _name, m, i, _, dt in shard:
            if m.path not in cache:  # one whole param on the host at a time
                cache.clear()
                cache[m.path] = _host(flat[m.path].get_value())
            src = cache[m.path] if i is None else cache[m.path][i]
            yield np.asarray(m.to_hf(src, cfg)).astype(dt)

    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(
            os.path.join(out_dir, fname), [(n, s, d) for n, _, _, s, d in shard], produce(shard)
        )
        for name, *_rest in shard:
            weight_map[name] = fname
        total += sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for *_, s, d in shard)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    hf_cfg = cfg.to_hf()
    saved = {str(dt) for *_, dt in items}  # the tensors' dtype, as written
    hf_cfg["dtype"] = saved.pop() if len(saved) == 1 else str(out_dtype or "float32")
    if "torch_dtype" in hf_cfg:  # transformers < 4.56's name, kept from the base config: the same value
        hf_cfg["torch_dtype"] = hf_cfg["dtype"]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    base_gen = os.path.join(base_dir, "generation_config.json") if base_dir else ""
    if base_gen and os.path.isfile(base_gen):
        shutil.copyfile(base_gen, os.path.join(out_dir, "generation_config.json"))
    else:
        gen = {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": hf_cfg["eos_token_id"],
            "pad_token_id": cfg.pad_token_id,
        }
        with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2, sort_keys=True)
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


PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def save_peft(
    model: Decoder, out_dir: str, *, base_model_name_or_path: str, dtype: str | None = None
) -> list[str]:
    """Write a LoRA model's adapters as a PEFT adapter folder (`alignx export --peft`):
    adapter_config.json and adapter_model.safetensors with PEFT's names,
    `base_model.model.<HF module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`.

    `peft.PeftModel.from_pretrained(<the base model in transformers>, out_dir)` computes the merged
    export (`save_hf`): PEFT's `lora_alpha / r` is our multiplier. Returns the names written."""
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
            tensors[f"{name}.lora_A.weight"] = a[i].reshape(ins, rank).T.astype(out_dtype)
            tensors[f"{name}.lora_B.weight"] = (scale * b[i].reshape(rank, outs).T).astype(out_dtype)
    names = sorted(tensors)
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(
        os.path.join(out_dir, PEFT_WEIGHTS_FILE),
        [(n, tensors[n].shape, tensors[n].dtype) for n in names],
        (tensors[n] for n in names),
    )
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
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


# ---- orbax model checkpoints ------------------------------------------------------------------------


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


def _has_tokenizer(folder: str) -> bool:
    return any(
        paths.path(os.path.join(folder, n)).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    )


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
            ref, params, ref if _has_tokenizer(ref) else None, step, head if isdir(head) else None
        )
    if step is not None:
        raise CheckpointError(f"{path}: --step applies to training workdirs only (no checkpoints/ here)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json (not a model checkpoint or training workdir)")
    if not os.path.isdir(os.path.join(path, "params")):
        raise CheckpointError(
            f"{path}: no params/ (not a model checkpoint; use `alignx import` for HF folders)"
        )
    from alignx_jax.models.preference_head import has_head

    return ResolvedCheckpoint(
        path,
        os.path.join(path, "params"),
        path if _has_tokenizer(path) else None,
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
    with open(sidecar + ".tmp", "w", encoding="utf-8") as f:
        json.dump(sums, f, indent=1, sort_keys=True)
    os.replace(sidecar + ".tmp", sidecar)


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


def load_checkpoint(
    path: str,
    step: int | None = None,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    compute_dtype: str | None = None,
    **run_options: Any,
) -> Decoder:
    """A model checkpoint or training workdir -> Decoder (params restored straight to their sharding).
    `dtype` None keeps the stored param dtype."""
    import orbax.checkpoint as ocp

    res = resolve_checkpoint(path, step)
    params_dir = paths.absolute(res.params_dir)  # orbax reads gs:// itself
    try:
        meta = ocp.StandardCheckpointer().metadata(params_dir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        stored = {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}
    except Exception as e:  # a half-written or foreign folder
        from alignx_jax.checkpointing import first_line

        raise CheckpointError(
            f"{params_dir}: unreadable orbax checkpoint ({type(e).__name__}: {first_line(e)})"
        ) from None
    if dtype is None:
        dtype = str(next(iter(stored))) if len(stored) == 1 else "float32"
    same_bits = stored == {jnp.dtype(dtype)}  # the saved digests describe the stored dtype's bits
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
    if base is not None:
        target = lora.split(target)[0]
    shard_pure = (
        nnx.to_pure_dict(shard_tree) if shard_tree is not None else jax.tree.map(lambda _: default, target)
    )
    if base is not None and shard_tree is not None:
        shard_pure = lora.split(shard_pure)[0]
    # restore in the stored dtype (orbax casts otherwise unsafely), cast after
    abstract_target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shard_pure
    )
    from alignx_jax.checkpointing import collect_orphans, first_line, verify_tree

    why = None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, abstract_target)
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e)}"
    if why is not None:
        collect_orphans()
        raise CheckpointError(f"{params_dir}: cannot restore params ({why})")
    verify_tree(restored, _saved_param_checksums(res) if same_bits else None, params_dir)
    if base is not None:
        restored = lora.join(restored, lora.split(nnx.to_pure_dict(nnx.state(base, nnx.Param)))[1])
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(nnx.graphdef(abstract), state)
    return model


# ---- CLI -----------------------------------------------------------------------------------------------


def load_checkpoint_head(res: ResolvedCheckpoint):
    """The preference head of a resolved checkpoint as (PreferenceHead, HeadConfig), or None."""
    from alignx_jax.models import preference_head as ph

    if res.head_dir is None:
        return None
    if res.step is None:  # a model checkpoint keeps the exported files as they are
        return ph.load_head(res.head_dir)
    import orbax.checkpoint as ocp

    from alignx_jax.checkpointing import read_meta

    ckpts = os.path.dirname(os.path.dirname(os.path.abspath(res.head_dir)))
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
            restored = ckptr.restore(os.path.abspath(res.head_dir), target)
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e)}"
    if why is not None:
        collect_orphans()
        raise CheckpointError(f"{res.head_dir}: cannot restore the preference head ({why})")
    verify_tree(restored, saved_checksums(ckpts, res.step, "head"), res.head_dir)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(head, state)
    return head, hcfg


def _copy_head_files(src: str, out_dir: str) -> None:
    from alignx_jax.models import preference_head as ph

    for name in (ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE):
        shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))


def remove_head_files(out_dir: str) -> None:
    from alignx_jax.models import preference_head as ph

    for name in (ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE):  # a stale head would pair with the wrong policy
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def cli_import(args) -> int:
    from alignx_jax.models import preference_head as ph
    from alignx_jax.models.presets import resolve_model_path

    src = resolve_model_path(args.hf)  # a local folder, or a hub id's snapshot in the HF cache
    model = load_pretrained(src, dtype=args.dtype)
    head = None
    if ph.has_head(src):  # read first: a malformed or mismatched head fails before anything is written
        head, hcfg = ph.load_head(src)
        if hcfg.embed_dim != model.cfg.hidden_size:
            raise CheckpointError(
                f"{args.hf}: preference head embed_dim {hcfg.embed_dim} != the model's "
                f"hidden_size {model.cfg.hidden_size}"
            )
    save_checkpoint(model, args.out, tokenizer_dir=src if _has_tokenizer(src) else None)
    from alignx_jax import model_card

    # what an export of this checkpoint keeps of the base: its generation_config.json as it is, and
    # where it came from (the `--hf` argument, a hub id stays one) with its license, for the model card
    gen = os.path.join(src, "generation_config.json")
    if os.path.isfile(gen):
        shutil.copyfile(gen, os.path.join(args.out, "generation_config.json"))
    elif os.path.isfile(os.path.join(args.out, "generation_config.json")):
        os.remove(os.path.join(args.out, "generation_config.json"))
    model_card.write_base_info(args.out, args.hf, src)
    remove_head_files(args.out)
    if head is not None:  # kept byte for byte: `alignx export` of this checkpoint copies them back
        _copy_head_files(src, args.out)
    print(
        f"imported {args.hf} -> {args.out} ({model.cfg.model_type}, {model.cfg.num_hidden_layers} layers, "
        f"{args.dtype}{', with preference head' if head is not None else ''})"
    )
    return 0


def _beside(out: str, tag: str, pid: int | None = None) -> str:
    """A hidden sibling of `out` for one process: `.NAME.TAG-PID`."""
    return os.path.join(
        os.path.dirname(out), f".{os.path.basename(out)}.{tag}-{os.getpid() if pid is None else pid}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_export_leftovers(out: str) -> None:
    """Tidy what a killed export left beside `out`: its half-written folder goes; a folder it had moved
    aside to swap in the new one comes back when `out` is missing (killed between the two renames)."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    for entry in sorted(os.listdir(parent)):
        m = re.fullmatch(re.escape(f".{name}.") + r"export-(tmp|old)-(\d+)", entry)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "old" and not os.path.exists(out):
            os.rename(path, out)
            print(
                f"alignx export: warning: restored {out} from {path} (an export was killed while replacing it)",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(path, ignore_errors=True)


def _export_target(out: str, source: str, overwrite: bool) -> tuple[list[str], set[str]]:
    """(entries of `out`, the files a previous export wrote there), after checking that `out` may be
    written: absent, empty, an export of the same `source`, or anything with `overwrite`."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out}: is a file, not a folder")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--out {out}: cannot create {e.filename or parent} ({e.strerror})") from None
    _recover_export_leftovers(out)
    if not os.path.isdir(out) or not os.listdir(out):
        return [], set()
    entries = sorted(os.listdir(out))
    manifest = read_export_manifest(out)
    if not overwrite and (manifest is None or manifest.get("source") != source):
        if manifest is not None:
            raise CheckpointError(
                f"--out {out}: holds an export of {manifest.get('source')}; pass --overwrite to "
                "replace its files, or choose another folder"
            )
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise CheckpointError(
            f"--out {out}: not empty and not an alignx export (holds {shown}); pass --overwrite "
            "to replace the files an export writes (the others are kept), or choose an empty folder"
        )
    return entries, {os.path.basename(str(f)) for f in (manifest or {}).get("files", [])}


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)  # the same data under a second name: nothing is copied or moved
    except OSError:
        shutil.copy2(src, dst)


def _publish(tmp: str, out: str, keep: list[str]) -> None:
    """Make the complete export folder `tmp` the folder `out`, carrying `out`'s `keep` entries over.

    `out` is replaced by two renames, so it is at every moment either the old folder or the new one;
    a kill between them leaves the old one beside it, put back by the next export."""
    for name in keep:
        src, dst = os.path.join(out, name), os.path.join(tmp, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
    if os.path.isdir(out):
        old = _beside(out, "export-old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _write_export(args, res: ResolvedCheckpoint, model: Decoder, head, tmp: str, source: str) -> list[str]:
    """Every file of the export into the fresh folder `tmp`; returns their names."""
    from alignx_jax import model_card
    from alignx_jax.models import preference_head as ph

    if getattr(args, "peft", False):  # the adapters alone, for peft.PeftModel on the base model
        files = save_peft(
            model, tmp, base_model_name_or_path=peft_base(args.checkpoint, res), dtype=args.dtype
        )
        files += copy_tokenizer(res.tokenizer_dir, tmp)
        write_export_manifest(tmp, files, source=source, step=res.step)
        return files
    files = save_hf(
        model,
        tmp,
        dtype=args.dtype,
        shard_size=args.shard_size,
        tokenizer_dir=res.tokenizer_dir,
        source=source,
        step=res.step,
        base_dir=res.config_dir,  # the base model's generation_config.json, kept as it is
    )
    if res.head_dir is not None:
        if res.step is None:  # an imported model checkpoint: the head files as they came in
            _copy_head_files(res.head_dir, tmp)
        else:
            ph.save_head(head, None, tmp)  # float32 always: the head is tiny, --dtype is the policy's
        files += [ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE]
    files.append(
        model_card.write_card(
            tmp,
            checkpoint=args.checkpoint,
            config_dir=res.config_dir,
            source=source,
            step=res.step,
            dtype=read_hf_config(tmp).get("dtype", "float32"),
            has_head=res.head_dir is not None,
            results_files=getattr(args, "results", None),
            name=os.path.basename(paths.absolute(args.out).rstrip("/")),
        )
    )
    write_export_manifest(
        tmp, files, source=source, step=res.step, prompt_format=run_prompt_format(args.checkpoint)
    )
    return files


def peft_base(checkpoint: str, res: ResolvedCheckpoint) -> str:
    """adapter_config.json's `base_model_name_or_path`: the run's `model.hf_path` (a hub id or folder, from
    a training workdir's config.json), else the folder of the base weights (a workdir's `reference`)."""
    try:
        data = json.loads(paths.path(os.path.join(checkpoint, "config.json")).read_text(encoding="utf-8"))
        hf_path = (data.get("model") or {}).get("hf_path") if isinstance(data, dict) else None
    except (OSError, ValueError, AttributeError):
        hf_path = None
    if isinstance(hf_path, str) and (os.path.isdir(hf_path) or re.fullmatch(r"[\w.-]+/[\w.-]+", hf_path)):
        return os.path.abspath(hf_path) if os.path.isdir(hf_path) else hf_path  # a folder or a hub id
    return paths.absolute(res.config_dir) if paths.is_url(res.config_dir) else os.path.abspath(res.config_dir)


def run_prompt_format(checkpoint: str) -> str | None:
    """The `data.prompt_format` of the run that wrote `checkpoint` (a training workdir's config.json),
    or the one an earlier export recorded (an exported folder's manifest); None when neither says."""
    for name, pick in (
        ("config.json", lambda d: (d.get("data") or {}).get("prompt_format")),
        (EXPORT_MANIFEST, lambda d: d.get("prompt_format")),
    ):
        try:
            data = json.loads(paths.path(os.path.join(checkpoint, name)).read_text(encoding="utf-8"))
            value = pick(data) if isinstance(data, dict) else None
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    return None


def _export_source(checkpoint: str) -> str:
    """The checkpoint as the export manifest names it (a URL stays a URL)."""
    return paths.absolute(checkpoint) if paths.is_url(checkpoint) else os.path.realpath(checkpoint)


def _export_inputs(checkpoint: str, res: ResolvedCheckpoint):
    """(model, head or None), both read and verified (finite, checksums where saved) before anything
    is written."""
    from alignx_jax.models import preference_head as ph

    model = load_checkpoint(checkpoint, res.step)
    head = None
    if res.head_dir is not None:
        head = ph.load_head(res.head_dir)[0] if res.step is None else load_checkpoint_head(res)[0]
    return model, head


def _export_to_bucket(args) -> int:
    """`alignx export --out gs://...`: the export is written to a local temporary folder, then uploaded
    file by file with the manifest last (a folder without `alignx_export.json` is an unfinished upload).
    The target must be absent or empty, or hold an earlier export (`--overwrite`: any folder); files of
    the target that this export does not write are left as they are."""
    import tempfile

    out = paths.path(args.out)
    foreign = out.exists() and any(out.iterdir()) and not (out / EXPORT_MANIFEST).exists()
    if foreign and not getattr(args, "overwrite", False):
        raise CheckpointError(
            f"--out {args.out}: not empty and not an export; pass --overwrite to write into it"
        )
    res = resolve_checkpoint(args.checkpoint, args.step)
    source = _export_source(args.checkpoint)
    model, head = _export_inputs(args.checkpoint, res)
    if not paths.is_main_process():
        return 0
    with tempfile.TemporaryDirectory(prefix="alignx-export-") as local:
        tmp = os.path.join(local, "export")
        files = _write_export(args, res, model, head, tmp, source)
        out.mkdir(parents=True, exist_ok=True)
        names = [os.path.relpath(os.path.join(d, n), tmp) for d, _, ns in os.walk(tmp) for n in ns]
        for name in sorted(n for n in names if n != EXPORT_MANIFEST) + [EXPORT_MANIFEST]:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(tmp, name), "rb") as f:
                (out / name).write_bytes(f.read())
    where = f" step {res.step}" if res.step is not None else ""
    print(f"exported {args.checkpoint}{where} -> {args.out} ({len(files)} files uploaded)")
    return 0


def cli_export(args) -> int:
    """`alignx export`: verify the checkpoint, write the HF folder beside `--out`, rename it into place.

    `--out` must be absent, empty or an export of the same checkpoint; `--overwrite` allows any folder.
    Files of `--out` that no export wrote are kept (hard links into the new folder), never deleted."""

    if paths.is_url(args.out):
        return _export_to_bucket(args)
    out = os.path.abspath(args.out)
    res = resolve_checkpoint(args.checkpoint, args.step)
    source = _export_source(args.checkpoint)
    # a multi-process job (launch/local.sh, a pod): every process reads the checkpoint, process 0 writes
    main = paths.is_main_process()
    entries, own = (
        _export_target(out, source, bool(getattr(args, "overwrite", False))) if main else ([], set())
    )
    model, head = _export_inputs(args.checkpoint, res)
    if not main:
        return 0
    tmp = _beside(out, "export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = _write_export(args, res, model, head, tmp, source)
        keep = [e for e in entries if e not in own and e not in files]
        _publish(tmp, out, keep)
    except OSError as e:  # a full disk, a permission: `out` is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        where = f": {e.filename}" if e.filename else ""
        raise CheckpointError(
            f"--out {out}: export failed ({e.strerror or e}{where}); {out} is unchanged"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    odd = [e for e in keep if e.endswith(".safetensors")]
    if odd:
        print(
            f"alignx export: warning: kept {', '.join(odd)} in {out} (not written by an export; the index names "
            "the exported shards, but tools that read every *.safetensors file would mix them in)",
            file=sys.stderr,
        )
    where = f" step {res.step}" if res.step is not None else ""
    extra = " (with preference head)" if res.head_dir is not None else ""
    print(f"exported {args.checkpoint}{where} -> {args.out}{extra}")
    return 0
