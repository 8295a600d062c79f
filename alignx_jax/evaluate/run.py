"""`evaluate`: alignment accuracy of a model folder on benchmark files (see the package docstring)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignx_jax import hardware, paths
from alignx_jax.data.benchmarks import BenchmarkSample, benchmark_sample, warn_empty_files
from alignx_jax.errors import CheckpointError, ConfigError, DataError
from alignx_jax.evaluate import scoring
from alignx_jax.evaluate.options import (
    BenchmarkSpec,
    EvalSettings,
    check_reference_flags,
    flip_direction,
    involves,
    resolve_personas,
)
from alignx_jax.evaluate.profiles import PredictedPreferences, file_profile, golden_profile
from alignx_jax.evaluate.results import (
    LOGP_KEYS,
    PerExampleLog,
    is_correct,
    key_of,
    missing_logps,
    moved_row,
    summarize,
)
from alignx_jax.hardware import resolve_dtype
from alignx_jax.models.safetensors_io import holds_safetensors


def _prepare(
    sample: BenchmarkSample,
    spec: BenchmarkSpec,
    persona: str | None,
    settings: EvalSettings,
    tokenizer: Any,
    predicted: PredictedPreferences | None,
) -> tuple[list[Any], list[bool | None]]:
    """DPOExamples for the rows `sample.picks` of one benchmark under one persona, each indexed by its
    row number in `sample.rows`, and per example whether P~ involves --flip dims."""
    from alignx_jax.data.batching import make_example

    rows, picks, places = sample.rows, sample.picks, sample.places
    directions = None
    if settings.method == "pba" and settings.preference == "predicted":
        assert predicted is not None
        directions = predicted.directions(
            [rows[i] for i in picks], persona or "p", spec.key if persona is None else f"{spec.key}/{persona}"
        )
    examples, involved = [], []
    for k, i in enumerate(picks):
        row = rows[i]
        profile, direction = None, None
        if settings.method == "pba":
            if directions is not None:
                direction = directions[k]
                from alignx_jax.data.persona import profile_text

                profile = profile_text(
                    flip_direction(direction, settings.flip) if settings.flip else direction
                )
            elif settings.preference == "profile":
                profile, direction = file_profile(row, settings.flip, file=places[i][0], index=places[i][1])
            else:
                profile, direction = golden_profile(row, settings.flip, file=places[i][0], index=places[i][1])
        ex = make_example(
            tokenizer,
            row,
            method=settings.method,
            persona=persona or "p",
            max_length=settings.max_length,
            prompt_format=settings.prompt_format,
            profile=profile,
            index=i,
            eval_mode=True,
        )
        examples.append(ex)
        # "involves" is judged on the unflipped P~ (flipping keeps neutral dims neutral anyway)
        involved.append(
            None if not settings.flip or direction is None else involves(direction, settings.flip)
        )
    return examples, involved


def _example_row(
    spec: BenchmarkSpec,
    persona: str | None,
    ex: Any,
    lp: np.ndarray,
    ref: np.ndarray | None,
    beta: float,
    involved: bool | None,
    ica_reference: bool = False,
    model: str | None = None,
    scored_with: dict[str, Any] | None = None,
    place: tuple[str, int] | None = None,
) -> dict[str, Any]:
    row = {
        "benchmark": spec.key,
        "persona": persona,
        "index": int(ex.index),
        "prompt_ids": list(ex.prompt_ids),
        "chosen_ids": list(ex.chosen_ids),
        "rejected_ids": list(ex.rejected_ids),
        "logp_chosen": float(lp[0]),
        "logp_rejected": float(lp[1]),
        "ref_logp_chosen": None if ref is None else float(ref[0]),
        "ref_logp_rejected": None if ref is None else float(ref[1]),
    }
    row["correct"] = is_correct(
        row["logp_chosen"], row["logp_rejected"], row["ref_logp_chosen"], row["ref_logp_rejected"], beta
    )
    if involved is not None:
        row["flip_involved"] = involved
    if ica_reference and ref is not None:
        row["reference_prompt"] = "ica"
    if model is not None:  # a resumed file must be this model's (the token ids alone do not say so)
        row["model"] = model
    if place is not None:  # a resume refused for other ids can say the index now names another file's row
        row["file"], row["row"] = paths.absolute(place[0]), int(place[1])
    row.update(scored_with or {})
    return row


def _check_resumed(
    stored: dict,
    ex: Any,
    has_ref: bool,
    path: str,
    ica_reference: bool = False,
    model: str | None = None,
    scored_with: dict[str, Any] | None = None,
    place: tuple[str, int] | None = None,
) -> None:
    """A resumed row must describe the same model, reference, dtype and matmul precision (rows of older files
    name none), token ids and reference setting as this run. `place`: the example's file and row there now,
    named beside the row's own where other ids come from another file's row."""
    # the folder through a link or another spelling is the same model (`paths.same_place`)
    if model is not None and stored.get("model") is not None and not paths.same_place(stored["model"], model):
        raise DataError(
            f"row {key_of(stored)} was scored with another model ({stored['model']}); use a new --per-example file",
            file=path,
        )
    for key, value in (scored_with or {}).items():  # the ids alone name no reference, dtype or precision
        if key not in stored:
            continue
        # the reference folder (or scores file) through a link or another spelling is the same reference
        if not (paths.same_place(stored[key], value) if key == "reference" else stored[key] == value):
            raise DataError(
                f"row {key_of(stored)} was scored with another {key} ({stored[key]}, now {value}); use a new "
                "--per-example file",
                file=path,
            )
    same = (
        stored.get("prompt_ids") == list(ex.prompt_ids)
        and stored.get("chosen_ids") == list(ex.chosen_ids)
        and stored.get("rejected_ids") == list(ex.rejected_ids)
        and (stored.get("ref_logp_chosen") is not None) == has_ref
        and (stored.get("reference_prompt") == "ica") == (has_ref and ica_reference)
    )
    if not same:
        moved = moved_row(stored, place)
        if moved:
            raise DataError(f"row {key_of(stored)} {moved}; use a new --per-example file", file=path)
        raise DataError(
            f"row {key_of(stored)} was written by a run with other settings (prompt, tokenizer, "
            "max length or reference); use a new --per-example file",
            file=path,
        )
    missing = missing_logps(stored, has_ref)
    if missing:
        raise DataError(f"row {key_of(stored)} has no {missing[0]}; use a new --per-example file", file=path)


def parameter_count(folder: str | None) -> int:
    """The parameters of a model folder's safetensors (headers only; the index's files; no preference head)."""
    from alignx_jax.models.preference_head import TENSOR_PREFIX
    from alignx_jax.models.safetensors_io import SafetensorsReader

    if not folder:
        return 0
    entries = SafetensorsReader(folder).entries
    return sum(
        int(np.prod(e[3], dtype=np.int64)) for k, e in entries.items() if not k.startswith(TENSOR_PREFIX)
    )


def default_mesh(folders: Sequence[str | None], itemsize: int = 4, per_device: int | None = None) -> Any:
    """Every device scores its slice of each batch; the weights are replicated on each (no gathers) while
    they take at most a quarter of a device's memory (`per_device` bytes, default: the device's, or its
    share of the host's on CPU) at `itemsize` bytes a parameter (the dtype they load in), else sharded FSDP
    over all the devices, as `alignx generate` loads them (a 70B model on 8 GPUs). Process 0 decides."""
    import jax

    from alignx_jax.hardware import local_device_bytes
    from alignx_jax.sharding import make_mesh

    if jax.device_count() == 1:
        return make_mesh(data=-1)
    per_device = local_device_bytes(jax.local_devices()) if per_device is None else per_device
    shard = bool(per_device) and itemsize * sum(parameter_count(f) for f in folders) > per_device // 4
    if jax.process_count() > 1:  # one mesh for all: hosts may see different free memory
        from jax.experimental import multihost_utils

        shard = bool(multihost_utils.broadcast_one_to_all(np.int32(shard)))
    return make_mesh(fsdp=-1) if shard else make_mesh(data=-1)


@dataclasses.dataclass
class _Scoring:
    """What every benchmark and persona is scored with: the models, the tokenizer, the reference setting."""

    settings: EvalSettings
    tokenizer: Any
    mesh: Any
    scorers: list[Any]  # the policy's, then the reference model's when there is one
    ref_scores: scoring.StoredScores | None
    predicted: PredictedPreferences | None
    pad_id: int
    has_ref: bool
    ica_reference: bool  # --reference-prompt ica: the reference reads the row's ICA prompt
    progress: bool
    model: str  # the policy folder, absolute: every per-example row records it
    dtypes: dict[str, str]  # the models' resolved compute and parameter dtypes, recorded in results
    # the reference, compute dtype and matmul precision: every per-example row records them
    scored_with: dict[str, Any]


def _check_inputs(
    model_dir: str, reference_dir: str | None, settings: EvalSettings, reference_scores: str | None
) -> tuple[str, str | None]:
    """The model folders resolved and checked before anything is loaded."""
    from alignx_jax.models.presets import resolve_model_folder

    settings.check()
    check_reference_flags(reference_dir, reference_scores, settings.reference_prompt)
    model_dir, reference_dir = (
        resolve_model_folder(model_dir, "--model"),
        reference_dir and resolve_model_folder(reference_dir, "--reference"),
    )
    for d, what in ((model_dir, "--model"), (reference_dir, "--reference")):
        if d is not None and os.path.isdir(d) and not holds_safetensors(d):
            raise CheckpointError(
                f"{what}: {d} holds no HF weights (*.safetensors); a training workdir or orbax checkpoint is "
                f"scored after `alignx export --checkpoint {d} --out HF_DIR`"
            )
    if (
        settings.method == "pba"
        and settings.preference == "predicted"
        and not os.path.isfile(os.path.join(model_dir, "preference_head.safetensors"))
    ):  # fail before loading anything
        raise CheckpointError(
            f"{model_dir}: --preference predicted needs preference_head.safetensors "
            "(export a PBA run with its head, or use --preference golden)"
        )
    return model_dir, reference_dir


def _load_scoring(
    model_dir: str,
    reference_dir: str | None,
    settings: EvalSettings,
    ref_scores: scoring.StoredScores | None,
    *,
    mesh: Any,
    rules: Any,
    dtype: str | None,
    progress: bool,
    cpu_matmul: str = "auto",
) -> _Scoring:
    """The tokenizer, the policy (and reference) scorers and the preference head a run scores with."""
    from alignx_jax.models.hf import load_pretrained
    from alignx_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if settings.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{model_dir}: the tokenizer has no chat template; use --prompt-format paper")
    kwargs: dict[str, Any] = {"cpu_matmul": cpu_matmul}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if mesh is None:  # HF folders load in float32 unless --dtype says otherwise
        import jax.numpy as jnp

        mesh = default_mesh([model_dir, reference_dir], jnp.dtype(kwargs.get("dtype", "float32")).itemsize)
    policy = load_pretrained(model_dir, mesh=mesh, rules=rules, **kwargs)
    scorers = [scoring.SequenceScorer(policy, mesh, rules, share_prompt=settings.share_prompt)]
    if reference_dir is not None:
        reference = load_pretrained(reference_dir, mesh=mesh, rules=rules, **kwargs)
        if int(reference.cfg.vocab_size) != int(policy.cfg.vocab_size):
            raise CheckpointError(
                f"--reference {reference_dir}: vocabulary size {reference.cfg.vocab_size} "
                f"differs from the policy's {policy.cfg.vocab_size}"
            )
        scorers.append(scoring.SequenceScorer(reference, mesh, rules, share_prompt=settings.share_prompt))
    predicted = None
    if settings.method == "pba" and settings.preference == "predicted":
        predicted = PredictedPreferences(model_dir, policy, tokenizer, batch_size=settings.batch_size)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    has_ref = reference_dir is not None or ref_scores is not None
    # --reference-prompt ica: the reference reads the row's ICA prompt (for ICA that is the same prompt)
    ica_reference = has_ref and settings.reference_prompt == "ica" and settings.method != "ica"
    dtypes = {"dtype": str(policy.cfg.dtype), "param_dtype": str(policy.cfg.param_dtype)}
    return _Scoring(
        settings,
        tokenizer,
        mesh,
        scorers,
        ref_scores,
        predicted,
        pad_id,
        has_ref,
        ica_reference,
        progress,
        paths.absolute(model_dir),
        dtypes,
        {"reference": _reference_name(reference_dir, ref_scores), "dtype": dtypes["dtype"]},
    )


def _reference_name(reference_dir: str | None, ref_scores: scoring.StoredScores | None) -> Any:
    """The reference as the results file names it: its folder, `{"scores": FILE}` or None."""
    if ref_scores is not None:
        return {"scores": paths.absolute(ref_scores.path)}
    return None if reference_dir is None else paths.absolute(reference_dir)


def _resumed(
    sc: _Scoring,
    log: PerExampleLog,
    per_example: str | None,
    spec: BenchmarkSpec,
    persona: str | None,
    sample: BenchmarkSample,
    examples,
    involved,
) -> tuple[list[dict], list[tuple[Any, bool | None]]]:
    """The outcomes of the examples the per-example file already holds, and the (example, involved) to score."""
    from alignx_jax.data.benchmarks import persona_group

    outcomes: list[dict] = []
    todo = []
    for ex, inv in zip(examples, involved):
        stored = log.get((spec.key, persona, ex.index))
        if stored is None:
            todo.append((ex, inv))
            continue
        _check_resumed(
            stored,
            ex,
            sc.has_ref,
            per_example,
            sc.ica_reference,
            sc.model,
            sc.scored_with,
            sample.places[ex.index],
        )
        # recompute `correct` with this run's beta; flip membership from this run
        outcomes.append(
            {
                "correct": is_correct(
                    stored["logp_chosen"],
                    stored["logp_rejected"],
                    stored["ref_logp_chosen"],
                    stored["ref_logp_rejected"],
                    sc.settings.beta,
                ),
                "index": ex.index,
                "flip_involved": inv,
                "group": persona_group(sample.rows[ex.index]),
                "truncated": ex.truncated,
                **{k: stored.get(k) for k in LOGP_KEYS},
            }
        )
    return outcomes, todo


def _scorers_for(
    sc: _Scoring,
    spec: BenchmarkSpec,
    persona: str | None,
    sample: BenchmarkSample,
    todo_ex: list,
    ica_by_index: dict,
):
    """The policy's scorer, then the reference's: a model, stored scores, or either on the ICA prompt."""
    if not sc.ica_reference:
        if sc.ref_scores is None:
            return sc.scorers
        return [*sc.scorers, sc.ref_scores.scorer(spec.key, persona, todo_ex, sc.scored_with, sample.places)]
    ref_scorer = (
        sc.scorers[1]
        if sc.ref_scores is None
        else sc.ref_scores.scorer(
            spec.key,
            persona or "p",
            [ica_by_index[ex.index] for ex in todo_ex],
            sc.scored_with,
            sample.places,
        )
    )
    return [sc.scorers[0], scoring.scorer_on(ref_scorer, ica_by_index, pad_id=sc.pad_id)]


def _score_todo(
    sc: _Scoring,
    log: PerExampleLog,
    spec: BenchmarkSpec,
    persona: str | None,
    sample: BenchmarkSample,
    todo,
    ica_by_index: dict,
) -> list[dict]:
    """Score the examples not yet in the per-example file, append them to it, return their outcomes."""
    from alignx_jax.data.benchmarks import persona_group
    from alignx_jax.metrics import progress_bar

    inv_by_index = {ex.index: inv for ex, inv in todo}
    todo_ex = [ex for ex, _ in todo]
    buckets = scoring.length_buckets(
        max(len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)) for ex in todo_ex)
    )
    desc = spec.key if persona is None else f"{spec.key}/{persona}"
    outcomes: list[dict] = []
    # process 0's bar only, as train's and generate's: every process scores every batch
    show = sc.progress and paths.is_main_process()
    with progress_bar(total=len(todo_ex), desc=desc, unit="pair", disable=not show) as bar:
        for chunk, outs in scoring.score_batches(
            todo_ex,
            _scorers_for(sc, spec, persona, sample, todo_ex, ica_by_index),
            batch_size=sc.settings.batch_size,
            pad_id=sc.pad_id,
            buckets=buckets,
            multiple=scoring.data_parallel_size(sc.mesh),
        ):
            new_rows = [
                _example_row(
                    spec,
                    persona,
                    ex,
                    outs[0][j],
                    outs[1][j] if sc.has_ref else None,
                    sc.settings.beta,
                    inv_by_index[ex.index],
                    sc.ica_reference,
                    sc.model,
                    sc.scored_with,
                    sample.places[ex.index],
                )
                for j, ex in enumerate(chunk)
            ]
            log.append_agreed(new_rows, "--per-example")
            outcomes.extend(
                {**r, "group": persona_group(sample.rows[r["index"]]), "truncated": ex.truncated}
                for ex, r in zip(chunk, new_rows)
            )
            bar.update(len(chunk))
    return outcomes


def fitting_max_length(positions: int, prompt_format: str) -> int:
    """The largest `--max-length` whose scored rows fit `positions`: the prompt and each response are cut
    to `max_length - reserve(max_length)` ids each (`data.batching._fit`), then EOS (and `paper`'s BOS)."""
    from alignx_jax.data.batching import RELEASE_RESERVE

    # the most ids the prompt and a response may keep
    budget = (positions - 1 - (prompt_format == "paper")) // 2
    # max_length - min(513, max_length // 2) <= budget: L - 513 past 1026, else ceil(L / 2)
    return budget + RELEASE_RESERVE if budget >= RELEASE_RESERVE else 2 * budget


def _warn_past_positions(spec: BenchmarkSpec, examples: list, limit: int, prompt_format: str) -> None:
    """One line when rows reach past the model's trained positions: RoPE computes any position, so they
    are scored (as transformers would score them), but their scores are extrapolated."""
    longest = [len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids)) for ex in examples]
    over = sum(n > limit for n in longest) if limit else 0
    if over:
        print(
            f"alignx: warning: {spec.path}: {over} of {len(examples)} rows to score are longer ({max(longest)} tokens) "
            f"than the model's max_position_embeddings ({limit}); --max-length "
            f"{fitting_max_length(limit, prompt_format)} cuts them to fit",
            file=sys.stderr,
        )


def _score_persona(
    sc: _Scoring,
    log: PerExampleLog,
    per_example: str | None,
    spec: BenchmarkSpec,
    sample: BenchmarkSample,
    persona: str | None,
) -> list[dict]:
    """The outcomes of the rows `picks` of one benchmark file under one persona variant: resumed
    rows, then the rest scored."""
    from alignx_jax.data.persona import persona_text

    rows, picks = sample.rows, sample.picks
    bare = 0 if persona is None else sum(not persona_text(rows[i], persona) for i in picks)
    if bare and bare == len(picks):
        print(
            f"alignx: warning: {spec.path}: no row has a persona under --persona {persona}; its prompts "
            "are scored with an empty one",
            file=sys.stderr,
        )
    elif bare:  # a few rows without that variant's fields would otherwise pass unnoticed in the accuracy
        print(
            f"alignx: warning: {spec.path}: {bare} of {len(picks)} rows to score have no persona under "
            f"--persona {persona}; their prompts are scored with an empty one",
            file=sys.stderr,
        )
    examples, involved = _prepare(sample, spec, persona, sc.settings, sc.tokenizer, sc.predicted)
    ica_by_index = {}
    if sc.ica_reference:
        ica_settings = dataclasses.replace(sc.settings, method="ica", flip=())
        ica_examples, _ = _prepare(sample, spec, persona or "p", ica_settings, sc.tokenizer, None)
        ica_by_index = {ex.index: ex for ex in ica_examples}
    outcomes, todo = _resumed(sc, log, per_example, spec, persona, sample, examples, involved)
    # the rows scored now
    _warn_past_positions(spec, [ex for ex, _ in todo], sc.scorers[0].max_positions, sc.settings.prompt_format)
    if todo:
        outcomes.extend(_score_todo(sc, log, spec, persona, sample, todo, ica_by_index))
    return outcomes


def _warn_empty_files(data: Sequence[tuple[BenchmarkSpec, BenchmarkSample]]) -> None:
    """One line per file of a benchmark folder that holds no rows (`warn_empty_files`): it scores nothing."""
    for spec, sample in data:
        warn_empty_files(
            spec.name,
            spec.path,
            sample,
            "scores the folder's other files (this one gets no entry of its own)",
        )


def _folder_files(
    benchmarks: Sequence[BenchmarkSpec], data: Sequence[tuple[BenchmarkSpec, BenchmarkSample]]
) -> dict[str, dict[str, str]]:
    """Per benchmark key scored from a folder of several files (a UF-P-4 folder): `KEY:FILE` (the file's name
    less its extension; `.2`, ... where two share one) -> the file, for the files some scored row is in, in the
    folder's order. A key never repeats a benchmark key or a pooled NAME."""
    used = {spec.key for spec in benchmarks} | {spec.name for spec in benchmarks}
    out: dict[str, dict[str, str]] = {}
    for spec, sample in data:
        if len({f for f, _ in sample.places}) < 2:
            continue
        # picks are in file order, so the files come in the folder's order
        files = list(dict.fromkeys(sample.places[i][0] for i in sample.picks))
        keys: dict[str, str] = {}
        for f in files:
            stem = os.path.splitext(os.path.basename(f))[0]
            key, k = f"{spec.key}:{stem}", 2
            while key in used:
                key, k = f"{spec.key}:{stem}.{k}", k + 1
            used.add(key)
            keys[key] = f
        out[spec.key] = keys
    return out


def _per_file(
    per_key: dict[str, dict[str | None, list[dict]]],
    data: Sequence[tuple[BenchmarkSpec, BenchmarkSample]],
    files: dict[str, dict[str, str]],
) -> dict[str, dict[str | None, list[dict]]]:
    """The outcomes of each `_folder_files` key: its folder's outcomes of the rows in its file."""
    out: dict[str, dict[str | None, list[dict]]] = {}
    for spec, sample in data:
        for key, f in files.get(spec.key, {}).items():
            out[key] = {
                persona: [o for o in outs if sample.places[o["index"]][0] == f]
                for persona, outs in per_key[spec.key].items()
            }
    return out


def _summaries(
    benchmarks: Sequence[BenchmarkSpec],
    per_key: dict[str, dict[str | None, list[dict]]],
    settings: EvalSettings,
    files: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Accuracy per benchmark key (per persona where there are several); a NAME given twice also pooled;
    a folder's files (`files`, from `_folder_files`; their outcomes in `per_key`) each after its folder's."""
    summaries: dict[str, Any] = {}
    by_name: dict[str, list[BenchmarkSpec]] = {}
    for spec in benchmarks:
        by_name.setdefault(spec.name, []).append(spec)
    for name, specs in by_name.items():
        entries = [(spec.key, per_key[spec.key]) for spec in specs]
        if len(specs) > 1:  # pooled over the files, then each file
            pooled: dict[str | None, list[dict]] = {}
            for _, by_persona in entries:
                for persona, outs in by_persona.items():
                    pooled.setdefault(persona, []).extend(outs)
            entries = [(name, pooled)] + entries
        with_files = []
        for key, by_persona in entries:  # a folder's own files after it: the folder's entry stays their pool
            with_files.append((key, by_persona))
            with_files += [(f, per_key[f]) for f in (files or {}).get(key, {})]
        for key, by_persona in with_files:
            nested = name == "alignx" and list(by_persona) != [None] or len(by_persona) > 1
            if nested:
                summaries[key] = {
                    p: summarize(o, settings.flip, settings.beta) for p, o in by_persona.items()
                }
            else:
                summaries[key] = summarize(next(iter(by_persona.values())), settings.flip, settings.beta)
    return summaries


def _results_header(
    model_dir: str,
    benchmarks: Sequence[BenchmarkSpec],
    sc: _Scoring,
    data: Sequence[tuple[BenchmarkSpec, BenchmarkSample]],
    files: dict[str, dict[str, str]] | None = None,
    given: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """The settings a results file records beside its accuracies; a folder's file keys (`_folder_files`)
    are named with their file and their folder's personas, and the rows each key scored (`data`'s picks).
    `given`: `--model` / `--reference` as the user gave them, recorded as `model_id` / `reference_id` where
    they name another place than the folder scored (a hub id, a gs:// folder, a .gguf file)."""
    settings = sc.settings
    files = files or {}
    scored = {
        key: sum(f is None or sample.places[i][0] == f for i in sample.picks)
        for spec, sample in data
        for key, f in [(spec.key, None), *files.get(spec.key, {}).items()]
    }
    names: dict[str, Any] = {}
    for key, value in (("model", paths.absolute(model_dir)), ("reference", sc.scored_with["reference"])):
        names[key] = value
        as_given = (given or {}).get(key)
        # readers compare the resolved `model` (the place scored); the id says what the user asked for
        if isinstance(as_given, str) and isinstance(value, str) and not paths.same_place(as_given, value):
            names[f"{key}_id"] = as_given
    return {
        **names,
        # the file or folder each benchmark key scored (a key alone does not say which P-SOUPS file)
        "benchmark_paths": {
            key: paths.absolute(path)
            for spec in benchmarks
            for key, path in [(spec.key, spec.path), *files.get(spec.key, {}).items()]
        },
        "method": settings.method,
        # resolved per benchmark key; null where the prompt does not depend on the persona
        "persona": {
            key: _none_if_independent(
                resolve_personas(
                    settings.persona, spec.name, method=settings.method, preference=settings.preference
                )
            )
            for spec in benchmarks
            for key in [spec.key, *files.get(spec.key, {})]
        },
        "preference": settings.preference if settings.method == "pba" else None,
        "reference_prompt": ("ica" if sc.ica_reference else "same") if sc.has_ref else None,
        "prompt_format": settings.prompt_format,
        "max_length": settings.max_length,
        "beta": settings.beta,
        "limit": settings.limit,
        # the rows each key scored (per persona): --limit's count, or all the rows of a benchmark holding fewer
        "rows_scored": scored,
        "flip": list(settings.flip) or None,
        **sc.dtypes,
        "batch_size": settings.batch_size,
        "share_prompt": settings.share_prompt,
        "benchmarks": {},
    }


def evaluate(
    model_dir: str,
    benchmarks: Sequence[BenchmarkSpec],
    settings: EvalSettings,
    *,
    reference_dir: str | None = None,
    per_example: str | None = None,
    per_example_log: PerExampleLog | None = None,
    mesh: Any = None,
    rules: Any = None,
    progress: bool = True,
    dtype: str | None = None,
    reference_scores: str | None = None,
    cpu_matmul: str = "auto",
    matmul_precision: str = "auto",
    model_given: str | None = None,
) -> dict[str, Any]:
    """Score every benchmark (and persona variant) and return the results dict of `alignx eval`.
    reference_scores: a per-example file of the reference model (`StoredScores`), instead of
    `reference_dir`. cpu_matmul: the models' `DecoderConfig.cpu_matmul` (`alignx eval --cpu-matmul`).
    matmul_precision: `hardware.matmul_precision`'s level for the scoring programs (`--matmul-precision`).
    per_example_log: `per_example` already opened by the caller (`PerExampleLog.for_job`), which closes it;
    None: opened here, first. model_given: `--model` as the user gave it where `model_dir` is what the caller
    resolved it to (a hub id's snapshot folder); recorded beside it."""

    # first, before anything is resolved or loaded: the file's own check refuses another command's rows (or
    # a folder, or lines that are not rows) up front; every process opens it, process 0 alone writes it,
    # and all must resume from the same rows or their batches differ
    log = PerExampleLog.for_job(per_example) if per_example_log is None else per_example_log
    try:
        _check_same_rows_everywhere(log)
        given = {"model": model_dir if model_given is None else model_given, "reference": reference_dir}
        model_dir, reference_dir = _check_inputs(model_dir, reference_dir, settings, reference_scores)
        ref_scores = scoring.StoredScores(reference_scores) if reference_scores is not None else None
        # Read every benchmark first: a bad file fails before minutes of model loading.
        data = [(spec, benchmark_sample(spec.name, spec.path, limit=settings.limit)) for spec in benchmarks]
        _warn_empty_files(data)
        sc = _load_scoring(
            model_dir,
            reference_dir,
            settings,
            ref_scores,
            mesh=mesh,
            rules=rules,
            dtype=dtype,
            progress=progress,
            cpu_matmul=cpu_matmul,
        )
        # every process scores every batch (its devices compute their slice of the global mesh)
        per_key: dict[str, dict[str | None, list[dict]]] = {}
        # the programs are traced inside: JAX reads the level then
        with hardware.matmul_precision(matmul_precision, sc.dtypes["dtype"]) as level:
            # decided only now (auto reads the dtype): rows of another level would mix silently on a resume
            sc.scored_with["matmul_precision"] = level
            for spec, sample in data:
                for persona in resolve_personas(
                    settings.persona, spec.name, method=settings.method, preference=settings.preference
                ):
                    per_key.setdefault(spec.key, {})[persona] = _score_persona(
                        sc, log, per_example, spec, sample, persona
                    )
    finally:
        if per_example_log is None:
            log.close()

    files = _folder_files(benchmarks, data)
    results = _results_header(model_dir, benchmarks, sc, data, files, given)
    results["matmul_precision"] = level
    results["benchmarks"] = _summaries(
        benchmarks, {**per_key, **_per_file(per_key, data, files)}, settings, files
    )
    if sc.predicted is not None:
        results["preference_head"] = sc.predicted.describe()
    return results


def _check_same_rows_everywhere(log: PerExampleLog) -> None:
    """A multi-process evaluation resumes only if every process read the same per-example rows (a
    shared file system or URL); otherwise their batches would differ and the collectives hang."""
    if paths.process_count() <= 1:
        return
    from jax.experimental import multihost_utils

    try:
        multihost_utils.assert_equal(np.int64(len(log.rows)), "per-example rows")
    except AssertionError:
        raise ConfigError(
            f"--per-example {log.path}: the processes read different rows; put it on a file system "
            "every host sees (or a gs:// URL)"
        ) from None


def _none_if_independent(personas: list[str | None]) -> list[str] | None:
    return None if personas == [None] else personas
