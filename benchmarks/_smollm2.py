"""Shared setup of the scoring and generation benchmarks: SmolLM2-135M's shape (or the real model),
the same weights on both sides, P-SOUPS-like token lengths, and interleaved timing helpers; and what every
benchmark shares: the machine description, the flag checks and the `--json` output."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from typing import Any

import numpy as np

from alignx_jax import allocator, hardware, paths

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct config.json), as LlamaConfig keywords.
SMOLLM2_SHAPE: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# a few-second shape for the tests
TINY_SHAPE: dict[str, Any] = dict(
    SMOLLM2_SHAPE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)


def hf_folder(shape: str, real: bool, seed: int = 0) -> tuple[str, str]:
    """(HF folder both sides load, a description). `real`: the prepared SmolLM2-135M-Instruct
    folder (alignx_jax.real_model), else random float32 weights of `shape` written by
    transformers' own `LlamaForCausalLM(LlamaConfig(...))` init (torch seed `seed`) to a temp folder."""
    if real:
        from alignx_jax.real_model import smollm2_dir

        path = smollm2_dir(prepare=False)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"--real: {path} is not prepared (run `make real-model`)")
        return path, "SmolLM2-135M-Instruct (real weights, float32)"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {"smollm2": SMOLLM2_SHAPE, "tiny": TINY_SHAPE}[shape]
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    out = tempfile.mkdtemp(prefix=f"alignx-bench-{shape}-")
    model.save_pretrained(out, safe_serialization=True)
    return out, f"{shape} shape, random float32 weights (LlamaConfig init, torch seed {seed})"


def torch_model(path: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def model_shape(path: str) -> dict[str, Any]:
    import json

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "rope_theta",
    )
    out = {k: c.get(k) for k in keys}
    if out["rope_theta"] is None:  # transformers 5 writes it under rope_parameters
        out["rope_theta"] = (c.get("rope_parameters") or {}).get("rope_theta")
    return out


def psoups_lengths(
    rng: np.random.Generator, n: int, prompt: int, response: int
) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts around P-SOUPS' (prompt ~`prompt`, responses ~`response`)."""
    out = []
    for _ in range(n):
        p = int(rng.integers(int(prompt * 0.85), int(prompt * 1.15) + 1))
        c = int(rng.integers(int(response * 0.6), int(response * 1.4) + 1))
        r = int(rng.integers(int(response * 0.6), int(response * 1.4) + 1))
        out.append((p, max(c, 2), max(r, 2)))
    return out


cpu_model, cpu_features = hardware.cpu_model, hardware.cpu_features  # the benchmarks' `machine` and `cpu`


def cpu_pressure() -> str | None:
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return None


def preload_allocator() -> None:
    """Re-execute this benchmark with the host allocator `alignx` would run a CPU job with (ALIGNX_ALLOCATOR,
    default auto: mimalloc; `system` measures glibc's). Both contenders share the process and so the allocator."""
    allocator.reexec(allocator.configured(), cpu_job=True)


def machine() -> dict[str, Any]:
    import jax

    try:  # torch is the contender of most benchmarks here, not of all (cpu_dtype.py runs without it)
        import torch
    except ImportError:
        torch = None

    return {
        "machine": cpu_model(),
        "cpu": cpu_features(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "torch_version": torch.__version__ if torch else None,
        "torch_threads": torch.get_num_threads() if torch else None,
        "jax_backend": jax.default_backend(),
        "allocator": allocator.active(),
    }


def ratios(jax_times: list[float], torch_times: list[float]) -> dict[str, Any]:
    """Speed ratio (torch time / JAX time) per round and the median of the per-round ratios."""
    per_round = [t / j for j, t in zip(jax_times, torch_times)]
    return {"jax_vs_transformers": statistics.median(per_round), "jax_vs_transformers_per_round": per_round}


def check_counts(minimum: int = 1, **counts: int) -> None:
    """Refuse, before any work, a count flag below `minimum` (`rounds=0` is `--rounds`): one line, exit 1;
    the medians of zero rounds and a batch of no rows only fail after the compiles."""
    for name, value in counts.items():
        if value < minimum:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _is_json_output(p: str) -> bool:
    return isinstance(paths.read_json(p), dict)


def check_json_out(dest: str | None, inputs: tuple[tuple[str, str | None], ...] = ()) -> None:
    """Refuse, before any work, a `--json` that could not be written (a folder, an unwritable place) or that
    would replace a file other than an earlier benchmark JSON (notes, one of `inputs`): one line, exit 1."""
    if dest is None:
        return
    problem = paths.refuse_unwritable("--json", dest, folder=False) or paths.refuse_to_replace(
        "--json", dest, inputs, _is_json_output, "a benchmark's JSON output"
    )
    if problem:
        raise SystemExit(problem)


def write_json_out(dest: str, out: dict[str, Any], indent: int = 2) -> None:
    """`out` to `dest` under a temporary name, then renamed: a failed or killed write leaves no half file.
    A NaN or infinite float is written as null (json.dumps writes `NaN`, which is not JSON)."""
    text = json.dumps(_finite(out), indent=indent, allow_nan=False)
    paths.write_all({dest: (text + "\n").encode("utf-8")})


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (numpy's too) in it, at any depth, replaced by None."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
