"""How far knowing the persona takes a P-SOUPS file: per-persona models beside a finished `alignx demo --real`.

    python benchmarks/persona_ceiling.py RUN [--out DIR] [--line] --json OUT.json

RUN is a finished `alignx demo --real` folder (its split, base-model scores and results are reused; nothing
in RUN is written). For each persona of RUN's training half, the demo's non-personalized recipe (the same
`configs/demo_real.py` budget, same passes over the rows: `demo_real.run_steps`) trains on that persona's
training rows alone and is scored on the whole held-out half against the base model's no-persona scores, as
the demo scores its non-personalized model. `routed` asks each persona's model only its own persona's rows:
what a model told the persona exactly, fitted to that persona alone, scores. A personalized model beats it
only by also keeping what the personas share.

`--line` also trains the demo's ICA recipe (on RUN's contrast rows) with each row's persona block replaced
by its one-line `ground_truth_persona` (the line as the demographic text, `data.persona=demo`) and scores
it the same way, with the base model scored on those prompts as reference: ICA given the persona as plainly
as a sentence can say it, instead of reading it from the history pairs.

Models and scores go under DIR (default RUN/../NAME.persona_ceiling), which must be new, empty or this
script's for the same RUN (`demo.claim_out`); each training and scoring is a stage (`demo.Stages`) that a
rerun, after a stop, finds done.
JSON: `file`, `personas` (per persona: `train_rows`, `steps`, `by_persona` accuracies of its model),
`routed` (`accuracy`, `n`), `line` (with --line: `accuracy`, `n`, `ci95`, `by_persona`, `base`), `run`
(RUN's non_personalized, ica and pba_profile accuracies), `seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from alignx_jax import allocator, demo, demo_real, paths  # noqa: E402
from alignx_jax.data import persona as persona_lib  # noqa: E402
from alignx_jax.data.contrast import persona_groups  # noqa: E402
from alignx_jax.demo_report import read_json, write_json  # noqa: E402
from alignx_jax.errors import AlignXError, DataError  # noqa: E402


def read_run(run: str) -> dict[str, Any]:
    """RUN's settings, model folder, split and results, or a one-line error naming what is missing."""
    need = (
        "demo_settings.json",
        "stages/model.json",
        "stages/split.json",
        "results.json",
        "eval/base_none.json",
    )
    for name in need:
        if not os.path.isfile(os.path.join(run, name)):
            raise DataError(f"not a finished `alignx demo --real` folder (no {name})", file=run)
    settings = read_json(os.path.join(run, "demo_settings.json"))
    if not settings.get("real"):
        raise DataError("a synthetic `alignx demo` folder; this needs `alignx demo --real`", file=run)
    return {
        "quick": bool(settings["quick"]),
        "seed": int(settings["seed"]),
        "model": read_json(os.path.join(run, "stages/model.json"))["value"],
        "split": read_json(os.path.join(run, "stages/split.json"))["value"],
        "results": read_json(os.path.join(run, "results.json"))["p_soups"],
    }


def per_persona_models(
    run: str,
    info: dict[str, Any],
    budget: Any,
    out: str,
    stages: demo.Stages,
    rows: list[dict],
    order: list[tuple[str, list[int]]],
) -> dict[str, Any]:
    """Each persona's non-personalized model (`order`: `persona_order` of the training half's `rows`),
    scored on the whole held-out half."""
    reference = demo_real.per_example_path(os.path.join(run, "eval", "base_none.json"))
    found = {}
    for i, (name, idx) in enumerate(order):
        data = os.path.join(out, f"persona{i}", "train.json")
        write_json(data, [rows[j] for j in idx])
        steps = demo_real.run_steps(budget, data)
        model = os.path.join(out, f"persona{i}", "model")
        stages.run(
            f"train/persona{i}",
            lambda data=data, model=model, steps=steps, i=i: demo_real.train_and_export(
                budget,
                workdir=os.path.join(out, f"persona{i}", "run"),
                model_dir=info["model"],
                data=data,
                method="none",
                seed=info["seed"],
                export_dir=model,
                steps=steps,
            ),
        )
        scored = stages.run(
            f"eval/persona{i}",
            lambda model=model, i=i: demo_real.score(
                budget,
                model_dir=model,
                path=info["split"]["test"],
                method="none",
                out_json=os.path.join(out, f"persona{i}", "eval.json"),
                reference_scores=reference,
            ),
        )
        found[name] = {
            "train_rows": len(idx),
            "steps": steps,
            "by_persona": {g: e["accuracy"] for g, e in scored["by_persona"].items()},
            "n_by_persona": {g: e["n"] for g, e in scored["by_persona"].items()},
        }
    return found


def persona_order(rows: list[dict]) -> list[tuple[str, list[int]]]:
    """The training half's personas, sorted, with their row indices: persona0, persona1, ..."""
    groups = persona_groups(rows)
    if None in groups or len(groups) < 2:
        raise DataError("the training half needs two or more named personas (ground_truth_persona)")
    return sorted((str(k), v) for k, v in groups.items())


def routed(personas: dict[str, Any]) -> dict[str, Any]:
    """Each persona's model asked only its own persona's held-out rows."""
    right = sum(
        p["by_persona"].get(name, 0.0) * p["n_by_persona"].get(name, 0) for name, p in personas.items()
    )
    n = sum(p["n_by_persona"].get(name, 0) for name, p in personas.items())
    return {"accuracy": right / n if n else None, "n": n}


def with_line(path: str, dest: str) -> str:
    """`path`'s rows with the one-line ground-truth persona as the demographic text."""
    rows = read_json(path)
    for i, row in enumerate(rows):
        if not isinstance(row.get("ground_truth_persona"), str):
            raise DataError("--line needs a string ground_truth_persona", file=path, row=i)
        row[persona_lib.DEMO_FIELD] = row["ground_truth_persona"]
    write_json(dest, rows)
    return dest


def line_model(run: str, info: dict[str, Any], budget: Any, out: str, stages: demo.Stages) -> dict[str, Any]:
    """The demo's ICA recipe with the persona given as its one line (module docstring)."""
    if info["split"].get("contrast") is None:
        raise DataError("--line needs the run's contrast rows (a file of two personas)", file=run)
    d = os.path.join(out, "line")
    train = with_line(info["split"]["contrast"], os.path.join(d, "train.json"))
    test = with_line(info["split"]["test"], os.path.join(d, "test.json"))
    model, base_json = os.path.join(d, "model"), os.path.join(d, "base.json")

    def score(model_dir: str, out_json: str, reference: str | None) -> dict[str, Any]:
        return demo_real.score(
            budget,
            model_dir=model_dir,
            path=test,
            method="ica",
            out_json=out_json,
            reference_scores=reference,
            persona="demo",
        )

    base = stages.run("eval/line_base", lambda: score(info["model"], base_json, None))
    stages.run(
        "train/line",
        lambda: demo_real.train_and_export(
            budget,
            workdir=os.path.join(d, "run"),
            model_dir=info["model"],
            data=train,
            method="ica",
            seed=info["seed"],
            export_dir=model,
            steps=demo_real.run_steps(budget, info["split"]["train"]),  # the demo's ICA budget
            overrides=("--config.data.persona=demo",),
        ),
    )
    scored = stages.run(
        "eval/line",
        lambda: score(model, os.path.join(d, "eval.json"), demo_real.per_example_path(base_json)),
    )
    return {**scored, "base": base["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished `alignx demo --real` folder")
    ap.add_argument("--out", default=None, help="models and scores (default RUN/../NAME.persona_ceiling)")
    ap.add_argument("--line", action="store_true", help="also ICA with the persona as its one-line text")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    allocator.reexec(allocator.configured(), cpu_job=True)  # the host allocator `alignx train` runs with
    try:
        run = os.path.abspath(args.run)
        info = read_run(run)
        out = os.path.abspath(args.out or run.rstrip(os.sep) + ".persona_ceiling")
        if out == run or out.startswith(run + os.sep):
            raise DataError("--out must be outside the run it reads", file=out)
        # before the hours of training: the write at the end would fail there (a folder, no permission)
        # or overwrite the run's own results
        problem = paths.refuse_unwritable("--json", args.json, folder=False) or paths.refuse_to_replace(
            "--json",
            args.json,
            (("run", run),),
            lambda p: isinstance(paths.read_json(p), dict),
            "a JSON output",
        )
        if problem:
            raise AlignXError(problem)
        demo.claim_out(out, {"persona_ceiling": run})
        budget = demo_real.RealBudget(info["quick"])
        rows = read_json(info["split"]["train"])
        order = persona_order(rows)
        names = [f"{kind}/persona{i}" for i in range(len(order)) for kind in ("train", "eval")]
        names += ["eval/line_base", "train/line", "eval/line"] if args.line else []
        stages = demo.Stages(out, names)
        try:
            personas = per_persona_models(run, info, budget, out, stages, rows, order)
            result: dict[str, Any] = {
                "file": info["results"]["file"],
                "personas": personas,
                "routed": routed(personas),
                "run": {
                    k: info["results"][k]["accuracy"] for k in ("non_personalized", "ica", "pba_profile")
                },
            }
            if args.line:
                result["line"] = line_model(run, info, budget, out, stages)
        finally:
            stages.close()
        # every stage's time, also those a rerun found done
        result["seconds"] = sum(read_json(stages.marker(n))["seconds"] for n in names)
    except AlignXError as e:
        print(f"persona_ceiling: error: {e}", file=sys.stderr)
        return 1
    write_json(args.json, result)
    print(json.dumps({k: result[k] for k in ("routed", "run")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
