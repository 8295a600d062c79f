"""The jitted train step: summed pair log-probs through the decoder, the DPO (+ joint PBA head)
objective with float32 gradients accumulated over microbatches by `lax.scan`, one optimizer update,
and the in-step non-finite check. `jit_train_step` is the one place the step is jitted, with the
shardings and donation `alignx train` uses; `alignx plan` lowers the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from alignx_jax import losses
from alignx_jax.batch import SharedPromptBatch, StepBatch
from alignx_jax.models import preference_head as ph
from alignx_jax.train.state import HeadCodec, ParamsCodec


def pair_logps(codec: ParamsCodec, params: Any, mb: StepBatch, chunk: int | None) -> jax.Array:
    """Summed response log-probs `[b, 2]` (chosen, rejected) for one microbatch (`StepBatch.microbatch`)."""
    return model_pair_logps(codec.module(params), mb, chunk)


def model_pair_logps(model, mb: StepBatch, chunk: int | None, *, with_logits: bool = False, reference=None):
    """`pair_logps` for an already merged Decoder (logits soft-capped as the model's `cap_logits`).

    `with_logits`: `(logps [b, 2], logit sums [b, 2])`, the second the sum over each response's scored
    tokens of the mean logit over the vocabulary (TRL's `logits/chosen` numerator). The mean over V
    of `h @ W` is `h @ mean_V(W)`: one `[D]` vector, no `[*, V]` logits. It is the mean of the logits
    before any final soft-capping (Gemma 2), which is not linear.

    `reference`: the reference Decoder of a model with frozen blocks; its log-probs `[b, 2]` (no
    gradient) come last in the returned tuple, from its blocks above the cut run on the policy's pass
    of the frozen ones (`Decoder.hidden_states(reference=)`).
    """
    # data.compact_tokens: the token-wise layers run on the batch's real tokens only
    tokens = None if mb.tokens is None else mb.tokens.layout()
    if isinstance(mb, SharedPromptBatch):  # one row per pair: prompt, chosen, rejected
        flat = None
        rows = (mb.input_ids, mb.attention_mask, mb.positions)
        kw = {"segment_ids_BT": mb.segment_ids, "branch_ids_BT": mb.branch_ids, "tokens": tokens}
    else:  # two rows per pair, chosen and rejected
        b, two, T = mb.input_ids.shape
        flat = {
            k: getattr(mb, k).reshape(b * two, T)
            for k in ("input_ids", "attention_mask", "positions", "loss_mask")
        }
        rows = (flat["input_ids"], flat["attention_mask"], flat["positions"])
        kw = {"tokens": tokens}
    with jax.named_scope("pair_logps"):
        if reference is None:
            h, h_ref = model.hidden_states(*rows, **kw), None
        else:
            h, h_ref = model.hidden_states(*rows, **kw, reference=reference)
        out = (_response_logps(model, mb, h, flat, chunk),)
        if with_logits:
            out += (_logit_sums(mb, h, model.output_embedding().astype(h.dtype), flat),)
        if reference is not None:
            out += (jax.lax.stop_gradient(_response_logps(reference, mb, h_ref, flat, chunk)),)
    return out[0] if len(out) == 1 else out


def _response_logps(model, mb: StepBatch, h, flat: dict | None, chunk: int | None) -> jax.Array:
    """`[b, 2]` summed log-probs of each pair's responses from `model`'s final hidden states `h`."""
    w_DV = model.output_embedding().astype(h.dtype)
    cap = getattr(model.cfg, "final_logit_softcapping", None)
    if flat is None:  # shared prompt: the scoring plan's tokens, one slot per response
        lp = losses.flat_logps(
            h,
            w_DV,
            mb.score_flat,
            mb.score_target,
            mb.score_slot,
            mb.score_valid,
            num_slots=2 * mb.pair_mask.shape[0],
            chunk=chunk,
            softcap=cap,
        )
    elif mb.score_index is not None:  # logits on the response window only (loss.logits_on_responses)
        idx = mb.score_index.reshape(h.shape[0], -1)
        lp = losses.window_logps(h, w_DV, flat["input_ids"], flat["loss_mask"], idx, chunk=chunk, softcap=cap)
    else:
        lp = losses.sequence_logps(h, w_DV, flat["input_ids"], flat["loss_mask"], chunk=chunk, softcap=cap)
    return lp.reshape(-1, 2)


def _logit_sums(mb: StepBatch, h, w_DV, flat: dict | None) -> jax.Array:
    """`[b, 2]` sums over each response's scored tokens of the mean logit over the vocabulary."""
    if flat is None:  # shared prompt: the scoring plan's tokens
        N, T, D = h.shape
        num_slots = 2 * mb.pair_mask.shape[0]
        h_SD = jnp.take(h.reshape(N * T, D), mb.score_flat.astype(jnp.int32), axis=0)
        mean_S = _mean_logits(h_SD, w_DV) * mb.score_valid.astype(jnp.float32)
        sums = jax.ops.segment_sum(mean_S, mb.score_slot.astype(jnp.int32), num_segments=num_slots)
        return jax.lax.stop_gradient(sums.reshape(-1, 2))
    mean_NT = _mean_logits(h[:, :-1], w_DV) * flat["loss_mask"][:, 1:].astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.sum(mean_NT, axis=-1).reshape(-1, 2))


def _mean_logits(h_SD: jax.Array, w_DV: jax.Array) -> jax.Array:
    """Mean over the vocabulary of the logits `h @ w` at each position, as `h @ mean_V(w)` in float32."""
    w_D = jnp.mean(w_DV.astype(jnp.float32), axis=-1)
    return jnp.einsum("...d,d->...", h_SD.astype(jnp.float32), w_D)


def reference_needed(loss_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run reads a frozen reference's log-probs: not for `loss.reference='none'`, and never
    for the reference-free kinds (orpo, simpo: `losses.PREFERENCE_LOSSES[...].uses_reference`), whatever
    `loss.reference` says (as TRL's ORPOTrainer/CPOTrainer, which take no reference model)."""
    spec = losses.PREFERENCE_LOSSES.get(loss_cfg.type)
    return loss_cfg.reference != "none" and (spec is None or spec.uses_reference)


def loss_options(loss_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """`losses.preference_loss`'s keyword arguments from the run's `loss` section (every key read by
    attribute: config_schema owns the defaults). `reference`: the config's 'none' is reference-free;
    'on_the_fly' and 'precomputed' (how the reference log-probs are obtained) are 'policy_ref'."""
    return {
        "beta": float(loss_cfg.beta),
        "label_smoothing": float(loss_cfg.label_smoothing),
        "gamma_beta_ratio": float(loss_cfg.gamma_beta_ratio),
        "sft_weight": float(loss_cfg.sft_weight),
        "sft_norm": loss_cfg.sft_norm,
        "reference": "none" if loss_cfg.reference == "none" else "policy_ref",
    }


def head_term_options(pba_cfg: ml_collections.ConfigDict) -> ph.HeadTermOptions:
    """`preference_head.joint_head_term`'s options from the run's `pba` section (read by attribute)."""
    return ph.HeadTermOptions(
        weight=float(pba_cfg.weight),
        stop_gradient=bool(pba_cfg.stop_gradient),
        class_weights=tuple(float(w) for w in pba_cfg.class_weights),
        focal_gamma=float(pba_cfg.focal_gamma),
    )


# the train metrics under TRL's names (DPOTrainer) -> the `losses.preference_loss` metric sums they
# are the per-pair means of; `logits/*` are token means (see `model_pair_logps`)
TRL_METRICS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "margin",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
}


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


# the metric sums a step accumulates over microbatches (`losses.preference_loss`'s, the logit and
# token sums of `microbatch_grads`, the loss), and the joint PBA head's
SUM_KEYS = (
    "reward_accuracy",
    "rewards_chosen",
    "rewards_rejected",
    "margin",
    "logps_chosen",
    "logps_rejected",
    "logits_chosen",
    "logits_rejected",
    "tokens_chosen",
    "tokens_rejected",
    "pairs",
    "loss",
)
JOINT_SUM_KEYS = ("total_loss", "head_loss", "head_accuracy", "head_accuracy_non_neutral", "non_neutral")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What `make_train_step`'s step is built from: the codecs, optimizers and loss options."""

    codec: ParamsCodec
    tx: optax.GradientTransformation
    chunk: int | None
    kind: str
    options: dict
    use_ref: bool
    precomputed: bool
    skip_nonfinite: bool
    grad_shardings: Any = None
    head_codec: HeadCodec | None = None
    head_tx: optax.GradientTransformation | None = None
    head_options: ph.HeadTermOptions | None = None  # joint PBA: the head term's (`head_term_options`)

    @property
    def joint(self) -> bool:
        return self.head_codec is not None

    def constrained(self, grads):
        """`grads` held to the params' shardings (when given)."""
        if self.grad_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, self.grad_shardings)


def _reference_model(spec: StepSpec, params, ref_params):
    """The reference Decoder (for LoRA: the same base with its adapters off, state.LoraCodec)."""
    policy_params = params["policy"] if spec.joint else params
    return spec.codec.reference(ref_params, jax.lax.stop_gradient(policy_params))


def _reference_on_trunk(spec: StepSpec) -> bool:
    """Whether the reference runs inside the policy's pass: a reference pass of a model with frozen
    blocks shares them (`model_pair_logps(reference=)`), so only the blocks above the cut run twice."""
    return spec.use_ref and not spec.precomputed and spec.codec.frozen_layers > 0


def _reference_logps(spec: StepSpec, params, ref_params, mb) -> jax.Array | None:
    """The microbatch's reference log-probs `[b, 2]`: none (reference-free, or computed in the
    policy's pass, `_reference_on_trunk`), the precomputed ones, or a forward pass of the reference."""
    if not spec.use_ref:  # reference-free: no reference pass (ref_params may be None)
        return None
    if spec.precomputed:
        return mb.ref_logps
    if _reference_on_trunk(spec):
        return None
    return jax.lax.stop_gradient(model_pair_logps(_reference_model(spec, params, ref_params), mb, spec.chunk))


def _microbatch_loss(spec: StepSpec, p, ref_params, mb, ref, pm, ntok, n_pairs):
    """`(objective, (metric sums, joint-head terms))` of one microbatch at params `p`."""
    joint = spec.joint
    model = spec.codec.policy(p["policy"] if joint else p, ref_params)
    if _reference_on_trunk(spec):  # one pass of the frozen blocks for policy and reference
        ref_model = _reference_model(spec, p, ref_params)
        lp, logit_sums, ref = model_pair_logps(model, mb, spec.chunk, with_logits=True, reference=ref_model)
    else:
        lp, logit_sums = model_pair_logps(model, mb, spec.chunk, with_logits=True)
    per, sums = losses.preference_loss(
        spec.kind,
        lp[:, 0],
        lp[:, 1],
        None if ref is None else ref[:, 0],
        None if ref is None else ref[:, 1],
        chosen_tokens=ntok[:, 0],
        rejected_tokens=ntok[:, 1],
        pair_mask=pm,
        **spec.options,
    )
    sums.update(
        logits_chosen=jnp.sum(logit_sums[:, 0] * pm),
        logits_rejected=jnp.sum(logit_sums[:, 1] * pm),
        tokens_chosen=jnp.sum(ntok[:, 0] * pm),
        tokens_rejected=jnp.sum(ntok[:, 1] * pm),
    )
    dpo = jnp.sum(per * pm) / n_pairs
    if not joint:
        return dpo, (sums, {})
    # the same merged policy reads the persona: one backbone for DPO and the head
    head_in = {  # models/ reads arrays, not the batch struct
        "persona_ids": mb.head.persona_ids,
        "persona_mask": mb.head.persona_mask,
        "direction": mb.head.direction,
        "pair_mask": mb.pair_mask,
    }
    term, hm = ph.joint_head_term(
        model, spec.head_codec.module(p["head"]), head_in, spec.head_options, n_pairs=n_pairs
    )
    return dpo + term, (sums, {"dpo": dpo, **hm})


def _pair_mask_and_tokens(mb) -> tuple[jax.Array, jax.Array]:
    """The microbatch's real-pair mask `[b]` and scored response tokens per pair `[b, 2]`."""
    pm = mb.pair_mask.astype(jnp.float32)
    if isinstance(mb, SharedPromptBatch):  # one row per pair: the scoring plan counts each branch's tokens
        return pm, mb.score_count.astype(jnp.float32)
    return pm, jnp.sum(mb.loss_mask.astype(jnp.float32), axis=-1)


def microbatch_grads(spec: StepSpec, params, ref_params, mb, n_pairs):
    """(gradients, metric sums) of one microbatch; the loss is a share of the global batch's mean
    (`n_pairs` real pairs in all)."""
    pm, ntok = _pair_mask_and_tokens(mb)
    ref = _reference_logps(spec, params, ref_params, mb)

    def loss_fn(p):
        return _microbatch_loss(spec, p, ref_params, mb, ref, pm, ntok, n_pairs)

    (loss, (sums, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    sums = jax.lax.stop_gradient(sums)
    sums["loss"] = loss
    if spec.joint:
        # per-microbatch means -> sums weighted by their counts, divided once at the end
        nn = jnp.sum((ph.direction_to_labels(mb.head.direction) != ph.NEUTRAL) * pm[:, None])
        sums.update(
            loss=aux["dpo"],
            total_loss=loss,
            head_loss=aux["head_loss"],
            head_accuracy=aux["head_accuracy"] * jnp.sum(pm),
            head_accuracy_non_neutral=aux["head_accuracy_non_neutral"] * nn,
            non_neutral=nn,
        )
    return grads, sums


def accumulated_grads(spec: StepSpec, params, ref_params, batch, n_pairs):
    """float32 gradients and metric sums over the batch's microbatches (`lax.scan` over the leading
    axis; a single microbatch runs without an accumulator)."""

    def accumulate(carry, mb):
        grads_acc, sums_acc = carry
        grads, sums = microbatch_grads(spec, params, ref_params, mb, n_pairs)
        grads_acc = spec.constrained(jax.tree.map(jnp.add, grads_acc, grads))
        return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

    num_micro = batch.num_micro
    if num_micro == 1:  # a single microbatch: no accumulator to zero-fill and add into
        grads, sums = microbatch_grads(spec, params, ref_params, batch.microbatch(0), n_pairs)
        return spec.constrained(jax.tree.map(lambda g: g.astype(jnp.float32), grads)), sums
    zeros = spec.constrained(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    sum_keys = SUM_KEYS + JOINT_SUM_KEYS if spec.joint else SUM_KEYS
    init = (zeros, {k: jnp.zeros((), jnp.float32) for k in sum_keys})
    (grads, sums), _ = jax.lax.scan(accumulate, init, batch)
    return grads, sums


def apply_updates(spec: StepSpec, params, opt_state, grads):
    """One optimizer update: `(new params, new optimizer state, gradient norms)` (the policy's, then
    the joint head's)."""
    if spec.joint:
        grad_norm = optax.tree.norm(grads["policy"])
        updates, pol_state = spec.tx.update(grads["policy"], opt_state["policy"], params["policy"])
        head_updates, head_state = spec.head_tx.update(grads["head"], opt_state["head"], params["head"])
        new_params = {
            "policy": optax.apply_updates(params["policy"], updates),
            "head": optax.apply_updates(params["head"], head_updates),
        }
        new_opt_state = {"policy": pol_state, "head": head_state}
        return new_params, new_opt_state, (grad_norm, optax.tree.norm(grads["head"]))
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = spec.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state, (grad_norm,)


def guard_nonfinite(spec: StepSpec, sums, norms, new, old):
    """`(state, nonfinite_code)`: the new (params, opt_state), or with `loss.nan_policy='skip'` the old
    one where the loss, a gradient norm or an updated param is not finite."""
    objective = (sums["loss"], sums["total_loss"]) if spec.joint else (sums["loss"],)
    nonfinite = nonfinite_code(objective, norms, new[0])
    if not spec.skip_nonfinite:
        return new, nonfinite
    keep = nonfinite == 0  # keep the old state: the update of a non-finite step never lands
    return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old), nonfinite


def step_metrics(joint: bool, sums, n_pairs, grad_norm, nonfinite, grads) -> dict[str, jax.Array]:
    """The step's metrics from the global batch's sums: TRL's names, token means, the loss, the norms."""
    metrics = {name: sums[key] / n_pairs for name, key in TRL_METRICS.items()}
    for side in ("chosen", "rejected"):  # token means over the global batch, as TRL
        metrics[f"logits/{side}"] = sums[f"logits_{side}"] / jnp.maximum(sums[f"tokens_{side}"], 1.0)
    if joint:
        metrics["head_accuracy"] = sums["head_accuracy"] / n_pairs
    metrics.update(loss=sums["loss"], grad_norm=grad_norm, pairs=sums["pairs"], nonfinite=nonfinite)
    if joint:
        metrics.update(
            total_loss=sums["total_loss"],
            head_loss=sums["head_loss"],
            head_accuracy_non_neutral=sums["head_accuracy_non_neutral"]
            / jnp.maximum(sums["non_neutral"], 1.0),
            head_grad_norm=optax.tree.norm(grads["head"]),
        )
    return metrics


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

    batch: a `batch.StepBatch` (either layout, M microbatches), with `ref_logps` when precomputed.
    The loss is the mean over all real pairs of the global batch, so it does not depend on how the
    batch is cut into microbatches.

    Joint PBA (`head_codec` given, with `head_tx` and the `pba` config section): params and
    opt_state are `{'policy': ..., 'head': ...}`, the batch also holds its `HeadInputs` (persona and
    direction), and the objective is DPO + `joint_head_term` (weighted
    by pba.weight). Metrics: `loss` stays the DPO loss (comparable across methods), `total_loss`
    is the objective, `head_loss` (unweighted CE) / `head_accuracy` / `head_accuracy_non_neutral`
    are global-batch means, `grad_norm` is the policy's, `head_grad_norm` the head's.

    The DPO metrics carry TRL's names (`TRL_METRICS`, plus `logits/chosen` / `logits/rejected`), from
    `losses.preference_loss` (each `loss.type`'s own rewards). A reference-free run
    (`reference_needed` false) never reads `ref_params` (None is fine).

    `metrics['nonfinite']` (`nonfinite_code`) is 0 when the loss, the gradient norm(s) and the updated
    params are all finite; with `loss.nan_policy='skip'` a step where it is not returns the old params
    and optimizer state unchanged.
    """
    if head_codec is not None and (head_tx is None or pba_cfg is None):
        raise ValueError("make_train_step: a head_codec needs head_tx and pba_cfg")
    spec = StepSpec(
        codec=codec,
        tx=tx,
        chunk=int(loss_cfg.logps_chunk) or None,
        kind=loss_cfg.type,
        options=loss_options(loss_cfg),
        use_ref=reference_needed(loss_cfg),
        precomputed=precomputed,
        skip_nonfinite=loss_cfg.nan_policy == "skip",
        grad_shardings=grad_shardings,
        head_codec=head_codec,
        head_tx=head_tx,
        head_options=head_term_options(pba_cfg) if head_codec is not None else None,
    )

    def step(params, opt_state, ref_params, batch):
        n_pairs = jnp.maximum(jnp.sum(batch.pair_mask.astype(jnp.float32)), 1.0)
        grads, sums = accumulated_grads(spec, params, ref_params, batch, n_pairs)
        new_params, new_opt_state, norms = apply_updates(spec, params, opt_state, grads)
        (params, opt_state), nonfinite = guard_nonfinite(
            spec, sums, norms, (new_params, new_opt_state), (params, opt_state)
        )
        return params, opt_state, step_metrics(spec.joint, sums, n_pairs, norms[0], nonfinite, grads)

    return step


def make_ref_logps_fn(codec: ParamsCodec, loss_cfg: ml_collections.ConfigDict) -> Callable:
    """`fn(ref_params, batch) -> ([M, b, 2] reference log-probs, batch.slot)` (precompute pass)."""
    chunk = int(loss_cfg.logps_chunk) or None

    def fn(ref_params, batch):
        def micro(_, mb):
            return None, model_pair_logps(codec.reference(ref_params), mb, chunk)

        return jax.lax.scan(micro, None, batch.model_inputs())[1], batch.slot

    return fn


def jit_ref_logps(
    codec: ParamsCodec, loss_cfg: ml_collections.ConfigDict, out_shardings: Any = None
) -> Callable:
    """`make_ref_logps_fn` jitted as `alignx train`'s precompute pass runs it (the model's compile options)."""
    return jax.jit(
        make_ref_logps_fn(codec, loss_cfg),
        out_shardings=out_shardings,
        compiler_options=codec.compiler_options,
    )


def jit_train_step(
    codec: ParamsCodec,
    tx: optax.GradientTransformation,
    cfg: ml_collections.ConfigDict,
    *,
    param_shardings: Any,
    opt_shardings: Any,
    replicated: Any,
    head_codec: HeadCodec | None = None,
    head_tx: optax.GradientTransformation | None = None,
) -> Callable:
    """`make_train_step` for the run config `cfg`, jitted as `alignx train` runs it (and `alignx plan`
    lowers it): gradients constrained to the params' shardings, params and optimizer state donated."""
    step = make_train_step(
        codec,
        tx,
        cfg.loss,
        precomputed=cfg.loss.reference == "precomputed" and reference_needed(cfg.loss),
        grad_shardings=param_shardings,
        head_codec=head_codec,
        head_tx=head_tx,
        pba_cfg=cfg.pba if head_codec is not None else None,
    )
    return jax.jit(
        step,
        out_shardings=(param_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
        compiler_options=codec.compiler_options,
    )


def eval_sums(spec: StepSpec, params, ref_params, mb) -> dict[str, jax.Array]:
    """`SUM_KEYS` metric sums of one microbatch at `params`, no gradient: `_microbatch_loss`'s forward
    with the loss summed over the real pairs (`n_pairs` 1)."""
    pm, ntok = _pair_mask_and_tokens(mb)
    ref = _reference_logps(spec, params, ref_params, mb)
    loss, (sums, aux) = _microbatch_loss(spec, params, ref_params, mb, ref, pm, ntok, 1.0)
    sums["loss"] = aux["dpo"] if spec.joint else loss
    return {k: sums[k].astype(jnp.float32) for k in SUM_KEYS}


def make_eval_step(spec: StepSpec) -> Callable:
    """Jitted `eval_step(params, ref_params, batch) -> metric sums` (`SUM_KEYS`) over the batch's
    microbatches (`lax.scan` over the leading axis, as `accumulated_grads`), with no gradient.

    The reference log-probs are a forward pass of `ref_params` (`spec.precomputed` is ignored: a
    held-out batch has no precomputed table). Sums, not means: batches add up, and the caller divides
    by `pairs` once."""
    spec = dataclasses.replace(spec, precomputed=False)

    def eval_step(params, ref_params, batch):
        def micro(acc, mb):
            sums = eval_sums(spec, params, ref_params, mb)
            return jax.tree.map(jnp.add, acc, sums), None

        init = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
        return jax.lax.scan(micro, init, batch)[0]

    return jax.jit(eval_step, compiler_options=spec.codec.compiler_options)


def jit_eval_step(codec: ParamsCodec, cfg: ml_collections.ConfigDict, head_codec: HeadCodec | None = None):
    """`make_eval_step` for the run config `cfg` (the loss options `jit_train_step` uses)."""
    spec = StepSpec(
        codec=codec,
        tx=None,
        chunk=int(cfg.loss.logps_chunk) or None,
        kind=cfg.loss.type,
        options=loss_options(cfg.loss),
        use_ref=reference_needed(cfg.loss),
        precomputed=False,
        skip_nonfinite=False,
        head_codec=head_codec,
        head_options=head_term_options(cfg.pba) if head_codec is not None else None,
    )
    return make_eval_step(spec)


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The `eval/` metrics of a held-out pass's summed `SUM_KEYS`: TRL's names as per-pair means (as
    `step_metrics`), the mean loss, `eval/accuracy` (`alignx eval`'s headline name) and `eval/pairs`."""
    n = max(float(sums["pairs"]), 1.0)
    out = {f"eval/{name}": float(sums[key]) / n for name, key in TRL_METRICS.items()}
    out.update(
        {
            "eval/loss": float(sums["loss"]) / n,
            "eval/accuracy": out["eval/rewards/accuracies"],
            "eval/pairs": float(sums["pairs"]),
        }
    )
    return out
