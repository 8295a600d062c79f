"""`alignx eval`: the command over `evaluate`, writing RESULTS.json and a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from contextlib import closing
from typing import Any

from alignx_jax import distributed, paths
from alignx_jax.errors import AlignXError, ConfigError
from alignx_jax.evaluate.options import (
    EvalSettings,
    check_cpu_matmul,
    check_reference_flags,
    default_prompt_format,
    parse_benchmark_specs,
    parse_flip,
)
from alignx_jax.evaluate.results import PerExampleLog
from alignx_jax.evaluate.run import evaluate


def _format_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for key, entry in results["benchmarks"].items():
        items = [(None, entry)] if "accuracy" in entry else list(entry.items())
        for persona, stats in items:
            name = key if persona is None else f"{key}/{persona}"
            acc = "n/a" if stats["accuracy"] is None else f"{100 * stats['accuracy']:.2f}%"
            lo, hi = stats["ci95"]
            cut = f"  ({stats['truncated']} cut to --max-length)" if stats.get("truncated") else ""
            lines.append(
                f"{name:<28} {acc:>8}  n={stats['n']:<6} 95% CI [{100 * lo:.1f}, {100 * hi:.1f}]{cut}"
            )
            for group, g in (stats.get("by_persona") or {}).items():
                a = "n/a" if g["accuracy"] is None else f"{100 * g['accuracy']:.2f}%"
                lines.append(f"  persona {group[:60]!r}: {a} n={g['n']}")
            if "flip" in stats:
                for part in ("involved", "rest"):
                    s = stats["flip"][part]
                    a = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
                    lines.append(f"  flip {part:<21} {a:>8}  n={s['n']}")
    return lines


def _refuse_foreign_out(args: argparse.Namespace, specs: list) -> None:
    """--out replaces an earlier results file only: never a file the command line names (a --benchmark file,
    the --per-example or --reference-scores file), named as such, and never another existing file (a
    --benchmark folder's files, notes, the model's config.json), which it would overwrite with no way back.
    Process 0, which writes it, judges the file on its disk for every process (`distributed.refuse_on_main`)."""
    inputs = [("--per-example", args.per_example), ("--reference-scores", args.reference_scores)]
    # a --benchmark folder is not listed (a bucket's listing is remote): its files are refused as not results
    inputs += [(f"--benchmark {spec.name}", spec.path) for spec in specs]

    def is_results(p: str) -> bool:
        earlier = paths.read_json(p)
        return isinstance(earlier, dict) and isinstance(earlier.get("benchmarks"), dict)

    distributed.refuse_on_main(
        lambda: paths.refuse_to_replace(
            "--out", args.out, inputs, is_results, "an `alignx eval` results file"
        ),
        "--out",
    )


def cli_eval(args: argparse.Namespace) -> int:
    """`alignx eval`: write RESULTS.json and print one line per benchmark (and persona)."""
    # the flags alone first: a bad one is named before anything reads a disk or resolves a hub id
    if args.preference is not None and args.method != "pba":  # given, not the default: refused as --flip is
        raise ConfigError("--preference chooses PBA's P~ and needs --method pba")
    settings = EvalSettings(
        method=args.method,
        persona=args.persona,
        preference=args.preference or "golden",
        flip=parse_flip(args.flip),
        # the flag's, else chat until the model resolves and its trained format replaces it (below)
        prompt_format=args.prompt_format or "chat",
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        beta=args.beta,
        share_prompt=not args.no_share_prompt,
        reference_prompt=getattr(args, "reference_prompt", "same"),
    )
    settings.check()
    reference = None if args.reference in (None, "", "none") else args.reference
    check_reference_flags(reference, args.reference_scores, settings.reference_prompt)
    check_cpu_matmul(args.cpu_matmul)
    if args.out:  # process 0's disk judges it (a folder there too) for every process
        distributed.check_output(args.out, "--out")
    specs = parse_benchmark_specs(args.benchmark)
    if args.out:
        _refuse_foreign_out(args, specs)
    # appended to: never an input, nor a file inside a --benchmark folder (the next read takes it for data)
    if args.per_example:
        inputs = [("--reference-scores", args.reference_scores)]
        inputs += [(f"--benchmark {spec.name}", spec.path) for spec in specs]
        problem = paths.refuse_inside_inputs("--per-example", args.per_example, inputs)
        if problem:
            raise ConfigError(problem)
    # opened before the model path resolves (a hub id downloads there, for the trained prompt format): the
    # file's own check refuses another command's rows (eval's --per-example appends to eval's own) up front
    with closing(PerExampleLog.for_job(args.per_example)) as log:
        # resolved once (a hub id's snapshot, a gs:// folder's copy): the trained format and evaluate read it
        from alignx_jax.models.presets import resolve_model_path

        model_path = resolve_model_path(args.model, model=True)
        settings = dataclasses.replace(
            settings, prompt_format=default_prompt_format(args.model, args.prompt_format, resolved=model_path)
        )
        try:
            # `--dtype` None: load_pretrained's default (float32)
            results = evaluate(
                model_path,
                specs,
                settings,
                reference_dir=reference,
                per_example=args.per_example,
                per_example_log=log,
                dtype=args.dtype,
                cpu_matmul=args.cpu_matmul,
                matmul_precision=args.matmul_precision,
                reference_scores=args.reference_scores,
                model_given=args.model,
            )
        except OSError as e:  # unreadable or unwritable files are the user's to fix
            raise AlignXError(f"eval: {e}") from e
    # never a half-written results file: a local one through a temporary name and a rename, a URL in place
    # (one object write is atomic; a rename there is a copy that leaves a temporary object behind on failure);
    # process 0 writes the one results file of a multi-process run, and every process exits on its outcome
    distributed.write_on_main(
        lambda: paths.write_all({args.out: (json.dumps(results, indent=2) + "\n").encode("utf-8")}), "--out"
    )
    if not paths.is_main_process():
        return 0
    for line in _format_table(results):
        print(line)
    print(f"results: {args.out}")
    return 0
