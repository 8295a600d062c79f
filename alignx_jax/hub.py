"""Hugging Face Hub ids as model paths: `org/name` or `org/name@revision` -> a local snapshot folder.

`models.presets.resolve_model_path` is the one resolver every model path goes through (`model.hf_path`,
`model.tokenizer`, `alignx import --hf`, `alignx eval --model/--reference`, `alignx generate --model`);
it calls `resolve_hub_id` for a path that does not exist locally and looks like a hub id.

The snapshot comes from `huggingface_hub.snapshot_download` into the usual cache (`HF_HUB_CACHE`, else
`HF_HOME/hub`, else `~/.cache/huggingface/hub`; `~` and `$VAR` expanded), with the token in `HF_TOKEN`. With `HF_HUB_OFFLINE=1`
nothing is downloaded: a cached snapshot is used, a missing one is a one-line error. The environment is
read at each call (huggingface_hub reads it once, at import). Only what a model folder needs is fetched:
configs, safetensors, tokenizer files, the model card and license (never `original/` consolidated
checkpoints or PyTorch `.bin` weights).

A full 40-hex commit whose snapshot is cached is used with no network call (a commit cannot change),
unless it lacks a weights shard (completed online). A model's snapshot must hold its safetensors weights,
every shard its index names: else one line naming the id and the file, not the loader's error at load.
Otherwise one `repo_info` request, with a timeout (`HF_HUB_ETAG_TIMEOUT`, default 10 s) and no retries,
first checks that the hub answers: when it does not, the cache alone is used (a missing snapshot is the
one-line error at once, not huggingface_hub's ~25 s of retries). huggingface_hub's warnings (each retry,
each fallback) are silenced while a hub id resolves unless `HF_HUB_VERBOSITY` asks for more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

from alignx_jax.errors import CheckpointError, one_line

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
_COMMIT = re.compile(r"[0-9a-f]{40}")  # a full commit sha, as huggingface_hub names snapshot folders


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
    """The hub cache folder, as huggingface_hub computes it, from the environment now: `HF_HUB_CACHE`,
    else the legacy `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, with `~` and `$VAR` expanded."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    home = os.path.expandvars(os.path.expanduser(home))
    cache = (
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    )
    # huggingface_hub expands them too: `HF_HUB_CACHE=~/hf` is the home's folder, not a `~` folder here
    return os.path.expandvars(os.path.expanduser(cache))


def _repo_folder(repo_id: str, cache: str | None = None) -> str:
    """The cache folder of model `repo_id` (`models--ORG--NAME`), as huggingface_hub lays it out."""
    return os.path.join(cache or cache_dir(), "models--" + repo_id.replace("/", "--"))


@contextlib.contextmanager
def _quiet_hub_logs():
    """huggingface_hub logs every retry and cache fallback as a warning (a dozen lines for one missing
    model); what went wrong is our one error line. A verbosity the user asked for is kept."""
    log = logging.getLogger("huggingface_hub")
    old = log.level
    if log.getEffectiveLevel() >= logging.WARNING:
        log.setLevel(max(logging.ERROR, log.getEffectiveLevel()))
    try:
        yield
    finally:
        log.setLevel(old)


def _timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


def _unreachable(repo_id: str, revision: str | None, endpoint: str | None, token: str | None) -> str | None:
    """Why the hub cannot be reached (one short phrase), or None when it answers. One request, with a
    timeout and no retries: huggingface_hub's own client has no timeout, and its listing retries a
    refused or unresolvable connection 5 times (1+2+4+8+8 s) before falling back to the cache."""
    from huggingface_hub import HfApi

    try:
        HfApi(endpoint=endpoint, token=token).repo_info(repo_id, revision=revision, timeout=_timeout())
    except Exception as e:  # the HTTP client's error classes differ between huggingface_hub releases
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int) and status < 500:  # it answered (not found, gated...): the download says
            return None
        return one_line(e, 160).rstrip(": ")
    return None


def _missing_weights(folder: str) -> str | None:
    """What a model snapshot lacks of its safetensors weights (one short phrase), or None when every shard
    its index names is there (a download cut short, a blob deleted from the cache: the link dangles)."""
    import json

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # a malformed index: the loader's own error names it
        missing = [n for n in shards if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            return f"{missing[0]}{more}, which its model.safetensors.index.json names"
        return None
    if not any(
        n.endswith(".safetensors") and os.path.isfile(os.path.join(folder, n)) for n in os.listdir(folder)
    ):
        return "its *.safetensors weights"
    return None


def _cached_commit(repo_id: str, revision: str | None, cache: str) -> str | None:
    """`revision` for a cache-only lookup: a short commit (`@0123abc`) that no ref of the cache names is the
    one cached snapshot whose commit it begins (huggingface_hub reads only `refs/<revision>` and full
    commits, so a short one cached under its full name read as not cached); anything else as it is."""
    if revision is None or not re.fullmatch(r"[0-9a-f]{7,39}", revision):
        return revision
    repo = _repo_folder(repo_id, cache)
    if os.path.isfile(os.path.join(repo, "refs", revision)):
        return revision
    try:
        found = [c for c in os.listdir(os.path.join(repo, "snapshots")) if c.startswith(revision)]
    except OSError:
        return revision
    return found[0] if len(found) == 1 and _COMMIT.fullmatch(found[0]) else revision


def _not_cached(e: BaseException) -> bool:
    """Whether snapshot_download's error `e` says the snapshot is not in the cache: huggingface_hub's
    LocalEntryNotFoundError (by name: its module moved between releases), not its IncompleteSnapshotError
    subclass (cached, files missing) nor another failure (a cache it cannot read)."""
    names = {c.__name__ for c in type(e).__mro__}
    return "LocalEntryNotFoundError" in names and "IncompleteSnapshotError" not in names


def resolve_hub_id(path: str, *, model: bool = False, config_only: bool = False) -> str:
    """The local snapshot folder of the hub id `path` (`org/name[@revision]`), downloaded unless cached
    or offline. `model`: the snapshot must hold a model (config.json), not a tokenizer alone.
    `config_only`: fetch config.json alone (`alignx plan` reads no weights); the folder may hold only it.
    CheckpointError (one line) when it cannot be had."""
    parsed = parse_hub_id(path)
    if parsed is None:
        raise CheckpointError(f"{path}: not a Hugging Face hub id (org/name or org/name@revision)")
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{path}: looks like a hub id, but huggingface_hub is missing ({e})") from None
    cache, is_offline = cache_dir(), offline()
    endpoint, token = os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None

    def snapshot(local_only: bool) -> str:
        return snapshot_download(
            repo_id,
            revision=_cached_commit(repo_id, revision, cache) if local_only else revision,
            cache_dir=cache,
            endpoint=endpoint,
            token=token,
            local_files_only=local_only,
            allow_patterns=["config.json"] if config_only else ALLOW_PATTERNS,
            ignore_patterns=None if config_only else IGNORE_PATTERNS,
        )

    at = f" at revision {revision}" if revision else ""
    folder, down = None, None
    with _quiet_hub_logs():
        pinned_commit = revision is not None and _COMMIT.fullmatch(revision) is not None
        if pinned_commit and os.path.isdir(os.path.join(_repo_folder(repo_id, cache), "snapshots", revision)):
            try:  # a commit never changes: its cached snapshot needs no network call
                folder = snapshot(local_only=True)
            except Exception:  # an incomplete snapshot: completed online below
                folder = None
            if folder is not None and model and not config_only and _missing_weights(str(folder)):
                folder = None  # a shard missing from the cache: completed online below
        if folder is None:
            down = None if is_offline else _unreachable(repo_id, revision, endpoint, token)
            try:
                folder = snapshot(local_only=is_offline or down is not None)
            except Exception as e:  # the hub's error classes moved between huggingface_hub releases
                kind = type(e).__name__
                if is_offline and not _not_cached(e):  # the cache could not be read: say why
                    first = (str(e).strip().splitlines() or [""])[0].strip()[:300]
                    raise CheckpointError(
                        f"{path}: not a local folder, and hub model {repo_id}{at} could not be read from the "
                        f"Hugging Face cache {cache}: {kind}" + (f": {first}" if first else "")
                    ) from None
                if is_offline:
                    raise CheckpointError(
                        f"{path}: not a local folder, and hub model {repo_id}{at} is not in the Hugging Face "
                        f"cache {cache} (HF_HUB_OFFLINE is set: nothing is downloaded; download it once "
                        "online, or give a local folder)"
                    ) from None
                if down is not None:
                    why = f"the hub is unreachable ({down}) and it is not in the cache {cache}"
                elif kind in ("RepositoryNotFoundError", "GatedRepoError"):
                    why = "not found, or gated/private: set HF_TOKEN to a token with access"
                elif kind == "RevisionNotFoundError":
                    why = f"no revision {revision!r}"
                elif kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
                    why = "the hub is unreachable and it is not in the cache"
                else:
                    why = " ".join(str(e).split())[:300] or kind
                raise CheckpointError(
                    f"{path}: not a local folder, and hub model {repo_id}{at}: {why}"
                ) from None
    folder = str(folder)
    if model and not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(
            f"{path}: hub model {repo_id}{at} has no config.json (a tokenizer alone?), not a model to load"
        )
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("config.json", "tokenizer_config.json")):
        raise CheckpointError(f"{path}: hub snapshot {folder} has no config.json (not a transformers model)")
    lacks = _missing_weights(folder) if model and not config_only else None
    if lacks is not None:  # else the loader fails on the snapshot's path, naming neither the id nor why
        if is_offline:
            where, why = (
                f"the cached snapshot {folder}",
                "; HF_HUB_OFFLINE is set: run it once online to complete it",
            )
        elif down is not None:
            where, why = (
                f"the cached snapshot {folder}",
                f", and the hub is unreachable ({down}) to complete it",
            )
        else:  # downloaded, and still lacking: the repo has no such file
            where, why = "the repo", f" (downloaded to {folder})"
            if "index.json" not in lacks:  # no weights at all: most likely PyTorch .bin ones alone
                why += "; PyTorch .bin weights are not fetched: alignx reads safetensors"
        raise CheckpointError(f"{path}: hub model {repo_id}{at}: {where} lacks {lacks}{why}")
    return folder
