"""`alignx demo --real`: a real pretrained model (SmolLM2-135M-Instruct) personalized on real P-SOUPS rows.

    alignx demo --real --out runs/demo-real [--p-soups FILE] [--model MODEL] [--quick] [--seed S]

Stages (each skipped when its marker exists; training resumes like `alignx train`):
  1. model   - the shipped SmolLM2 as an HF folder (`real_model.smollm2_dir`, prepared once), or `--model`:
               any HF folder, hub id, .gguf file or URL folder `model.hf_path` takes (`model_folder`).
  2. split   - `alignx data split FILE --by prompt --test-fraction 0.5`; --quick takes seeded samples
               of each half balanced across the file's personas (`benchmarks.balanced_sample`); then
               `alignx data contrast --originals 2` of the training half: its pairs twice, then each pair
               once under the other persona with chosen and rejected swapped, what ICA and PBA train on.
  3. base    - the untouched model scored on the held-out half with no persona, with the ICA prompt
               and with the PBA prompt (`alignx eval --reference none`); each per-example file is
               then the reference of the model trained with that prompt (`--reference-scores`).
  4. train   - configs/demo_real.py, one recipe and budget (the same steps of the same batch), for
               data.method none (on the training half: a contrast row contradicts its pair without the
               persona), ica and pba (the row's `profile` text; on the contrast file); each exported.
  5. eval    - `alignx eval` of each trained model on the held-out half, the base model as reference.
  6. samples - three sampled responses per persona for one held-out prompt from each trained model.
  7. report  - DIR/results.json, DIR/report.md (per persona, beside the paper's P-SOUPS column),
               DIR/accuracy.png, DIR/curves.png, DIR/generations.json and DIR/generations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from alignx_jax import demo, paths
from alignx_jax.data import contrast
from alignx_jax.demo import (
    DEFAULT_PSOUPS,
    ROOT,
    Stages,
    check_out,
    check_psoups,
    open_out,
    run_config,
    split_psoups,
    train_stages,
)
from alignx_jax.demo_report import PAPER, pct, plot_curves, read_json, save_figure, write_json, write_lines
from alignx_jax.errors import ConfigError, DataError

REAL_CONFIG = os.path.join(ROOT, "configs", "demo_real.py")
METHODS = ("none", "ica", "pba")
TRAINED = {"none": "non_personalized", "ica": "ica", "pba": "pba_profile"}
BASE = {"none": "base_none", "ica": "base_ica", "pba": "base_pba"}
ROWS = ("base_none", "base_ica", "base_pba", "non_personalized", "ica", "pba_profile")
# The paper's P-SOUPS column (docs/method.md section 8) beside each row; None = no such row. The
# trained rows' numbers are the synthetic demo's P-SOUPS ones (`demo_report.PAPER`).
PAPER_PSOUPS = {
    "base_none": None,
    "base_ica": ("Llama-3-8B-Instruct", 49.44),
    "base_pba": None,
    **{key: (paper if paper[0] else None) for key, paper in PAPER["p_soups"].items()},
}
TARGETS = (
    "ica >= non_personalized + 0.10",
    "pba_profile >= non_personalized + 0.10",
    "ica >= base_ica + 0.10",
    "pba_profile >= base_pba + 0.10",
    "seconds <= 3600",
)
SAMPLING = {"temperature": 0.9, "top_k": 10, "top_p": 0.95}  # the paper's generation settings
# ICA and PBA train on the training half twice plus its contrast rows (`alignx data contrast --originals`):
# twins alone erased the preference friendly_unfriendly's personas share (docs/recipes.md, section 2)
ORIGINALS = 2
# loss.reference per run where it differs from the config's on_the_fly: the non-personalized run's later
# epochs repeat its batches, which a precomputed pass scores once (32 of 148; BENCHMARKS.md §4, "The
# reference on the frozen blocks"); `--quick` keeps one compiled step for all three runs
REFERENCE = {"none": "precomputed"}
SHIPPED_NAME = "SmolLM2-135M-Instruct"  # the model without --model


def model_folder(model: str | None) -> str:
    """`--model`: None or `smollm2` -> the shipped SmolLM2 folder (prepared once); an HF folder, a hub id,
    a .gguf file or a URL folder -> its local folder (`resolve_model_path`, as `model.hf_path`), which must
    hold a config.json (else a one-line ConfigError naming it)."""
    from alignx_jax.models.presets import SMOLLM2, resolve_model_path

    # model=True: a hub id's snapshot must hold a model's weights, refused here before the out folder is written
    path = resolve_model_path(SMOLLM2 if model is None else model, model=True)
    if not os.path.isfile(os.path.join(path, "config.json")):
        if path.lower().endswith(".gguf"):  # an existing one resolved to its converted folder
            raise ConfigError(f"--model {model}: no such GGUF file")
        raise ConfigError(f"--model {model}: not a Hugging Face model folder (no config.json in {path})")
    from alignx_jax.tokenizer import load_tokenizer

    if not getattr(load_tokenizer(path), "chat_template", None):  # configs/demo_real.py: prompt_format chat
        raise ConfigError(
            f"--model {model}: its tokenizer has no chat template, and the real demo's prompts are chat "
            "prompts (an instruct model's folder has one)"
        )
    return os.path.abspath(path)


def shipped(model: str | None) -> bool:
    """Whether `--model` names the shipped SmolLM2: absent, or `smollm2` as `model.hf_path` reads it."""
    from alignx_jax.models.presets import names_smollm2

    return model is None or names_smollm2(model)


def model_name(model: str | None) -> str:
    """What the report and plot call the model: a local folder or file by its name, else as given."""
    if shipped(model):
        return SHIPPED_NAME
    name = model.rstrip("/")
    return os.path.basename(name) if os.path.exists(name) else name


def frozen_layers(model_dir: str) -> int:
    """The recipe's frozen blocks for any model: its bottom half (SmolLM2: 15 of 30, configs/demo_real.py)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    return int(cfg.get("text_config", cfg)["num_hidden_layers"]) // 2


class RealBudget:
    """Sizes of one run; `quick` is the few-minute smoke run of the same chain."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.config = REAL_CONFIG + (":quick" if quick else "")
        self.train_rows = 8 if quick else None  # a balanced sample of the training half (None = all)
        self.test_rows = 8 if quick else None  # and of the held-out half
        self.eval_batch = 4 if quick else 8
        self.max_length = 512 if quick else 1024  # quick: a smoke run, half the tokens per step
        self.samples = 1 if quick else 3  # generations per persona and model
        self.max_new_tokens = 16 if quick else 96


def balanced_copy(path: str, n: int | None, seed: int, dest: str) -> str:
    """A seeded sample of `n` rows of a JSON-list file balanced across personas (all when n is None)."""
    if n is None:
        return path
    from alignx_jax.data.benchmarks import balanced_sample

    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    write_json(dest, [rows[i] for i in balanced_sample(rows, n, seed)])
    return dest


def run_steps(budget: RealBudget, train: str) -> int:
    """Every run's steps: the recipe's `train.steps`, or `train.epochs` passes of two rows per training
    pair (the recipe's count; the contrast file the runs train on holds three, `ORIGINALS` + 1)."""
    from alignx_jax.config import load_config

    cfg = load_config(budget.config)
    if int(cfg.train.steps) > 0:
        return int(cfg.train.steps)
    with open(train, encoding="utf-8") as f:
        rows = 2 * len(json.load(f))
    return max(1, int(cfg.train.epochs) * (rows // int(cfg.train.global_batch)))


def train_and_export(
    budget: RealBudget,
    *,
    workdir: str,
    model_dir: str,
    data: str,
    method: str,
    seed: int,
    export_dir: str,
    steps: int,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """`alignx train` of this recipe (resumes from W's checkpoints), `overrides` last, then `alignx export`
    of the last step (`demo.train_and_export`: a run stopped by a signal is not a finished stage)."""
    cfg = run_config(
        budget,
        workdir=workdir,
        model_dir=model_dir,
        data=data,
        method=method,
        seed=seed,
        steps=steps,
        config_file=REAL_CONFIG,
        overrides=(
            "--config.train.epochs=0",
            f"--config.model.frozen_layers={frozen_layers(model_dir)}",
            *(
                [f"--config.loss.reference={REFERENCE[method]}"]
                if method in REFERENCE and not budget.quick
                else []
            ),
            *overrides,
        ),
    )
    t0 = time.perf_counter()
    done = demo.train_and_export(cfg, export_dir)
    return {**done, "train_seconds": time.perf_counter() - t0}


def score(
    budget: RealBudget,
    *,
    model_dir: str,
    path: str,
    method: str,
    out_json: str,
    reference_scores: str | None,
    persona: str = "p",
) -> dict[str, Any]:
    """`alignx eval` on the P-SOUPS half (ICA's prompts show persona variant `persona`); returns
    {"accuracy", "n", "ci95", "by_persona"}."""
    from alignx_jax import evaluate as ev

    settings = ev.EvalSettings(
        method=method,
        persona=persona if method == "ica" else None,
        preference="golden",
        batch_size=budget.eval_batch,
        max_length=budget.max_length,
    )
    results = ev.evaluate(
        model_dir,
        [ev.BenchmarkSpec("p-soups", path, "p-soups")],
        settings,
        reference_scores=reference_scores,
        per_example=per_example_path(out_json),
        dtype=compute_dtype(budget),  # the recipe's, for base and trained models alike
    )
    write_json(out_json, results)
    entry = results["benchmarks"]["p-soups"]
    return {k: entry[k] for k in ("accuracy", "n", "ci95", "by_persona") if k in entry}


def compute_dtype(budget: RealBudget) -> str:
    """The recipe's model.dtype as this machine computes it (`auto`: alignx_jax.hardware)."""
    from alignx_jax.config import load_config
    from alignx_jax.hardware import resolve_dtype

    return resolve_dtype(str(load_config(budget.config).model.dtype))


def per_example_path(out_json: str) -> str:
    return out_json.replace(".json", ".per_example.jsonl")


def sample_generations(
    budget: RealBudget, *, models: dict[str, str], test_path: str, seed: int
) -> dict[str, Any]:
    """For one held-out prompt: `budget.samples` sampled responses per persona from each trained model.

    P-SOUPS asks each prompt of one persona only; the other persona's context (its history pairs and
    profile) comes from another held-out row of it, so both personas answer the same prompt."""
    import numpy as np

    from alignx_jax.data import prompts as prompts_lib
    from alignx_jax.data.benchmarks import persona_group
    from alignx_jax.generate import generate, load_model_and_tokenizer

    with open(test_path, encoding="utf-8") as f:
        rows = json.load(f)
    by_group: dict[str, dict] = {}
    for row in rows:
        by_group.setdefault(str(persona_group(row)), row)
    rng = np.random.default_rng(seed)
    prompt = rows[int(rng.integers(len(rows)))]["prompt"]
    out: dict[str, Any] = {
        "prompt": prompt,
        "sampling": {**SAMPLING, "max_new_tokens": budget.max_new_tokens},
        "models": {},
    }
    for name, model_dir in models.items():
        model, tokenizer = load_model_and_tokenizer(model_dir)
        method = {"non_personalized": "none", "ica": "ica", "pba_profile": "pba"}[name]
        ids, who = [], []
        for group, ctx in sorted(by_group.items()):
            row = {**ctx, "prompt": prompt}
            p = prompts_lib.prompt_ids(
                tokenizer, row, method=method, profile=row.get("profile") if method == "pba" else None
            )
            ids += [p] * budget.samples
            who += [group] * budget.samples
        toks = generate(model, tokenizer, ids, max_new_tokens=budget.max_new_tokens, seed=seed, **SAMPLING)
        texts: dict[str, list[str]] = {}
        for group, t in zip(who, toks):
            texts.setdefault(group, []).append(tokenizer.decode(t, skip_special_tokens=True).strip())
        out["models"][name] = texts
    return out


# ----------------------------------------------------------------------------- report


def check_targets(ps: dict[str, Any], seconds: float | None) -> dict[str, bool | None]:
    def acc(key):
        return (ps.get(key) or {}).get("accuracy")

    def at_least(a, b):
        return None if acc(a) is None or acc(b) is None else bool(acc(a) >= acc(b) + 0.10)

    return {
        TARGETS[0]: at_least("ica", "non_personalized"),
        TARGETS[1]: at_least("pba_profile", "non_personalized"),
        TARGETS[2]: at_least("ica", "base_ica"),
        TARGETS[3]: at_least("pba_profile", "base_pba"),
        TARGETS[4]: None if seconds is None else bool(seconds <= 3600),
    }


def _persona_names(ps: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for key in ROWS:
        for g in (ps.get(key) or {}).get("by_persona") or {}:
            if g not in names:
                names.append(g)
    return names


def write_report(
    out: str, results: dict[str, Any], info: dict[str, Any], generations: dict[str, Any] | None
) -> str:
    ps = results["p_soups"]
    personas = _persona_names(ps)
    lines = [
        f"# alignx demo --real: {info.get('model_name', SHIPPED_NAME)} personalized on P-SOUPS",
        "",
        f"File: `{ps.get('file')}`, split by prompt (half held out); {results['seconds']:.0f} s wall.",
        "",
        "Alignment accuracy (%) on the held-out prompts with its 95% Wilson interval, per persona, beside",
        "the paper's P-SOUPS column (docs/method.md section 8; its models are 8B). Base rows: the",
        "untouched model, no reference; trained rows: the base model as reference.",
        "",
        "| row | accuracy | n | 95% CI | " + " | ".join(p[:40] for p in personas) + " | paper row | paper |",
        "|---|---|---|---|" + "---|" * len(personas) + "---|---|",
    ]
    for key in ROWS:
        e = ps.get(key)
        if not e:
            continue
        lo, hi = e["ci95"]
        per = [pct(((e.get("by_persona") or {}).get(p) or {}).get("accuracy")) for p in personas]
        paper = PAPER_PSOUPS[key]
        lines.append(
            f"| {key} | {pct(e['accuracy'])} | {e['n']} | [{pct(lo)}, {pct(hi)}] | "
            + " | ".join(per)
            + f" | {paper[0] if paper else '-'} | {f'{paper[1]:.2f}' if paper else '-'} |"
        )
    lines += ["", "## Targets", ""]
    for name, ok in results["targets"].items():
        lines.append(f"- {'PASS' if ok else ('FAIL' if ok is False else 'n/a')}: {name}")
    if generations:
        lines += [
            "",
            "## Samples",
            "",
            f"Held-out prompt: {generations['prompt']!r}",
            "",
            f"Sampling: {json.dumps(generations['sampling'])}; see generations.md.",
            "",
        ]
    lines += ["", "## Setup", "", "```", json.dumps(info, indent=2), "```", ""]
    return write_lines(os.path.join(out, "report.md"), lines)


def write_generations(out: str, generations: dict[str, Any]) -> str:
    lines = [
        "# Sampled responses per persona",
        "",
        f"Prompt: {generations['prompt']}",
        "",
        f"Sampling: {json.dumps(generations['sampling'])}",
        "",
    ]
    for name, by_persona in generations["models"].items():
        lines += [f"## {name}", ""]
        for persona, texts in by_persona.items():
            lines += [f"### persona: {persona}", ""]
            lines += [f"{i + 1}. {t}" for i, t in enumerate(texts)] + [""]
    return write_lines(os.path.join(out, "generations.md"), lines)


def plot_accuracy(out: str, ps: dict[str, Any], name: str = SHIPPED_NAME) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in ROWS if (ps.get(k) or {}).get("accuracy") is not None]
    personas = _persona_names(ps)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(keys))
    acc = np.array([ps[k]["accuracy"] for k in keys])
    lo = np.array([ps[k]["ci95"][0] for k in keys])
    hi = np.array([ps[k]["ci95"][1] for k in keys])
    ax.bar(
        x,
        100 * acc,
        yerr=100 * np.stack([acc - lo, hi - acc]),
        capsize=4,
        width=0.5,
        color=["#999999" if k.startswith("base") or k == "non_personalized" else "#3b75af" for k in keys],
        label="all held-out rows",
    )
    for j, p in enumerate(personas):
        y = [100 * (((ps[k].get("by_persona") or {}).get(p) or {}).get("accuracy") or np.nan) for k in keys]
        ax.plot(x, y, "o", ms=5, label=p[:50], color=f"C{j + 1}")
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels(keys, rotation=20, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("alignment accuracy (%)")
    ax.set_title(f"{name} on P-SOUPS, held-out prompts")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, os.path.join(out, "accuracy.png"))


def format_table(results: dict[str, Any]) -> list[str]:
    ps = results["p_soups"]
    lines = [f"{'row':<18} {'acc %':>6}  {'n':>5}  95% CI"]
    for key in ROWS:
        e = ps.get(key)
        if e:
            lo, hi = e["ci95"]
            lines.append(f"{key:<18} {pct(e['accuracy']):>6}  {e['n']:>5}  [{pct(lo)}, {pct(hi)}]")
    return lines


# ----------------------------------------------------------------------------- the demo


def run_real_demo(
    out: str,
    *,
    quick: bool = False,
    psoups: str | None = None,
    seed: int = 0,
    progress: bool = True,
    model: str | None = None,
) -> dict[str, Any]:
    """The whole chain; returns the results dict written to OUT/results.json. `model`: `--model` (None:
    the shipped SmolLM2)."""
    t_start = time.perf_counter()
    budget = RealBudget(quick)
    out = os.path.abspath(out)
    psoups = os.path.abspath(psoups or DEFAULT_PSOUPS)
    if not os.path.isfile(psoups):
        raise DataError(
            "--p-soups: no such file (the real demo needs a P-SOUPS file, e.g. student_phd.json of the "
            "AlignX release's benchmark/P-Soups/)",
            file=psoups,
        )
    # before the split: configs/ is in source checkouts only (demo_real.py reads base.py beside it)
    for config in (REAL_CONFIG, os.path.join(os.path.dirname(REAL_CONFIG), "base.py")):
        if not os.path.isfile(config):
            raise ConfigError(f"demo config not found: {config} (run from a source checkout)")
    # the recipe's training file is part of what a rerun must match (a folder from the twins recipe is refused)
    settings = {
        "real": True,
        "quick": quick,
        "seed": seed,
        "psoups": paths.place(psoups),
        "contrast_originals": ORIGINALS,
    }
    given = None  # --model's folder, resolved and checked once, before anything is written
    if not shipped(model):  # a folder of the shipped model's runs keeps its settings
        settings["model"] = paths.place(model) if os.path.exists(model) else model  # as from any folder
        check_out(out, settings)  # a refused --out before a conversion or download
        given = model_folder(model)
    check_psoups(psoups)  # after --model's checks, before anything is written
    inputs = {"--p-soups": psoups, **({"--model": given} if given else {})}
    d = open_out(out, settings, inputs)

    names = [
        "model",
        "split",
        *(f"eval/{BASE[m]}" for m in METHODS),
        *(f"train/{m}" for m in METHODS),
        *(f"eval/{TRAINED[m]}" for m in METHODS),
        "samples",
    ]
    stages = Stages(out, names, progress)
    ps: dict[str, Any] = {"file": psoups}
    try:
        model_dir = stages.run("model", lambda: given or model_folder(None))
        split = stages.run("split", lambda: _split(psoups, d["data"], budget, seed))
        ps.update(_base_evals(stages, budget, d, model_dir, split["test"]))

        steps = run_steps(budget, split["train"])

        def train(m: str, workdir: str, export_dir: str) -> dict[str, Any]:
            # a contrast row contradicts its pair without a persona; a file of other than two personas has none
            personal = m != "none" and split["contrast"] is not None
            return train_and_export(
                budget,
                workdir=workdir,
                model_dir=model_dir,
                data=split["contrast"] if personal else split["train"],
                method=m,
                seed=seed,
                export_dir=export_dir,
                steps=steps,
            )

        by_method, workdirs = train_stages(stages, d, TRAINED, train)
        exports = {TRAINED[m]: path for m, path in by_method.items()}
        ps.update(_trained_evals(stages, budget, d, exports, split["test"]))
        generations = stages.run(
            "samples", lambda: sample_generations(budget, models=exports, test_path=split["test"], seed=seed)
        )
    finally:
        stages.close()

    results: dict[str, Any] = {"p_soups": ps}
    # the wall time of every stage, also those a resumed run found done
    results["seconds"] = sum(read_json(stages.marker(n))["seconds"] for n in names)
    results["targets"] = check_targets(ps, results["seconds"])
    info = {
        "quick": quick,
        "seed": seed,
        "config": budget.config,
        "model": model_dir,
        "model_name": model_name(model),
        "compute_dtype": compute_dtype(budget),
        "split": split,
        "steps_per_run": steps,
        "stage_seconds": {n: read_json(stages.marker(n))["seconds"] for n in names},
        "budget": {k: v for k, v in vars(budget).items() if k != "config"},
        "this_run_seconds": time.perf_counter() - t_start,
    }
    write_json(os.path.join(out, "results.json"), results)
    write_json(os.path.join(out, "generations.json"), generations)
    write_generations(out, generations)
    write_report(out, results, info, generations)
    plot_accuracy(out, ps, model_name(model))
    plot_curves(out, workdirs)
    return results


def _base_evals(
    stages: Stages, budget: RealBudget, d: dict[str, str], model_dir: str, test: str
) -> dict[str, Any]:
    """The untouched model scored with each method's prompt (stages `eval/{BASE[m]}`); its
    per-example files are the trained runs' reference."""
    return {
        BASE[m]: stages.run(
            f"eval/{BASE[m]}",
            lambda m=m: score(
                budget,
                model_dir=model_dir,
                path=test,
                method=m,
                reference_scores=None,
                out_json=os.path.join(d["eval"], f"{BASE[m]}.json"),
            ),
        )
        for m in METHODS
    }


def _trained_evals(
    stages: Stages, budget: RealBudget, d: dict[str, str], exports: dict[str, str], test: str
) -> dict[str, Any]:
    """Each trained model scored with its method's prompt against the base model's scores (stages
    `eval/{TRAINED[m]}`)."""
    return {
        TRAINED[m]: stages.run(
            f"eval/{TRAINED[m]}",
            lambda m=m: score(
                budget,
                model_dir=exports[TRAINED[m]],
                path=test,
                method=m,
                reference_scores=per_example_path(os.path.join(d["eval"], f"{BASE[m]}.json")),
                out_json=os.path.join(d["eval"], f"{TRAINED[m]}.json"),
            ),
        )
        for m in METHODS
    }


def _split(psoups: str, data_dir: str, budget: RealBudget, seed: int) -> dict[str, Any]:
    split = split_psoups(psoups, os.path.join(data_dir, "p-soups"), seed)
    train = balanced_copy(
        split["train"], budget.train_rows, seed, os.path.join(data_dir, "quick", "train.json")
    )
    test = balanced_copy(split["test"], budget.test_rows, seed, os.path.join(data_dir, "quick", "test.json"))
    with open(train, encoding="utf-8") as f:
        personas = contrast.persona_groups(json.load(f))
    if len(personas) != 2 or None in personas:  # what contrast_rows needs
        print(
            f"demo: {len(personas)} personas in the training half, not two: ICA and PBA train on it, "
            "no contrast rows"
        )
        return {"train": train, "test": test, "contrast": None}
    path = os.path.join(data_dir, "contrast", os.path.basename(psoups))
    contrast.cli_contrast(
        argparse.Namespace(path=train, seed=seed, out=path, twins=False, originals=ORIGINALS)
    )
    return {"train": train, "test": test, "contrast": path}


def print_summary(results: dict[str, Any], out: str, lines: Sequence[str]) -> None:
    for line in lines:
        print(line)
    for name, ok in results["targets"].items():
        print(f"{'PASS' if ok else ('FAIL' if ok is False else 'n/a '):<4} {name}")
    print(
        f"{results['seconds']:.0f} s; results: {os.path.join(out, 'results.json')}, "
        f"report: {os.path.join(out, 'report.md')}"
    )
