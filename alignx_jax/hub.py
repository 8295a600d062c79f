"""Hugging Face Hub ids as model paths: `org/name` or `org/name@revision` -> a local snapshot folder.

`models.presets.resolve_model_path` is the one resolver every model path goes through (`model.hf_path`,
`model.tokenizer`, `alignx import --hf`, `alignx eval --model/--reference`, `alignx generate --model`);
it calls `resolve_hub_id` for a path that does not exist locally and looks like a hub id.

The snapshot comes from `huggingface_hub.snapshot_download` into the usual cache (`HF_HUB_CACHE`, else
`HF_HOME/hub`, else `~/.cache/huggingface/hub`), with the token in `HF_TOKEN`. With `HF_HUB_OFFLINE=1`
nothing is downloaded: a cached snapshot is used, a missing one is a one-line error. The environment is
read at each call (huggingface_hub reads it once, at import). Only what a model folder needs is fetched:
configs, safetensors, tokenizer files, the model card and license (never `original/` consolidated
checkpoints or PyTorch `.bin` weights).
"""

from __future__ import annotations

import os
import re

from alignx_jax.errors import CheckpointError

# org/name, optionally @revision (a branch, tag or commit); the names as the Hub allows them
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.txt",
    "*.jinja",
    "*.tiktoken",
    "*.md",
    "LICENSE*",
]
IGNORE_PATTERNS = ["original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.h5", "*.msgpack"]


def parse_hub_id(path: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `path` is shaped like a hub id, else None. A path that exists locally,
    starts with `.`, `/` or `~`, or holds `..` or a backslash is a local path."""
    path = str(path)
    if not path or os.path.exists(path) or path.startswith((".", "/", "~")) or ".." in path or "\\" in path:
        return None
    m = _HUB_ID.fullmatch(path)
    if m is None or m.group("repo").endswith((".", "-")):
        return None
    return m.group("repo"), m.group("revision")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def cache_dir() -> str:
    """The hub cache folder, as huggingface_hub computes it, from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def resolve_hub_id(path: str) -> str:
    """The local snapshot folder of the hub id `path` (`org/name[@revision]`), downloaded unless cached
    or offline. CheckpointError (one line) when it cannot be had."""
    parsed = parse_hub_id(path)
    if parsed is None:
        raise CheckpointError(f"{path}: not a Hugging Face hub id (org/name or org/name@revision)")
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{path}: looks like a hub id, but huggingface_hub is missing ({e})") from None
    cache, is_offline = cache_dir(), offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=is_offline,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as e:  # the hub's error classes moved between huggingface_hub releases
        kind = type(e).__name__
        at = f" at revision {revision}" if revision else ""
        if is_offline:
            raise CheckpointError(
                f"{path}: not a local folder, and hub model {repo_id}{at} is not in the Hugging Face cache "
                f"{cache} (HF_HUB_OFFLINE is set: nothing is downloaded; download it once online, or "
                "give a local folder)"
            ) from None
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            why = "not found, or gated/private: set HF_TOKEN to a token with access"
        elif kind == "RevisionNotFoundError":
            why = f"no revision {revision!r}"
        elif kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            why = "the hub is unreachable and it is not in the cache"
        else:
            why = " ".join(str(e).split())[:300] or kind
        raise CheckpointError(f"{path}: not a local folder, and hub model {repo_id}{at}: {why}") from None
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("config.json", "tokenizer_config.json")):
        raise CheckpointError(f"{path}: hub snapshot {folder} has no config.json (not a transformers model)")
    return str(folder)
