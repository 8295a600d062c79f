"""The evaluation's arguments: benchmark specs, prompt format, personas, `--flip`, and the
`EvalSettings` an evaluation runs with (checked as one)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignx_jax import hardware, paths
from alignx_jax.errors import AlignXError, ConfigError, DataError
from alignx_jax.export import trained_prompt_format

BENCHMARKS: tuple[str, ...] = ("alignx", "p-soups", "uf-p-4", "prism")
PERSONA_VARIANTS: tuple[str, ...] = ("ugc", "pair", "demo", "p")
PREFERENCES: tuple[str, ...] = ("golden", "predicted", "profile")
REFERENCE_PROMPTS: tuple[str, ...] = ("same", "ica")


# ----------------------------------------------------------------------------- arguments


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """One `--benchmark NAME=PATH`: `key` names it in the results and the per-example file."""

    name: str
    path: str
    key: str


def parse_benchmark_specs(specs: Sequence[str]) -> list[BenchmarkSpec]:
    """`NAME=PATH` strings -> specs; a bad name, a missing `=PATH` or a missing path is a DataError."""
    from alignx_jax.data.benchmarks import parse_benchmark_arg
    from alignx_jax.data.schema import list_files

    pairs, seen, files = [], set(), {}
    for spec in specs:
        name, path = parse_benchmark_arg(spec)
        if not paths.exists(path):  # a local path or a URL (gs://...)
            raise DataError(f"--benchmark {name}: no such file or folder", file=path)
        # the same file twice (`a.json`, `./a.json`) would be scored twice and counted twice in NAME's pool
        if (name, paths.place(path)) in seen:
            raise DataError(f"--benchmark {name} given twice with the same path", file=path)
        seen.add((name, paths.place(path)))
        for f in list_files(path):  # so would a file of a folder given too (its rows are the folder's)
            earlier = files.setdefault((name, paths.place(f)), path)
            if earlier != path:
                raise DataError(f"--benchmark {name} gives this file twice (also in {earlier})", file=f)
        pairs.append((name, path))
    counts: dict[str, int] = {}
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
    out, used = [], set()
    for name, path in pairs:
        key = name
        if counts[name] > 1:  # same benchmark from several files: name each by its file
            stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
            key = f"{name}:{stem}"
            k = 2
            while key in used:  # files of one name in other folders
                key, k = f"{name}:{stem}.{k}", k + 1
        used.add(key)
        out.append(BenchmarkSpec(name, path, key))
    return out


def check_cpu_matmul(choice: str) -> None:
    """`--cpu-matmul` refused up front where this host cannot run it, in a line naming the flag: the model's
    own check (`DecoderConfig.compiler_options`) names a training config's key, and only once it is loaded."""
    why = hardware.cpu_matmul_refusal(choice)
    if why is not None:
        raise ConfigError(f"--cpu-matmul {choice}: {why}; use auto or ynnpack")


def check_reference_flags(
    reference_dir: str | None, reference_scores: str | None, reference_prompt: str
) -> None:
    """The reference flags among themselves, before either is read: one reference at most, and
    `--reference-prompt ica` only with one (with none it would be ignored)."""
    if reference_dir is not None and reference_scores is not None:
        raise ConfigError("--reference and --reference-scores are two references; give one")
    if reference_prompt != "same" and reference_dir is None and reference_scores is None:
        raise ConfigError(
            f"--reference-prompt {reference_prompt} chooses the prompt the reference is scored on and needs "
            "--reference or --reference-scores"
        )


def default_prompt_format(
    model_dir: str, explicit: str | None, *, fallback: str = "chat", resolved: str | None = None
) -> str:
    """`explicit` if given, else the trained format (`release` -> `paper`, the release's evaluation
    input), else `fallback`. One warning line on stderr when `explicit` differs from the trained one.
    `resolved`: `model_dir` already resolved (`resolve_model_path`), read instead of resolving it again."""
    from alignx_jax.models.presets import resolve_model_path

    try:
        trained = trained_prompt_format(resolved or resolve_model_path(model_dir))
    except AlignXError:
        trained = None
    if explicit is None:
        return fallback if trained is None else ("paper" if trained == "release" else trained)
    compatible = {"release": ("release", "paper")}.get(trained or "", (trained,))
    if trained is not None and explicit not in compatible:
        print(
            f"alignx: warning: --prompt-format {explicit} differs from the format {model_dir} was trained "
            f"with ({trained})",
            file=sys.stderr,
        )
    return explicit


def persona_dependent(method: str, preference: str) -> bool:
    """Whether the scored prompt depends on the persona (ICA, or PBA with a predicted P~)."""
    return method == "ica" or (method == "pba" and preference == "predicted")


def resolve_personas(value: str | None, benchmark: str, *, method: str, preference: str) -> list[str | None]:
    """The persona variants to score for one benchmark ([None] when the prompt ignores the persona)."""
    if not persona_dependent(method, preference):
        return [None]
    if value is None:
        return list(PERSONA_VARIANTS) if benchmark == "alignx" else ["p"]
    return parse_personas(value)


def parse_personas(value: str) -> list[str]:
    """`--persona ugc,pair` -> the variants, each once; an empty list or an unknown variant is a ConfigError."""
    variants = [v.strip().lower() for v in value.split(",") if v.strip()]
    if not variants:
        raise ConfigError("--persona: empty list")
    for v in variants:
        if v not in PERSONA_VARIANTS:
            raise ConfigError(f"--persona: unknown variant {v!r}; expected {', '.join(PERSONA_VARIANTS)}")
    return list(dict.fromkeys(variants))


def parse_flip(value: str | None) -> tuple[int, ...]:
    """`--flip` -> sorted dimension indices. Items are indices (0..89) or labels (either side of a
    dimension, case-insensitive); labels may themselves contain ", " so pieces are re-joined."""
    if value is None or not value.strip():
        return ()
    from alignx_jax.preference_space import NUM_DIMS, load_preference_space

    labels: dict[str, int] = {}
    for d in load_preference_space():
        labels[d["positive_label"].lower()] = d["index"]
        labels[d["negative_label"].lower()] = d["index"]
    parts = [p.strip() for p in value.split(",")]
    dims: set[int] = set()
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):  # longest run of pieces that forms one item
            item = ", ".join(parts[i:j]).lower()
            if j == i + 1 and item.lstrip("-").isdigit():
                dim = int(item)
                if not 0 <= dim < NUM_DIMS:
                    raise ConfigError(f"--flip: dimension {dim} is out of range 0..{NUM_DIMS - 1}")
                dims.add(dim)
                break
            if item in labels:
                dims.add(labels[item])
                break
        else:
            raise ConfigError(f"--flip: {parts[i]!r} is neither a dimension index nor a preference label")
        i = j
    return tuple(sorted(dims))


def flip_direction(direction: Any, dims: Sequence[int]) -> np.ndarray:
    """Reverse the listed dimensions of a direction (1 <-> 0; neutral stays neutral)."""
    out = np.asarray(direction, dtype=np.float32).copy()
    idx = list(dims)
    out[idx] = 1.0 - out[idx]
    return out


def involves(direction: Any, dims: Sequence[int]) -> bool:
    """Whether a direction is non-neutral on any of `dims`."""
    arr = np.asarray(direction, dtype=np.float32)
    return bool(len(dims)) and bool(np.any(arr[list(dims)] != 0.5))


@dataclasses.dataclass
class EvalSettings:
    method: str = "ica"
    persona: str | None = None
    preference: str = "golden"
    flip: tuple[int, ...] = ()
    prompt_format: str = "chat"
    limit: int | None = None
    batch_size: int = 8
    max_length: int = 8192
    beta: float = 0.1
    share_prompt: bool = True  # one row per pair (SequenceScorer): the prompt's compute once
    reference_prompt: str = "same"  # 'same' | 'ica': the prompt the reference is scored on

    def check(self) -> None:
        from alignx_jax.data.prompts import PROMPT_FORMATS

        if self.method not in ("none", "ica", "pba"):
            raise ConfigError(f"--method must be none, ica or pba, got {self.method!r}")
        if self.preference not in PREFERENCES:
            raise ConfigError(
                f"--preference must be one of {', '.join(PREFERENCES)}, got {self.preference!r}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(
                f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}"
            )
        if self.reference_prompt not in REFERENCE_PROMPTS:
            raise ConfigError(
                f"--reference-prompt must be one of {', '.join(REFERENCE_PROMPTS)}, got {self.reference_prompt!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be positive, got {self.limit}")
        if self.max_length < 4:
            raise ConfigError(f"--max-length must be at least 4, got {self.max_length}")
        if not (self.beta > 0 and np.isfinite(self.beta)):  # inf: inf * 0 = NaN rewards, every pair wrong
            raise ConfigError(f"--beta must be a finite number > 0, got {self.beta}")
        if self.flip and self.method != "pba":
            raise ConfigError("--flip reverses dimensions of P~ and needs --method pba")
        if self.persona is not None and not persona_dependent(self.method, self.preference):
            shows = {"none": "no persona", "golden": "the row's direction", "profile": "the row's profile"}
            what = "none" if self.method == "none" else self.preference
            raise ConfigError(
                f"--persona chooses the persona variant the prompt shows and needs --method ica or --method pba "
                f"--preference predicted (--method {self.method}"
                + (f" --preference {self.preference}" if self.method == "pba" else "")
                + f" shows {shows.get(what, 'no persona variant')})"
            )
        if self.persona is not None:  # here, not first when the benchmarks are scored (after the models load)
            parse_personas(self.persona)
