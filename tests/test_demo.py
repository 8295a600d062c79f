"""`alignx demo --quick`: the whole chain (synth -> train -> export -> eval -> report) writes every file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from alignx_jax import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACC_KEYS = {"accuracy", "n", "ci95"}


def _run_demo(out, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "alignx_jax", "demo", "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )


def _check_acc(entry):
    assert set(entry) >= ACC_KEYS, entry
    assert entry["n"] > 0
    assert 0.0 <= entry["accuracy"] <= 1.0
    lo, hi = entry["ci95"]
    assert 0.0 <= lo <= entry["accuracy"] <= hi <= 1.0


@pytest.mark.slow
def test_quick_demo_writes_every_file_and_reruns_from_its_stages(tmp_path):
    out = tmp_path / "demo"
    proc = _run_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "report.md", "accuracy.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert set(res["synthetic"]) == {"non_personalized", "ica", "pba_predicted", "pba_golden", "base"}
    for entry in res["synthetic"].values():
        _check_acc(entry)
    assert res["seconds"] > 0
    if os.path.isfile(demo.DEFAULT_PSOUPS):
        assert res["p_soups"]["file"] == os.path.abspath(demo.DEFAULT_PSOUPS)
        for key in ("non_personalized", "ica", "pba_profile"):
            _check_acc(res["p_soups"][key])
    # every run started from the one initial model and trained the configured number of steps
    for run in ("non_personalized", "ica", "pba"):
        rows = demo.read_metrics(str(out / "runs" / run))
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    assert (out / "models" / "pba" / "preference_head.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "| pba_golden |" in report and "91.36" in report  # beside the paper's golden-P~ number
    # held-out synthetic users: none of their rows (or task prompts) was trained on
    import pyarrow.parquet as pq

    train = pq.read_table(out / "data" / "synth" / "train" / "data.parquet").to_pylist()
    test = pq.read_table(out / "data" / "synth" / "test" / "data.parquet").to_pylist()
    assert not {r["user_id"] for r in train} & {r["user_id"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    # a rerun reuses every finished stage and reproduces the same numbers
    proc2 = _run_demo(out)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    res2 = json.loads((out / "results.json").read_text())
    assert res2["synthetic"] == res["synthetic"] and res2["p_soups"] == res["p_soups"]
    # its time counts the stages it reused (it reported its own second or two as the demo's)
    stage_seconds = sum(json.loads(p.read_text())["seconds"] for p in (out / "stages").iterdir())
    assert res2["seconds"] >= stage_seconds > 0
    report2 = (out / "report.md").read_text()
    assert f"({res2['seconds']:.0f} s wall)" in report2
    # the report's stage times are the stages' own, reused ones too, so they add up within the total
    setup = json.loads(report2.split("## Setup", 1)[1].split("```")[1])
    assert setup["stage_seconds"] == {
        n: json.loads((out / "stages" / (n.replace("/", "_") + ".json")).read_text())["seconds"]
        for n in setup["stage_seconds"]
    }
    assert set(setup["reused_stages"]) == set(setup["stage_seconds"])
    assert sum(setup["stage_seconds"].values()) == pytest.approx(stage_seconds)
    stages = {p: json.loads((out / "stages" / p).read_text()) for p in os.listdir(out / "stages")}
    # init, synth, 3 trainings, the head, 5 evaluations; the P-SOUPS split adds its own stages
    assert len(stages) >= (12 if os.path.isfile(demo.DEFAULT_PSOUPS) else 11)


def test_missing_psoups_file_is_a_one_line_error(tmp_path):
    from alignx_jax.cli import main

    assert (
        main(["demo", "--quick", "--out", str(tmp_path / "d"), "--p-soups", str(tmp_path / "nope.json")]) == 1
    )


@pytest.mark.parametrize("real", [False, True])
def test_a_psoups_file_the_stages_cannot_read_is_refused_before_any_stage(capsys, tmp_path, real):
    """A --p-soups file without `profile` (or with no rows) is refused in one line naming it before anything is
    written: it failed at the P-SOUPS stages, after the stages before them had trained."""
    from alignx_jax.cli import main

    row = {"prompt": "p", "chosen": "a", "rejected": "b", "ground_truth_persona": "g"}
    row["Pair-wise Comparative Feedback"] = [{"prompt": "q", "chosen": "c", "rejected": "d"}]
    for name, rows, says in (
        ("noprof.json", [row], "field 'profile': missing"),
        ("none.json", [], "no rows"),
    ):
        psoups = tmp_path / name
        psoups.write_text(json.dumps(rows))
        out = tmp_path / f"d-{real}-{name}"
        capsys.readouterr()
        argv = ["demo", *(["--real"] if real else []), "--quick", "--out", str(out), "--p-soups", str(psoups)]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and name in err, err
        assert not out.exists()


@pytest.mark.parametrize("real", [False, True])
def test_a_seed_past_32_bits_is_refused_before_anything_is_written(capsys, tmp_path, real):
    """The JAX keys keep a seed's low 32 bits (2**32 initialized what 0 does); past 2**63 it was a traceback
    after the synthetic data was written."""
    from alignx_jax.cli import main

    for seed in (2**32, 2**64):
        out = tmp_path / f"d-{real}-{seed}"
        capsys.readouterr()
        assert (
            main(["demo", *(["--real"] if real else []), "--quick", "--out", str(out), "--seed", str(seed)])
            == 1
        )
        err = capsys.readouterr().err
        assert err == f"alignx: error: --seed must be below 2**32, got {seed}\n", err
        assert not out.exists()


@pytest.mark.parametrize("real", [False, True])
def test_an_empty_out_is_refused_not_the_default(capsys, tmp_path, monkeypatch, real):
    """`--out ""` ran the demo into the default runs/demo (runs/demo-real) as if no --out were given."""
    from alignx_jax.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", *(["--real"] if real else []), "--quick", "--out", ""]) == 1
    assert capsys.readouterr().err == "alignx: error: --out: an empty path; name a folder\n"
    assert os.listdir(tmp_path) == []


def test_other_settings_in_the_same_out_are_refused(tmp_path):
    from alignx_jax.errors import ConfigError

    out = tmp_path / "d"
    out.mkdir()
    (out / "demo_settings.json").write_text(json.dumps({"quick": False, "seed": 5, "psoups": None}))
    with pytest.raises(ConfigError, match="other settings") as e:
        demo.run_demo(str(out), quick=True, seed=0, psoups=None, progress=False)
    # it says what differs (it printed the earlier run's whole settings, which named no --model it lacked)
    assert "other settings (quick False, now True, seed 5, now 0, psoups None, now " in str(e.value), e.value
    (out / "demo_settings.json").write_text(json.dumps({"real": True, "quick": True, "seed": 0}))
    with pytest.raises(ConfigError, match=r"other settings \(model None, now 'HuggingFaceTB/x'\)"):
        demo.check_out(str(out), {"real": True, "quick": True, "seed": 0, "model": "HuggingFaceTB/x"})
    # settings that are no JSON object (null, a list) are other settings too, in one line
    for text in ("null", "[1, 2]"):
        (out / "demo_settings.json").write_text(text)
        with pytest.raises(
            ConfigError, match=rf"other settings \({re.escape(text.replace('null', 'None'))}\)"
        ):
            demo.check_out(str(out), {"real": True, "quick": True, "seed": 0})


def test_a_folder_of_the_users_is_refused_as_out(tmp_path):
    from alignx_jax.errors import ConfigError

    out = tmp_path / "mine"
    (out / "models" / "ica").mkdir(parents=True)  # the demo would replace a folder of this name
    (out / "report.md").write_text("my notes")
    with pytest.raises(
        ConfigError, match=r"--out .*mine: not empty and not a demo folder \(holds models, report.md\)"
    ):
        demo.run_demo(str(out), quick=True, seed=0, psoups=None, progress=False)
    assert (out / "report.md").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == [
        "models",
        "report.md",
    ]


def test_a_file_as_out_is_one_line(tmp_path):
    from alignx_jax.errors import ConfigError

    out = tmp_path / "afile.txt"
    out.write_text("mine")
    with pytest.raises(
        ConfigError, match=r"^--out .*afile.txt: a file, not a folder; use a new or empty folder$"
    ):
        demo.run_demo(str(out), quick=True, seed=0, psoups=None, progress=False)
    assert out.read_text() == "mine"


def test_targets_and_report_from_results(tmp_path):
    def e(acc):
        return {"accuracy": acc, "n": 100, "ci95": [acc - 0.05, acc + 0.05]}

    results = {
        "synthetic": {
            "base": e(0.5),
            "non_personalized": e(0.52),
            "ica": e(0.7),
            "pba_predicted": e(0.66),
            "pba_golden": e(0.85),
        },
        "p_soups": {"file": "x.json", "non_personalized": e(0.5), "ica": e(0.6), "pba_profile": e(0.45)},
        "seconds": 12.0,
    }
    t = demo.check_targets(results)
    assert t[demo.TARGETS[0]] and t[demo.TARGETS[1]] and t[demo.TARGETS[2]] and t[demo.TARGETS[3]]
    assert t[demo.TARGETS[4]] is False
    results["synthetic"]["ica"] = e(0.6)
    assert demo.check_targets(results)[demo.TARGETS[1]] is False
    path = demo.write_report(str(tmp_path), results, {"quick": True, "seed": 0})
    text = open(path).read()
    assert "| ica | 60.0 | 100 |" in text and "FAIL: p-soups: pba_profile > non_personalized" in text
    assert os.path.isfile(demo.plot_accuracy(str(tmp_path), results))
    w = tmp_path / "w"
    w.mkdir()
    (w / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 0.7 - s / 100, "rewards/accuracies": 0.5}) + "\n"
            for s in (1, 2, 3, 2, 3, 4)
        )
    )
    assert [r["step"] for r in demo.read_metrics(str(w))] == [1, 2, 3, 4]
    assert os.path.isfile(demo.plot_curves(str(tmp_path), {"run": str(w)}))


def test_psoups_runs_train_with_the_budgets_wider_buckets(tmp_path):
    full, quick = demo.Budget(quick=False), demo.Budget(quick=True)
    kw = dict(workdir=str(tmp_path / "w"), model_dir="/m", data="/d.json", method="ica", seed=0)
    cfg = demo.run_config(full, steps=full.psoups_steps, buckets=full.psoups_buckets, **kw)
    assert tuple(cfg.data.buckets) == full.psoups_buckets and cfg.train.steps == 80
    default = demo.run_config(full, **kw)  # the synthetic runs keep the config's buckets
    assert len(default.data.buckets) > len(cfg.data.buckets) and max(default.data.buckets) == max(
        cfg.data.buckets
    )
    assert quick.psoups_buckets is None


def test_a_rerun_whose_input_changed_is_refused(tmp_path):
    """OUT/demo_inputs.json: the same inputs pass again; a P-SOUPS file or model folder rewritten since the
    first run is refused in one line naming its flag once a stage finished (a rerun would reuse it), and
    taken as the new input before any has."""
    from alignx_jax.demo import check_inputs
    from alignx_jax.errors import ConfigError

    out, data, model = tmp_path / "out", tmp_path / "p.json", tmp_path / "model"
    out.mkdir()
    model.mkdir()
    data.write_text("[]")
    (model / "config.json").write_text("{}")
    inputs = {"--p-soups": str(data), "--model": str(model)}
    check_inputs(str(out), inputs)
    data.write_text("[ ]")  # fixed after a first run that stopped before any stage finished: taken
    check_inputs(str(out), inputs)
    (out / "stages").mkdir()
    (out / "stages" / "split.json").write_text("{}")
    check_inputs(str(out), inputs)  # unchanged: reused
    (model / "model.safetensors").write_bytes(b"new weights")
    with pytest.raises(ConfigError, match=r"--model .*model changed since this folder's first run") as e:
        check_inputs(str(out), inputs)
    assert "\n" not in str(e.value)
    (model / "model.safetensors").unlink()
    check_inputs(str(out), inputs)  # as it was
    data.write_text('[{"prompt": "x"}]')
    with pytest.raises(ConfigError, match=r"--p-soups .*p.json changed"):
        check_inputs(str(out), inputs)


def _psoups_file(path) -> str:
    row = {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "ground_truth_persona": "g",
        "profile": "Likes science",
    }
    row["Pair-wise Comparative Feedback"] = [{"prompt": "q", "chosen": "c", "rejected": "d"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([row]))
    return str(path)


@pytest.mark.parametrize("real", [False, True])
def test_a_psoups_file_reached_through_a_link_is_the_same_input(tmp_path, real):
    """A demo folder made from one checkout (its `../shared` a link, as /tmp/shared to /work/shared) was
    refused from another as "other settings": the P-SOUPS path was compared as written. The same file
    through a link passes on to the input check (here: refusing a rewritten file); another file is refused."""
    from alignx_jax import demo_real
    from alignx_jax.errors import ConfigError

    given = _psoups_file(tmp_path / "shared" / "p.json")
    other = _psoups_file(tmp_path / "shared" / "q.json")
    (tmp_path / "link").symlink_to(tmp_path / "shared", target_is_directory=True)
    out = tmp_path / "d"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "split.json").write_text("{}")  # a finished stage: a changed input is refused
    settings = {"quick": True, "seed": 0, "psoups": str(tmp_path / "link" / "p.json")}
    if real:
        settings = {"real": True, **settings, "contrast_originals": demo_real.ORIGINALS}
    (out / "demo_settings.json").write_text(json.dumps(settings))  # as the other checkout recorded it
    (out / "demo_inputs.json").write_text(json.dumps({"--p-soups": [["p.json", 1, 1]]}))
    run = demo_real.run_real_demo if real else demo.run_demo
    with pytest.raises(ConfigError, match=r"--p-soups .*p.json changed since this folder's first run"):
        run(str(out), quick=True, seed=0, psoups=given, progress=False)
    with pytest.raises(ConfigError, match=r"other settings \(psoups '.*/p.json', now '.*/shared/q.json'\)"):
        run(str(out), quick=True, seed=0, psoups=other, progress=False)


def test_the_default_psoups_through_a_link_is_still_the_default(tmp_path, monkeypatch):
    """The default file missing is skipped (the demo runs without its P-SOUPS part); given through a link
    (another checkout's `../shared`) it was "--p-soups: no such file"."""
    from alignx_jax.errors import ConfigError, DataError

    (tmp_path / "shared").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "shared", target_is_directory=True)
    monkeypatch.setattr(demo, "DEFAULT_PSOUPS", str(tmp_path / "shared" / "missing.json"))
    out = tmp_path / "afile.txt"  # refused next, before any stage: the check above passed
    out.write_text("mine")
    with pytest.raises(ConfigError, match="a file, not a folder"):
        demo.run_demo(str(out), quick=True, psoups=str(tmp_path / "link" / "missing.json"), progress=False)
    with pytest.raises(DataError, match="no such file"):  # another missing file is no default
        demo.run_demo(str(out), quick=True, psoups=str(tmp_path / "shared" / "other.json"), progress=False)


def test_attach_head_records_a_two_stage_head_and_lists_it_in_the_export(tmp_path):
    """The demo's two-stage head records how it was fit and is listed in the export's manifest (a re-export
    over the folder replaces it as its own); a two-stage head left by a demo killed before the stage's
    record is fit again, not reported as "joint"; a head the export recorded as joint is kept."""
    from alignx_jax import export
    from alignx_jax.models import hf
    from alignx_jax.models import preference_head as ph

    budget = demo.Budget(quick=True)
    data = demo.make_synthetic(str(tmp_path / "data"), budget, 0)
    model_dir = str(tmp_path / "pba")
    demo.make_init(budget, model_dir, 0)
    first = demo.attach_head(budget, export_dir=model_dir, data=data["train"], seed=0)
    assert first["mode"] == "two_stage" and first["steps"] == budget.head_steps
    listed = set(hf.read_export_manifest(model_dir)["files"])
    assert {ph.HEAD_WEIGHTS_FILE, ph.HEAD_CONFIG_FILE} <= listed
    # a re-export writing the policy's files alone keeps none of the head's
    entries = sorted(os.listdir(model_dir))
    kept = export._kept(model_dir, entries, listed, ["config.json", "model.safetensors"])
    assert ph.HEAD_WEIGHTS_FILE not in kept and ph.HEAD_CONFIG_FILE not in kept
    # the head saved, its stage unrecorded: the rerun fits it again and says so
    again = demo.attach_head(budget, export_dir=model_dir, data=data["train"], seed=0)
    assert again["mode"] == "two_stage" and set(again) == set(first)
    assert ph.head_training(model_dir) == "two_stage"
    # a joint run's head, as `alignx export` records it: kept as it is
    head, hcfg = ph.load_head(model_dir)
    ph.save_head(head, hcfg, model_dir, training="joint")
    before = (tmp_path / "pba" / ph.HEAD_WEIGHTS_FILE).read_bytes()
    assert demo.attach_head(budget, export_dir=model_dir, data=data["train"], seed=0) == {"mode": "joint"}
    assert (tmp_path / "pba" / ph.HEAD_WEIGHTS_FILE).read_bytes() == before


def test_a_reused_stage_reports_the_seconds_it_took(tmp_path):
    """A stage a rerun finds done is listed with its own seconds (its marker's), marked reused, as the
    total counts it; it was listed as 0.0 while the total held its time."""
    first = demo.Stages(str(tmp_path), ["a", "b"], progress=False)
    assert first.run("a", lambda: time.sleep(0.05) or 1) == 1
    first.close()
    took = first.seconds["a"]
    assert took >= 0.05 and first.reused == []
    rerun = demo.Stages(str(tmp_path), ["a", "b"], progress=False)
    assert rerun.run("a", lambda: pytest.fail("a finished stage ran again")) == 1
    assert rerun.run("b", lambda: 2) == 2
    rerun.close()
    assert rerun.seconds["a"] == took and rerun.reused == ["a"]
    assert rerun.reused_seconds == took and "b" in rerun.seconds


def test_init_redone_over_the_folder_a_killed_run_left_before_its_marker(tmp_path):
    """A demo killed after the init stage renamed its model into place, before the stage's marker, left
    models/init: the rerun redoes the stage and its rename onto that folder failed ("Directory not empty")
    on every rerun. It replaces it with the same model."""
    budget = demo.Budget(quick=True)
    init_dir = tmp_path / "init"
    first = demo.make_init(budget, str(init_dir), 0)
    weights = {n: (init_dir / n).read_bytes() for n in os.listdir(init_dir) if n.endswith(".safetensors")}
    (init_dir / "left.txt").write_text("a killed run's")
    assert demo.make_init(budget, str(init_dir), 0) == first
    assert weights and {n: (init_dir / n).read_bytes() for n in weights} == weights
    assert not (init_dir / "left.txt").exists()
    assert [n for n in os.listdir(tmp_path) if n != "init"] == []  # no temporary folder left


def test_a_report_write_cut_short_keeps_the_earlier_report(tmp_path):
    """report.md and the figures are written aside and renamed: a write that fails (a kill) leaves the
    earlier report whole, never a cut one beside a complete results.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignx_jax import demo_report

    report = tmp_path / "report.md"
    demo_report.write_lines(str(report), ["# before", "whole"])

    with pytest.raises(TypeError):
        demo_report.write_lines(str(report), ["# after", 3])  # fails mid-join, as a kill would
    assert report.read_text() == "# before\nwhole"
    fig, _ = plt.subplots()
    png = demo_report.save_figure(fig, str(tmp_path / "fig.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "report.md"]  # no temporary left
