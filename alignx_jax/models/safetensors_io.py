"""safetensors files, read lazily (memory-mapped, one tensor at a time) and written as a stream."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from alignx_jax.errors import CheckpointError

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


# the preference head's weights beside a PBA model (models.preference_head saves it under this name), which
# an `alignx import` checkpoint (orbax params/) keeps too: no model weights, so it must not make that folder
# look like an HF one
HEAD_WEIGHTS_FILE = "preference_head.safetensors"
NOT_MODEL_WEIGHTS = frozenset({HEAD_WEIGHTS_FILE})


def weight_files(folder: str) -> list[str]:
    """The names of the local `folder`'s *.safetensors files of model weights, sorted (not the head's)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and n not in NOT_MODEL_WEIGHTS)


def holds_safetensors(folder: str) -> bool:
    """Whether `folder` is a local folder holding a *.safetensors file of model weights (a HF weights
    folder, not an orbax one; a preference head's file alone does not count)."""
    return os.path.isdir(folder) and bool(weight_files(folder))


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
            files = weight_files(folder)
        if not files:
            listed = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            # pytorch_model*.bin only: a training_args.bin beside safetensors-less files is no model
            bins = [n for n in listed if n.startswith("pytorch_model") and n.endswith(".bin")]
            # transformers' older pickle format: loading it needs torch, which the package does not import
            hint = (
                f" (it holds {bins[0]}, transformers' older format: save the model from transformers "
                "with save_pretrained for safetensors)"
                if bins
                else ""
            )
            raise CheckpointError(f"{folder}: no *.safetensors files{hint}")
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

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.entries[name][2])

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
        path, offset, dtype, shape = self.entries[name]
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def write_safetensors(
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
