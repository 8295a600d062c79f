"""`alignx demo`: the paper's result at small scale on one CPU, through the real pipeline.

    alignx demo --out runs/demo [--quick] [--p-soups FILE] [--seed S]

Stages (each skipped when its outputs are complete; training resumes like `alignx train`):
  1. synth   - `alignx synth` users; split by user AND by prompt (`data.split.split_indices`) so the
               held-out users' rows and task prompts never appear in training (DIR/data/synth/).
  2. init    - one random-init tiny decoder saved as an HF folder (DIR/models/init): every run
               starts from it and uses it as the frozen reference, and it is the `base` row.
  3. train   - the same config and budget (configs/demo_cpu.py) for `data.method` none, ica, pba;
               export each (`alignx export`); PBA gets its preference head: joint if training
               wrote one, else the two-stage head trainer on the PBA policy's backbone.
  4. eval    - `alignx eval` on the held-out users: non_personalized, ica (persona P),
               pba_predicted, pba_golden, and base (the initial model, ICA prompt, no reference).
  5. p-soups - `alignx data split --by prompt --test-fraction 0.5` of a P-SOUPS file; the same
               three runs trained on its train half, evaluated on the other prompts (PBA with the
               row's `profile`).
  6. report  - DIR/results.json, DIR/report.md, DIR/accuracy.png, DIR/curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignx_jax import paths
from alignx_jax.demo_report import (  # noqa: F401  (re-exported: the demo's report and writers)
    PAPER,
    TARGETS,
    check_targets,
    format_table,
    pct,
    plot_accuracy,
    plot_curves,
    read_json,
    read_metrics,
    save_figure,
    write_json,
    write_lines,
    write_report,
)
from alignx_jax.errors import AlignXError, ConfigError, DataError
from alignx_jax.hardware import AUTO, matmul_precision, use_fast_cpu_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.py")
DEFAULT_PSOUPS = os.path.join(os.path.dirname(ROOT), "shared", "benchmarks", "p-soups", "student_phd.json")
METHODS = ("none", "ica", "pba")
RUN_NAMES = {"none": "non_personalized", "ica": "ica", "pba": "pba"}
SYNTH_ROWS = ("non_personalized", "ica", "pba_predicted", "pba_golden", "base")
PSOUPS_ROWS = ("non_personalized", "ica", "pba_profile")


class Budget:
    """Sizes of one demo; `quick` is a minute-long smoke run of the same chain."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.config = DEMO_CONFIG + (":quick" if quick else "")
        self.users = 32 if quick else 320  # synthetic users (train + held out)
        self.pairs_per_user = 8 if quick else 16
        self.test_user_fraction = 0.25
        self.test_prompt_fraction = 0.25  # task prompts only the held-out users are asked
        self.eval_limit = 16 if quick else 400  # held-out pairs scored per method
        self.psoups_train_limit = 16 if quick else None
        self.psoups_eval_limit = 16 if quick else 300
        # P-SOUPS rows are ~3x longer (long, long-tailed responses): fewer steps, so the whole demo stays
        # within 15 minutes on 2 cores (None = the config's)
        self.psoups_steps = None if quick else 80
        # an 80-step run is compile-bound: buckets twice as wide as the config's halve its compiled step
        # shapes for a few % more padding (BENCHMARKS.md §6; None = the config's)
        # (up to 1536: a shared row takes up to 2 x max_length - 1 tokens)
        self.psoups_buckets = None if quick else tuple(range(128, 1537, 128))
        self.head_steps = 30 if quick else 1500
        self.eval_batch = 8 if quick else 16
        self.max_length = 384 if quick else 768


# ----------------------------------------------------------------------------- small helpers


def check_out(out: str, settings: dict[str, Any]) -> None:
    """ConfigError unless OUT is absent, empty or an earlier demo's folder with these settings (read
    only: a demo checks it before its slow first steps, such as converting a model)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: a file, not a folder; use a new or empty folder")
    if not os.path.isdir(out):
        return
    path = os.path.join(out, "demo_settings.json")
    before = read_json(path) if os.path.isfile(path) else settings
    # a local path (`psoups`, a `model` folder) by the place it names: one file reached through a link or
    # another checkout's `../shared` link is the same input, and one recorded before settings held real paths
    if not paths.same_place(before, settings):
        what = repr(before)  # not a settings object at all (null, a list)
        if isinstance(before, dict):  # what changed, as `alignx generate` words it (a key it had not: None)
            keys = (*before, *(k for k in settings if k not in before))
            changed = [k for k in keys if before.get(k) != settings.get(k)]
            what = ", ".join(f"{k} {before.get(k)!r}, now {settings.get(k)!r}" for k in changed)
        raise ConfigError(f"{out} holds a demo run with other settings ({what}); use a new --out")
    # the demo writes, and replaces, data/ models/ runs/ eval/ and its reports in OUT: never in a folder
    # of the user's (a demo stopped before its first claim leaves at most its compilation cache)
    foreign = sorted(set(os.listdir(out)) - {".jax_cache"}) if not os.path.isfile(path) else []
    if foreign:
        raise ConfigError(
            f"--out {out}: not empty and not a demo folder (holds {paths.listing(foreign)}); use a new or "
            "empty folder"
        )


def claim_out(out: str, settings: dict[str, Any]) -> None:
    """OUT made, with OUT/demo_settings.json: a rerun with other settings (budget, seed, data) must not
    reuse this one's stages, so it is refused (`check_out`)."""
    check_out(out, settings)
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "demo_settings.json"), settings)


STAGES_DIR = "stages"  # OUT/stages/NAME.json: a finished stage's marker


class Stages:
    """Runs named stages once: a stage whose marker file exists is skipped on a rerun. `seconds`: each
    stage's own wall time, also a reused one's (its marker's, from the run that did it); `reused`: those
    found done."""

    def __init__(self, out: str, names: Sequence[str], progress: bool = True):
        from alignx_jax.metrics import progress_bar

        self.dir = os.path.join(out, STAGES_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self.bar = progress_bar(total=len(names), desc="demo", unit="stage", disable=not progress)
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    @property
    def reused_seconds(self) -> float:
        """What the stages found done took when they ran."""
        return sum(self.seconds[name] for name in self.reused)

    def marker(self, name: str) -> str:
        return os.path.join(self.dir, name.replace("/", "_") + ".json")

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        path = self.marker(name)
        self.bar.set_description(f"demo: {name}")
        if os.path.isfile(path):
            info = read_json(path)
            self.seconds[name] = info["seconds"]
            self.reused.append(name)
        else:
            t0 = time.perf_counter()
            value = fn()
            self.seconds[name] = time.perf_counter() - t0
            info = {"value": value, "seconds": self.seconds[name]}
            write_json(path, info)
        self.bar.update(1)
        return info["value"]

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- data


def _take_parquet(src: str, picks: Sequence[int], dest: str) -> None:
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    table = pq.read_table(src)
    pq.write_table(table.take(np.asarray(picks, dtype=np.int64)), dest)


def make_synthetic(out: str, budget: Budget, seed: int) -> dict[str, Any]:
    """`alignx synth` into DIR/world, then train/test parquet files split by user and by prompt."""
    from alignx_jax.data import schema, split, synth, synth_measure

    world_dir = os.path.join(out, "world")
    synth.cli_synth(
        argparse.Namespace(out=world_dir, users=budget.users, pairs_per_user=budget.pairs_per_user, seed=seed)
    )
    src = os.path.join(world_dir, "data.parquet")
    rows, _ = schema.load_rows(src)
    train_u, test_u = split.split_indices(rows, by="user", test_fraction=budget.test_user_fraction, seed=seed)
    train_p, test_p = split.split_indices(
        rows, by="prompt", test_fraction=budget.test_prompt_fraction, seed=seed
    )
    train_p, test_p = set(train_p), set(test_p)
    # held-out users are asked only held-out prompts; training users only the others
    train = [i for i in train_u if i in train_p]
    test = [i for i in test_u if i in test_p]
    test_users = {rows[i]["user_id"] for i in test_u}
    if not train or not test:
        raise DataError("demo: the synthetic split left no train or no test rows (more --users?)", file=src)
    paths = {
        "train": os.path.join(out, "train", "data.parquet"),
        "test": os.path.join(out, "test", "data.parquet"),
    }
    _take_parquet(src, train, paths["train"])
    _take_parquet(src, test, paths["test"])
    stats = {
        "users": budget.users,
        "test_users": len(test_users),
        "train_rows": len(train),
        "test_rows": len(test),
        "test_prompts": len({rows[i]["prompt"] for i in test}),
        "measured": synth_measure.measure_world(
            synth.generate_world(budget.users, budget.pairs_per_user, seed)
        ),
    }
    return {**paths, "stats": stats}


def split_psoups(path: str, out: str, seed: int) -> dict[str, str]:
    """`alignx data split PATH --by prompt --test-fraction 0.5 --out DIR`."""
    from alignx_jax.data import split

    split.cli_split(argparse.Namespace(path=path, by="prompt", test_fraction=0.5, seed=seed, out=out))
    name = os.path.basename(path)
    return {"train": os.path.join(out, "train", name), "test": os.path.join(out, "test", name)}


def check_psoups(path: str) -> None:
    """`--p-soups` read as P-SOUPS rows before any stage runs: a row missing a field the P-SOUPS stages read
    (`profile`, `ground_truth_persona`) failed only at its stage, after the stages before it had trained."""
    from alignx_jax.data import schema

    if not schema.load(path, kind="p-soups").rows:
        raise DataError("--p-soups: the file holds no rows", file=path)


def _limited_copy(path: str, limit: int | None, dest: str) -> str:
    """The first `limit` rows of a JSON-list file (the quick run's tiny training set)."""
    if limit is None:
        return path
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    write_json(dest, rows[:limit])
    return dest


# ----------------------------------------------------------------------------- models


# the synthetic demo trains PBA's policy without the joint head (`attach_head` says why)
PBA_HEAD_OFF = ("--config.pba.enabled=false",)


def run_config(
    budget: Any,
    *,
    workdir: str,
    model_dir: str,
    data: str,
    method: str,
    seed: int,
    steps: int | None = None,
    buckets: Sequence[int] | None = None,
    config_file: str = DEMO_CONFIG,
    overrides: Sequence[str] = PBA_HEAD_OFF,
):
    """A demo's training config for one run: `budget.config` (a variant of `config_file`) with the
    run's workdir, starting model, rows, method, seed and the budget's max_length, `steps` and
    `buckets` (None: the config's), then `overrides`."""
    from alignx_jax.config import load_config

    if not os.path.isfile(config_file):
        raise ConfigError(f"demo config not found: {config_file} (run from a source checkout)")
    return load_config(
        budget.config,
        [
            f"--config.workdir={workdir}",
            f"--config.model.hf_path={model_dir}",
            f"--config.data.train={data}",
            f"--config.data.method={method}",
            f"--config.train.seed={seed + 42}",
            f"--config.data.max_length={budget.max_length}",
            *([f"--config.train.steps={steps}"] if steps else []),
            *([f"--config.data.buckets={tuple(buckets)}"] if buckets else []),
            *overrides,
        ],
    )


def make_init(budget: Budget, init_dir: str, seed: int) -> dict[str, Any]:
    """The one initial model every run starts from (random init as the tiny config describes)."""
    import shutil

    import jax
    from flax import nnx

    from alignx_jax import sharding as shd
    from alignx_jax.config import load_config
    from alignx_jax.models import hf
    from alignx_jax.train.state import build_policy, load_tokenizer_for, rules_from_config

    cfg = load_config(budget.config, [f"--config.workdir={init_dir}", f"--config.model.init.seed={seed}"])
    mesh = shd.mesh_from_config(cfg.mesh)
    tokenizer, tokenizer_dir = load_tokenizer_for(cfg)
    model = build_policy(cfg, tokenizer, mesh, rules_from_config(cfg))
    tmp = paths.tmp_path(init_dir)
    hf.save_hf(model, tmp, tokenizer_dir=tokenizer_dir)
    # a run killed after its rename, before the stage's marker, left one: a folder cannot replace it
    shutil.rmtree(init_dir, ignore_errors=True)
    os.replace(tmp, init_dir)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "dir": init_dir,
        "params": n,
        **{
            k: int(getattr(model.cfg, k))
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
            )
        },
    }


def train_and_export(cfg: Any, export_dir: str) -> dict[str, Any]:
    """`alignx train` of a `run_config` (resumes from its workdir's checkpoints) then `alignx export`
    of the last step."""
    import shutil

    from alignx_jax import export
    from alignx_jax.train.loop import run_training
    from alignx_jax.train.signals import StopFlag

    workdir, steps = cfg.workdir, int(cfg.train.steps)
    ckpts = os.path.join(workdir, "checkpoints")
    stop = StopFlag()
    code = run_training(cfg, stop)
    # a signal stops training with exit 0, at a saved step short of the budget or before the first
    # save: not a finished stage
    if code != 0 or not os.path.isdir(os.path.join(ckpts, str(steps))):
        saved = [int(p) for p in (os.listdir(ckpts) if os.path.isdir(ckpts) else ()) if p.isdigit()]
        raise AlignXError(
            f"demo: training {workdir} stopped at step {max(saved, default=0)} of {steps}; rerun to resume"
        )
    if stop.signum is not None:  # in the last step the run finishes and saves; the demo stops all the same
        raise AlignXError(
            f"demo: {signal.Signals(stop.signum).name} in the last step of training {workdir}, which was "
            "saved; rerun to go on"
        )
    shutil.rmtree(export_dir, ignore_errors=True)
    export.cli_export(
        argparse.Namespace(checkpoint=workdir, step=None, out=export_dir, dtype=None, shard_size="5GB")
    )
    return {"workdir": workdir, "export": export_dir, "steps": steps}


def train_stages(
    stages: Stages,
    d: dict[str, str],
    run_names: dict[str, str],
    train: Callable[[str, str, str], Any],
    prefix: str = "",
) -> tuple[dict[str, str], dict[str, str]]:
    """Each method of `run_names` trained and exported as stage `{prefix}train/{m}`: `train(m,
    workdir, export_dir)` into DIR/runs/NAME and DIR/models/NAME, NAME = `run_names[m]`; returns
    (export folders by method, workdirs by run name)."""
    exports, workdirs = {}, {}
    for m, name in run_names.items():
        workdirs[name] = os.path.join(d["runs"], name)
        exports[m] = os.path.join(d["models"], name)
        stages.run(f"{prefix}train/{m}", lambda m=m, name=name: train(m, workdirs[name], exports[m]))
    return exports, workdirs


def attach_head(budget: Budget, *, export_dir: str, data: str, seed: int) -> dict[str, Any]:
    """PBA's preference head: kept when the export's head was fit jointly with the policy (its config
    records it), else trained two-stage on the PBA policy's frozen backbone over the training rows'
    persona P, then saved beside the policy (recorded as two-stage) and listed in the export's manifest.

    The demo trains PBA's policy with `pba.enabled=false` (plain DPO on the golden profile): a
    joint head would push a ~250-token persona through the model beside every ~60-token PBA pair,
    several times the step's cost on a CPU, and the two-stage head needs one forward per row."""
    from alignx_jax.data import schema
    from alignx_jax.models import hf
    from alignx_jax.models import preference_head as ph
    from alignx_jax.pba import head_training
    from alignx_jax.tokenizer import load_tokenizer

    if ph.has_head(export_dir) and ph.head_training(export_dir) == "joint":
        return {"mode": "joint"}
    # any other head is an earlier two-stage fit whose stage was cut short (or one that recorded nothing):
    # fit again, so the stage records its steps and loss
    cfg = run_config(
        budget, workdir=os.path.dirname(export_dir), model_dir=export_dir, data=data, method="pba", seed=seed
    )
    rows, _ = schema.load_rows(data)
    model = hf.load_pretrained(export_dir)
    tokenizer = load_tokenizer(export_dir)
    with matmul_precision(AUTO, str(model.cfg.dtype)):  # as `alignx train`'s two-stage head
        res = head_training.train_head_two_stage(
            model,
            tokenizer,
            rows,
            cfg,
            steps=budget.head_steps,
            seed=seed,
            feature_batch_size=budget.eval_batch,
        )
    # listed first: a re-export over the folder then replaces the head (its own file), whenever this stops
    hf.list_in_export_manifest(export_dir, [ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE])
    ph.save_head(res.head, res.cfg, export_dir, training="two_stage")
    return {
        "mode": "two_stage",
        "steps": budget.head_steps,
        "final_loss": res.losses[-1],
        "train_metrics": {k: float(v) for k, v in res.train_metrics.items()},
    }


def run_eval(
    budget: Budget,
    *,
    model_dir: str,
    reference_dir: str | None,
    name: str,
    path: str,
    method: str,
    preference: str,
    out_json: str,
    limit: int | None,
) -> dict[str, Any]:
    """`alignx eval` on one benchmark file; returns {"accuracy", "n", "ci95"} (+ head agreement)."""
    from alignx_jax import evaluate as ev

    settings = ev.EvalSettings(
        method=method,
        persona="p" if method == "ica" or preference == "predicted" else None,
        preference=preference,
        limit=limit,
        batch_size=budget.eval_batch,
        max_length=budget.max_length,
    )
    spec = ev.BenchmarkSpec(name, path, name)
    results = ev.evaluate(
        model_dir,
        [spec],
        settings,
        reference_dir=reference_dir,
        per_example=out_json.replace(".json", ".per_example.jsonl"),
    )
    write_json(out_json, results)
    entry = results["benchmarks"][name]
    if "accuracy" not in entry:  # alignx with a persona level: the one variant asked for
        entry = entry["p"]
    stats = {k: entry[k] for k in ("accuracy", "n", "ci95")}
    if "preference_head" in results:
        agree = results["preference_head"].get("agreement_with_golden") or {}
        if agree:
            stats["head_agreement"] = next(iter(agree.values()))
    return stats


# ----------------------------------------------------------------------------- the demo


def check_inputs(out: str, inputs: dict[str, str]) -> None:
    """OUT/demo_inputs.json records each input (a flag's file or folder: its files' sizes and modification
    times) at the first run; a rerun whose inputs changed since is refused, since the stages it would reuse
    were computed from the old ones (the settings hold only their paths)."""
    from alignx_jax.workdir import path_signature

    path = os.path.join(out, "demo_inputs.json")
    before = read_json(path) if os.path.isfile(path) else {}
    now = {flag: path_signature(where) for flag, where in inputs.items()}
    stages = os.path.join(out, STAGES_DIR)
    finished = os.path.isdir(stages) and any(n.endswith(".json") for n in os.listdir(stages))
    for flag, signature in now.items():
        if finished and flag in before and before[flag] != signature:  # no stage yet: nothing stale
            raise ConfigError(
                f"{out}: {flag} {inputs[flag]} changed since this folder's first run (its files' sizes or "
                "times), and its finished stages used the old one; use a new --out"
            )
    write_json(path, {**before, **now})


def open_out(out: str, settings: dict[str, Any], inputs: dict[str, str] | None = None) -> dict[str, str]:
    """OUT made and claimed for these settings (`claim_out`: a rerun must match them) and `inputs`
    (`check_inputs`), its compilation cache on (`compile_cache`: OUT/.jax_cache, unless the user chose one
    or turned it off) -> its data/models/runs/eval subfolders by name."""
    from alignx_jax.compile_cache import use_compile_cache

    claim_out(out, settings)
    check_inputs(out, inputs or {})
    use_compile_cache(out)
    return {k: os.path.join(out, k) for k in ("data", "models", "runs", "eval")}


def run_demo(
    out: str, *, quick: bool = False, psoups: str | None = None, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """The whole chain; returns the results dict written to OUT/results.json."""
    t_start = time.perf_counter()
    budget = Budget(quick)
    out = os.path.abspath(out)
    psoups = os.path.abspath(psoups or DEFAULT_PSOUPS)
    # the default reached through a link (another checkout's ../shared) is still the default: skipped if absent
    if paths.place(psoups) != paths.place(DEFAULT_PSOUPS) and not os.path.isfile(psoups):
        raise DataError("--p-soups: no such file", file=psoups)
    have_psoups = os.path.isfile(psoups)
    if have_psoups:
        check_psoups(psoups)
    settings = {"quick": quick, "seed": seed, "psoups": paths.place(psoups) if have_psoups else None}
    d = open_out(out, settings, {"--p-soups": psoups} if have_psoups else None)
    stages = Stages(out, _stage_names(have_psoups), progress)
    init_dir = os.path.join(d["models"], "init")
    results: dict[str, Any] = {"synthetic": {}, "p_soups": {}}
    try:
        data = stages.run("synth", lambda: make_synthetic(os.path.join(d["data"], "synth"), budget, seed))
        init = stages.run("init", lambda: make_init(budget, init_dir, seed))
        exports, workdirs = _train_methods(stages, budget, d, init_dir, seed, "", data["train"])
        head = stages.run(
            "head/pba", lambda: attach_head(budget, export_dir=exports["pba"], data=data["train"], seed=seed)
        )
        results["synthetic"] = _synthetic_evals(stages, budget, d, init_dir, exports, data["test"])
        ps: dict[str, Any] = {"file": psoups}
        if have_psoups:
            ps.update(_psoups_part(stages, budget, d, init_dir, seed, psoups))
        else:
            ps["skipped"] = f"P-SOUPS file not found: {psoups}"
            print(f"alignx demo: {ps['skipped']}; skipping the P-SOUPS part", file=sys.stderr)
        results["p_soups"] = ps
    finally:
        stages.close()

    # the stages a rerun found done count with the time they took: a rerun's own seconds were its total
    results["seconds"] = time.perf_counter() - t_start + stages.reused_seconds
    results["targets"] = check_targets(results)
    info = {
        "quick": quick,
        "seed": seed,
        "config": budget.config,
        "init_model": init,
        "synthetic_data": data["stats"],
        "pba_head": head,
        "stage_seconds": stages.seconds,
        # their seconds are the earlier run's, as the total counts them
        "reused_stages": stages.reused,
        "budget": {k: v for k, v in vars(budget).items() if k != "config"},
    }
    write_json(os.path.join(out, "results.json"), results)
    write_report(out, results, info)
    plot_accuracy(out, results)
    plot_curves(out, workdirs)
    return results


def _stage_names(have_psoups: bool) -> list[str]:
    """Every stage of the demo, in order (the progress bar's total)."""
    names = ["synth", "init", *(f"train/{m}" for m in METHODS), "head/pba", "eval/base"]
    names += [f"eval/{k}" for k in SYNTH_ROWS if k != "base"]
    if have_psoups:
        names += (
            ["psoups/split"]
            + [f"psoups/train/{m}" for m in METHODS]
            + ["psoups/head"]
            + [f"psoups/eval/{k}" for k in PSOUPS_ROWS]
        )
    return names


def _train_methods(
    stages: Stages,
    budget: Budget,
    d: dict[str, str],
    init_dir: str,
    seed: int,
    prefix: str,
    data: str,
    steps: int | None = None,
    buckets: Sequence[int] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Each of METHODS trained from init on `data` and exported (`train_stages`), as run
    `{prefix}{RUN_NAMES[m]}` ("/" -> "_"), `steps` steps each with `buckets` (None: the config's)."""
    run_names = {m: prefix.replace("/", "_") + RUN_NAMES[m] for m in METHODS}

    def train(m: str, workdir: str, export_dir: str) -> dict[str, Any]:
        cfg = run_config(
            budget,
            workdir=workdir,
            model_dir=init_dir,
            data=data,
            method=m,
            seed=seed,
            steps=steps,
            buckets=buckets,
        )
        return train_and_export(cfg, export_dir)

    return train_stages(stages, d, run_names, train, prefix)


def _synthetic_evals(
    stages: Stages, budget: Budget, d: dict[str, str], init_dir: str, exports: dict[str, str], test: str
) -> dict[str, Any]:
    """The held-out users' rows scored per SYNTH_ROWS (stages `eval/{row}`); the base model with no
    reference, the trained ones with init as reference."""
    # row: (model, reference, method, preference)
    runs = {
        "base": (init_dir, None, "ica", "golden"),
        "non_personalized": (exports["none"], init_dir, "none", "golden"),
        "ica": (exports["ica"], init_dir, "ica", "golden"),
        "pba_predicted": (exports["pba"], init_dir, "pba", "predicted"),
        "pba_golden": (exports["pba"], init_dir, "pba", "golden"),
    }
    syn: dict[str, Any] = {}
    for key, (model, ref, method, pref) in runs.items():
        syn[key] = stages.run(
            f"eval/{key}",
            lambda key=key, model=model, ref=ref, method=method, pref=pref: run_eval(
                budget,
                model_dir=model,
                reference_dir=ref,
                name="alignx",
                path=test,
                method=method,
                preference=pref,
                out_json=os.path.join(d["eval"], "synthetic", f"{key}.json"),
                limit=budget.eval_limit,
            ),
        )
    return syn


def _psoups_part(
    stages: Stages, budget: Budget, d: dict[str, str], init_dir: str, seed: int, psoups: str
) -> dict[str, Any]:
    """Split the P-SOUPS file by prompt, train METHODS on its train half and score them on the
    other half's prompts (PBA with the row's `profile`): accuracy per PSOUPS_ROWS."""
    split = stages.run("psoups/split", lambda: split_psoups(psoups, os.path.join(d["data"], "p-soups"), seed))
    train_file = _limited_copy(
        split["train"],
        budget.psoups_train_limit,
        os.path.join(d["data"], "p-soups", "train_quick", "rows.json"),
    )
    ps_exports, _ = _train_methods(
        stages,
        budget,
        d,
        init_dir,
        seed,
        "psoups/",
        train_file,
        steps=budget.psoups_steps,
        buckets=budget.psoups_buckets,
    )
    # P-SOUPS rows carry no direction vectors: there is no head to train, PBA uses `profile`
    stages.run("psoups/head", lambda: {"mode": "none: PBA on P-SOUPS uses the row's profile"})
    ps: dict[str, Any] = {}
    for key, method in zip(PSOUPS_ROWS, METHODS):
        ps[key] = stages.run(
            f"psoups/eval/{key}",
            lambda key=key, method=method: run_eval(
                budget,
                model_dir=ps_exports[method],
                reference_dir=init_dir,
                name="p-soups",
                path=split["test"],
                method=method,
                preference="golden",
                limit=budget.psoups_eval_limit,
                out_json=os.path.join(d["eval"], "p_soups", f"{key}.json"),
            ),
        )
    return ps


def cli_demo(args: argparse.Namespace) -> int:
    from alignx_jax.generate import SEED_LIMIT

    # its training keys (and --real's samples) keep 32 bits: a larger one aliased a smaller or, past 2**63, was
    # a traceback after the synthetic data was written
    if int(args.seed) >= SEED_LIMIT:
        raise ConfigError(f"--seed must be below 2**32, got {args.seed}")
    if args.out == "":  # given and empty: not the default folder in its place
        raise ConfigError("--out: an empty path; name a folder")
    if getattr(args, "real", False):
        from alignx_jax import demo_real

        out = args.out or "runs/demo-real"
        results = demo_real.run_real_demo(
            out, quick=bool(args.quick), psoups=args.p_soups, seed=int(args.seed), model=args.model
        )
        demo_real.print_summary(results, out, demo_real.format_table(results))
        return 0
    if args.model is not None:
        raise ConfigError("--model needs --real: the synthetic demo trains its own tiny random model")
    args.out = args.out or "runs/demo"
    # the tiny model's programs compile for longer than they run: XLA's quicker CPU compile (hardware.py)
    use_fast_cpu_compile()
    results = run_demo(args.out, quick=bool(args.quick), psoups=args.p_soups, seed=int(args.seed))
    for line in format_table(results):
        print(line)
    for name, ok in results["targets"].items():
        print(f"{'PASS' if ok else ('FAIL' if ok is False else 'n/a '):<4} {name}")
    print(
        f"{results['seconds']:.0f} s; results: {os.path.join(args.out, 'results.json')}, "
        f"report: {os.path.join(args.out, 'report.md')}"
    )
    return 0
