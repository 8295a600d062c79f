"""Two-stage training of PBA's preference head on a frozen backbone.

Stage 1 runs the backbone once over every row's persona-only prompt and caches the pooled
features `[N, D]` (`pba.predict.persona_features`); stage 2 trains only the head's MLP on
those features with optax (AdamW), mini-batches drawn with replacement. Since the backbone never
changes, this costs one forward pass per row plus a few thousand tiny MLP steps, and works on any
exported policy (`mode='two_stage'` in the `pba` config section). Joint training (head CE added to
the DPO loss in one step) is `preference_head.joint_head_term`, wired in by `train.step`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignx_jax.errors import DataError
from alignx_jax.models.preference_head import (
    HeadConfig,
    PreferenceHead,
    head_loss,
    head_metrics,
    head_probs,
    predict_direction,
)
from alignx_jax.pba.predict import head_persona_features


@dataclasses.dataclass
class TwoStageResult:
    head: PreferenceHead
    cfg: HeadConfig
    losses: list[float]  # training loss every `log_every` steps
    train_metrics: dict[str, float]  # head_metrics on the training rows after training
    features: np.ndarray  # the cached [N, D] features (reuse for a second head)


def _directions(rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Gold directions [N, 90] (0.5 where a row has none) and a row mask [N]."""
    gold = np.full((len(rows), 90), 0.5, dtype=np.float32)
    mask = np.zeros((len(rows),), dtype=np.float32)
    for i, r in enumerate(rows):
        d = r.get("Preference Direction")
        if d is not None:
            gold[i] = np.asarray(d, dtype=np.float32)
            mask[i] = 1.0
    return gold, mask


def head_config(cfg: Any, embed_dim: int) -> HeadConfig:
    """The HeadConfig a run config asks for on a backbone of hidden size `embed_dim`: `pba.hidden`,
    `pba.pooling`, `pba.max_persona_tokens`, and `data.persona` (the head reads the persona variant the
    policy reads); every key read by attribute (config_schema owns the defaults)."""
    return HeadConfig(
        embed_dim=int(embed_dim),
        hidden=int(cfg.pba.hidden),
        pooling=str(cfg.pba.pooling),
        persona_variant=cfg.data.persona,
        max_persona_tokens=cfg.pba.max_persona_tokens,
    )


def head_config_for(backbone: nnx.Module, cfg: Any) -> HeadConfig:
    """A HeadConfig for `backbone`: `cfg` itself when it is one, else `head_config` of a run config."""
    if isinstance(cfg, HeadConfig):
        return cfg
    return head_config(cfg, backbone.cfg.hidden_size)


@functools.lru_cache(maxsize=16)
def _adamw(lr: float, weight_decay: float) -> optax.GradientTransformation:
    # One object per setting: it is a static argument of the jitted step, so a new one would recompile.
    return optax.adamw(lr, weight_decay=weight_decay)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "tx", "class_weights", "focal_gamma"), donate_argnums=(1, 2)
)
def _train_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    opt_state: Any,
    x_BD: jax.Array,
    d_BK: jax.Array,
    m_B: jax.Array,
    *,
    tx: optax.GradientTransformation,
    class_weights: tuple[float, ...] | None,
    focal_gamma: float,
):
    """One AdamW step on the head's params; pure (split state in, new state out) so that a step
    costs no Python graph traversal and the compilation is shared by every training call."""

    def loss_fn(params):
        head = nnx.merge(graphdef, params)
        logits = head.classify(x_BD)
        # joint training's normalisation (rows x dims, not the class weights' sum): one loss scale in both modes
        norm = jnp.maximum(jnp.sum(m_B), 1.0) * d_BK.shape[1]
        return head_loss(
            logits, d_BK, class_weights=class_weights, focal_gamma=focal_gamma, mask=m_B, normalizer=norm
        )

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_head_two_stage(
    backbone: nnx.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    cfg: Any,
    *,
    head: PreferenceHead | None = None,
    features: np.ndarray | None = None,
    steps: int = 500,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    class_weights: Sequence[float] | None = None,
    focal_gamma: float | None = None,
    feature_batch_size: int = 8,
    seed: int = 0,
    log_every: int = 50,
) -> TwoStageResult:
    """Train a preference head on a frozen `backbone` (see the module docstring).

    cfg: a HeadConfig, or a run config (`head_config`, and `pba.class_weights`, `pba.focal_gamma`);
    explicit `class_weights`/`focal_gamma` arguments win. `features`
    skips stage 1 (they must come from the same backbone, pooling and persona rule). Rows without
    a `Preference Direction` are ignored by the loss; a set with none is a DataError.
    """
    hcfg = head_config_for(backbone, cfg)
    pba = None if isinstance(cfg, HeadConfig) else cfg.pba
    if class_weights is None and pba is not None:
        class_weights = tuple(pba.class_weights)
    if focal_gamma is None:  # None, not 0.0, is "not given": an explicit 0.0 (plain CE) wins too
        focal_gamma = 0.0 if pba is None else float(pba.focal_gamma)
    gold, mask = _directions(rows)
    if not mask.any():
        raise DataError("two-stage head training: no row has a 'Preference Direction' to learn from")
    if features is None:
        features = head_persona_features(backbone, tokenizer, rows, hcfg, batch_size=feature_batch_size)
    if features.shape != (len(rows), hcfg.embed_dim):
        raise ValueError(
            f"features {features.shape} do not match {len(rows)} rows x embed_dim {hcfg.embed_dim}"
        )

    head = PreferenceHead(hcfg, rngs=nnx.Rngs(params=seed)) if head is None else head
    tx = _adamw(float(lr), float(weight_decay))
    cw = None if class_weights is None else tuple(float(w) for w in class_weights)
    graphdef, params = nnx.split(head, nnx.Param)  # the head's whole state is its params
    opt_state = tx.init(params)

    # Only rows with a direction are drawn; with replacement so every batch has the same shape.
    pool = np.nonzero(mask)[0]
    rng = np.random.default_rng(seed)
    feats_j, gold_j = jnp.asarray(features), jnp.asarray(gold)
    ones = jnp.ones((batch_size,), jnp.float32)
    losses: list[float] = []
    for t in range(steps):
        pick = jnp.asarray(rng.choice(pool, size=batch_size, replace=True))
        params, opt_state, loss = _train_step(
            graphdef,
            params,
            opt_state,
            feats_j[pick],
            gold_j[pick],
            ones,
            tx=tx,
            class_weights=cw,
            focal_gamma=float(focal_gamma),
        )
        if t % log_every == 0 or t == steps - 1:
            losses.append(float(loss))
    nnx.update(head, params)
    pred = predict_direction(head_probs(head, features[pool]))
    return TwoStageResult(
        head=head, cfg=hcfg, losses=losses, train_metrics=head_metrics(pred, gold[pool]), features=features
    )
