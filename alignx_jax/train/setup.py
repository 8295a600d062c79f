"""A run's start-up on disk: the workdir (lock, config check, config.json), the training data (or
synthetic users written once), the reference HF folder, and the fingerprint of derived files.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import sys
from typing import Any

import jax
import ml_collections

from alignx_jax import model_card, paths
from alignx_jax import workdir as workdir_lib
from alignx_jax.config import config_to_json
from alignx_jax.errors import ConfigError
from alignx_jax.hardware import describe_auto, resolve_dtype
from alignx_jax.models.presets import resolve_model_path
from alignx_jax.models.safetensors_io import holds_safetensors
from alignx_jax.train.signals import StopFlag

# the local folders (and fingerprints) `_write_synth` writes aside for a URL workdir in the system's temporary folder
_LOCAL_SYNTH = re.compile(r"alignx-synth-[0-9a-f]{16}(\.fingerprint)?")


def ensure_data(cfg: ml_collections.ConfigDict, workdir: str, is_main: bool) -> str:
    """`data.train`, or synthetic users written into W/data once (as `alignx synth` does).

    A URL workdir (gs://...): the loader reads local files, so every process writes the (deterministic,
    small) synthetic users into a local folder keyed by their settings and reads them from there;
    process 0 also copies them into W/data, the run's record."""
    if cfg.data.train:
        return cfg.data.train
    key = workdir_lib.fingerprint(
        [int(cfg.data.synth_users), int(cfg.data.synth_pairs_per_user), int(cfg.data.synth_seed)]
    )
    if paths.is_url(workdir):
        import tempfile

        local = os.path.join(tempfile.gettempdir(), f"alignx-synth-{key[:16]}")
        paths.remove_dead_tmp(tempfile.gettempdir(), _LOCAL_SYNTH)  # a killed run's, never renamed
        _write_synth(cfg, local, key, write=True)
        remote = paths.path(workdir) / "data"
        if is_main and not (remote / "data.parquet").exists():
            remote.mkdir(parents=True, exist_ok=True)
            for name in os.listdir(local):
                (remote / name).write_bytes(open(os.path.join(local, name), "rb").read())
        sync("synth")
        return local
    out = os.path.join(workdir, "data")
    _write_synth(cfg, out, key, write=is_main)
    sync("synth")
    return out


def _write_synth(cfg: ml_collections.ConfigDict, out: str, key: str, *, write: bool) -> None:
    """The synthetic users into the local folder `out`, unless there already (of the same settings)."""
    have = os.path.exists(os.path.join(out, "data.parquet"))
    # data written before the key existed is kept; data of other synth settings is written again
    stale = have and os.path.exists(out + ".fingerprint") and not workdir_lib.fingerprint_matches(out, key)
    if write and (not have or stale):
        from alignx_jax.data import synth

        world = synth.generate_world(
            int(cfg.data.synth_users), int(cfg.data.synth_pairs_per_user), int(cfg.data.synth_seed)
        )
        # written aside and renamed: a kill mid-write leaves no half parquet file (one tmp per process:
        # the processes of a URL-workdir job on one machine may all write the same local folder)
        tmp = paths.tmp_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        synth.write_world(world, tmp)
        workdir_lib.forget_fingerprint(out)
        shutil.rmtree(out, ignore_errors=True)  # W/data is the run's own (written here from data.synth_*)
        # named before the rename: a kill between the two leaves no data (written again), never data that
        # no fingerprint names (kept as data from before fingerprints, whatever the settings)
        workdir_lib.write_fingerprint(out, key)
        try:
            os.replace(tmp, out)
        except OSError:  # another process of this machine renamed its same data first
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(os.path.join(out, "data.parquet")):
                raise


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_reference(cfg, model, workdir: str, tokenizer_dir: str, is_main: bool) -> None:
    """W/reference: the frozen reference as an HF folder with its tokenizer (written once, by process 0).

    A multi-process run gathers the weights to every host first (one parameter at a time, a collective
    every process joins), so `alignx export` of its workdir finds the config and tokenizer as in a
    1-process run. A URL workdir: written to a local folder, then copied."""
    from alignx_jax.models import hf

    ref = paths.path(workdir) / "reference"
    there = (ref / "config.json").is_file()
    sync("reference-check")  # every process looked before process 0 writes: all take the same branch
    if there:
        return
    src = resolve_model_path(cfg.model.hf_path, model=True)
    is_hf = bool(src) and holds_safetensors(src) and os.path.isfile(os.path.join(src, "config.json"))
    # where the base came from, decided here (a relative path is relative to this directory), for the
    # export's model card and PEFT adapter config; written inside the folder before it is renamed in
    extra: dict[str, bytes] = {}
    if cfg.model.hf_path:
        info = model_card.base_record(str(cfg.model.hf_path), src if src and os.path.isdir(src) else None)
        extra[model_card.BASE_INFO] = json.dumps(info, indent=2, sort_keys=True).encode("utf-8")
    if is_hf:
        if is_main:  # an HF folder already is the reference: copy its files (no multi-host gather)
            files = _folder_files(src)
            if tokenizer_dir and os.path.realpath(tokenizer_dir) != os.path.realpath(src):
                # model.tokenizer's files, not the weights folder's: an export ships what the run trained with
                files = {n: p for n, p in files.items() if n not in hf.TOKENIZER_FILES}
                files.update(
                    (n, os.path.join(tokenizer_dir, n))
                    for n in hf.TOKENIZER_FILES
                    if os.path.isfile(os.path.join(tokenizer_dir, n))
                )
            _publish_folder(files, ref, extra)
    else:
        from alignx_jax.models import checkpoint

        # a model checkpoint's or workdir's generation_config.json is its base's: it may list stop tokens
        # (Gemma-2's <end_of_turn>) that config.json's eos_token_id does not
        base_dir = (
            checkpoint.resolve_checkpoint(src).config_dir
            if src and checkpoint.is_checkpoint_layout(src)
            else None
        )
        host_model = _gathered(model)
        if is_main and paths.is_url(workdir):  # written locally, then copied to the bucket
            import tempfile

            with tempfile.TemporaryDirectory(prefix="alignx-reference-") as local:
                tmp = os.path.join(local, "reference")
                hf.save_hf(host_model, tmp, tokenizer_dir=tokenizer_dir, base_dir=base_dir)
                _publish_folder(tmp, ref, extra)
        elif is_main:  # beside its place in W (a full disk names W) and renamed into place
            tmp = paths.path(paths.tmp_path(ref))
            if tmp.exists():
                tmp.rmtree()
            hf.save_hf(host_model, os.fspath(tmp), tokenizer_dir=tokenizer_dir, base_dir=base_dir)
            for name, data in extra.items():
                (tmp / name).write_bytes(data)
            if ref.exists():
                ref.rmtree()
            tmp.rename(ref)
        del host_model
    sync("reference")


def _gathered(model):
    """`model` with every parameter as a whole host array on this process (one process: `model` itself)."""
    if jax.process_count() == 1:
        return model
    from flax import nnx
    from jax.experimental import multihost_utils

    graphdef, state = nnx.split(model)

    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return nnx.merge(graphdef, jax.tree.map(gather, state))


def _folder_files(folder: str) -> dict[str, str]:
    """{name: path} of the files (not folders) directly in the local `folder`."""
    return {n: os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))}


def _publish_folder(src: str | dict[str, str], dst, extra: dict[str, bytes] | None = None) -> None:
    """The files `src` (a local folder's, or {name: local path}) and `extra` ({name: bytes}) as the folder
    `dst` (an epath.Path, maybe a URL), written aside and renamed into place."""
    # a URL has no dead-temp sweep: its one `NAME.tmp` is cleared here by the next write instead
    tmp = dst.parent / (dst.name + ".tmp") if paths.is_url(dst) else paths.path(paths.tmp_path(dst))
    if tmp.exists():
        tmp.rmtree()
    if isinstance(src, str):
        src = _folder_files(src)
    tmp.mkdir(parents=True)
    for name, path in sorted(src.items()):
        with open(path, "rb") as f:
            (tmp / name).write_bytes(f.read())
    for name, data in (extra or {}).items():
        (tmp / name).write_bytes(data)
    if dst.exists():
        dst.rmtree()
    tmp.rename(dst)


def write_run_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """W/config.json: the run's resolved config."""
    workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), config_to_json(cfg))


def _refuse_dangling_link(workdir: str) -> None:
    """ConfigError naming a symlink to a missing folder at the local `workdir` or on its way up (the
    nearest part that exists): mkdir's own word for it is "File exists"."""
    part = os.path.abspath(workdir)
    while not os.path.lexists(part) and os.path.dirname(part) != part:
        part = os.path.dirname(part)
    if not os.path.islink(part) or os.path.exists(part):
        return
    which = "" if part == os.path.abspath(workdir) else f"{part} is "
    raise ConfigError(
        f"workdir {workdir}: {which}a symlink to a missing {os.path.realpath(part)}; create that folder or "
        "choose another workdir"
    )


def prepare_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> workdir_lib.WorkdirLock:
    """Create W, take its lock, refuse a resume that changes what is trained. W/config.json is written
    once the restore's outcome is known (`write_run_config`): a failed resume with a changed config must
    leave it describing the checkpoints."""
    w = paths.path(workdir)
    if w.exists() and not w.is_dir():
        raise ConfigError(f"workdir {workdir}: exists and is a file, not a folder")
    if not paths.is_url(workdir):
        _refuse_dangling_link(workdir)
    try:
        w.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir}: cannot create it ({e.strerror})") from None
    lock = workdir_lib.WorkdirLock(workdir)
    lock.acquire()
    try:
        if not paths.is_url(workdir):  # a URL is written in place, never aside
            workdir_lib.remove_dead_tmp(workdir)
        current = json.loads(config_to_json(cfg))
        ckpts = w / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):  # a resume
            allow = bool(cfg.train.allow_config_change)
            if allow:  # before W/data is rewritten (without allow, the change is refused as any other)
                workdir_lib.check_synth_kept(workdir, current)
            workdir_lib.check_config_change(workdir, current, allow=allow)
        else:  # a fresh start over an earlier run's outputs: the reference folder is the old model's
            saved = workdir_lib.read_saved_config(workdir)
            ref = w / "reference"
            if (
                saved is not None
                and ref.is_dir()
                and any(k.startswith("model.") for k in workdir_lib.changed_keys(saved, current))
            ):
                workdir_lib.warn(f"{workdir}/config.json names another model; rewriting {ref}")
                ref.rmtree()
    except BaseException:
        lock.release()
        raise
    return lock


def stopped_in_start_up(stop: StopFlag, is_main: bool) -> int:
    if is_main:
        print(
            f"alignx train: {signal.Signals(stop.signum).name} received during start-up; nothing to save "
            "(rerun the same command to start or resume)",
            file=sys.stderr,
        )
    return 0


def derived_fingerprint(cfg: ml_collections.ConfigDict, data_path: str, **extra: Any) -> str:
    """What a file derived from the run's inputs depends on: the config (less what only changes how long or
    how fast it runs, and the optimizer), the data files and the model files (sizes and mtimes)."""
    flat = workdir_lib.flatten(json.loads(config_to_json(cfg)))
    keep = {k: v for k, v in flat.items() if not k.startswith("optim.") and not workdir_lib.is_free(k)}
    return workdir_lib.fingerprint(
        {
            "config": keep,
            "data": workdir_lib.path_signature(data_path),
            "model": workdir_lib.path_signature(resolve_model_path(cfg.model.hf_path)),
            **extra,
        }
    )


def warn_skipped(source: Any, what: str, is_main: bool) -> None:
    """data.skip_bad_rows: how many rows were left out, and the first one's error (naming its file and row)."""
    if is_main and getattr(source, "skipped", 0):
        workdir_lib.warn(
            f"{source.skipped} {what} row(s) skipped (data.skip_bad_rows), the first: {source.first_skipped}"
        )


def with_concrete_dtype(cfg: ml_collections.ConfigDict, say: bool = False) -> ml_collections.ConfigDict:
    """`cfg` with model.dtype=auto made concrete for this machine (`hardware.resolve_dtype`); the
    workdir's config.json keeps `auto`, so the same command on another machine picks that machine's."""
    dtype = resolve_dtype(str(cfg.model.dtype))
    if dtype == cfg.model.dtype:
        return cfg
    if say:
        print(f"alignx train: model.dtype {describe_auto(dtype)}", file=sys.stderr)
    cfg = copy.deepcopy(cfg)
    cfg.model.dtype = dtype
    return cfg
