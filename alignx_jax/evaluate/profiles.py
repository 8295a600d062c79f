"""Where PBA's preference direction P~ comes from (`--preference`): the row's golden direction,
its `profile` text, or the model folder's preference head (`PredictedPreferences`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignx_jax.errors import CheckpointError, DataError
from alignx_jax.evaluate.options import flip_direction


def file_profile(row: dict, flip: Sequence[int], *, file: str, index: int) -> tuple[str, np.ndarray | None]:
    """`--preference profile`: the row's `profile` text as the release's PBA evaluation renders it
    (flipped through its parsed direction if asked), and that direction when it parses."""
    from alignx_jax.data import persona as persona_lib

    text = persona_lib.row_profile(row, file=file, index=index)
    if not isinstance(text, str):
        raise DataError("--preference profile needs a `profile` field in every row", file=file, row=index)
    if not flip:
        return text, _parsed(text)
    direction = flip_direction(_flippable(text, file=file, index=index), flip)
    return persona_lib.profile_text(direction), direction


def _parsed(text: str) -> np.ndarray | None:
    """A profile's direction, or None for free text (rendered as is, no direction to report on)."""
    from alignx_jax.data import persona as persona_lib

    try:
        return persona_lib.parse_profile(text)
    except DataError:
        return None


def _flippable(text: str, *, file: str, index: int) -> np.ndarray:
    """The direction `--flip` changes: the profile must be the preference space's labels."""
    direction = _parsed(text)
    if direction is None:
        raise DataError(
            "--flip needs a `profile` made of the preference space's labels", file=file, row=index
        )
    return direction


def golden_profile(row: dict, flip: Sequence[int], *, file: str, index: int) -> tuple[str, np.ndarray | None]:
    """PBA's golden profile text (flipped if asked) and the direction it renders (None if only text): the
    row's P~ as training's 'golden' takes it (`prompts.golden_preference`)."""
    from alignx_jax.data import persona as persona_lib
    from alignx_jax.data.prompts import golden_preference

    golden = golden_preference(row, file=file, index=index)
    if golden is None:
        raise DataError(
            "--preference golden needs a `Preference Direction` or a `profile`", file=file, row=index
        )
    if isinstance(golden, str):
        if not flip:  # the release's exact string (P-SOUPS) when nothing is changed
            return golden, _parsed(golden)
        direction = _flippable(golden, file=file, index=index)
    else:
        direction = golden
    if flip:
        direction = flip_direction(direction, flip)
    return persona_lib.profile_text(direction), direction


class PredictedPreferences:
    """P~ from the model folder's preference head (PBA with `--preference predicted`).

    The head reads the policy's pooled hidden states of the persona-only prompt; here the persona
    variant is the one being evaluated (the paper infers P~ from each persona representation), the
    pooling and token budget are the head's own. Against rows with a golden direction the head's
    agreement is collected for the results' `preference_head` block.
    """

    def __init__(self, model_dir: str, model: Any, tokenizer: Any, *, batch_size: int = 8):
        from alignx_jax.models import preference_head as ph
        from alignx_jax.pba import predict

        if not os.path.isfile(os.path.join(model_dir, ph.HEAD_WEIGHTS_FILE)):
            raise CheckpointError(
                f"{model_dir}: --preference predicted needs {ph.HEAD_WEIGHTS_FILE} "
                "(export a PBA run with its head, or use --preference golden)"
            )
        self._ph, self._predict = ph, predict
        self.head, self.cfg = ph.load_head(model_dir)
        ph.check_backbone(self.cfg, model.cfg.hidden_size, model_dir)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.metrics: dict[str, dict[str, float]] = {}
        self._pooled: list[tuple[np.ndarray, np.ndarray, list[dict], str]] = []  # pred, gold, rows, variant

    def directions(self, rows: Sequence[dict], persona: str, key: str) -> np.ndarray:
        """float32 [N, 90] predicted directions for `rows` under one persona variant."""
        ph = self._ph
        feats = self._predict.persona_features(
            self.model,
            self.tokenizer,
            rows,
            pooling=self.cfg.pooling,
            variant=persona,
            max_tokens=self.cfg.max_persona_tokens,
            batch_size=self.batch_size,
        )
        pred = ph.predict_direction(ph.head_probs(self.head, feats)).astype(np.float32)
        gold = [i for i, r in enumerate(rows) if r.get("Preference Direction") is not None]
        if gold:
            gold_rows = [rows[i] for i in gold]
            gold_dirs = np.asarray([r["Preference Direction"] for r in gold_rows], dtype=np.float32)
            # the release's averaging rule, and the head on the rows the rule could score (like for like)
            self.metrics[key] = _finite(
                {
                    **ph.head_metrics(pred[gold], gold_dirs),
                    **self._predict.heuristic_metrics(gold_rows, pred[gold], variant=persona),
                }
            )
            self._pooled.append((pred[gold], gold_dirs, gold_rows, persona))
        return pred

    def describe(self) -> dict[str, Any]:
        """`accuracy`/`macro_f1` of the head and `heuristic_*` of the release rule, pooled over every
        benchmark/persona scored (rows with a golden direction), plus the per-benchmark breakdown."""
        out: dict[str, Any] = {"config": self.cfg.to_json()}
        if self._pooled:
            pred = np.concatenate([p for p, _, _, _ in self._pooled])
            gold = np.concatenate([g for _, g, _, _ in self._pooled])
            rows = [r for _, _, rs, _ in self._pooled for r in rs]
            # each block's persona variant decides which history the rule may average
            variants = [v for p, _, _, v in self._pooled for _ in range(len(p))]
            rule = self._predict.heuristic_metrics(rows, pred, variant=variants)
            out.update(_finite({**self._ph.head_metrics(pred, gold), **rule}))
            out["n"] = int(len(rows))
        out["agreement_with_golden"] = self.metrics
        return out


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (a class absent from gold and prediction) -> None, so the results stay valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
