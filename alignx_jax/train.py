"""DPO training (ICA / PBA / non-personalized): train state, the jitted sharded step, the loop.

`alignx train --config=CONFIG.py --config.workdir=W [--config.KEY=VALUE ...]`

One optimizer step = one call of a jitted function on the whole global batch: the batch arrives as
`[M, b, 2, T]` (M microbatches of b pairs, chosen and rejected side by side so a device always
holds both halves of its pairs), and `lax.scan` accumulates float32 gradients over the M
microbatches before one AdamW update. Params are float32 master weights; the decoder computes in
`model.dtype` (bf16 on accelerators). The reference is a frozen copy of the initial weights in the
compute dtype (`loss.reference=on_the_fly`), or its log-probs are computed once in a pass over the
exact batch sequence the run will see and stored as `W/ref_logps.p<process>.npy`
(`loss.reference=precomputed`; the frozen copy is then freed before training).

Workdir `W`: `config.json`, `reference/` (HF folder of the frozen reference + tokenizer),
`metrics.jsonl`, `tensorboard/`, `checkpoints/<step>/{params,opt_state,head?,meta}`. SIGTERM/SIGINT
save at the next step boundary and exit 0; rerunning the same command resumes from the newest
checkpoint that verifies (`checkpointing`: checksums and finiteness; a bad newer step is moved aside
with a warning). `W/train.lock` keeps a second run out; a resume may not change what is trained
(`workdir.FREE_KEYS` lists what it may change) unless `train.allow_config_change`.

Every step checks, inside the jitted step, that its loss, gradient norm and updated params are finite
(`nonfinite_code`). `loss.nan_policy='stop'`: a non-finite step stops the run (exit 1), is never saved,
and the error names the newest saved step that verifies; 'skip': the step's update is dropped (counted
as `skipped_nonfinite_steps`), and `loss.max_skipped_steps` such steps in a row stop the run.

PBA's preference head (`data.method='pba'`, `pba.enabled`):
  * `pba.mode='joint'`: the head is trained in the same step as the policy, on the same backbone:
    loss = DPO + pba.weight * CE(head(pooled persona hidden states), row's `Preference Direction`)
    (`preference_head.joint_head_term`). The trained tree is `{'policy', 'head'}` with one AdamW
    per part (the head's at `pba.lr`; gradient clipping and `grad_norm` are the policy's only, so
    with `pba.stop_gradient` the policy's update is exactly that of a DPO-only run). Checkpoints
    store the head as the `head` item and its `HeadConfig` in `meta['head_config']`.
  * `pba.mode='two_stage'`: DPO only; after the last step the head is fit on the final policy,
    frozen (`head_training.train_head_two_stage`: pooled features cached once, then AdamW on the
    MLP only), and saved with the last checkpoint.
  * `pba.preference`: the P~ rendered into the policy's prompt. 'golden' = the row's own;
    'predicted' = P~ predicted by a *first-stage* head: before step 1 a head is fit two-stage on
    the initial policy (`pba.head_*`), and its prediction for every training row is stored in
    `W/pba_predicted.npy` and used for the whole run (fixed per row, so resume and the precomputed
    reference stay exact); 'mix' = the predicted P~ for a fixed `pba.mix_predicted` fraction of
    rows (chosen per row from `train.seed`), golden for the rest. The policy so learns to read
    the noisier profiles it will see when evaluated with `--preference predicted`.
  Predicted profiles and the two-stage head run on one process (ConfigError on multi-host runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from alignx_jax import losses
from alignx_jax import sharding as shd
from alignx_jax import workdir as workdir_lib
from alignx_jax.checkpointing import TrainCheckpointer, abstract_like
from alignx_jax.config import config_to_json, load_config
from alignx_jax.data import batching
from alignx_jax.errors import AlignXError, ConfigError
from alignx_jax.metrics import MetricsWriter
from alignx_jax.models.compaction import TokenLayout
from alignx_jax.real_model import resolve_model_path

METHODS = ("ica", "pba", "none")
REFERENCE_MODES = ("on_the_fly", "precomputed")
PBA_MODES = ("joint", "two_stage")
PBA_PREFERENCES = ("golden", "predicted", "mix")
PREDICTED_FILE = "pba_predicted.npy"
NAN_POLICIES = ("stop", "skip")


def head_enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run trains PBA's preference head (either mode)."""
    return cfg.data.method == "pba" and bool(cfg.pba.enabled)


def joint_head(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the head is trained inside the DPO step (persona ids then travel with every batch)."""
    return head_enabled(cfg) and cfg.pba.mode == "joint"


# ----------------------------------------------------------------------------- config checks


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Consistency checks a key lookup cannot do; each failure is one ConfigError line."""
    if not cfg.workdir:
        raise ConfigError("--config.workdir is required (the run's output folder)")
    buckets = cfg.data.buckets
    if (
        not isinstance(buckets, (tuple, list))
        or not buckets
        or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in buckets)
    ):
        raise ConfigError(
            f"data.buckets={buckets!r}: expected a tuple of positive integers, e.g. (1024, 2048)"
        )
    if not cfg.model.hf_path and not cfg.model.init.enabled:
        raise ConfigError("--config.model.hf_path is required (an HF folder or `alignx import` checkpoint)")
    if not cfg.data.train and cfg.data.synth_users <= 0:
        raise ConfigError("--config.data.train is required (parquet/JSONL/JSON file or folder)")
    if cfg.data.method not in METHODS:
        raise ConfigError(f"data.method={cfg.data.method!r}: expected one of {', '.join(METHODS)}")
    if cfg.loss.type not in losses.LOSS_TYPES:
        raise ConfigError(f"loss.type={cfg.loss.type!r}: expected one of {', '.join(losses.LOSS_TYPES)}")
    if cfg.loss.reference not in REFERENCE_MODES:
        raise ConfigError(
            f"loss.reference={cfg.loss.reference!r}: expected one of {', '.join(REFERENCE_MODES)}"
        )
    if cfg.loss.beta <= 0:
        raise ConfigError(f"loss.beta must be positive, got {cfg.loss.beta}")
    if cfg.loss.type == "robust" and not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError("loss.label_smoothing must be in [0, 0.5) for the robust loss")
    if cfg.loss.sft_norm not in ("length", "sum"):
        raise ConfigError(f"loss.sft_norm={cfg.loss.sft_norm!r}: expected 'length' or 'sum'")
    if cfg.loss.get("nan_policy", "stop") not in NAN_POLICIES:
        raise ConfigError(
            f"loss.nan_policy={cfg.loss.nan_policy!r}: expected one of {', '.join(NAN_POLICIES)}"
        )
    if int(cfg.loss.get("max_skipped_steps", 10)) < 1:
        raise ConfigError(f"loss.max_skipped_steps must be at least 1, got {cfg.loss.max_skipped_steps}")
    gb, mb = cfg.train.global_batch, cfg.train.micro_batch or cfg.train.global_batch
    if gb <= 0 or mb <= 0 or gb % mb:
        raise ConfigError(f"train.global_batch={gb} must be a positive multiple of train.micro_batch={mb}")
    if cfg.train.steps == 0 or cfg.train.steps < -1 or (cfg.train.steps == -1 and cfg.train.epochs <= 0):
        raise ConfigError("train.steps must be positive, or -1 with train.epochs > 0")
    if max(cfg.data.buckets) < cfg.data.max_length:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the largest of data.buckets "
            f"{tuple(cfg.data.buckets)}"
        )
    if cfg.data.get("packing", False):
        if not cfg.data.get("share_prompt", False):
            raise ConfigError("data.packing packs share_prompt rows: set data.share_prompt=true as well")
        if jax.process_count() > 1:
            raise ConfigError(
                "data.packing runs on one process (each host's rows would need a global row "
                "offset); use data.share_prompt alone on multi-host runs"
            )
    if cfg.data.get("share_prompt", False) or cfg.data.get("packing", False):
        from alignx_jax.data.batching import reserve

        longest = int(cfg.data.max_length) + reserve(int(cfg.data.max_length))
        if max(cfg.data.buckets) < longest:
            raise ConfigError(
                f"data.share_prompt: rows hold a prompt and both responses, up to data.max_length + "
                f"{reserve(int(cfg.data.max_length))} = {longest} tokens, beyond the largest of "
                f"data.buckets {tuple(cfg.data.buckets)}"
            )
    if int(cfg.data.get("compact_tokens", 8)) < 0:
        raise ConfigError(
            f"data.compact_tokens={cfg.data.compact_tokens}: the number of kept-token sizes per "
            "row length, >= 1 (0 = off)"
        )
    if cfg.model.attention_impl == "splash":
        if cfg.data.get("share_prompt", False):
            raise ConfigError(
                "model.attention_impl=splash cannot express data.share_prompt's branch mask; "
                "use attention_impl=xla or auto with share_prompt"
            )
        odd = [int(b) for b in cfg.data.buckets if int(b) % 128]
        if odd:
            raise ConfigError(
                f"model.attention_impl=splash tiles rows by 128 tokens: data.buckets {odd} "
                "are not multiples of 128"
            )
    if cfg.data.method == "pba":
        pba = cfg.pba
        if pba.preference not in PBA_PREFERENCES:
            raise ConfigError(
                f"pba.preference={pba.preference!r}: expected one of {', '.join(PBA_PREFERENCES)}"
            )
        if pba.mode not in PBA_MODES:
            raise ConfigError(f"pba.mode={pba.mode!r}: expected one of {', '.join(PBA_MODES)}")
        if not 0.0 <= float(pba.mix_predicted) <= 1.0:
            raise ConfigError(f"pba.mix_predicted must be in [0, 1], got {pba.mix_predicted}")
        if float(pba.focal_gamma) < 0:
            raise ConfigError(f"pba.focal_gamma must be >= 0, got {pba.focal_gamma}")
        if float(pba.weight) < 0:
            raise ConfigError(f"pba.weight must be >= 0, got {pba.weight}")
        if float(pba.lr) <= 0:
            raise ConfigError(f"pba.lr must be positive, got {pba.lr}")
        if int(pba.max_persona_tokens) < 2:
            raise ConfigError(f"pba.max_persona_tokens must be at least 2, got {pba.max_persona_tokens}")
        if int(pba.head_steps) < 1 or int(pba.head_batch_size) < 1 or int(pba.head_rows) < 0:
            raise ConfigError("pba.head_steps and pba.head_batch_size must be positive, pba.head_rows >= 0")
        if joint_head(cfg) and int(pba.max_persona_tokens) > max(cfg.data.buckets):
            raise ConfigError(
                f"pba.max_persona_tokens={pba.max_persona_tokens} exceeds the largest of data.buckets "
                f"{tuple(cfg.data.buckets)} (persona ids are padded to a bucket)"
            )


def rules_from_config(cfg: ml_collections.ConfigDict) -> shd.Rules:
    return tuple(
        (str(name), None if axes is None else (axes if isinstance(axes, str) else tuple(axes)))
        for name, axes in cfg.sharding.rules
    )


# ----------------------------------------------------------------------------- model


def _run_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    remat = cfg.model.remat
    if isinstance(remat, bool):  # True = recompute everything per layer (gradient checkpointing)
        remat = "full" if remat else "none"
    return {
        "remat": str(remat),
        "scan_layers": bool(cfg.model.scan_layers),
        "attention_impl": str(cfg.model.attention_impl),
        "frozen_layers": int(cfg.model.frozen_layers),
    }


def load_tokenizer_for(cfg: ml_collections.ConfigDict):
    """(tokenizer, folder holding its files or None for the shipped one)."""
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    path = resolve_model_path(cfg.model.tokenizer or cfg.model.hf_path) or None
    tok = load_tokenizer(path)
    return tok, (path or TINY_TOKENIZER_DIR)


def build_policy(cfg: ml_collections.ConfigDict, tokenizer, mesh, rules):
    """The policy Decoder with float32 (param_dtype) master weights placed on the mesh."""
    from alignx_jax.models import hf
    from alignx_jax.models.decoder import Decoder, DecoderConfig

    opts = _run_options(cfg)
    if cfg.model.hf_path:
        path = resolve_model_path(cfg.model.hf_path)
        if os.path.isdir(os.path.join(path, "params")) or os.path.isdir(os.path.join(path, "checkpoints")):
            return hf.load_checkpoint(
                path,
                dtype=cfg.model.param_dtype,
                mesh=mesh,
                rules=rules,
                compute_dtype=cfg.model.dtype,
                **opts,
            )
        return hf.load_pretrained(
            path, cfg.model.param_dtype, mesh, rules, compute_dtype=cfg.model.dtype, **opts
        )
    init = cfg.model.init
    hf_cfg = {
        k: init[k]
        for k in (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rope_theta",
            "rms_norm_eps",
            "max_position_embeddings",
            "tie_word_embeddings",
        )
    }
    hf_cfg["vocab_size"] = len(tokenizer) if init.vocab_size == -1 else int(init.vocab_size)
    hf_cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dcfg = DecoderConfig.from_hf(hf_cfg, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, **opts)
    model = Decoder(dcfg, rngs=nnx.Rngs(int(init.seed)))
    return shd.shard_model(model, mesh, rules)


@dataclasses.dataclass(frozen=True)
class ParamsCodec:
    """Pure-dict params (what we train, checkpoint and export) <-> the Decoder module."""

    graphdef: Any
    treedef: Any

    @classmethod
    def of(cls, model) -> ParamsCodec:
        graphdef, state = nnx.split(model)
        pure = nnx.to_pure_dict(state)

        # leaves of the State and of its pure dict must line up one to one (both sort dict keys)
        def names(tree):
            return [
                tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
                for path, _ in jax.tree_util.tree_leaves_with_path(tree)
            ]

        if names(state) != names(pure):
            raise RuntimeError("decoder state and its pure dict disagree on leaf order")
        return cls(graphdef, jax.tree.structure(state))

    def module(self, params: Any):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True)
class HeadCodec:
    """Pure-dict params <-> the PreferenceHead. Only `nnx.Param`s are trained; the rest of the
    head's state (its dropout RNG stream) is a constant, since the joint term runs deterministically."""

    graphdef: Any
    treedef: Any
    rest: Any

    @classmethod
    def of(cls, head) -> HeadCodec:
        graphdef, params, rest = nnx.split(head, nnx.Param, ...)
        return cls(graphdef, jax.tree.structure(params), rest)

    @staticmethod
    def params(head) -> dict[str, Any]:
        return nnx.to_pure_dict(nnx.state(head, nnx.Param))

    def module(self, params: Any):
        state = jax.tree.unflatten(self.treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state, self.rest)


# ----------------------------------------------------------------------------- the step


def freeze_lower_layers(frozen_layers: int) -> optax.GradientTransformation:
    """Zero the updates of the bottom `frozen_layers` blocks and the input embedding (model.frozen_layers):
    their gradients are already zero, but AdamW's weight decay would still move them."""
    if not frozen_layers:
        return optax.identity()

    def zero_frozen(path, u):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys[:1] == ["embed_tokens"]:
            return jnp.zeros_like(u)
        if keys[:1] == ["layers"]:
            return u.at[:frozen_layers].set(0)
        return u

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(zero_frozen, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, frozen_layers: int = 0
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW + global-norm clipping; linear warm-up to lr, cosine to min_lr_ratio * lr."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip) if optim.clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
        freeze_lower_layers(frozen_layers),
    )
    return tx, schedule


def make_head_optimizer(pba: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The preference head's own AdamW (constant `pba.lr`), separate from the policy's schedule and clip."""
    return optax.adamw(float(pba.lr), weight_decay=float(pba.weight_decay))


def pair_logps(codec: ParamsCodec, params: Any, mb: dict[str, jax.Array], chunk: int | None) -> jax.Array:
    """Summed response log-probs `[b, 2]` (chosen, rejected) for one microbatch `[b, 2, T]`."""
    return model_pair_logps(codec.module(params), mb, chunk)


def model_pair_logps(model, mb: dict[str, jax.Array], chunk: int | None) -> jax.Array:
    """`pair_logps` for an already merged Decoder."""
    # data.compact_tokens: the token-wise layers run on the batch's real tokens only
    tokens = TokenLayout(mb["token_index"], mb["token_slot"]) if "token_index" in mb else None
    with jax.named_scope("pair_logps"):
        if "branch_ids" in mb:  # one row per pair: prompt, chosen, rejected (batching.share_prompt)
            h_NTD = model.hidden_states(
                mb["input_ids"],
                mb["attention_mask"],
                mb["positions"],
                segment_ids_BT=mb.get("segment_ids"),
                branch_ids_BT=mb["branch_ids"],
                tokens=tokens,
            )
            w_DV = model.output_embedding().astype(h_NTD.dtype)
            return losses.flat_logps(
                h_NTD,
                w_DV,
                mb["score_flat"],
                mb["score_target"],
                mb["score_slot"],
                mb["score_valid"],
                num_slots=2 * mb["pair_mask"].shape[0],
                chunk=chunk,
            ).reshape(-1, 2)
        b, two, T = mb["input_ids"].shape
        flat = {
            k: mb[k].reshape(b * two, T) for k in ("input_ids", "attention_mask", "positions", "loss_mask")
        }
        h_ND = model.hidden_states(
            flat["input_ids"], flat["attention_mask"], flat["positions"], tokens=tokens
        )
        w_DV = model.output_embedding().astype(h_ND.dtype)
        if "score_index" in mb:  # logits on the response window only (loss.logits_on_responses)
            idx = mb["score_index"].reshape(b * two, -1)
            lp = losses.window_logps(h_ND, w_DV, flat["input_ids"], flat["loss_mask"], idx, chunk=chunk)
        else:
            lp = losses.sequence_logps(h_ND, w_DV, flat["input_ids"], flat["loss_mask"], chunk=chunk)
        return lp.reshape(b, two)


NONFINITE_PARTS = ((1, "loss"), (2, "gradient norm"), (4, "updated params"))


def nonfinite_code(losses_: tuple, norms: tuple, new_params: Any) -> jax.Array:
    """int32 bit set: 1 = a loss, 2 = a gradient norm, 4 = an updated param is NaN/inf (0: all finite)."""

    def all_finite(xs):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))

    return (
        jnp.where(all_finite(losses_), 0, 1)
        + jnp.where(all_finite(norms), 0, 2)
        + jnp.where(all_finite(jax.tree.leaves(new_params)), 0, 4)
    ).astype(jnp.int32)


def describe_nonfinite(code: int) -> str:
    """'loss, gradient norm' for a `nonfinite_code`."""
    return ", ".join(name for bit, name in NONFINITE_PARTS if int(code) & bit)


def make_train_step(
    codec: ParamsCodec,
    tx: optax.GradientTransformation,
    loss_cfg: ml_collections.ConfigDict,
    *,
    precomputed: bool,
    grad_shardings: Any = None,
    head_codec: HeadCodec | None = None,
    head_tx: optax.GradientTransformation | None = None,
    pba_cfg: ml_collections.ConfigDict | None = None,
) -> Callable:
    """`step(params, opt_state, ref_params, batch) -> (params, opt_state, metrics)`, to be jitted.

    batch: input_ids/attention_mask/positions/loss_mask `[M, b, 2, T]`, pair_mask `[M, b]`, and
    ref_logps `[M, b, 2]` when precomputed. The loss is the mean over all real pairs of the global
    batch, so it does not depend on how the batch is cut into microbatches.

    Joint PBA (`head_codec` given, with `head_tx` and the `pba` config section): params and
    opt_state are `{'policy': ..., 'head': ...}`, the batch also holds persona_ids/persona_mask
    `[M, b, P]` and direction `[M, b, 90]`, and the objective is DPO + `joint_head_term` (weighted
    by pba.weight). Metrics: `loss` stays the DPO loss (comparable across methods), `total_loss`
    is the objective, `head_loss` (unweighted CE) / `head_accuracy` / `head_accuracy_non_neutral`
    are global-batch means, `grad_norm` is the policy's, `head_grad_norm` the head's.

    `metrics['nonfinite']` (`nonfinite_code`) is 0 when the loss, the gradient norm(s) and the updated
    params are all finite; with `loss.nan_policy='skip'` a step where it is not returns the old params
    and optimizer state unchanged.
    """
    from alignx_jax.models import preference_head as ph

    chunk = int(loss_cfg.logps_chunk) or None
    beta = float(loss_cfg.beta)
    skip_nonfinite = loss_cfg.get("nan_policy", "stop") == "skip"
    joint = head_codec is not None
    if joint and (head_tx is None or pba_cfg is None):
        raise ValueError("make_train_step: a head_codec needs head_tx and pba_cfg")

    def step(params, opt_state, ref_params, batch):
        n_pairs = jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)

        def micro_grads(mb):
            """(gradients, metric sums) of one microbatch."""
            pm = mb["pair_mask"].astype(jnp.float32)
            ntok = (
                mb["score_count"].astype(jnp.float32)
                if "branch_ids" in mb
                else jnp.sum(mb["loss_mask"].astype(jnp.float32), axis=-1)
            )  # [b, 2]
            if precomputed:
                ref = mb["ref_logps"]
            else:
                ref = jax.lax.stop_gradient(pair_logps(codec, ref_params, mb, chunk))

            def loss_fn(p):
                model = codec.module(p["policy"] if joint else p)
                lp = model_pair_logps(model, mb, chunk)
                per = losses.dpo_per_pair(
                    lp[:, 0],
                    lp[:, 1],
                    ref[:, 0],
                    ref[:, 1],
                    loss_cfg,
                    chosen_tokens=ntok[:, 0],
                    rejected_tokens=ntok[:, 1],
                )
                dpo = jnp.sum(per * pm) / n_pairs
                if not joint:
                    return dpo, (lp, {})
                # the same merged policy reads the persona: one backbone for DPO and the head
                term, hm = ph.joint_head_term(
                    model, head_codec.module(p["head"]), mb, pba_cfg, n_pairs=n_pairs
                )
                return dpo + term, (lp, {"dpo": dpo, **hm})

            (loss, (lp, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            sums = losses.dpo_sums(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta, pm)
            sums["loss"] = loss
            if joint:
                # per-microbatch means -> sums weighted by their counts, divided once at the end
                nn = jnp.sum((ph.direction_to_labels(mb["direction"]) != ph.NEUTRAL) * pm[:, None])
                sums.update(
                    loss=aux["dpo"],
                    total_loss=loss,
                    head_loss=aux["head_loss"],
                    head_accuracy=aux["head_accuracy"] * jnp.sum(pm),
                    head_accuracy_non_neutral=aux["head_accuracy_non_neutral"] * nn,
                    non_neutral=nn,
                )
            return grads, sums

        def constrained(grads):
            return (
                grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)
            )

        def accumulate(carry, mb):
            grads_acc, sums_acc = carry
            grads, sums = micro_grads(mb)
            grads_acc = constrained(jax.tree.map(jnp.add, grads_acc, grads))
            return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

        num_micro = jax.tree.leaves(batch)[0].shape[0]
        if num_micro == 1:  # a single microbatch: no accumulator to zero-fill and add into
            grads, sums = micro_grads(jax.tree.map(lambda x: x[0], batch))
            grads = constrained(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        else:
            zeros = constrained(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            sum_keys = (
                "reward_accuracy",
                "rewards_chosen",
                "rewards_rejected",
                "margin",
                "logps_chosen",
                "logps_rejected",
                "pairs",
                "loss",
            )
            if joint:
                sum_keys += (
                    "total_loss",
                    "head_loss",
                    "head_accuracy",
                    "head_accuracy_non_neutral",
                    "non_neutral",
                )
            init = (zeros, {k: jnp.zeros((), jnp.float32) for k in sum_keys})
            (grads, sums), _ = jax.lax.scan(accumulate, init, batch)
        if joint:
            grad_norm = optax.tree.norm(grads["policy"])
            updates, pol_state = tx.update(grads["policy"], opt_state["policy"], params["policy"])
            head_updates, head_state = head_tx.update(grads["head"], opt_state["head"], params["head"])
            new_params = {
                "policy": optax.apply_updates(params["policy"], updates),
                "head": optax.apply_updates(params["head"], head_updates),
            }
            new_opt_state = {"policy": pol_state, "head": head_state}
            norms = (grad_norm, optax.tree.norm(grads["head"]))
        else:
            grad_norm = optax.tree.norm(grads)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            norms = (grad_norm,)
        objective = (sums["loss"], sums["total_loss"]) if joint else (sums["loss"],)
        nonfinite = nonfinite_code(objective, norms, new_params)
        if skip_nonfinite:  # keep the old state: the update of a non-finite step never lands
            keep = nonfinite == 0
            params, opt_state = jax.tree.map(
                lambda n, o: jnp.where(keep, n, o), (new_params, new_opt_state), (params, opt_state)
            )
        else:
            params, opt_state = new_params, new_opt_state
        plain = ("loss", "pairs", "total_loss", "head_loss", "head_accuracy_non_neutral", "non_neutral")
        metrics = {k: v / n_pairs for k, v in sums.items() if k not in plain}
        metrics.update(loss=sums["loss"], grad_norm=grad_norm, pairs=sums["pairs"], nonfinite=nonfinite)
        if joint:
            metrics.update(
                total_loss=sums["total_loss"],
                head_loss=sums["head_loss"],
                head_accuracy_non_neutral=sums["head_accuracy_non_neutral"]
                / jnp.maximum(sums["non_neutral"], 1.0),
                head_grad_norm=optax.tree.norm(grads["head"]),
            )
        return params, opt_state, metrics

    return step


# what `pair_logps` reads from a microbatch (either layout)
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "positions",
    "loss_mask",
    "score_index",
    "branch_ids",
    "segment_ids",
    "score_flat",
    "score_target",
    "score_slot",
    "score_valid",
    "pair_mask",
    "token_index",
    "token_slot",
)


def make_ref_logps_fn(codec: ParamsCodec, loss_cfg: ml_collections.ConfigDict) -> Callable:
    """`fn(ref_params, batch) -> ([M, b, 2] reference log-probs, batch["slot"])` (precompute pass)."""
    chunk = int(loss_cfg.logps_chunk) or None

    def fn(ref_params, batch):
        def micro(_, mb):
            return None, pair_logps(codec, ref_params, mb, chunk)

        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return jax.lax.scan(micro, None, inputs)[1], batch["slot"]

    return fn


# ----------------------------------------------------------------------------- batches


def flat_scores(
    batch: dict[str, np.ndarray], num_micro: int, T: int, *, minimum: int | None = None
) -> dict[str, np.ndarray]:
    """The per-pair scoring plan of a shared/packed batch (`score_index/target/mask [B, 2, R]`,
    optional `score_row [B]`) as one dense list of scored tokens per microbatch.

    Padding every pair's responses to the batch's longest (R) would run the output layer on
    B * 2 * R positions; a long-tailed response length makes most of them padding. Returns
    `score_flat` (row * T + position within the microbatch's rows), `score_target`, `score_slot`
    (2 * pair + branch within the microbatch) and `score_valid`, each `[M, S]` with S the largest
    microbatch's count rounded up to a power of two (at least `minimum`, 64), and `score_count [M, b, 2]`.
    """
    B = batch["pair_mask"].shape[0]
    b = B // num_micro
    n_rows = batch["input_ids"].shape[0] // num_micro
    idx, tgt, mask = batch["score_index"], batch["score_target"], batch["score_mask"].astype(bool)
    row = batch["score_row"] if "score_row" in batch else np.arange(B)
    per = []
    for m in range(num_micro):
        ks, js, rs = np.nonzero(mask[m * b : (m + 1) * b])
        k_glob = ks + m * b
        per.append(((row[k_glob] % n_rows) * T + idx[k_glob, js, rs], tgt[k_glob, js, rs], 2 * ks + js))
    longest = max([len(f) for f, _, _ in per] + [1])
    S = max(64, int(minimum or 0), 1 << (longest - 1).bit_length())
    flat = np.zeros((num_micro, S), np.int32)
    target = np.zeros((num_micro, S), np.int32)
    slot = np.zeros((num_micro, S), np.int32)
    valid = np.zeros((num_micro, S), np.int32)
    for m, (f, t, sl) in enumerate(per):
        n = len(f)
        flat[m, :n], target[m, :n], slot[m, :n], valid[m, :n] = f, t, sl, 1
    count = mask.sum(-1).astype(np.int32).reshape(num_micro, b, 2)
    return {
        "score_flat": flat,
        "score_target": target,
        "score_slot": slot,
        "score_valid": valid,
        "score_count": count,
    }


def to_microbatches(
    batch: dict[str, np.ndarray],
    num_micro: int,
    T: int | None = None,
    *,
    head: bool = False,
    P: int | None = None,
    window: int | None = None,
    scored: int | None = None,
    tokens: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """A collated DPO batch (2B rows, chosen first) -> the step layout `[M, B/M, 2, T]`.

    head=True also carries the PBA head's persona_ids/persona_mask `[M, B/M, P]` (widened to P)
    and direction `[M, B/M, 90]`. window: also carry `score_index [M, B/M, 2, R]` (the response
    window `losses.window_logps` scores; R at least `window`, 0 = the data's own). tokens=(G, N):
    also carry `token_index [M, G, N]` / `token_slot [M, G, R]` (`batching.compact_index`: the
    token-wise layers run on N kept tokens per group of rows; N 0 = the data's own).
    """
    if head:
        missing = [k for k in ("persona_ids", "persona_mask", "direction") if k not in batch]
        if missing:
            from alignx_jax.errors import DataError

            raise DataError(
                f"joint PBA head training needs {', '.join(missing)} in every batch (rows need a "
                "`Preference Direction`; use pba.mode=two_stage or pba.enabled=false otherwise)"
            )
    B = batch["pair_mask"].shape[0]
    b = B // num_micro
    out: dict[str, np.ndarray] = {}
    shared = "branch_ids" in batch  # batching.share_prompt's layout: rows are pairs already
    n_rows = batch["input_ids"].shape[0] // num_micro
    for k in ("input_ids", "attention_mask", "positions", "branch_ids", "segment_ids") if shared else ():
        if k not in batch:
            continue
        x = batch[k]
        if T is not None and x.shape[1] < T:
            x = np.pad(x, ((0, 0), (0, T - x.shape[1])))
        out[k] = x.reshape(num_micro, n_rows, x.shape[1])
    if shared:
        out.update(flat_scores(batch, num_micro, out["input_ids"].shape[-1], minimum=scored))
    for k in () if shared else ("input_ids", "attention_mask", "positions", "loss_mask"):
        x = batch[k]
        if T is not None and x.shape[1] < T:  # widen to the step's common length (mask 0)
            x = np.pad(x, ((0, 0), (0, T - x.shape[1])))
        out[k] = np.stack([x[:B], x[B:]], axis=1).reshape(num_micro, b, 2, x.shape[1])
    if window is not None and not shared:
        out["score_index"] = losses.scored_window(out["loss_mask"], minimum=max(16, int(window)))
    out["pair_mask"] = batch["pair_mask"].reshape(num_micro, b)
    if tokens is not None:
        add_token_layout(out, int(tokens[0]), int(tokens[1]) or None)
    if "ref_logps" in batch:
        out["ref_logps"] = np.asarray(batch["ref_logps"], np.float32).reshape(num_micro, b, 2)
    if head:  # PBA joint: the head's input and target, per pair
        for k in ("persona_ids", "persona_mask"):
            x = batch[k]
            if P is not None and x.shape[1] < P:
                x = np.pad(x, ((0, 0), (0, P - x.shape[1])))
            out[k] = x.reshape(num_micro, b, x.shape[1])
        out["direction"] = np.asarray(batch["direction"], np.float32).reshape(num_micro, b, -1)
    return out


def token_mask(out: dict[str, np.ndarray]) -> np.ndarray:
    """The step layout's attention mask as `[M, rows, T]` (rows in the order the decoder sees them)."""
    mask = out["attention_mask"]
    return mask.reshape(mask.shape[0], -1, mask.shape[-1])


def add_token_layout(
    out: dict[str, np.ndarray], groups: int, kept: int | None = None
) -> dict[str, np.ndarray]:
    """Add `token_index`/`token_slot` (`batching.compact_index`) to a step batch, in place, unless
    every position would be kept (then the plain layout is as cheap)."""
    mask = token_mask(out)
    N = batching.kept_tokens(mask, groups) if kept is None else int(kept)
    if mask.shape[1] // groups * mask.shape[2] > N:
        out.update(batching.compact_index(mask, groups, kept=N))
    return out


def batch_shardings(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, NamedSharding]:
    """Pairs (axis 1) over the batch mesh axes; everything else replicated."""
    out = {}
    for k, v in batch.items():
        axes = (None, "activation_batch") + (None,) * (v.ndim - 2)
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        out[k] = shd.logical_sharding(axes, mesh, rules, gshape)
    return out


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Each process contributes its own pairs; together they form the global batch."""
    out = {}
    for k, v in batch.items():
        gshape = list(v.shape)
        gshape[1] *= jax.process_count()
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, tuple(gshape))
    return out


# ----------------------------------------------------------------------------- the run


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker): no handler
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def _ensure_data(cfg: ml_collections.ConfigDict, workdir: str, is_main: bool) -> str:
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
    _sync("synth")
    return out


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_reference(cfg, model, workdir: str, tokenizer_dir: str, is_main: bool) -> None:
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
    _sync("reference")


def _tree_shardings(tree: Any, mesh) -> Any:
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else rep, tree)


def _prepare_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> workdir_lib.WorkdirLock:
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


def _stopped_in_start_up(stop: _StopFlag, is_main: bool) -> int:
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


def run_training(cfg: ml_collections.ConfigDict) -> int:
    """The whole run for a loaded config; returns the exit status."""
    stop = _StopFlag()
    stop.install()  # first: a SIGTERM during start-up (data, model, compile) is a clean exit 0
    held: list[workdir_lib.WorkdirLock] = []
    try:
        return _run_training(cfg, stop, held)
    except OSError as e:  # a full disk, a permission: one line naming the file
        where = e.filename or os.path.abspath(cfg.workdir or ".")
        raise AlignXError(
            f"{where}: {e.strerror or e}; the run stopped (rerun the same command to resume from "
            "the last checkpoint)"
        ) from None
    finally:
        for lock in held:
            lock.release()
        stop.restore()


def _run_training(cfg: ml_collections.ConfigDict, stop: _StopFlag, held: list) -> int:
    validate_config(cfg)
    if cfg.train.distributed:
        jax.distributed.initialize()
    mesh = shd.mesh_from_config(cfg.mesh)
    rules = rules_from_config(cfg)
    workdir = os.path.abspath(cfg.workdir)
    is_main = jax.process_index() == 0
    if is_main:
        held.append(_prepare_workdir(cfg, workdir))
    _sync("workdir")

    from alignx_jax.data import sources

    tokenizer, tokenizer_dir = load_tokenizer_for(cfg)
    data_path = _ensure_data(cfg, workdir, is_main)
    if stop.signum is not None:
        return _stopped_in_start_up(stop, is_main)
    source = sources.open_source(data_path, skip_bad=bool(cfg.data.skip_bad_rows))
    skipped = int(getattr(source, "skipped", 0))
    if len(source) == 0:
        raise AlignXError(f"{data_path}: no training rows")

    gb = int(cfg.train.global_batch)
    num_micro = gb // int(cfg.train.micro_batch or gb)
    pc, pi = jax.process_count(), jax.process_index()
    if gb % pc or (gb // pc) % num_micro:
        raise ConfigError(
            f"train.global_batch={gb} must split evenly over {pc} processes and {num_micro} microbatches"
        )
    seed = int(cfg.train.seed)
    buckets = tuple(int(b) for b in cfg.data.buckets)
    pad_id = int(tokenizer.pad_token_id)
    truncated = [0]  # rows whose prompt was cut to fit (saved with the loader state)
    joint = joint_head(cfg)
    two_stage = head_enabled(cfg) and cfg.pba.mode == "two_stage"
    use_predicted = cfg.data.method == "pba" and cfg.pba.preference != "golden"
    if (use_predicted or two_stage) and pc > 1:
        raise ConfigError(
            "pba.preference predicted/mix and pba.mode=two_stage run on one process; "
            "use pba.mode=joint with pba.preference=golden on multi-host runs"
        )
    persona_length = int(cfg.pba.max_persona_tokens) if joint else None
    response_logits = bool(cfg.loss.get("logits_on_responses", True))
    share = bool(cfg.data.get("share_prompt", False))
    packing = bool(cfg.data.get("packing", False))
    compact = int(cfg.data.get("compact_tokens", 8))  # size steps per row length; 0 = off
    pack_length = int(cfg.data.get("pack_length", 0)) or max(buckets)
    predicted: dict[str, np.ndarray] = {}  # 'dirs' [N, 90]: filled before the first batch is drawn

    def profile_for(index: int) -> np.ndarray | None:
        """The predicted P~ for this row when the run renders predicted profiles for it, else None (golden)."""
        if not use_predicted:
            return None
        # mix: a fixed choice per row, independent of the history-sampling rng and of the epoch
        if cfg.pba.preference == "mix" and (
            np.random.default_rng([seed, 0x5042, int(index)]).random() >= float(cfg.pba.mix_predicted)
        ):
            return None
        return predicted["dirs"][index]

    def example_fn(row, rng, index):
        ex = batching.make_example(
            tokenizer,
            row,
            method=cfg.data.method,
            persona=cfg.data.persona,
            max_length=int(cfg.data.max_length),
            prompt_format=cfg.data.prompt_format,
            rng=rng,
            overflow=cfg.data.overflow,
            index=index,
            profile=profile_for(index),
            persona_length=persona_length,
        )
        truncated[0] += int(ex is not None and ex.truncated)
        return ex

    def new_loader():
        return sources.TrainLoader(
            source,
            example_fn,
            pairs_per_batch=gb // pc,
            pad_id=pad_id,
            buckets=buckets,
            seed=seed,
            shuffle=bool(cfg.data.shuffle),
            num_epochs=None,
            on_drop="pad",
            shard_index=pi,
            shard_count=pc,
        )

    loader = new_loader()
    total_steps = (
        int(cfg.train.steps)
        if cfg.train.steps > 0
        else max(1, int(cfg.train.epochs) * loader.steps_per_epoch)
    )

    def host_batch(coll: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        stats = batching.padding_stats(coll)
        if share:
            two_rows = coll
            coll = batching.share_prompt(two_rows, buckets=buckets, pad_id=pad_id)
            if pc > 1:  # every process must agree on the row length and the scored window
                from jax.experimental import multihost_utils

                Ts, Rs = (
                    int(np.max(multihost_utils.process_allgather(np.asarray(v))))
                    for v in (coll["input_ids"].shape[1], coll["score_index"].shape[-1])
                )
                coll = batching.share_prompt(two_rows, buckets=buckets, pad_id=pad_id, length=Ts, window=Rs)
            if packing:  # several pairs per row of pack_length tokens, packed per microbatch and batch shard
                shards = mesh.shape["data"] * mesh.shape["fsdp"]
                per_micro = coll["pair_mask"].shape[0] // num_micro
                groups = num_micro * (shards if per_micro % shards == 0 else 1)
                coll = batching.pack_pairs(coll, groups=groups, length=pack_length, pad_id=pad_id)
            stats = batching.padding_stats(coll)
        T = coll["input_ids"].shape[1]
        P = coll["persona_ids"].shape[1] if joint and "persona_ids" in coll else None
        R = losses.scored_window(coll["loss_mask"]).shape[-1] if response_logits and not share else None
        if pc > 1:  # every process must agree on the step's lengths
            from jax.experimental import multihost_utils

            T = int(np.max(multihost_utils.process_allgather(np.asarray(T))))
            if P is not None:
                P = int(np.max(multihost_utils.process_allgather(np.asarray(P))))
            if R is not None:
                R = int(np.max(multihost_utils.process_allgather(np.asarray(R))))
        S = None
        if share and pc > 1:  # the scored-token list length, too
            S = flat_scores(coll, num_micro, T)["score_flat"].shape[-1]
            S = int(np.max(multihost_utils.process_allgather(np.asarray(S))))
        out = to_microbatches(coll, num_micro, T, head=joint, P=P, window=R, scored=S)
        if compact:  # kept tokens per group of rows, one group per local batch shard
            local_shards = max(1, mesh.shape["data"] * mesh.shape["fsdp"] // pc)
            G = (
                local_shards if out["input_ids"].shape[1] % local_shards == 0 else 1
            )  # axis 1 is the sharded one
            N = batching.kept_tokens(token_mask(out), G, compact)
            if pc > 1:  # every process must agree on the kept-token count
                N = int(np.max(multihost_utils.process_allgather(np.asarray(N))))
            add_token_layout(out, G, N)
        # the share of padded positions the token-wise layers still compute (0 when all are skipped)
        mask = token_mask(out)
        computed = (
            out["token_index"].shape[-1] * out["token_index"].shape[-2] * mask.shape[0]
            if "token_index" in out
            else mask.size
        )
        stats["computed_padding_fraction"] = float(computed - (mask > 0).sum()) / float(computed)
        return out, stats

    # --- model, reference, optimizer
    policy = build_policy(cfg, tokenizer, mesh, rules)
    _write_reference(cfg, policy, workdir, tokenizer_dir, is_main)
    if use_predicted:
        predicted["dirs"] = _predicted_directions(
            cfg, policy, tokenizer, source, workdir, derived_fingerprint(cfg, data_path)
        )
    if stop.signum is not None:
        return _stopped_in_start_up(stop, is_main)
    codec = ParamsCodec.of(policy)
    params = nnx.to_pure_dict(nnx.state(policy))
    hidden_size = int(policy.cfg.hidden_size)
    del policy
    compute_dt = jnp.dtype(cfg.model.dtype)
    # a separate buffer even when dtypes agree: the policy's buffers are donated to the step
    ref_params = jax.tree.map(lambda x: jnp.array(x, dtype=compute_dt, copy=True), params)
    tx, schedule = make_optimizer(cfg.optim, total_steps, int(cfg.model.frozen_layers))
    head_codec = head_tx = head_cfg = None
    if joint:
        head = build_head(cfg, hidden_size, mesh, rules)
        head_cfg, head_codec, head_tx = head.cfg, HeadCodec.of(head), make_head_optimizer(cfg.pba)
        params = {"policy": params, "head": HeadCodec.params(head)}
        opt_state = {"policy": tx.init(params["policy"]), "head": head_tx.init(params["head"])}
        del head
    else:
        opt_state = tx.init(params)
    param_sh = _tree_shardings(params, mesh)
    opt_sh = _tree_shardings(opt_state, mesh)
    opt_state = jax.device_put(opt_state, opt_sh)
    rep = NamedSharding(mesh, PartitionSpec())
    precomputed = cfg.loss.reference == "precomputed"

    # --- resume
    ckpt = TrainCheckpointer(
        os.path.join(workdir, "checkpoints"),
        keep=int(cfg.checkpoint.keep),
        async_save=bool(cfg.checkpoint["async"]),
    )
    start = skipped_total = 0
    # restore targets (shapes, dtypes, shardings); also what a failed run checks its last checkpoint with
    targets = (
        (abstract_like(params["policy"]), abstract_like(opt_state), abstract_like(params["head"]))
        if joint
        else (abstract_like(params), abstract_like(opt_state), None)
    )
    found = ckpt.restore_newest_good(*targets, warn=workdir_lib.warn if is_main else None)
    latest = None
    if found is not None:
        latest, restored = found
        params = {"policy": restored[0], "head": restored[3]} if joint else restored[0]
        opt_state, meta = restored[1], restored[2]
        loader.set_state(meta["loader"])
        truncated[0] = int(meta.get("rows_truncated", 0))
        skipped_total = int(meta.get("skipped_nonfinite_steps", 0))
        start = int(meta["step"])
        if is_main:
            print(
                f"alignx train: resuming from {ckpt.directory}/{latest} (step {start} of {total_steps})",
                file=sys.stderr,
            )

    # --- precomputed reference: one pass over the batches this run will see, stored per process
    ref_table = None
    if precomputed:
        ref_path = os.path.join(workdir, f"ref_logps.p{pi}.npy")
        want_shape = (total_steps, gb // pc, 2)
        # keyed by what the log-probs depend on: a same-shaped table of other data or another model is stale
        ref_key = derived_fingerprint(cfg, data_path, shape=want_shape, process=[pc, pi])
        if (
            workdir_lib.fingerprint_matches(ref_path, ref_key)
            and np.load(ref_path, mmap_mode="r").shape == want_shape
        ):
            ref_table = np.load(ref_path)
        else:
            ref_fn = jax.jit(make_ref_logps_fn(codec, cfg.loss), out_shardings=rep)
            pre_loader = new_loader()
            saved_truncated = truncated[0]
            ref_table = np.zeros(want_shape, np.float32)
            local_pairs = gb // pc
            from tqdm import tqdm

            with shd.use_mesh(mesh, rules):
                # the pass takes about a third of the training's time: it shows progress as training does
                for s in tqdm(
                    range(total_steps),
                    desc="reference log-probs",
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                    disable=not (is_main and cfg.train.progress),
                ):
                    if stop.signum is not None:  # nothing is written: the next run does the pass again
                        return _stopped_in_start_up(stop, is_main)
                    hb, _ = host_batch(next(pre_loader)[0])
                    # global slot ids tell each process which of the gathered results are its own
                    hb["slot"] = (pi * local_pairs + np.arange(local_pairs, dtype=np.int32)).reshape(
                        num_micro, -1
                    )
                    lp, slot = jax.device_get(
                        ref_fn(ref_params, put_batch(hb, batch_shardings(hb, mesh, rules)))
                    )
                    lp, slot = np.asarray(lp).reshape(-1, 2), np.asarray(slot).reshape(-1)
                    mine = slot // local_pairs == pi
                    ref_table[s][slot[mine] % local_pairs] = lp[mine]
            truncated[0] = saved_truncated
            if is_main or pc > 1:
                workdir_lib.forget_fingerprint(ref_path)
                np.save(ref_path + ".tmp.npy", ref_table)
                os.replace(ref_path + ".tmp.npy", ref_path)
                workdir_lib.write_fingerprint(ref_path, ref_key)
        ref_params = None  # the frozen copy is no longer needed: its memory goes to training

    step_fn = jax.jit(
        make_train_step(
            codec,
            tx,
            cfg.loss,
            precomputed=precomputed,
            grad_shardings=param_sh,
            head_codec=head_codec,
            head_tx=head_tx,
            pba_cfg=cfg.pba if joint else None,
        ),
        out_shardings=(param_sh, opt_sh, rep),
        donate_argnums=(0, 1),
    )

    if stop.signum is not None:
        return _stopped_in_start_up(stop, is_main)
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
    bar = None
    if is_main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr
        )

    def meta_for(step: int, hcfg=None) -> dict[str, Any]:
        meta = {
            "step": step,
            "total_steps": total_steps,
            "seed": seed,
            "loader": loader.get_state(),
            "rows_truncated": truncated[0],
            "rows_skipped": skipped,
            "skipped_nonfinite_steps": skipped_total,
        }
        if hcfg is not None:  # `alignx export` rebuilds the head from this
            meta["head_config"] = hcfg.to_json()
        return meta

    def save(step: int, two_stage_head: tuple[Any, Any] | None = None) -> None:
        if joint:
            ckpt.save(step, params["policy"], opt_state, meta_for(step, head_cfg), head=params["head"])
        elif two_stage_head is not None:
            ckpt.save(step, params, opt_state, meta_for(step, two_stage_head[0]), head=two_stage_head[1])
        else:
            ckpt.save(step, params, opt_state, meta_for(step))

    step = start
    last_saved = latest
    every = max(1, int(cfg.checkpoint.every_steps))
    skip_policy = cfg.loss.get("nan_policy", "stop") == "skip"
    max_skipped = int(cfg.loss.get("max_skipped_steps", 10))
    in_a_row = 0  # non-finite steps skipped since the last finite one
    try:
        while step < total_steps:
            if stop.signum is not None:
                break
            t0 = time.perf_counter()
            coll, info = next(loader)
            hb, stats = host_batch(coll)
            if precomputed:
                hb["ref_logps"] = ref_table[step].reshape(num_micro, -1, 2)
            batch = put_batch(hb, batch_shardings(hb, mesh, rules))
            with shd.use_mesh(mesh, rules):
                params, opt_state, m = step_fn(params, opt_state, ref_params, batch)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            step += 1
            nonfinite = int(m.pop("nonfinite"))
            in_a_row = in_a_row + 1 if nonfinite else 0
            skipped_total += int(nonfinite != 0 and skip_policy)
            if nonfinite and (not skip_policy or in_a_row >= max_skipped):
                params = opt_state = None  # the bad state: its memory goes to checking the saved ones
                raise _nonfinite_error(ckpt, targets, step, m, nonfinite, in_a_row if skip_policy else 0)
            m["skipped_nonfinite_steps"] = skipped_total
            final_head = None
            if two_stage and step == total_steps:  # the head is fit on the final policy, then saved with it
                final_head = _fit_two_stage_head(cfg, codec.module(params), tokenizer, source)
                m.update(final_head[2])
            if step % max(1, int(cfg.train.log_every)) == 0 or step == total_steps:
                writer.write(
                    step,
                    {
                        **m,
                        "learning_rate": float(schedule(step - 1)),
                        "epoch": info["epoch"],
                        "tokens_per_sec": stats["real_tokens"] * pc / dt,
                        "step_time": dt,
                        "rows_dropped": info["rows_dropped"],
                        "rows_truncated": truncated[0],
                        "rows_skipped": skipped,
                        "padding_fraction": stats["padding_fraction"],
                        "computed_padding_fraction": stats["computed_padding_fraction"],
                    },
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['reward_accuracy']:.2f}")
            if step % every == 0 or step == total_steps:
                save(step, None if final_head is None else final_head[:2])
                last_saved = step
        if stop.signum is not None and step < total_steps:
            if step > start and last_saved != step:
                save(step)
            ckpt.wait()
            if is_main:
                name = signal.Signals(stop.signum).name
                what = (
                    f"saved step {step} to {ckpt.directory}"
                    if step > start
                    else "no step run, nothing to save"
                )
                print(
                    f"alignx train: {name} received: {what}; rerun the same command to resume",
                    file=sys.stderr,
                )
            return 0
        ckpt.wait()
        if is_main:
            print(f"alignx train: done, {step} steps; checkpoints in {ckpt.directory}", file=sys.stderr)
        return 0
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()


def _nonfinite_error(
    ckpt: TrainCheckpointer, targets: tuple, step: int, m: dict[str, float], code: int, in_a_row: int
) -> AlignXError:
    """The error of a run stopped by a non-finite step, naming the newest saved step that verifies."""
    ckpt.wait()
    good = ckpt.newest_good_step(*targets)
    last = (
        f"last finite checkpoint: step {good} (a rerun resumes from it)"
        if good is not None
        else "no finite checkpoint saved (a rerun starts over)"
    )
    what = (
        f"{describe_nonfinite(code)} not finite (loss {m.get('loss', 0.0):.4g}, "
        f"grad_norm {m.get('grad_norm', 0.0):.4g})"
    )
    if in_a_row:
        return AlignXError(
            f"non-finite loss, gradient or update in {in_a_row} steps in a row up to step {step} "
            f"(loss.max_skipped_steps): {what}; {last}; lower optim.lr"
        )
    return AlignXError(
        f"non-finite loss, gradient or update at step {step}: {what}; step {step} not saved; {last}; "
        "lower optim.lr, or set loss.nan_policy=skip to skip such steps"
    )


def build_head(cfg: ml_collections.ConfigDict, hidden_size: int, mesh, rules):
    """The joint run's PreferenceHead, placed on the mesh. Initialised from `model.hf_path`'s own head
    when that folder has one of the same shape and input rule (an exported or imported PBA model)."""
    from alignx_jax.models import preference_head as ph

    hcfg = ph.HeadConfig.from_config(cfg.pba, hidden_size, persona_variant=cfg.data.persona)
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


def _head_rows(cfg: ml_collections.ConfigDict, source) -> list[dict]:
    """The rows a first/two-stage head is fit on: all, or a seeded subset of `pba.head_rows`."""
    n = len(source)
    k = int(cfg.pba.head_rows)
    if k <= 0 or k >= n:
        return [source[i] for i in range(n)]
    idx = np.sort(np.random.default_rng([int(cfg.pba.seed), n]).choice(n, k, replace=False))
    return [source[int(i)] for i in idx]


def _fit_head(cfg: ml_collections.ConfigDict, backbone, tokenizer, rows: list[dict]):
    from alignx_jax.head_training import train_head_two_stage

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


def _fit_two_stage_head(
    cfg: ml_collections.ConfigDict, backbone, tokenizer, source
) -> tuple[Any, Any, dict[str, float]]:
    """(HeadConfig, head params as a pure dict, metrics) of a head fit on the frozen final policy."""
    res = _fit_head(cfg, backbone, tokenizer, _head_rows(cfg, source))
    metrics = {
        "head_loss": float(res.losses[-1]),
        "head_accuracy": float(res.train_metrics["accuracy"]),
        "head_accuracy_non_neutral": float(res.train_metrics["accuracy_non_neutral"]),
    }
    return res.cfg, HeadCodec.params(res.head), metrics


def _predicted_directions(
    cfg: ml_collections.ConfigDict, policy, tokenizer, source, workdir: str, key: str = ""
) -> np.ndarray:
    """P~ of every training row from a first-stage head fit on the initial policy -> `[N, 90]` float32.

    Stored in `W/pba_predicted.npy` so that a resumed run reuses exactly the same profiles; `key`
    (`derived_fingerprint`) names the inputs they were computed from: other inputs recompute them.
    """
    from alignx_jax.models import preference_head as ph

    path = os.path.join(workdir, PREDICTED_FILE)
    n = len(source)
    if workdir_lib.fingerprint_matches(path, key):
        dirs = np.load(path)
        if dirs.shape == (n, ph.NUM_DIMS):
            return dirs
    t0 = time.perf_counter()
    res = _fit_head(cfg, policy, tokenizer, _head_rows(cfg, source))
    rows = [source[i] for i in range(n)]
    feats = (
        res.features
        if int(cfg.pba.head_rows) <= 0 or int(cfg.pba.head_rows) >= n
        else ph.persona_features(
            policy,
            tokenizer,
            rows,
            pooling=res.cfg.pooling,
            variant=res.cfg.persona_variant,
            max_tokens=res.cfg.max_persona_tokens,
        )
    )
    dirs = ph.predict_direction(ph.head_probs(res.head, feats)).astype(np.float32)
    workdir_lib.forget_fingerprint(path)
    np.save(path + ".tmp.npy", dirs)
    os.replace(path + ".tmp.npy", path)
    workdir_lib.write_fingerprint(path, key)
    gold = [i for i in range(n) if rows[i].get("Preference Direction") is not None]
    acc = ph.head_metrics(dirs[gold], np.asarray([rows[i]["Preference Direction"] for i in gold], np.float32))
    print(
        f"alignx train: first-stage preference head on {len(rows)} rows ({time.perf_counter() - t0:.1f}s): "
        f"accuracy {acc['accuracy']:.4f}, macro-F1 {acc['macro_f1']:.4f}; profiles -> {path}",
        file=sys.stderr,
    )
    return dirs


def cli_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, getattr(args, "overrides", []) or [])
    return run_training(cfg)
