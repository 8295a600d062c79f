"""PBA's preference-vector head: persona -> a distribution over {0, 0.5, 1} for each of the 90 dims.

The head reads the decoder's final hidden states of the *persona-only* prompt (see
`pba.predict.persona_prompt_ids`), pools them over the persona tokens ('mean' or 'last'), and maps the pooled
vector through a LayerNorm and a one-hidden-layer MLP to logits `[B, 90, 3]` over `LABEL_VALUES`
(negative=0, neutral=0.5, positive=1). The release does not ship its P̃ predictor (docs/method.md section 5);
this head is this project's learned replacement for it.

Shape suffixes: D is the backbone's hidden width, K the 90 preference dims, C the 3 classes.

What lives here (one concept: the head and its I/O):
  * `HeadConfig`, `PreferenceHead` (NNX; params carry logical axis names so it shards with the model)
  * `direction_to_labels` / `labels_to_direction`, `head_loss` (class-weighted or focal CE)
  * `predict_direction` (argmax or threshold rule, with the release's all-neutral fallback)
  * `head_metrics` (predicted vs gold directions)
  * `pad_persona`, `pooled_features`, `head_probs` (tensor-level prediction on pooled features)
  * `HeadTermOptions`, `joint_head_term` (the term `train.step` adds to the DPO loss for joint training)
  * `save_head` / `load_head` (beside an HF export)

`models/` never imports `data/` (an import-linter contract): what renders persona text, reads data
files or applies the release's P~ rule to a history lives in `alignx_jax.pba` (`pba.predict`:
persona_prompt_ids, persona_features, predict_preferences, heuristic_metrics, cli_predict_preferences);
the dimensions and the rule itself are `alignx_jax.preference_space`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax import paths
from alignx_jax.errors import CheckpointError, ConfigError
from alignx_jax.models.safetensors_io import HEAD_WEIGHTS_FILE
from alignx_jax.preference_space import (
    NUM_DIMS,
    RELEASE_NEG_THRESHOLD,
    RELEASE_POS_THRESHOLD,
    dimension_labels,
    release_fallback,
    threshold_direction,
)
from alignx_jax.sharding import annotated

# The class order of the head's last axis; a direction value v has class index round(2 v).
LABEL_VALUES: tuple[float, float, float] = (0.0, 0.5, 1.0)
NEGATIVE, NEUTRAL, POSITIVE = 0, 1, 2
POOLINGS: tuple[str, ...] = ("mean", "last")
RULES: tuple[str, ...] = ("argmax", "threshold")

HEAD_CONFIG_FILE: str = "preference_head_config.json"
HEAD_FORMAT: str = "alignx-preference-head/1"
# how a saved head was fit, recorded in its config json: with the policy, or on the frozen final policy
HEAD_TRAININGS: tuple[str, ...] = ("joint", "two_stage")

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Shape and input rule of a preference head.

    `embed_dim` is the backbone's hidden size D. `persona_variant` and `max_persona_tokens` fix how
    the persona-only prompt is built (`persona_prompt_ids`), so that prediction reproduces training.
    A run's head is `pba.head_training.head_config` of its config (models/ reads no config).
    """

    embed_dim: int
    hidden: int = 256
    pooling: str = "mean"
    num_dims: int = NUM_DIMS
    num_classes: int = len(LABEL_VALUES)
    persona_variant: str = "p"
    max_persona_tokens: int = 1024

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pba.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.num_classes != len(LABEL_VALUES):
            raise ConfigError(
                f"preference head: num_classes must be {len(LABEL_VALUES)} (labels {LABEL_VALUES})"
            )
        for name in ("embed_dim", "hidden", "num_dims", "max_persona_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):  # e.g. "64" from a hand-edited file
                raise ConfigError(f"preference head: {name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"preference head: {name} must be positive, got {getattr(self, name)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- module


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    # logical axis names like the decoder's params: names without a rule (pref_dims) are replicated
    return annotated(nnx.Param, value, axes)


# the head computes in float32 whatever the backbone's dtype; its products are tiny, so full float32 on a
# GPU/TPU too, whose default rounds float32 inputs (alignx_jax.hardware.matmul_precision)
FULL = jax.lax.Precision.HIGHEST


def pool_hidden(hidden_BSD: jax.Array, mask_BS: jax.Array, pooling: str) -> jax.Array:
    """Pool hidden states over the persona tokens (mask 1) -> `[B, D]` float32.

    'last' takes the last masked position, so it works for left and right padding alike.
    """
    mask_BS = mask_BS.astype(jnp.float32)
    if pooling == "mean":
        total_BD = jnp.einsum("bsd,bs->bd", hidden_BSD.astype(jnp.float32), mask_BS, precision=FULL)
        return total_BD / jnp.maximum(jnp.sum(mask_BS, axis=-1, keepdims=True), 1.0)
    if pooling == "last":
        pos_BS = jnp.arange(mask_BS.shape[-1])[None, :] * (mask_BS > 0)
        last_B = jnp.max(pos_BS, axis=-1)
        return jnp.take_along_axis(hidden_BSD, last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    raise ConfigError(f"pba.pooling must be one of {POOLINGS}, got {pooling!r}")


class PreferenceHead(nnx.Module):
    """Pooled persona hidden state -> LayerNorm -> Linear(D, H) -> GELU -> Linear(H, 90 x 3)."""

    def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, K, C = cfg.embed_dim, cfg.hidden, cfg.num_dims, cfg.num_classes
        self.norm_scale = _param(jnp.ones((D,), jnp.float32), ("norm",))
        self.norm_bias = _param(jnp.zeros((D,), jnp.float32), ("norm",))
        self.w_in = _param(
            jax.nn.initializers.lecun_normal()(rngs.params(), (D, H), jnp.float32), ("embed", "mlp")
        )
        self.b_in = _param(jnp.zeros((H,), jnp.float32), ("mlp",))
        init_out = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.w_out = _param(
            init_out(rngs.params(), (H, K, C), jnp.float32), ("mlp", "pref_dims", "pref_classes")
        )
        self.b_out = _param(jnp.zeros((K, C), jnp.float32), ("pref_dims", "pref_classes"))

    def pool(self, hidden_BSD: jax.Array, mask_BS: jax.Array) -> jax.Array:
        return pool_hidden(hidden_BSD, mask_BS, self.cfg.pooling)

    def classify(self, feats_BD: jax.Array) -> jax.Array:
        """Pooled features `[B, D]` -> logits `[B, num_dims, num_classes]` (float32)."""
        with jax.named_scope("preference_head"):
            x_BD = feats_BD.astype(jnp.float32)
            # LayerNorm: pooled hidden states of different backbones/lengths differ in scale.
            mu_B1 = jnp.mean(x_BD, axis=-1, keepdims=True)
            var_B1 = jnp.var(x_BD, axis=-1, keepdims=True)
            x_BD = (x_BD - mu_B1) * jax.lax.rsqrt(var_B1 + 1e-5) * self.norm_scale[...] + self.norm_bias[...]
            h_BH = jax.nn.gelu(jnp.matmul(x_BD, self.w_in[...], precision=FULL) + self.b_in[...])
            return jnp.einsum("bh,hkc->bkc", h_BH, self.w_out[...], precision=FULL) + self.b_out[...]

    def __call__(self, hidden_BSD: jax.Array, mask_BS: jax.Array) -> jax.Array:
        """Persona hidden states `[B, S, D]` + mask `[B, S]` -> logits `[B, 90, 3]`."""
        return self.classify(self.pool(hidden_BSD, mask_BS))


# ----------------------------------------------------------------------------- labels and loss


def head_params(head: PreferenceHead) -> dict[str, Any]:
    """The head's trained `nnx.Param`s as a pure dict (what checkpoints store as the `head` item)."""
    return nnx.to_pure_dict(nnx.state(head, nnx.Param))


def direction_to_labels(direction_BK):
    """Direction values {0, 0.5, 1} -> class indices {0, 1, 2} (int32); numpy in, numpy out."""
    xp = np if isinstance(direction_BK, (np.ndarray, list, tuple)) else jnp
    d = xp.asarray(direction_BK, dtype=xp.float32)
    return xp.clip(xp.round(d * 2.0), 0, 2).astype(xp.int32)


def labels_to_direction(labels_BK):
    """Class indices {0, 1, 2} -> direction values {0, 0.5, 1} (float32)."""
    xp = np if isinstance(labels_BK, (np.ndarray, list, tuple)) else jnp
    return xp.asarray(LABEL_VALUES, dtype=xp.float32)[xp.asarray(labels_BK)]


def head_loss(
    logits_BKC: jax.Array,
    direction_BK: jax.Array,
    *,
    class_weights: Sequence[float] | None = None,
    focal_gamma: float = 0.0,
    mask=None,
    normalizer=None,
) -> jax.Array:
    """Cross-entropy of the head against a row's direction; scalar.

    Most dims of most rows are neutral, so plain CE learns "always neutral"; `class_weights`
    (per class, in `LABEL_VALUES` order) and/or focal loss (`focal_gamma` > 0 scales each term by
    (1 - p_true)^gamma) push it to the rare non-neutral labels. `mask` is `[B]` (rows, e.g. padding
    pairs or rows with no direction) or `[B, K]`. The mean is weighted: sum(w m l) / sum(w m);
    with `normalizer` it is sum(w m l) / normalizer (additive over micro-batches).
    """
    labels_BK = direction_to_labels(jnp.asarray(direction_BK))
    logp_BKC = jax.nn.log_softmax(logits_BKC.astype(jnp.float32), axis=-1)
    logp_BK = jnp.take_along_axis(logp_BKC, labels_BK[..., None], axis=-1)[..., 0]
    nll_BK = -logp_BK
    if focal_gamma:
        nll_BK = nll_BK * (1.0 - jnp.exp(logp_BK)) ** focal_gamma
    w_BK = jnp.ones_like(nll_BK)
    if class_weights is not None:
        cw = jnp.asarray(class_weights, jnp.float32)
        w_BK = cw[labels_BK]
    if mask is not None:
        m = jnp.asarray(mask, jnp.float32)
        w_BK = w_BK * (m[:, None] if m.ndim == 1 else m)
    if normalizer is not None:
        return jnp.sum(w_BK * nll_BK) / normalizer
    return jnp.sum(w_BK * nll_BK) / jnp.maximum(jnp.sum(w_BK), 1e-8)


# ----------------------------------------------------------------------------- decision rule


def expected_direction(probs_BKC) -> np.ndarray:
    """E[v] = p(neg) 0 + p(neu) 0.5 + p(pos) 1 per dim (float64), the analogue of the release's mean."""
    p = np.asarray(probs_BKC, dtype=np.float64)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-30)
    return p @ np.asarray(LABEL_VALUES, dtype=np.float64)


def predict_direction(
    probs_BKC,
    *,
    rule: str = "argmax",
    pos_threshold: float = RELEASE_POS_THRESHOLD,
    neg_threshold: float = RELEASE_NEG_THRESHOLD,
) -> np.ndarray:
    """Head probabilities `[B, K, 3]` -> a direction `[B, K]` in {0, 0.5, 1} (float32, numpy).

    rule='argmax': the most probable class. Ties: if neutral is among the most probable classes,
    or negative and positive tie for the top, the dim is neutral (undecided -> no claim).
    rule='threshold': on the expected value E = p(neu) 0.5 + p(pos) 1, E >= pos_threshold -> 1,
    E <= neg_threshold -> 0, else 0.5; with the defaults (0.6 / 0.4) this is exactly the release's
    rule with the mean of history directions replaced by E.
    Fallback (both rules): a row that comes out all-neutral gets `release_fallback(E)`, i.e. the
    release's fallback applied to E as it is applied to the mean — so a profile is never empty.
    """
    p = np.asarray(probs_BKC, dtype=np.float64)
    if p.ndim != 3 or p.shape[-1] != len(LABEL_VALUES):
        raise ValueError(f"predict_direction expects probabilities [B, K, 3], got shape {p.shape}")
    E_BK = expected_direction(p)
    if rule == "argmax":
        is_max = p == p.max(axis=-1, keepdims=True)
        undecided = is_max[..., NEUTRAL] | (is_max[..., NEGATIVE] & is_max[..., POSITIVE])
        out = np.where(undecided, 0.5, np.where(is_max[..., POSITIVE], 1.0, 0.0)).astype(np.float32)
    elif rule == "threshold":
        if not neg_threshold < pos_threshold:
            raise ConfigError(
                f"predict_direction: neg_threshold {neg_threshold} must be < pos_threshold {pos_threshold}"
            )
        out = threshold_direction(E_BK, pos_threshold, neg_threshold)
    else:
        raise ConfigError(f"predict_direction: rule must be one of {RULES}, got {rule!r}")
    for b in np.nonzero(np.all(out == 0.5, axis=-1))[0]:
        out[b] = release_fallback(E_BK[b])
    return out


# ----------------------------------------------------------------------------- metrics


def head_metrics(pred_BK, gold_BK) -> dict[str, float]:
    """Per-dim agreement of predicted and gold directions (rows with gold None must be dropped).

    accuracy: exact match averaged over all B x K entries; accuracy_non_neutral: over the entries
    whose gold is non-neutral (the ones that end up in profile text); macro_f1: the mean of the
    per-class F1 over {0, 0.5, 1}, leaving out a class absent from both gold and prediction;
    f1_negative / f1_neutral / f1_positive: the per-class F1 (nan when absent from both).
    """
    pred = direction_to_labels(np.asarray(pred_BK, dtype=np.float32))
    gold = direction_to_labels(np.asarray(gold_BK, dtype=np.float32))
    if pred.shape != gold.shape:
        raise ValueError(f"head_metrics: prediction {pred.shape} and gold {gold.shape} differ in shape")
    out: dict[str, float] = {"n": float(gold.shape[0]) if gold.ndim else 0.0}
    if gold.size == 0:
        return {
            **out,
            "accuracy": float("nan"),
            "accuracy_non_neutral": float("nan"),
            "macro_f1": float("nan"),
        }
    hit = pred == gold
    out["accuracy"] = float(hit.mean())
    nn = gold != NEUTRAL
    out["accuracy_non_neutral"] = float(hit[nn].mean()) if nn.any() else float("nan")
    f1s = []
    for c, name in ((NEGATIVE, "negative"), (NEUTRAL, "neutral"), (POSITIVE, "positive")):
        tp = float(np.sum((pred == c) & (gold == c)))
        denom = float(np.sum(pred == c) + np.sum(gold == c))
        f1 = 2 * tp / denom if denom else float("nan")
        out[f"f1_{name}"] = f1
        if denom:
            f1s.append(f1)
    out["macro_f1"] = float(np.mean(f1s))
    return out


# ----------------------------------------------------------------------------- persona input


def pad_persona(
    ids_list: Sequence[Sequence[int]], *, pad_id: int, min_length: int = 64, num_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad persona ids -> (ids [B, S] int32, mask [B, S] int32). S is the next power of two
    >= the longest (at least `min_length`): few distinct shapes, so few recompilations. Extra rows
    up to `num_rows` hold one attended pad token (an empty attention row would give NaN)."""
    B = len(ids_list) if num_rows is None else int(num_rows)
    longest = max([len(x) for x in ids_list] + [1])
    S = max(int(min_length), 1 << (longest - 1).bit_length())
    ids = np.full((B, S), pad_id, dtype=np.int32)
    mask = np.zeros((B, S), dtype=np.int32)
    for k, x in enumerate(ids_list):
        ids[k, : len(x)] = x
        mask[k, : len(x)] = 1
    mask[len(ids_list) :, 0] = 1
    return ids, mask


def pad_token_id(tokenizer: Any) -> int:
    """The id persona rows are padded with: the tokenizer's pad id, else its EOS, else 0."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pid if pid is not None else 0)


def pooled_features(model: nnx.Module, ids_BS: jax.Array, mask_BS: jax.Array, pooling: str) -> jax.Array:
    """Pooled final hidden states `[B, D]` of persona ids `[B, S]` (jitted once per shape, with the
    model's compile options)."""
    graphdef, state = nnx.split(model)
    program = _pooled_program(model.cfg.compiler_options_key())
    return program(graphdef, state, ids_BS, mask_BS, pooling=pooling)


@functools.cache
def _pooled_program(options: tuple[tuple[str, Any], ...]) -> Any:
    def pooled(graphdef, state, ids_BS, mask_BS, pooling):
        return pool_hidden(nnx.merge(graphdef, state).hidden_states(ids_BS, mask_BS), mask_BS, pooling)

    return jax.jit(pooled, static_argnames=("graphdef", "pooling"), compiler_options=dict(options) or None)


@nnx.jit
def _head_probs(head: PreferenceHead, feats_BD: jax.Array) -> jax.Array:
    return jax.nn.softmax(head.classify(feats_BD), axis=-1)


def head_probs(head: PreferenceHead, features_ND: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Softmax of the head's logits on pooled features -> `[N, K, 3]` float32."""
    parts = [
        np.asarray(_head_probs(head, jnp.asarray(features_ND[i : i + batch_size])))
        for i in range(0, len(features_ND), batch_size)
    ]
    return (
        np.concatenate(parts) if parts else np.zeros((0, head.cfg.num_dims, head.cfg.num_classes), np.float32)
    )


# ----------------------------------------------------------------------------- joint training term


@dataclasses.dataclass(frozen=True)
class HeadTermOptions:
    """How `joint_head_term` weighs the head's CE; the values of the run's `pba` section, which
    `train.step` reads (models/ reads no config)."""

    weight: float  # the term is weight * CE
    stop_gradient: bool  # detach the persona features: the head's loss does not move the policy
    class_weights: tuple[float, ...] | None  # per class in LABEL_VALUES order; None: unweighted
    focal_gamma: float  # > 0: focal CE (`head_loss`)


def joint_head_term(
    model: nnx.Module,
    head: PreferenceHead,
    batch: Mapping[str, jax.Array],
    options: HeadTermOptions,
    *,
    n_pairs: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PBA head's term for a joint step: `(options.weight * CE, metrics)`; pure, jit-friendly.

    Reads `batch['persona_ids'/'persona_mask'/'direction']` and `pair_mask` (dummy pairs count for
    nothing): plain arrays, which `train.step` takes from the microbatch's `batch.HeadInputs`
    (persona ids from `data.batching.make_example` with persona_length set). `options`
    (`HeadTermOptions`): `weight`, `stop_gradient`, `class_weights`, `focal_gamma`. The returned loss is
    already weighted: `train.step` adds it to the DPO loss as is. Metrics are unweighted.

    Micro-batching: pass `n_pairs` = real pairs in the *global* batch; the CE is then
    sum(w * ce) / (n_pairs * num_dims) over this micro-batch, so summing the terms of all
    micro-batches gives the global-batch mean (like the DPO sum / n_pairs). Without it the CE is the
    class-weighted mean over this batch's real rows.
    """
    ids_BS, mask_BS = batch["persona_ids"], batch["persona_mask"]
    with jax.named_scope("pba_head_term"):
        hidden_BSD = model.hidden_states(ids_BS, mask_BS)
        if options.stop_gradient:
            hidden_BSD = jax.lax.stop_gradient(hidden_BSD)
        logits_BKC = head(hidden_BSD, mask_BS)
        row_mask_B = batch.get("pair_mask")
        norm = (
            None
            if n_pairs is None
            else jnp.maximum(jnp.asarray(n_pairs, jnp.float32), 1.0) * logits_BKC.shape[1]
        )
        ce = head_loss(
            logits_BKC,
            batch["direction"],
            class_weights=options.class_weights,
            focal_gamma=options.focal_gamma,
            mask=row_mask_B,
            normalizer=norm,
        )
        labels_BK = direction_to_labels(jnp.asarray(batch["direction"]))
        hit_BK = (jnp.argmax(logits_BKC, axis=-1) == labels_BK).astype(jnp.float32)
        m_B = (
            jnp.ones(hit_BK.shape[:1], jnp.float32)
            if row_mask_B is None
            else jnp.asarray(row_mask_B, jnp.float32)
        )
        nn_BK = (labels_BK != NEUTRAL).astype(jnp.float32) * m_B[:, None]
        metrics = {
            "head_loss": ce,
            "head_accuracy": jnp.sum(hit_BK * m_B[:, None])
            / jnp.maximum(jnp.sum(m_B) * hit_BK.shape[1], 1.0),
            "head_accuracy_non_neutral": jnp.sum(hit_BK * nn_BK) / jnp.maximum(jnp.sum(nn_BK), 1.0),
        }
    return options.weight * ce, metrics


# ----------------------------------------------------------------------------- export / import

_PARAM_NAMES: tuple[str, ...] = ("norm_scale", "norm_bias", "w_in", "b_in", "w_out", "b_out")
TENSOR_PREFIX = "preference_head."  # the head's tensor names in its safetensors file


def has_head(hf_dir: str) -> bool:
    return os.path.isfile(os.path.join(hf_dir, HEAD_WEIGHTS_FILE)) and os.path.isfile(
        os.path.join(hf_dir, HEAD_CONFIG_FILE)
    )


def save_head(
    head: PreferenceHead, cfg: HeadConfig | None, hf_dir: str, *, training: str | None = None
) -> None:
    """Write `preference_head.safetensors` + `preference_head_config.json` into `hf_dir`; `training` (one
    of `HEAD_TRAININGS`, None: not recorded) is how it was fit, which `head_training` reads back.

    Separate files with names transformers does not read, so the policy folder still loads with
    `AutoModelForCausalLM.from_pretrained` unchanged. Tensors keep their dtype (bit-exact round trip).
    """
    from safetensors.numpy import save_file

    cfg = head.cfg if cfg is None else cfg
    os.makedirs(hf_dir, exist_ok=True)
    tensors = {
        TENSOR_PREFIX + n: np.ascontiguousarray(np.asarray(jax.device_get(getattr(head, n).get_value())))
        for n in _PARAM_NAMES
    }
    # each file whole or absent, the config (which `has_head` also needs) last: a first save cut short
    # leaves no head (`alignx demo` then fits it again), never one that half loads
    weights = os.path.join(hf_dir, HEAD_WEIGHTS_FILE)
    tmp = paths.tmp_path(weights)
    save_file(tensors, tmp, metadata={"format": HEAD_FORMAT})
    os.replace(tmp, weights)
    meta = {
        "format": HEAD_FORMAT,
        **cfg.to_json(),
        "label_values": list(LABEL_VALUES),
        "label_names": ["negative", "neutral", "positive"],
        "dim_labels": [
            {"index": i, "negative": neg, "positive": pos} for i, (neg, pos) in enumerate(dimension_labels())
        ],
        "input": "BOS + persona_text(row, persona_variant) ids, left-truncated to max_persona_tokens; "
        f"pooled ({cfg.pooling}) final hidden states of the policy",
    }
    if training is not None:
        if training not in HEAD_TRAININGS:
            raise ConfigError(f"preference head training must be one of {HEAD_TRAININGS}, got {training!r}")
        meta["training"] = training
    config = os.path.join(hf_dir, HEAD_CONFIG_FILE)
    tmp = paths.tmp_path(config)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(tmp, config)


def head_training(hf_dir: str) -> str | None:
    """How the head in `hf_dir` was fit, as `save_head` recorded it (one of `HEAD_TRAININGS`); None when
    it recorded none (a head saved before it did) or the folder has no readable head config."""
    try:
        with open(os.path.join(hf_dir, HEAD_CONFIG_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    training = meta.get("training") if isinstance(meta, dict) else None
    return training if training in HEAD_TRAININGS else None


def check_backbone(cfg: HeadConfig, hidden_size: int, where: str) -> None:
    """A head reads its backbone's pooled hidden states, so its width must be the model's."""
    if int(cfg.embed_dim) != int(hidden_size):
        raise CheckpointError(
            f"{where}: preference head embed_dim {cfg.embed_dim} != the model's hidden_size {hidden_size}"
        )


def load_head(hf_dir: str) -> tuple[PreferenceHead, HeadConfig]:
    """Read a head written by `save_head`; CheckpointError when the folder has none."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"model folder not found: {hf_dir}")
    if not has_head(hf_dir):
        raise CheckpointError(
            f"{hf_dir}: no preference head ({HEAD_WEIGHTS_FILE} + {HEAD_CONFIG_FILE}); the model must be "
            "an export of a PBA run that trained one (pba.enabled)"
        )
    cfg_path = os.path.join(hf_dir, HEAD_CONFIG_FILE)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON object expected, got {type(meta).__name__}")
        fields = {f.name for f in dataclasses.fields(HeadConfig)}
        cfg = HeadConfig(**{k: v for k, v in meta.items() if k in fields})
    # HeadConfig's own checks (ConfigError) name config keys; here the file is what is wrong
    except (OSError, json.JSONDecodeError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{cfg_path}: malformed preference head config: {e}") from e
    labels = meta.get("label_values", list(LABEL_VALUES))
    if not isinstance(labels, list) or tuple(labels) != LABEL_VALUES:
        raise CheckpointError(
            f"{cfg_path}: label_values {meta.get('label_values')} differ from {list(LABEL_VALUES)}"
        )
    try:
        tensors = load_file(os.path.join(hf_dir, HEAD_WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{os.path.join(hf_dir, HEAD_WEIGHTS_FILE)}: cannot read: {e}") from e
    head = PreferenceHead(cfg, rngs=nnx.Rngs(0))  # tiny; real arrays so it can be trained further
    for n in _PARAM_NAMES:
        key = TENSOR_PREFIX + n
        var = getattr(head, n)
        want = tuple(var.get_value().shape)
        if key not in tensors:
            raise CheckpointError(f"{hf_dir}/{HEAD_WEIGHTS_FILE}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != want:
            raise CheckpointError(
                f"{hf_dir}/{HEAD_WEIGHTS_FILE}: {key} has shape {tuple(tensors[key].shape)}, "
                f"config {HEAD_CONFIG_FILE} implies {want}"
            )
        if not np.isfinite(tensors[key]).all():  # a corrupt head would predict silently wrong P~
            raise CheckpointError(f"{hf_dir}/{HEAD_WEIGHTS_FILE}: {key} holds NaN/inf values")
        var.set_value(jnp.asarray(tensors[key]))
    return head, cfg
