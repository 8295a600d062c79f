"""DPO training (ICA / PBA / non-personalized): train state, the jitted sharded step, the loop.

`alignx train --config=CONFIG.py --config.workdir=W [--config.KEY=VALUE ...]`

One optimizer step = one call of a jitted function on the whole global batch: the batch arrives as
M microbatches (`alignx_jax.batch`: `TwoRowBatch` `[M, b, 2, T]`, b pairs with chosen and rejected
side by side so a device always holds both halves of its pairs, or `SharedPromptBatch` `[M, rows, T]`,
one row per pair or packed pairs), and `lax.scan` accumulates float32 gradients over the M
microbatches before one AdamW update. Params are float32 master weights; the decoder computes in
`model.dtype` (bf16 on accelerators). The reference is a frozen copy of the initial weights in the
compute dtype (`loss.reference=on_the_fly`; with `model.frozen_layers` it runs on the policy's pass of
the frozen blocks, so only the blocks above the cut run twice), or its log-probs are computed once in a pass over the
exact batch sequence the run will see and stored as `W/ref_logps.p<process>.npy`
(`loss.reference=precomputed`; a step whose pairs were all scored before, the same tokens in an
earlier epoch, reuses them; the frozen copy is then freed before training).

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
    frozen (`pba.head_training.train_head_two_stage`: pooled features cached once, then AdamW on the
    MLP only), and saved with the last checkpoint.
  * `pba.preference`: the P~ rendered into the policy's prompt. 'golden' = the row's own;
    'predicted' = P~ predicted by a *first-stage* head: before step 1 a head is fit two-stage on
    the initial policy (`pba.head_*`), and its prediction for every training row is stored in
    `W/pba_predicted.npy` and used for the whole run (fixed per row, so resume and the precomputed
    reference stay exact); 'mix' = the predicted P~ for a fixed `pba.mix_predicted` fraction of
    rows (chosen per row from `train.seed`), golden for the rest. The policy so learns to read
    the noisier profiles it will see when evaluated with `--preference predicted`.
  Every mode runs multi-process: the first-stage and two-stage heads run on the global mesh (every
  process computes the same P~; process 0 writes W/pba_predicted.npy).

Modules (one owner per concept):
  * `train.state`: policy building, params/head codecs, optimizers, mesh rules, run options
  * `train.step`: the jitted step (`make_train_step`, `jit_train_step`), reference log-probs,
    non-finite detection
  * `train.setup`: workdir, data, reference folder, derived-file fingerprints
  * `train.signals`: the SIGTERM/SIGINT stop flag
  * `train.loop`: `run_training` and its `Trainer`
  * `train.checkpoints`: the `Trainer`'s checkpoints (saved meta, save, resume, the non-finite error)
  * `train.cli`: `alignx train`
The config's rules (allowed values, `joint_head`, ...) are `alignx_jax.config_schema`'s, `validate_config` is
`alignx_jax.config_rules`'s,
the batch layout is `alignx_jax.batch`; PBA's head steps are `alignx_jax.pba`. The names below are
re-exported so `from alignx_jax import train; train.X` keeps working.
"""

from __future__ import annotations

from alignx_jax.batch import (
    BatchBuilder,
    HeadInputs,
    KeptTokens,
    SharedPromptBatch,
    StepBatch,
    TwoRowBatch,
    add_token_layout,
    batch_shardings,
    flat_scores,
    put_batch,
    to_microbatches,
    token_mask,
)
from alignx_jax.config_rules import validate_config
from alignx_jax.config_schema import (
    METHODS,
    NAN_POLICIES,
    PBA_MODES,
    PBA_PREFERENCES,
    REFERENCE_MODES,
    head_enabled,
    joint_head,
)
from alignx_jax.pba.stages import PREDICTED_FILE, build_head
from alignx_jax.train.cli import cli_train
from alignx_jax.train.loop import Trainer, run_training
from alignx_jax.train.setup import derived_fingerprint
from alignx_jax.train.signals import StopFlag
from alignx_jax.train.state import (
    HeadCodec,
    ParamsCodec,
    build_policy,
    freeze_lower_layers,
    load_tokenizer_for,
    make_head_optimizer,
    make_optimizer,
    rules_from_config,
    run_options,
)
from alignx_jax.train.step import (
    NONFINITE_PARTS,
    describe_nonfinite,
    jit_train_step,
    make_ref_logps_fn,
    make_train_step,
    model_pair_logps,
    nonfinite_code,
    pair_logps,
)

__all__ = [
    "METHODS",
    "NAN_POLICIES",
    "NONFINITE_PARTS",
    "PBA_MODES",
    "PBA_PREFERENCES",
    "PREDICTED_FILE",
    "REFERENCE_MODES",
    "BatchBuilder",
    "HeadCodec",
    "HeadInputs",
    "KeptTokens",
    "ParamsCodec",
    "SharedPromptBatch",
    "StepBatch",
    "StopFlag",
    "Trainer",
    "TwoRowBatch",
    "add_token_layout",
    "batch_shardings",
    "build_head",
    "build_policy",
    "cli_train",
    "derived_fingerprint",
    "describe_nonfinite",
    "flat_scores",
    "freeze_lower_layers",
    "head_enabled",
    "jit_train_step",
    "joint_head",
    "load_tokenizer_for",
    "make_head_optimizer",
    "make_optimizer",
    "make_ref_logps_fn",
    "make_train_step",
    "model_pair_logps",
    "nonfinite_code",
    "pair_logps",
    "put_batch",
    "rules_from_config",
    "run_options",
    "run_training",
    "to_microbatches",
    "token_mask",
    "validate_config",
]
