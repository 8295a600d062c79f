"""PBA's steps inside `alignx train`: the joint run's head, the two-stage head fit on the final policy,
and the first-stage head whose predicted P~ the policy's prompts render (`pba.preference`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from alignx_jax import sharding as shd
from alignx_jax import workdir as workdir_lib
from alignx_jax.data.persona import DIRECTION_FIELD
from alignx_jax.errors import DataError
from alignx_jax.models import preference_head as ph
from alignx_jax.models.presets import resolve_model_path
from alignx_jax.pba.head_training import head_config, train_head_two_stage
from alignx_jax.pba.predict import head_persona_features

PREDICTED_FILE = "pba_predicted.npy"


def build_head(cfg: ml_collections.ConfigDict, hidden_size: int, mesh, rules):
    """The joint run's PreferenceHead, placed on the mesh. Initialised from `model.hf_path`'s own head
    when that folder has one of the same shape and input rule (an exported or imported PBA model)."""
    hcfg = head_config(cfg, hidden_size)
    head = ph.PreferenceHead(hcfg, rngs=nnx.Rngs(int(cfg.pba.seed)))
    src = resolve_model_path(cfg.model.hf_path)
    if src and os.path.isdir(src) and ph.has_head(src):
        loaded, lcfg = ph.load_head(src)
        if lcfg == hcfg:
            head = loaded
        elif jax.process_index() == 0:
            print(
                f"alignx train: {src} has a preference head with a different config; starting a new one",
                file=sys.stderr,
            )
    return shd.shard_model(head, mesh, rules)


def _head_row_indices(cfg: ml_collections.ConfigDict, n: int) -> list[int]:
    k = int(cfg.pba.head_rows)
    if k <= 0 or k >= n:
        return list(range(n))
    return [
        int(i) for i in np.sort(np.random.default_rng([int(cfg.pba.seed), n]).choice(n, k, replace=False))
    ]


def head_rows(cfg: ml_collections.ConfigDict, source) -> list[dict]:
    """The rows a first/two-stage head is fit on: all, or a seeded subset of `pba.head_rows`."""
    return [source[i] for i in _head_row_indices(cfg, len(source))]


def check_head_rows(cfg: ml_collections.ConfigDict, source, *, first_stage: bool = False) -> None:
    """Before the first step: the head a two-stage run fits after its last step, or (`first_stage`) the one
    whose P~ `pba.preference` predicted/mix renders, needs a row with a `Preference Direction` among its
    head rows (found at the end, the run's steps would be lost; found in setup, the reference written)."""
    idx = _head_row_indices(cfg, len(source))
    if not any(source[i].get(DIRECTION_FIELD) is not None for i in idx):
        setting, instead = (
            (f"pba.preference={cfg.pba.preference}", "pba.preference=golden or history")
            if first_stage
            else ("pba.mode=two_stage", "pba.enabled=false")
        )
        raise DataError(
            f"{setting}: none of the {len(idx)} training rows the head is fit on (pba.head_rows) "
            f"has a '{DIRECTION_FIELD}' to learn from; use data with one, or {instead}"
        )


def fit_head(cfg: ml_collections.ConfigDict, backbone, tokenizer, rows: list[dict]):
    """A head fit two-stage (`pba.head_*` settings) on the frozen `backbone` over `rows`."""
    return train_head_two_stage(
        backbone,
        tokenizer,
        rows,
        cfg,
        steps=int(cfg.pba.head_steps),
        lr=float(cfg.pba.lr),
        batch_size=int(cfg.pba.head_batch_size),
        weight_decay=float(cfg.pba.weight_decay),
        seed=int(cfg.pba.seed),
        log_every=max(1, int(cfg.pba.head_steps) // 10),
    )


def fit_two_stage_head(
    cfg: ml_collections.ConfigDict, backbone, tokenizer, source
) -> tuple[Any, Any, dict[str, float]]:
    """(HeadConfig, head params as a pure dict, metrics) of a head fit on the frozen final policy."""
    res = fit_head(cfg, backbone, tokenizer, head_rows(cfg, source))
    metrics = {
        "head_loss": float(res.losses[-1]),
        "head_accuracy": float(res.train_metrics["accuracy"]),
        "head_accuracy_non_neutral": float(res.train_metrics["accuracy_non_neutral"]),
    }
    return res.cfg, ph.head_params(res.head), metrics


def predicted_directions(
    cfg: ml_collections.ConfigDict, policy, tokenizer, source, workdir: str, key: str = ""
) -> np.ndarray:
    """P~ of every training row from a first-stage head fit on the initial policy -> `[N, 90]` float32.

    Stored in `W/pba_predicted.npy` so that a resumed run reuses exactly the same profiles; `key`
    (`train.setup.derived_fingerprint`) names the inputs they were computed from: other inputs recompute them.
    A multi-process run: every process fits the same head on the global mesh (the backbone passes are
    collectives) and gets the same P~; process 0 writes the file, the others wait for it.
    """
    from alignx_jax.batch import agree_max

    path = os.path.join(workdir, PREDICTED_FILE)
    n = len(source)
    dirs = None
    if workdir_lib.fingerprint_matches(path, key):
        dirs = workdir_lib.load_array(path)
        if dirs.shape != (n, ph.NUM_DIMS):
            dirs = None
    if not agree_max(int(dirs is None)):  # every process takes the same branch
        return dirs
    main = jax.process_index() == 0
    t0 = time.perf_counter()
    res = fit_head(cfg, policy, tokenizer, head_rows(cfg, source))
    rows = [source[i] for i in range(n)]
    feats = (
        res.features
        if int(cfg.pba.head_rows) <= 0 or int(cfg.pba.head_rows) >= n
        else head_persona_features(policy, tokenizer, rows, res.cfg)
    )
    dirs = ph.predict_direction(ph.head_probs(res.head, feats)).astype(np.float32)
    if main:
        workdir_lib.save_derived(path, dirs, key)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pba-predicted")
    if not main:
        return dirs
    gold = [i for i in range(n) if rows[i].get("Preference Direction") is not None]
    acc = ph.head_metrics(dirs[gold], np.asarray([rows[i]["Preference Direction"] for i in gold], np.float32))
    print(
        f"alignx train: first-stage preference head on {len(rows)} rows ({time.perf_counter() - t0:.1f}s): "
        f"accuracy {acc['accuracy']:.4f}, macro-F1 {acc['macro_f1']:.4f}; profiles -> {path}",
        file=sys.stderr,
    )
    return dirs
