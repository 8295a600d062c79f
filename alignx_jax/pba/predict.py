"""PBA's data side of the preference head: the persona-only prompt it reads, features and P~
predictions for data rows, the release's averaging rule as a baseline, and `alignx predict-preferences`.

The head itself (NNX module, loss, tensor-level prediction, save/load) is `models.preference_head`;
this module joins it to `data.persona` / `data.schema`, which `models/` never imports.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignx_jax import distributed, paths
from alignx_jax.data.persona import (
    history_direction,
    persona_text,
    profile_text,
)
from alignx_jax.data.schema import load, read_persona_file, refuse_split_folder
from alignx_jax.errors import CheckpointError, ConfigError, DataError
from alignx_jax.hardware import AUTO, matmul_precision
from alignx_jax.models.preference_head import (
    NUM_DIMS,
    PreferenceHead,
    check_backbone,
    head_metrics,
    head_probs,
    load_head,
    pad_persona,
    pad_token_id,
    pooled_features,
    predict_direction,
)


def gold_rows(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the rows that carry a golden `Preference Direction`."""
    return [i for i, r in enumerate(rows) if r.get("Preference Direction") is not None]


def heuristic_metrics(
    rows: Sequence[Mapping[str, Any]],
    head_pred: np.ndarray | None = None,
    *,
    variant: str | Sequence[str] = "p",
) -> dict[str, float]:
    """The release's averaging rule (history directions -> P̃) scored against the rows' own direction.

    Keys are `heuristic_<metric>` for each metric of `head_metrics` (`heuristic_n` rows). The rule reads
    the history items the persona `variant` (one, or one per row) shows, none for 'demo'; rows with no
    gold, or no such item with a direction, are skipped. `head_pred` ([len(rows), 90], the head's P̃ of
    the same rows) adds `heuristic_head_<metric>`: the head on exactly the rule's rows.
    """
    variants = [variant] * len(rows) if isinstance(variant, str) else list(variant)
    if len(variants) != len(rows):
        raise ValueError(f"heuristic_metrics: {len(variants)} persona variants for {len(rows)} rows")
    idx = [i for i in gold_rows(rows) if history_direction(rows[i], variants[i]) is not None]

    def stacked(vectors) -> np.ndarray:
        return np.stack([np.asarray(v, np.float32) for v in vectors]) if idx else np.zeros((0, NUM_DIMS))

    gold = stacked(rows[i]["Preference Direction"] for i in idx)
    out = {
        f"heuristic_{k}": v
        for k, v in head_metrics(stacked(history_direction(rows[i], variants[i]) for i in idx), gold).items()
    }
    if head_pred is not None:
        out.update(
            {
                f"heuristic_head_{k}": v
                for k, v in head_metrics(stacked(head_pred[i] for i in idx), gold).items()
            }
        )
        del out["heuristic_head_n"]  # = heuristic_n
    return out


def persona_prompt_ids(
    tokenizer: Any, row: Mapping[str, Any], variant: str = "p", *, max_tokens: int = 1024
) -> list[int]:
    """The head's input ids for one row: BOS, then the persona block's ids, left-truncated.

    The block is `data.persona.persona_text(row, variant)` (the whole history; docs/method.md section 4's
    `{ugc}{pairs}{demographics}`) tokenized with no special tokens. Truncation keeps the *last*
    `max_tokens - 1` ids (as the release left-truncates prompts), so the demographic text, which
    comes last, survives. The BOS id falls back to EOS for tokenizers without one. This is the same
    rule as `data.batching.make_example(..., persona_length=max_tokens)` uses for joint training (a
    test checks they agree on a whole history); there the history is the row's training sample
    (`data.history`, as the prompt shows it), so a joint head learns from the partial histories the
    policy sees and predicts from the whole one. Two-stage and first-stage heads fit on whole histories.
    """
    if max_tokens < 2:
        raise ConfigError(f"max_persona_tokens must be at least 2, got {max_tokens}")
    body = [
        int(i) for i in tokenizer(persona_text(dict(row), variant), add_special_tokens=False)["input_ids"]
    ]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise CheckpointError(
            "the tokenizer has neither a BOS nor an EOS token; the preference head needs one"
        )
    return [int(bos)] + body[-(max_tokens - 1) :]


def persona_features(
    model: nnx.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    pooling: str,
    variant: str = "p",
    max_tokens: int = 1024,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """Pooled final hidden states of the persona-only prompts, one backbone pass -> `[N, D]` float32.

    Rows are run in order of length (less padding), results come back in input order. Batches are
    padded to `batch_size` rows so that only the sequence length varies between compilations.
    A backbone sharded over the devices of several processes (mesh.fsdp across hosts) may leave a
    batch's features sharded over them too: they are gathered, on every process (each runs the pass).
    `progress`: a tqdm bar of the rows (`alignx predict-preferences --data`, on process 0).
    """
    from alignx_jax.metrics import progress_bar

    all_ids = [persona_prompt_ids(tokenizer, r, variant, max_tokens=max_tokens) for r in rows]
    order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
    out: np.ndarray | None = None
    pad_id = pad_token_id(tokenizer)
    show = progress and paths.is_main_process()
    with progress_bar(total=len(order), desc="persona features", unit="row", disable=not show) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = pad_persona([all_ids[i] for i in chunk], pad_id=pad_id, num_rows=batch_size)
            feats = pooled_features(model, jnp.asarray(ids), jnp.asarray(mask), pooling)
            if not feats.is_fully_addressable:  # the same sharding on every process: all gather, or none
                from jax.experimental import multihost_utils

                feats = multihost_utils.process_allgather(feats, tiled=True)
            feats = np.asarray(jax.device_get(feats), dtype=np.float32)
            if out is None:
                out = np.zeros((len(rows), feats.shape[-1]), dtype=np.float32)
            out[chunk] = feats[: len(chunk)]
            bar.update(len(chunk))
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    return out


def head_persona_features(
    model: nnx.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    head_cfg: Any,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """`persona_features` of the persona prompts a preference head reads: its config's pooling,
    persona variant and max tokens, as in its training and prediction alike."""
    return persona_features(
        model,
        tokenizer,
        rows,
        pooling=head_cfg.pooling,
        variant=head_cfg.persona_variant,
        max_tokens=head_cfg.max_persona_tokens,
        batch_size=batch_size,
        progress=progress,
    )


def predict_preferences(
    model: nnx.Module,
    head: PreferenceHead,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 8,
    rule: str = "argmax",
    return_probs: bool = False,
    progress: bool = False,
):
    """The head's P̃ for each row: a list of float32 `[90]` arrays in {0, 0.5, 1} (never all neutral).

    The persona prompt follows the head's own config (variant, max tokens), as in its training.
    With return_probs, returns (directions, probs [N, 90, 3]). `progress`: a bar of the rows.
    """
    cfg = head.cfg
    # a float32 model's products in full float32 on a GPU/TPU too, as in training's auto (alignx_jax.hardware)
    with matmul_precision(AUTO, str(model.cfg.dtype)):
        feats = head_persona_features(model, tokenizer, rows, cfg, batch_size=batch_size, progress=progress)
        probs = head_probs(head, feats)
    pred = predict_direction(probs, rule=rule) if len(rows) else np.zeros((0, cfg.num_dims), np.float32)
    directions = [pred[i] for i in range(len(rows))]
    return (directions, probs) if return_probs else directions


# ----------------------------------------------------------------------------- CLI


def _is_predictions(p: str) -> bool:
    """Whether the file `p` is an earlier `alignx predict-preferences --out` (its first row's keys)."""
    row = paths.first_json_line(p)
    return isinstance(row, dict) and {"index", "direction", "profile"} <= row.keys()


def _refuse_foreign_out(args: Any) -> None:
    """--out replaces an earlier predictions file only: never the --data file (named as such), never another
    existing file (a --data folder's files, the --model folder's config.json: the model would no longer
    load, notes), which `_is_predictions` tells from predictions; neither folder is walked for it. Process
    0, which writes it, judges the file on its disk for every process (`distributed.refuse_on_main`)."""
    inputs = [("--data", args.data)] if args.data else []
    distributed.refuse_on_main(
        lambda: paths.refuse_to_replace(
            "--out", args.out, inputs, _is_predictions, "an `alignx predict-preferences` predictions file"
        ),
        "--out",
    )


def _nan_to_none(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics block with each NaN (a class absent from gold and prediction, no non-neutral gold) None."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def _read_inputs(args: Any):
    """predict-preferences' flags, --out and its input checked, before the model resolves and loads: the
    --data rows read (`schema.load`, else None) and the --persona row (else None)."""
    if args.persona is not None and args.out:  # not written, and not a word said: refused
        raise ConfigError("--out applies to --data; with --persona the result is printed (--json for JSON)")
    if args.out:  # before the model loads; process 0's disk judges it for every process
        _refuse_foreign_out(args)
        distributed.check_output(args.out, "--out")
    # --data or --persona read before the model resolves and loads: a missing, empty or malformed one fails first
    if args.data is not None:  # read whole, a split folder's metrics would count its training half
        refuse_split_folder(args.data, "annotate")
    loaded = None if args.data is None else load(args.data)
    persona_row = None if args.persona is None else read_persona_file(args.persona, needs="ica")
    if loaded is not None and not loaded.rows:
        raise DataError("no rows", file=args.data)
    return loaded, persona_row


def _refuse_checkpoint(model_arg: str, model_path: str) -> None:
    """A CheckpointError naming it where --model is this project's orbax checkpoint or training workdir, which
    predict-preferences does not read (its loader's line said only that the folder held no *.safetensors,
    a workdir's that it held no preference head)."""
    from alignx_jax.models.checkpoint import is_checkpoint_layout
    from alignx_jax.models.safetensors_io import holds_safetensors

    if holds_safetensors(model_path) or not is_checkpoint_layout(model_path):
        return
    what = (
        "a training workdir"
        if os.path.isdir(os.path.join(model_path, "checkpoints"))
        else "an alignx model checkpoint (orbax params/, as `alignx import` writes)"
    )
    raise CheckpointError(
        f"--model {model_arg}: {what}, not an HF folder; `alignx export --checkpoint {model_arg} --out HF_DIR` "
        "makes the HF folder predict-preferences reads"
    )


def _load_head_model(model_arg: str):
    """The --model folder's (head, head config, tokenizer, float32 backbone), the backbone checked to fit
    the head."""
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.models.presets import resolve_model_folder
    from alignx_jax.tokenizer import load_tokenizer

    # resolved as eval and generate resolve it (a hub id, `smollm2`, a gs:// folder), in their one line
    model_path = resolve_model_folder(model_arg, "--model")
    _refuse_checkpoint(model_arg, model_path)
    head, hcfg = load_head(model_path)  # first: a folder without a head fails before the model loads
    tokenizer = load_tokenizer(model_path)
    model = load_pretrained(model_path, dtype="float32")
    check_backbone(hcfg, model.cfg.hidden_size, model_path)
    return head, hcfg, tokenizer, model


def _print_persona_prediction(model, head, tokenizer, persona_row, as_json: bool) -> int:
    """--persona: its predicted direction and profile text, printed by process 0."""
    [direction], probs = predict_preferences(
        model, head, tokenizer, [persona_row], batch_size=1, return_probs=True
    )
    text = profile_text(direction)
    if not paths.is_main_process():  # a multi-process job: process 0 prints
        return 0
    if as_json:
        print(json.dumps({"direction": [float(x) for x in direction], "profile": text}))
    else:
        print(f"direction: {[float(x) for x in direction]}")
        print(f"profile: {text}")
    return 0


def _warn_bare_rows(data: str, rows: Sequence[Mapping[str, Any]], variant: str) -> None:
    """One line counting the --data rows whose persona under the head's variant is empty: their P~ comes from
    BOS alone (--persona refuses such a persona; a real file may hold a few, so they are predicted)."""
    bare = sum(not persona_text(dict(r), variant) for r in rows)
    if bare and paths.is_main_process():
        lacks = {"ugc": "comments", "pair": "history pairs", "demo": "demographics"}
        print(
            f"alignx: warning: {data}: {bare} of {len(rows)} rows have no persona the head reads (persona "
            f"variant {variant}: no {lacks.get(variant, 'comments, history pairs or demographics')}); their "
            "P~ is predicted from BOS alone",
            file=sys.stderr,
        )


def _prediction_lines(rows, directions, places) -> list[str]:
    """--data's JSONL records, one a row; `places` (each row's file and row number, else None) adds them."""
    lines = []
    for i, (row, d) in enumerate(zip(rows, directions)):
        rec: dict[str, Any] = {"index": i}
        if places is not None:
            rec["file"], rec["row"] = places[i]
        if row.get("user_id") is not None:
            rec["user_id"] = row["user_id"]
        rec["direction"] = [float(x) for x in d]
        rec["profile"] = profile_text(d)
        lines.append(json.dumps(rec))
    return lines


def _prediction_summary(rows, directions, hcfg, out: str | None) -> dict[str, Any]:
    """The row count and --out, and where rows carry a golden direction the head's metrics on them beside
    the release averaging rule's."""
    summary: dict[str, Any] = {"rows": len(rows), "out": out}
    idx = gold_rows(rows)
    if idx:
        gold = np.stack([np.asarray(rows[i]["Preference Direction"], np.float32) for i in idx])
        summary["head"] = head_metrics(np.stack([directions[i] for i in idx]), gold)
        heuristic = heuristic_metrics(rows, np.stack(directions), variant=hcfg.persona_variant)
        if heuristic["heuristic_n"]:
            summary["heuristic"] = heuristic
    return summary


def _print_summary(summary: Mapping[str, Any], out: str | None, as_json: bool) -> None:
    """`_prediction_summary` printed: one JSON object, or a line and a table of the metrics."""
    # With --out, stdout carries the summary; without, stdout is the JSONL and the summary goes to stderr.
    stream = sys.stdout if out else sys.stderr
    if as_json:
        # NaN (a metric with nothing to count) is no JSON: null, as in eval's results
        strict = {k: _nan_to_none(v) if isinstance(v, dict) else v for k, v in summary.items()}
        print(json.dumps(strict, allow_nan=False), file=stream)
        return
    print(f"predicted P~ for {summary['rows']} rows" + (f" -> {out}" if out else ""), file=stream)
    table = []
    if "head" in summary:
        table.append(("head", summary["head"]))
    if "heuristic" in summary:
        h = summary["heuristic"]
        rule = {k.removeprefix("heuristic_"): v for k, v in h.items() if not k.startswith("heuristic_head_")}
        table.append(("heuristic", rule))
        if rule["n"] != summary["head"]["n"]:  # the rule skips rows without history vectors
            on_rule_rows = {
                k.removeprefix("heuristic_head_"): v for k, v in h.items() if k.startswith("heuristic_head_")
            }
            table.append(("head on the heuristic's rows", {**on_rule_rows, "n": rule["n"]}))
    for name, m in table:
        print(
            f"  {name:9s} accuracy {m['accuracy']:.4f}  non-neutral accuracy "
            f"{m['accuracy_non_neutral']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({m['n']:.0f} rows)",
            file=stream,
        )


def cli_predict_preferences(args: Any) -> int:
    """`alignx predict-preferences --model HF_DIR (--persona FILE.json | --data PATH) [--out F.jsonl] [--json]`.

    --persona: prints the predicted direction and its profile text (or one JSON object).
    --data: predicts every row; writes JSONL `{index, file?, row?, user_id?, direction, profile}` (file
    and row in it when the data is several files) to --out (else
    stdout) and, where rows carry a golden direction, prints the head's metrics beside the release
    averaging rule's on the same rows.
    """
    loaded, persona_row = _read_inputs(args)
    head, hcfg, tokenizer, model = _load_head_model(args.model)
    as_json = bool(getattr(args, "json", False))
    if persona_row is not None:
        return _print_persona_prediction(model, head, tokenizer, persona_row, as_json)
    rows = loaded.rows
    _warn_bare_rows(args.data, rows, hcfg.persona_variant)
    # a folder's rows are numbered through its files: each record also names its own file and row
    places = loaded.places if len(loaded.files) > 1 else None
    directions = predict_preferences(model, head, tokenizer, rows, batch_size=8, progress=True)
    lines = _prediction_lines(rows, directions, places)
    if args.out:  # under a temporary name, renamed into place; every process exits on process 0's write
        distributed.write_on_main(
            lambda: paths.write_all({args.out: "".join(line + "\n" for line in lines).encode("utf-8")}),
            "--out",
        )
    if not paths.is_main_process():
        return 0
    if not args.out:
        print("\n".join(lines))
    _print_summary(_prediction_summary(rows, directions, hcfg, args.out), args.out, as_json)
    return 0
