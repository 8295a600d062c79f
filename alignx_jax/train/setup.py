"""A run's start-up on disk: the workdir (lock, config check, config.json), the training data (or
synthetic users written once), the reference HF folder, and the fingerprint of derived files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from typing import Any

import jax
import ml_collections

from alignx_jax import workdir as workdir_lib
from alignx_jax.config import config_to_json
from alignx_jax.errors import ConfigError
from alignx_jax.real_model import resolve_model_path
from alignx_jax.train.signals import StopFlag


def ensure_data(cfg: ml_collections.ConfigDict, workdir: str, is_main: bool) -> str:
    """`data.train`, or synthetic users written into W/data once (as `alignx synth` does)."""
    if cfg.data.train:
        return cfg.data.train
    out = os.path.join(workdir, "data")
    key = workdir_lib.fingerprint(
        [int(cfg.data.synth_users), int(cfg.data.synth_pairs_per_user), int(cfg.data.synth_seed)]
    )
    have = os.path.exists(os.path.join(out, "data.parquet"))
    # data written before the key existed is kept; data of other synth settings is written again
    stale = have and os.path.exists(out + ".fingerprint") and not workdir_lib.fingerprint_matches(out, key)
    if is_main and (not have or stale):
        from alignx_jax.data import synth

        world = synth.generate_world(
            int(cfg.data.synth_users), int(cfg.data.synth_pairs_per_user), int(cfg.data.synth_seed)
        )
        tmp = out + ".tmp"  # written aside and renamed: a kill mid-write leaves no half parquet file
        shutil.rmtree(tmp, ignore_errors=True)
        synth.write_world(world, tmp)
        workdir_lib.forget_fingerprint(out)
        shutil.rmtree(out, ignore_errors=True)  # W/data is the run's own (written here from data.synth_*)
        os.replace(tmp, out)
        workdir_lib.write_fingerprint(out, key)
    sync("synth")
    return out


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_reference(cfg, model, workdir: str, tokenizer_dir: str, is_main: bool) -> None:
    """W/reference: the frozen reference as an HF folder with its tokenizer (written once)."""
    from alignx_jax.models import hf

    ref = os.path.join(workdir, "reference")
    if os.path.isfile(os.path.join(ref, "config.json")):
        return
    src = resolve_model_path(cfg.model.hf_path)
    is_hf = (
        bool(src)
        and os.path.isfile(os.path.join(src, "config.json"))
        and any(n.endswith(".safetensors") for n in os.listdir(src))
    )
    if is_hf:
        if is_main:  # an HF folder already is the reference: copy its files (no multi-host gather)
            tmp = ref + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for name in os.listdir(src):
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
            os.replace(tmp, ref)
    elif jax.process_count() == 1:
        tmp = ref + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_hf(model, tmp, tokenizer_dir=tokenizer_dir)
        os.replace(tmp, ref)
    elif is_main:
        print(
            "alignx train: W/reference not written (multi-host run from an orbax checkpoint; "
            "export the initial checkpoint with `alignx export`)",
            file=sys.stderr,
        )
    sync("reference")


def prepare_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> workdir_lib.WorkdirLock:
    """Create W, take its lock, refuse a resume that changes what is trained, write W/config.json."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir}: exists and is a file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir}: cannot create it ({e.strerror})") from None
    lock = workdir_lib.WorkdirLock(workdir)
    lock.acquire()
    try:
        current = json.loads(config_to_json(cfg))
        ckpts = os.path.join(workdir, "checkpoints")
        if os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):  # a resume
            workdir_lib.check_config_change(
                workdir, current, allow=bool(cfg.train.get("allow_config_change", False))
            )
        else:  # a fresh start over an earlier run's outputs: the reference folder is the old model's
            saved = workdir_lib.read_saved_config(workdir)
            ref = os.path.join(workdir, "reference")
            if (
                saved is not None
                and os.path.isdir(ref)
                and any(k.startswith("model.") for k in workdir_lib.changed_keys(saved, current))
            ):
                workdir_lib.warn(f"{workdir}/config.json names another model; rewriting {ref}")
                shutil.rmtree(ref)
        workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"), config_to_json(cfg))
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
