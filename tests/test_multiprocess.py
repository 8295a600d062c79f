"""Real multi-process JAX jobs on this machine: `launch/local.sh 2 alignx ...` starts 2 processes of 4 CPU
devices each (one 8-device mesh, gloo collectives) and must give what one process of 8 devices gives.

Slow: about four minutes on two cores (one tiny compile per run). The runs are shared by the tests
through module fixtures; each test names the command it checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
LOCAL = os.path.join(ROOT, "launch", "local.sh")
PSOUPS = os.path.join(ROOT, "..", "shared", "benchmarks", "p-soups", "student_phd.json")

pytestmark = pytest.mark.slow

# tests/test_train.py's tiny run: 8 synthetic users, hidden 32, one 128-token bucket (one compilation);
# the mesh is the 8 devices of either layout
TRAIN = [
    f"--config={TINY}",
    "--config.model.init.hidden_size=32",
    "--config.model.init.intermediate_size=64",
    "--config.model.init.head_dim=8",
    "--config.data.synth_users=8",
    "--config.data.max_length=128",
    "--config.data.buckets=(128,)",
    "--config.loss.logps_chunk=64",
    "--config.train.global_batch=8",
    "--config.train.micro_batch=4",
    "--config.train.progress=false",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
]
# enough steps that a SIGTERM lands mid-run (test_sigterm_...), which resumes to these same losses
STEPS = ["--config.train.steps=12", "--config.checkpoint.every_steps=12"]
EVAL = ["--method", "ica", "--limit", "4", "--max-length", "256", "--batch-size", "4"]


def _env(cache: str, devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.pop("XLA_FLAGS", None)
    for k in list(env):
        if k.startswith("ALIGNX_") and k != "ALIGNX_CACHE_DIR":
            env.pop(k)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def one_process(args, cache, devices=8, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignx_jax", *args],
        env=_env(cache, devices),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def two_processes(args, cache, logdir, timeout=600) -> subprocess.CompletedProcess:
    env = dict(_env(cache), DEVICES_PER_PROCESS="4", LOGDIR=str(logdir))
    return subprocess.run(
        ["bash", LOCAL, "2", "alignx", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _logs(logdir) -> str:
    out = []
    for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
        with open(os.path.join(logdir, name), errors="replace") as f:
            out.append(f"== {name}\n" + f.read()[-2000:])
    return "\n".join(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 8-device single-process run and one 2 x 4-device run of the same tiny config."""
    d = tmp_path_factory.mktemp("mp")
    cache = str(d / "jax_cache")
    t0 = time.perf_counter()
    r = one_process(["train", *TRAIN, *STEPS, f"--config.workdir={d / 'one'}"], cache)
    assert r.returncode == 0, r.stderr[-3000:]
    t1 = time.perf_counter()
    r = two_processes(["train", *TRAIN, *STEPS, f"--config.workdir={d / 'two'}"], cache, d / "logs-train")
    assert r.returncode == 0, r.stderr[-3000:] + _logs(d / "logs-train")
    t2 = time.perf_counter()
    print(f"train: 1 process {t1 - t0:.0f}s, 2 processes {t2 - t1:.0f}s", file=sys.stderr)
    return {"dir": d, "cache": cache, "one": d / "one", "two": d / "two"}


def test_two_processes_train_like_one(runs):
    """(a) `launch/local.sh 2 alignx train`: the losses of one 8-device process, to 1e-4."""
    a, b = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    # one writer: metrics and the checkpoint once, in the shared workdir
    assert len(open(runs["two"] / "metrics.jsonl").read().splitlines()) == 12
    assert (runs["two"] / "checkpoints" / "12" / "params").is_dir()
    # W/reference of a multi-process run: the weights gathered to process 0 (export reads its config)
    assert (runs["two"] / "reference" / "config.json").is_file()
    logs = _logs(runs["dir"] / "logs-train")
    assert "process_0.log" in logs and "process_1.log" in logs


@pytest.fixture(scope="module")
def exported(runs):
    """(c) `launch/local.sh 2 alignx export` of the 2-process run's checkpoint."""
    d = runs["dir"]
    two = runs["two"]
    r = two_processes(
        ["export", "--checkpoint", str(two), "--out", str(d / "hf2")], runs["cache"], d / "logs-export"
    )
    assert r.returncode == 0, r.stderr[-3000:] + _logs(d / "logs-export")
    r1 = one_process(
        ["export", "--checkpoint", str(two), "--out", str(d / "hf1")], runs["cache"], devices=None
    )
    assert r1.returncode == 0, r1.stderr[-3000:]
    return {"hf2": d / "hf2", "hf1": d / "hf1", "log": _logs(d / "logs-export")}


def test_export_under_two_processes_writes_once_and_loads(runs, exported):
    from safetensors.numpy import load_file

    from alignx_jax.models.hf import load_pretrained

    hf2, hf1 = exported["hf2"], exported["hf1"]
    assert exported["log"].count("exported ") == 1  # process 0 alone reports (and writes)
    assert not [e for e in os.listdir(hf2.parent) if e.startswith(".hf2.")]  # no half-written folder left
    assert (hf2 / "alignx_export.json").exists() and (hf2 / "config.json").exists()
    shards = sorted(p.name for p in hf2.glob("*.safetensors"))
    assert shards == sorted(p.name for p in hf1.glob("*.safetensors")) and shards
    for name in shards:  # the same tensors as a 1-process export of the same checkpoint
        a, b = load_file(str(hf2 / name)), load_file(str(hf1 / name))
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    model = load_pretrained(str(hf2))
    assert int(model.cfg.hidden_size) == 32


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_eval_over_two_processes_gives_one_process_accuracy(runs, exported):
    """(b) `launch/local.sh 2 alignx eval`: the single-process results exactly; one results file and
    one per-example row per pair (process 0 writes)."""
    d = runs["dir"]
    common = ["eval", "--model", str(exported["hf2"]), "--benchmark", f"p-soups={PSOUPS}", *EVAL]
    r = one_process(
        [*common, "--per-example", str(d / "e1.jsonl"), "--out", str(d / "e1.json")], runs["cache"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = two_processes(
        [*common, "--per-example", str(d / "e2.jsonl"), "--out", str(d / "e2.json")],
        runs["cache"],
        d / "logs-eval",
    )
    assert r.returncode == 0, r.stderr[-3000:] + _logs(d / "logs-eval")
    one, two = json.load(open(d / "e1.json")), json.load(open(d / "e2.json"))
    assert two["benchmarks"] == one["benchmarks"]
    rows1 = [json.loads(x) for x in open(d / "e1.jsonl")]
    rows2 = [json.loads(x) for x in open(d / "e2.jsonl")]
    assert len(rows2) == len(rows1) == 4
    by_key = {(r["benchmark"], r["persona"], r["index"]): r for r in rows1}
    for r in rows2:
        want = by_key[(r["benchmark"], r["persona"], r["index"])]
        assert abs(r["logp_chosen"] - want["logp_chosen"]) < 1e-4
        assert r["correct"] == want["correct"]
    assert _logs(d / "logs-eval").count("results: ") == 1


def _children(pid: int) -> list[int]:
    """The alignx processes local.sh started (not its polling `sleep`)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/environ", "rb") as f:
                if b"ALIGNX_PROCESS_ID=" in f.read():
                    out.append(k)
        except OSError:
            pass
    return out


def test_sigterm_on_one_host_saves_on_all_and_exits_0(runs):
    """A preemption notice reaches one host: every process saves the same step and exits 0; the same
    command resumes and gives the uninterrupted run's losses."""
    d = runs["dir"]
    w, logdir = d / "sig", d / "logs-sig"
    env = dict(_env(runs["cache"]), DEVICES_PER_PROCESS="4", LOGDIR=str(logdir), KILL_AFTER="5")
    args = [*TRAIN, *STEPS, f"--config.workdir={w}"]
    proc = subprocess.Popen(
        ["bash", LOCAL, "2", "alignx", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    metrics = w / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    kids = _children(proc.pid)
    assert proc.poll() is None and len(kids) == 2, "the run ended before it could be interrupted"
    by_id = {}
    for k in kids:
        with open(f"/proc/{k}/environ", "rb") as f:
            env_k = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        by_id[int(env_k[b"ALIGNX_PROCESS_ID"])] = k
    os.kill(by_id[1], signal.SIGTERM)  # the maintenance event of one host
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        err = None
    finally:  # a hung pair is killed here, never left behind
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if err is None:
        pytest.fail("the processes did not stop within 60 s of a SIGTERM to one of them\n" + _logs(logdir))
    assert proc.returncode == 0, err[-2000:] + _logs(logdir)
    stopped = max(_losses(w))
    assert 2 <= stopped < 12
    # the same step on both processes: one checkpoint, complete (every process wrote its shards)
    assert sorted(int(n) for n in os.listdir(w / "checkpoints") if n.isdigit()) == [stopped]
    assert (w / "checkpoints" / str(stopped) / "params").is_dir()
    logs = _logs(logdir)
    assert "rerun the same command to resume" in logs and "Traceback" not in logs
    r = two_processes(["train", *args], runs["cache"], d / "logs-resume")  # the same command
    assert r.returncode == 0, r.stderr[-3000:] + _logs(d / "logs-resume")
    assert f"resuming from {w / 'checkpoints'}/{stopped}" in _logs(d / "logs-resume")
    a, b = _losses(runs["two"]), _losses(w)
    assert sorted(b) == sorted(a)
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
