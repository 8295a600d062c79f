"""Real multi-process JAX jobs on this machine: `launch/local.sh 2 alignx ...` (or `... 2 python
tests/mp_modes.py`) starts 2 processes of 4 CPU devices each (one 8-device mesh, gloo collectives) and must
give what one process of 8 devices gives.

Slow: one tiny compile per mode and run; every training mode runs in one launch of 2 processes (and one of
1 process) that the other tests share (module fixtures); each test names the command it checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
LOCAL = os.path.join(ROOT, "launch", "local.sh")
PSOUPS = os.path.join(ROOT, "..", "shared", "benchmarks", "p-soups", "student_phd.json")
MODES_SCRIPT = os.path.join(ROOT, "tests", "mp_modes.py")

pytestmark = pytest.mark.slow


def _load_mp_modes():
    spec = importlib.util.spec_from_file_location("mp_modes", MODES_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# tests/mp_modes.py: every training mode; its tiny run (8 synthetic users, hidden 32, one 128-token bucket)
# on the 8 devices of either layout is also what the `alignx train` commands here run
MP_MODES = _load_mp_modes()
TRAIN = [f"--config={TINY}", *MP_MODES.TRAIN]
STEPS = (
    MP_MODES.STEPS
)  # 12 steps: a SIGTERM lands mid-run (test_sigterm_...), which resumes to the same losses
EVAL = ["--method", "ica", "--limit", "4", "--max-length", "256", "--batch-size", "4"]


def _env(cache: str, devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    for k in list(env):
        if k.startswith("ALIGNX_") and k != "ALIGNX_CACHE_DIR":
            env.pop(k)
    env["XLA_FLAGS"] = xla_flags(devices)
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


def _records(workdir) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _logs(logdir) -> str:
    out = []
    for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
        with open(os.path.join(logdir, name), errors="replace") as f:
            out.append(f"== {name}\n" + f.read()[-2000:])
    return "\n".join(out)


# the row append of eval --per-example / generate --out on process 0 fails at its second batch (a full
# disk) where FULL is set
FULL_DISK_ON_PROCESS_0 = (
    "import errno, os\n"
    "from alignx_jax import distributed\n"
    "distributed.initialize_from_env()\n"
    "from alignx_jax.evaluate import results\n"
    "append, calls = results.PerExampleLog.append, []\n"
    "def full(self, rows):\n"
    "    calls.append(1)\n"
    "    if len(calls) == 2 and os.environ['ALIGNX_PROCESS_ID'] == '0' and 'FULL' in os.environ:\n"
    "        raise OSError(errno.ENOSPC, 'No space left on device', self.path)\n"
    "    return append(self, rows)\n"
    "results.PerExampleLog.append = full\n"
)


def _launch_patched_cli(tmp_path, patch: str, argv: list[str], logdir: str = "logs", **extra: str):
    """`launch/local.sh 2` of `alignx ARGV` after the Python lines `patch` (one device per process):
    (the completed launcher, the processes' logs)."""
    wrap = tmp_path / "patched_cli.py"
    wrap.write_text(
        "import sys\n" + patch + "from alignx_jax.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(_env(str(tmp_path / "cache")), DEVICES_PER_PROCESS="1", LOGDIR=str(tmp_path / logdir), **extra)
    r = subprocess.run(
        ["bash", LOCAL, "2", "python", str(wrap), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    return r, _logs(tmp_path / logdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """tests/mp_modes.py, every training mode one after another (its `two_row` mode: the 12-step tiny run
    the other tests read), once in one 8-device process and once as `launch/local.sh 2 python
    tests/mp_modes.py` (2 x 4 devices): one launch each, started together."""
    d = tmp_path_factory.mktemp("mp")
    cache = str(d / "jax_cache")
    t0 = time.perf_counter()
    one = subprocess.Popen(
        [sys.executable, MODES_SCRIPT, str(d / "modes1")],
        env=_env(cache, 8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    env = dict(_env(cache), DEVICES_PER_PROCESS="4", LOGDIR=str(d / "logs-train"))
    two = subprocess.Popen(
        ["bash", LOCAL, "2", "python", MODES_SCRIPT, str(d / "modes2")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        _, err1 = one.communicate(timeout=1200)
        _, err2 = two.communicate(timeout=1200)
    finally:
        for p in (one, two):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert one.returncode == 0, err1[-3000:]
    assert two.returncode == 0, err2[-3000:] + _logs(d / "logs-train")
    print(f"every mode, 1 and 2 processes: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    # each mode's seconds in the 1-process launch (mp_modes.py's lines): where this fixture's time goes
    print(
        "".join(ln + "\n" for ln in err1.splitlines() if ln.startswith("mp_modes: ")), file=sys.stderr, end=""
    )
    return {
        "dir": d,
        "cache": cache,
        "modes1": d / "modes1",
        "modes2": d / "modes2",
        "one": d / "modes1" / "two_row",
        "two": d / "modes2" / "two_row",
    }


def test_two_processes_train_like_one(runs):
    """(a) 2 processes train (`run_training`, as `alignx train`): the losses of one 8-device process, to
    1e-4."""
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


def test_every_training_mode_runs_on_two_processes_like_one(runs):
    """Two-row, shared-prompt, packing (the latter two with token compaction), precomputed reference, PBA
    joint / two-stage / predicted / mix: 2 x 4 devices give the losses of 1 x 8 devices; each process
    read only its shard and the checkpoint holds every process's loader state."""
    from alignx_jax.checkpointing import read_meta

    one, two = runs["modes1"], runs["modes2"]
    for name in MP_MODES.MODES:
        a, b = _records(one / name), _records(two / name)
        last = max(a)
        assert sorted(a) == sorted(b) == list(range(1, last + 1)), name
        for s in a:
            assert abs(a[s]["loss"] - b[s]["loss"]) < 1e-4, (name, s, a[s]["loss"], b[s]["loss"])
            # the first step's loss is log 2 whatever the pairs: their log-probs name wrong rows or pairs
            for k in ("logps/chosen", "logps/rejected", "grad_norm"):
                assert abs(a[s][k] - b[s][k]) <= 1e-5 * max(1.0, abs(a[s][k])), (name, s, k, a[s][k], b[s][k])
            # the data counters are the job's, not process 0's shard's
            for k in ("rows_truncated", "rows_dropped", "rows_skipped"):
                assert a[s][k] == b[s][k], (name, s, k, a[s][k], b[s][k])
            assert abs(a[s]["padding_fraction"] - b[s]["padding_fraction"]) < 1e-6, (name, s)
        meta = read_meta(str(two / name / "checkpoints"), last)
        procs = meta["processes"]
        assert [p["loader"]["shard_index"] for p in procs] == [0, 1], name
        assert all(p["loader"]["shard_count"] == 2 for p in procs), name
        # 4 pairs a step: each process read rows of its own shard only, not the global batch's 8
        assert [p["loader"]["rows_seen"] for p in procs] == [4 * last, 4 * last], name
        assert meta["loader"] == procs[0]["loader"]
        assert "processes" not in read_meta(str(one / name / "checkpoints"), last)
    assert (two / "share_prompt_precomputed" / "ref_logps.p0.npy").is_file()
    assert (two / "share_prompt_precomputed" / "ref_logps.p1.npy").is_file()
    for name in ("pba_joint_predicted", "pba_two_stage_mix"):  # the same first-stage P~, written once
        np.testing.assert_array_equal(
            np.load(two / name / "pba_predicted.npy"), np.load(one / name / "pba_predicted.npy")
        )
    for name in ("pba_joint_predicted", "pba_two_stage_mix"):
        assert (two / name / "checkpoints" / "2" / "head").is_dir(), name


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


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (/proc/PID/status SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def _by_process_id(kids: list[int]) -> dict[int, int]:
    by_id = {}
    for k in kids:
        with open(f"/proc/{k}/environ", "rb") as f:
            env_k = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        by_id[int(env_k[b"ALIGNX_PROCESS_ID"])] = k
    return by_id


def _finish(proc: subprocess.Popen, kids: list[int], timeout: float, logdir) -> str:
    """local.sh's stderr once it exits within `timeout`; a hung pair is killed, never left behind."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        err = None
    finally:
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if err is None:
        pytest.fail(
            f"the processes did not stop within {timeout:.0f} s of a SIGTERM to one\n" + _logs(logdir)
        )
    return err


def test_sigterm_on_one_host_during_start_up_stops_all_with_exit_0(runs):
    """A SIGTERM to one process before the trainer installs its handler (`alignx`'s start-up handler):
    in a multi-process job it is recorded, not an exit of that process alone (the other would wait in a
    collective until the heartbeat timeout); the trainer's first agreed check stops both, exit 0."""
    d = runs["dir"]
    w, logdir = d / "early", d / "logs-early"
    env = dict(_env(runs["cache"]), DEVICES_PER_PROCESS="4", LOGDIR=str(logdir), KILL_AFTER="5")
    proc = subprocess.Popen(
        ["bash", LOCAL, "2", "alignx", "train", *TRAIN, *STEPS, f"--config.workdir={w}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 120
    kids: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        kids = _children(proc.pid)
        if len(kids) == 2 and all(_catches_sigterm(k) for k in kids):  # `alignx` installed its handler
            break
        time.sleep(0.01)
    assert proc.poll() is None and len(kids) == 2, "the processes ended before they could be signalled"
    os.kill(_by_process_id(kids)[1], signal.SIGTERM)
    err = _finish(proc, kids, 240, logdir)
    assert proc.returncode == 0, err[-2000:] + _logs(logdir)
    logs = _logs(logdir)
    assert "SIGTERM received during start-up; nothing to save" in logs and "Traceback" not in logs
    assert not (w / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def sigterm_run(runs):
    """The 12-step run of 2 processes, stopped by a SIGTERM to process 1 after its second step, with a
    copy of its workdir as the stop left it (for a resume on another process count)."""
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
    deadline = time.time() + 420
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    kids = _children(proc.pid)
    assert proc.poll() is None and len(kids) == 2, "the run ended before it could be interrupted"
    os.kill(_by_process_id(kids)[1], signal.SIGTERM)  # the maintenance event of one host
    err = _finish(proc, kids, 180, logdir)
    assert proc.returncode == 0, err[-2000:] + _logs(logdir)
    shutil.copytree(w, d / "sig-copy")
    return {"workdir": w, "copy": d / "sig-copy", "args": args, "logdir": logdir, "stopped": max(_losses(w))}


def test_sigterm_on_one_host_saves_on_all_and_exits_0(runs, sigterm_run):
    """A preemption notice reaches one host: every process saves the same step and exits 0; the same
    command resumes and gives the uninterrupted run's losses."""
    d, w, args, stopped = runs["dir"], sigterm_run["workdir"], sigterm_run["args"], sigterm_run["stopped"]
    assert 2 <= stopped < 12
    # the same step on both processes: one checkpoint, complete (every process wrote its shards)
    assert sorted(int(n) for n in os.listdir(w / "checkpoints") if n.isdigit()) == [stopped]
    assert (w / "checkpoints" / str(stopped) / "params").is_dir()
    logs = _logs(sigterm_run["logdir"])
    assert "rerun the same command to resume" in logs and "Traceback" not in logs
    r = two_processes(["train", *args], runs["cache"], d / "logs-resume")  # the same command
    assert r.returncode == 0, r.stderr[-3000:] + _logs(d / "logs-resume")
    assert f"resuming from {w / 'checkpoints'}/{stopped}" in _logs(d / "logs-resume")
    a, b = _losses(runs["two"]), _losses(w)
    assert sorted(b) == sorted(a)
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])


def test_a_two_process_checkpoint_resumes_on_one_process(runs, sigterm_run):
    """The stopped 2-process run resumed by 1 process (the same 8-device mesh, as after moving to a slice
    of other hosts): each process's data position is shared out, the same global batches follow, and the
    losses are the uninterrupted 2-process run's; the job's row counters add up as before."""
    from alignx_jax.checkpointing import read_meta

    w, stopped = sigterm_run["copy"], sigterm_run["stopped"]
    args = [a for a in sigterm_run["args"] if not a.startswith("--config.workdir=")]
    r = one_process(["train", *args, f"--config.workdir={w}"], runs["cache"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "saved by 2 processes, this run has 1: the data position is shared out" in r.stderr
    a, b = _records(runs["two"]), _records(w)
    assert sorted(b) == sorted(a) == list(range(1, 13))
    for s in range(stopped + 1, 13):
        assert abs(a[s]["loss"] - b[s]["loss"]) < 1e-4, (s, a[s]["loss"], b[s]["loss"])
        assert a[s]["rows_truncated"] == b[s]["rows_truncated"], s
    procs = read_meta(str(runs["two"] / "checkpoints"), 12)["processes"]
    one = read_meta(str(w / "checkpoints"), 12)
    assert "processes" not in one and one["loader"]["shard_count"] == 1
    assert one["loader"]["rows_seen"] == sum(p["loader"]["rows_seen"] for p in procs)
    assert one["loader"]["position"] == sum(p["loader"]["position"] for p in procs)


def test_a_workdir_in_use_stops_every_process_with_one_line(tmp_path):
    """Process 0 finds the workdir's lock held by a live `alignx train` (here this test's process): both
    processes stop at once, process 0 naming the holder and process 1 pointing at it (process 1 waited in
    the next collective until gloo's deadline, a 56-line traceback)."""
    from alignx_jax.workdir import WorkdirLock

    w = tmp_path / "w"
    w.mkdir()
    lock = WorkdirLock(str(w))
    lock.acquire()
    try:
        r = two_processes(
            ["train", *TRAIN, "--config.train.steps=1", f"--config.workdir={w}"],
            str(tmp_path / "cache"),
            tmp_path / "logs",
            timeout=240,
        )
    finally:
        lock.release()
    logs = _logs(tmp_path / "logs")
    assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
    assert f"is in use by alignx train pid {os.getpid()}" in logs
    assert "preparing the workdir failed on process 0 (its log has the error line)" in logs


def test_pairs_that_do_not_split_over_the_processes_are_one_line(tmp_path):
    """`launch/local.sh 2 alignx train --config=configs/tiny_cpu.py`: its 4-pair microbatches over fsdp=8
    (one process replicates them) cannot be split between 2 processes: one line on each, exit 1."""
    w = tmp_path / "w"
    r = two_processes(
        ["train", f"--config={TINY}", f"--config.workdir={w}", "--config.train.steps=1"],
        str(tmp_path / "cache"),
        tmp_path / "logs",
    )
    logs = _logs(tmp_path / "logs")
    want = (
        "alignx: error: a microbatch's 4 pairs (rows) do not split over the mesh's data*fsdp=8 batch shards "
        "of 2 processes; make train.micro_batch a multiple of 8"
    )
    assert r.returncode == 1 and logs.count(want) == 2 and "Traceback" not in logs, r.stderr[-2000:] + logs
    assert not w.exists()  # refused before the workdir was taken (it held a lock and synthetic data)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_before_the_workdir(tmp_path):
    """train.global_batch=6 in microbatches of 3 over 2 processes: 3 pairs a process are no whole number of
    its 2 microbatches. One line on each process, exit 1, and the workdir never created (it was refused after
    process 0 took it and wrote the synthetic users there)."""
    w = tmp_path / "w"
    r = two_processes(
        [
            "train",
            *TRAIN,
            "--config.train.steps=1",
            "--config.train.global_batch=6",
            "--config.train.micro_batch=3",
            f"--config.workdir={w}",
        ],
        str(tmp_path / "cache"),
        tmp_path / "logs",
        timeout=240,
    )
    logs = _logs(tmp_path / "logs")
    want = "alignx: error: train.global_batch=6 must split evenly over 2 processes and 2 microbatches"
    assert r.returncode == 1 and logs.count(want) == 2 and "Traceback" not in logs, r.stderr[-2000:] + logs
    assert not w.exists()


def test_a_packed_run_whose_tensor_axis_spans_the_processes_is_refused_before_the_workdir(tmp_path):
    """data.packing on mesh.tensor=8 over 2 processes of 4 devices: its one batch shard cannot be split
    between them. One line on each, exit 1, and no workdir (packed rows skipped the start-up check: the line
    came at the first step, after the reference, config.json and the synthetic users were written)."""
    w = tmp_path / "w"
    r = two_processes(
        [
            "train",
            *TRAIN,
            *MP_MODES.SHARED,
            "--config.data.packing=true",
            "--config.train.steps=1",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=1",
            "--config.mesh.tensor=8",
            f"--config.workdir={w}",
        ],
        str(tmp_path / "cache"),
        tmp_path / "logs",
        timeout=240,
    )
    logs = _logs(tmp_path / "logs")
    want = (
        "alignx: error: the mesh's data*fsdp=1 batch shards do not split over 2 processes: make "
        "mesh.data*mesh.fsdp a multiple of 2 (mesh.tensor must not span processes)"
    )
    assert r.returncode == 1 and logs.count(want) == 2 and "Traceback" not in logs, r.stderr[-2000:] + logs
    assert not w.exists()


def test_a_pba_head_over_an_fsdp_axis_across_processes_fits_like_one_process(tmp_path):
    """`pba.mode=two_stage`, `pba.preference=mix` on `mesh.fsdp=8` over 2 processes (tiny_pba.py's own
    fsdp=-1 mesh, as a pod's): the backbone's pooled persona features come back sharded over both processes'
    devices and every process gathers them (fetched as they were, they were a RuntimeError on every process:
    in the first-stage P~ at start-up, and in the two-stage head after the last step). The losses, P~ and
    the final head's metrics are one 8-device process's."""
    cache = str(tmp_path / "cache")
    args = [
        f"--config={MP_MODES.TINY_PBA}",
        *MP_MODES.TRAIN,
        *MP_MODES.PBA,
        *MP_MODES.SHORT,
        "--config.pba.mode=two_stage",
        "--config.pba.preference=mix",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=8",
        "--config.mesh.tensor=1",
        "--config.train.micro_batch=8",
    ]
    r = two_processes(["train", *args, f"--config.workdir={tmp_path / 'two'}"], cache, tmp_path / "logs")
    logs = _logs(tmp_path / "logs")
    assert r.returncode == 0 and "Traceback" not in logs, r.stderr[-2000:] + logs
    r = one_process(["train", *args, f"--config.workdir={tmp_path / 'one'}"], cache)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2]
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) < 1e-4, (s, a[s]["loss"], b[s]["loss"])
    for k in ("head_accuracy", "head_accuracy_non_neutral", "head_loss"):  # the two-stage head, last step
        assert abs(a[2][k] - b[2][k]) < 1e-4, (k, a[2][k], b[2][k])
    np.testing.assert_array_equal(
        np.load(tmp_path / "two" / "pba_predicted.npy"), np.load(tmp_path / "one" / "pba_predicted.npy")
    )
    assert (tmp_path / "two" / "checkpoints" / "2" / "head").is_dir()


def test_a_step_one_process_cannot_read_is_given_up_by_all(runs):
    """A checkpoint file only process 1 reads is cut short: both processes give that step up together
    (moved to checkpoints.bad/), resume from the step before and end with the uninterrupted losses (the
    process that read its files waited in orbax's barrier and verify_tree's collectives for ever)."""
    d = runs["dir"]
    w = d / "cut"
    args = [*TRAIN, "--config.train.steps=4", "--config.checkpoint.every_steps=2", f"--config.workdir={w}"]
    r = two_processes(["train", *args], runs["cache"], d / "logs-cut1")
    assert r.returncode == 0, r.stderr[-3000:] + _logs(d / "logs-cut1")
    before = _losses(w)
    own = [p for p in (w / "checkpoints" / "4" / "params").glob("ocdbt.process_1/d/*") if p.is_file()]
    assert own, sorted(str(p) for p in (w / "checkpoints" / "4").rglob("*"))
    biggest = max(own, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    # the metrics of steps 3-4 go with the step, as after any fallback
    r = two_processes(["train", *args], runs["cache"], d / "logs-cut2", timeout=300)
    logs = _logs(d / "logs-cut2")
    assert r.returncode == 0, r.stderr[-3000:] + logs
    assert "resuming from step 2" in logs and "Traceback" not in logs, logs
    assert [p.name.split(".")[0] for p in (w.parent / "cut" / "checkpoints.bad").iterdir()] == ["4"]
    after = _losses(w)
    assert sorted(after) == sorted(before) == [1, 2, 3, 4]
    for s in before:
        assert abs(before[s] - after[s]) < 1e-6, (s, before[s], after[s])


def test_generate_writes_once_and_a_refusal_on_process_0_stops_every_process(runs, exported, tmp_path):
    """`launch/local.sh 2 alignx generate --out`: each row once (every process wrote it); an --out only
    process 0 writes and refuses (eval's results file, export's folder) ends both processes with one line
    at once (the other used to wait in a collective, or exit 0)."""
    from alignx_jax.data.synth import generate_world, write_world

    data = tmp_path / "syn"
    write_world(generate_world(4, 2, seed=0), str(data))
    r = two_processes(
        ["generate", "--model", str(exported["hf2"]), "--benchmark", f"alignx={data / 'data.parquet'}"]
        + ["--limit", "4", "--max-new-tokens", "4", "--greedy", "--out", str(tmp_path / "g.jsonl")],
        runs["cache"],
        tmp_path / "logs-gen",
    )
    assert r.returncode == 0, r.stderr[-3000:] + _logs(tmp_path / "logs-gen")
    rows = [json.loads(x) for x in open(tmp_path / "g.jsonl")]
    assert sorted(x["index"] for x in rows) == sorted({x["index"] for x in rows}) and len(rows) == 4
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for name, argv in (
        ("export", ["export", "--checkpoint", str(runs["two"]), "--out", str(foreign)]),
        (
            "eval",
            ["eval", "--model", str(exported["hf2"]), "--benchmark", f"alignx={data / 'data.parquet'}"]
            + ["--limit", "2", "--out", "/proc/no/such/results.json"],
        ),
    ):
        logdir = tmp_path / f"logs-{name}"
        r = two_processes(argv, runs["cache"], logdir, timeout=120)
        logs = _logs(logdir)
        assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
        assert logs.count("alignx: error:") == 2 and "failed on process 0" in logs, logs
    assert os.listdir(foreign) == ["notes.txt"]


def _on_own_disks(tmp_path, argv, cache, logdir, timeout=300) -> subprocess.CompletedProcess:
    """`launch/local.sh 2` of `alignx ARGV`, each process in its own folder tmp_path/host<i> (the local
    disk of its host: a relative path names another file on each)."""
    wrap = tmp_path / "on_own_disk.py"
    wrap.write_text(
        "import os, sys\n"
        "os.chdir(os.path.join(sys.argv[1], 'host' + os.environ['ALIGNX_PROCESS_ID']))\n"
        "from alignx_jax.cli import main\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )
    env = dict(_env(cache), DEVICES_PER_PROCESS="1", LOGDIR=str(logdir), KILL_AFTER="5")
    return subprocess.run(
        ["bash", LOCAL, "2", "python", str(wrap), str(tmp_path), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_an_out_file_on_another_hosts_disk_is_process_0s_to_judge(tmp_path, tiny_hf_checkpoints):
    """eval --out and predict-preferences --out are written by process 0 alone, so its disk decides whether
    the file there may be replaced, for every process: a foreign file on process 0's disk stops both in one
    line each (process 1 went on to the model), and one on process 1's disk (where nothing is written) is
    no reason to stop (process 1 refused alone; process 0 waited in a collective until JAX's timeout)."""
    cache = str(tmp_path / "cache")
    for i in (0, 1):
        (tmp_path / f"host{i}").mkdir()
    (tmp_path / "host0" / "r.json").write_text("my notes\n")
    bench = ["--benchmark", f"p-soups={PSOUPS}", "--method", "none", "--limit", "2", "--max-length", "64"]
    no_model = str(tmp_path / "no_model")
    for name, argv in (
        ("eval", ["eval", "--model", no_model, *bench, "--out", "r.json"]),
        ("predict", ["predict-preferences", "--model", no_model, "--data", PSOUPS, "--out", "r.json"]),
    ):
        r = _on_own_disks(tmp_path, argv, cache, tmp_path / f"logs-{name}")
        logs = _logs(tmp_path / f"logs-{name}")
        assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
        assert "exists and is not" in logs and "--out failed on process 0" in logs, logs
        assert "no_model" not in logs, logs  # neither process went on to the model
    (tmp_path / "host0" / "r.json").rename(tmp_path / "host1" / "r.json")
    model = tiny_hf_checkpoints["qwen2"]
    r = _on_own_disks(
        tmp_path, ["eval", "--model", model, *bench, "--out", "r.json"], cache, tmp_path / "logs"
    )
    logs = _logs(tmp_path / "logs")
    assert r.returncode == 0, r.stderr[-2000:] + logs
    assert json.loads((tmp_path / "host0" / "r.json").read_text())["benchmarks"]
    assert (tmp_path / "host1" / "r.json").read_text() == "my notes\n"


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_eval_without_a_shared_prompt_over_two_processes_gives_one_process_rows(
    tmp_path, tiny_hf_checkpoints
):
    """`launch/local.sh 2 alignx eval --no-share-prompt`: each pair scored as two rows, their log-probs
    sharded over both processes' devices, which every process gathers (fetched as they were, a
    RuntimeError on every process): one 8-device process's rows and results."""
    cache = str(tmp_path / "cache")
    common = ["eval", "--model", tiny_hf_checkpoints["qwen2"], "--benchmark", f"p-soups={PSOUPS}"]
    common += [
        "--method",
        "none",
        "--limit",
        "4",
        "--max-length",
        "64",
        "--batch-size",
        "4",
        "--no-share-prompt",
    ]
    r = one_process(
        [*common, "--per-example", str(tmp_path / "e1.jsonl"), "--out", str(tmp_path / "e1.json")], cache
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = two_processes(
        [*common, "--per-example", str(tmp_path / "e2.jsonl"), "--out", str(tmp_path / "e2.json")],
        cache,
        tmp_path / "logs",
        timeout=300,
    )
    logs = _logs(tmp_path / "logs")
    assert r.returncode == 0 and "Traceback" not in logs, r.stderr[-2000:] + logs
    one, two = json.load(open(tmp_path / "e1.json")), json.load(open(tmp_path / "e2.json"))
    assert two["benchmarks"] == one["benchmarks"] and not two["share_prompt"]
    rows1 = {(x["persona"], x["index"]): x for x in map(json.loads, open(tmp_path / "e1.jsonl"))}
    rows2 = {(x["persona"], x["index"]): x for x in map(json.loads, open(tmp_path / "e2.jsonl"))}
    assert sorted(rows2) == sorted(rows1) and len(rows1) == 4
    for k, want in rows1.items():
        for f in ("logp_chosen", "logp_rejected"):
            assert abs(rows2[k][f] - want[f]) < 1e-4, (k, f, rows2[k][f], want[f])


def test_an_export_folder_process_0_cannot_write_stops_every_process_before_the_read(tmp_path):
    """`launch/local.sh 2 alignx export --out` beside which process 0 cannot make its folder (here under
    /proc): one line on each process, exit 1 on both, before the checkpoint is read (process 0 failed
    after reading it, its write refused, while process 1 had exited 0)."""
    cache, w = str(tmp_path / "cache"), tmp_path / "w"
    r = one_process(["train", *TRAIN, "--config.train.steps=1", f"--config.workdir={w}"], cache)
    assert r.returncode == 0, r.stderr[-3000:]
    out = "/proc/alignx-no-export"
    r = two_processes(["export", "--checkpoint", str(w), "--out", out], cache, tmp_path / "logs", timeout=120)
    logs = _logs(tmp_path / "logs")
    assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
    assert "process 1 exited with status 1" in r.stderr, r.stderr[-2000:]
    assert f"alignx: error: --out {out}: export failed (" in logs and f"{out} is unchanged" in logs, logs
    assert "--out failed on process 0 (its log has the error line)" in logs, logs
    assert logs.count("alignx: error:") == 2, logs


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_a_per_example_write_that_fails_on_process_0_stops_every_process(tmp_path, tiny_hf_checkpoints):
    """`launch/local.sh 2 alignx eval --per-example` whose second batch process 0 cannot append (a full
    disk): both processes stop there with one line each, exit 1 (process 1 went on to the next batch's
    collective, where both waited until JAX's shutdown barrier aborted them minutes later)."""
    rows = tmp_path / "rows.jsonl"
    argv = ["eval", "--model", tiny_hf_checkpoints["qwen2"], "--benchmark", f"p-soups={PSOUPS}"]
    argv += ["--method", "none", "--limit", "3", "--batch-size", "1", "--max-length", "64"]
    argv += ["--per-example", str(rows), "--out", str(tmp_path / "r.json")]
    r, logs = _launch_patched_cli(tmp_path, FULL_DISK_ON_PROCESS_0, argv, FULL="1")
    assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
    # on its own, not stopped by local.sh (which may then stop process 0, still shutting down, after its line)
    assert "process 1 exited with status 1" in r.stderr, r.stderr[-2000:]
    assert "alignx: error: eval: [Errno 28] No space left on device" in logs, logs
    assert "alignx: error: --per-example failed on process 0 (its log has the error line)" in logs, logs
    assert len(rows.read_text().splitlines()) == 1  # the first batch's row, for a resume
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_a_sigterm_stops_a_multi_process_eval_at_once(tmp_path, tiny_hf_checkpoints):
    """SIGTERM to every process of `launch/local.sh 2 alignx eval` (a pod's stop) after its first batch:
    each stops at once, exit 143, one line each (jax.distributed.initialize's preemption notifier had taken
    SIGTERM over from `alignx`'s handler: the eval ran to its end and exited 0)."""
    then_stop = (
        "import os, signal\n"
        "from alignx_jax.evaluate import results\n"
        "append = results.PerExampleLog.append\n"
        "def then_stop(self, rows):\n"
        "    append(self, rows)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "results.PerExampleLog.append = then_stop\n"
    )
    rows = tmp_path / "rows.jsonl"
    argv = ["eval", "--model", tiny_hf_checkpoints["qwen2"], "--benchmark", f"p-soups={PSOUPS}"]
    argv += ["--method", "none", "--limit", "3", "--batch-size", "1", "--max-length", "64"]
    argv += ["--per-example", str(rows), "--out", str(tmp_path / "r.json")]
    r, logs = _launch_patched_cli(tmp_path, then_stop, argv)
    assert r.returncode == 143 and "Traceback" not in logs, r.stderr[-2000:] + logs
    assert logs.count("alignx: stopped by SIGTERM; rerun the same command to resume or redo it") == 2, logs
    assert len(rows.read_text().splitlines()) == 1 and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_a_generate_row_write_that_fails_on_process_0_stops_every_process(tmp_path, tiny_hf_checkpoints):
    """`launch/local.sh 2 alignx generate --benchmark --out` whose second batch process 0 cannot append (a
    full disk): both stop there, one line each, exit 1 (process 1 generated every other row and exited 0,
    while process 0 waited for it in JAX's shutdown barrier). The rows to generate are process 0's, whose
    --out decides: a resume on another host's disk generates the same batches on every process."""
    out = tmp_path / "g.jsonl"
    argv = ["generate", "--model", tiny_hf_checkpoints["qwen2"], "--benchmark", f"p-soups={PSOUPS}"]
    argv += ["--limit", "3", "--batch-size", "1", "--max-new-tokens", "2", "--greedy", "--out", str(out)]

    def launch(name: str, **extra: str) -> tuple[subprocess.CompletedProcess, str]:
        return _launch_patched_cli(tmp_path, FULL_DISK_ON_PROCESS_0, argv, name, **extra)

    r, logs = launch("logs-full", FULL="1")
    assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
    # on its own, not stopped by local.sh (which may then stop process 0, still shutting down, after its line)
    assert "process 1 exited with status 1" in r.stderr, r.stderr[-2000:]
    assert "alignx: error: --out failed on process 0 (its log has the error line)" in logs, logs
    assert "No space left on device" in logs, logs
    assert len(out.read_text().splitlines()) == 1  # the first batch's row
    r, logs = launch("logs-resume")  # the rest, once, by both processes together
    assert r.returncode == 0, r.stderr[-2000:] + logs
    assert f"{out}: 2 rows generated, 3 in all" in logs, logs
    assert len({json.loads(x)["index"] for x in out.read_text().splitlines()}) == 3


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_synth_and_split_refuse_a_multi_process_job_on_every_process(tmp_path):
    """`launch/local.sh 2 alignx synth` and `... data split` wrote the same files from both processes at
    once: each process refuses in one line, exit 1, nothing written (a process the launcher stopped after
    the other's refusal, before it reached its own check, says that in its one line)."""
    cache = str(tmp_path / "cache")
    for name, argv in (
        ("synth", ["synth", "--out", str(tmp_path / "synth"), "--users", "2"]),
        ("data split", ["data", "split", PSOUPS, "--out", str(tmp_path / "split")]),
    ):
        logdir = tmp_path / f"logs-{name.replace(' ', '-')}"
        r = two_processes(argv, cache, logdir, timeout=120)
        logs = _logs(logdir)
        assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
        line = f"alignx: error: alignx {name} runs as one process and this one is part of a multi-process job"
        stopped = logs.count("alignx: stopped by SIGTERM")
        assert logs.count(line) >= 1 and logs.count(line) + stopped == 2, logs
    assert not (tmp_path / "synth").exists() and not (tmp_path / "split").exists()


# the final write of eval --out (paths.write_all) and of export (its rename into place) fails on process 0 (a
# full disk)
LAST_WRITE_FAILS_ON_PROCESS_0 = (
    "import errno, os\n"
    "from alignx_jax import distributed\n"
    "distributed.initialize_from_env()\n"
    "from alignx_jax import export, paths\n"
    "def full(*args, **kwargs):\n"
    "    if os.environ['ALIGNX_PROCESS_ID'] == '0':\n"
    "        raise OSError(errno.ENOSPC, 'No space left on device', 'the-full-disk')\n"
    "paths.write_all = export._publish = full\n"
)


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_a_last_write_that_fails_on_process_0_fails_every_process(tmp_path, tiny_hf_checkpoints):
    """`launch/local.sh 2 alignx eval --out` and `... export` whose final write process 0 cannot make (a full
    disk): one line on each process, exit 1 on both (process 0 failed while process 1 exited 0)."""
    ckpt = tmp_path / "ckpt"
    r = one_process(["import", "--hf", tiny_hf_checkpoints["qwen2"], "--out", str(ckpt)], str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr[-2000:]
    bench = ["--benchmark", f"p-soups={PSOUPS}", "--method", "none", "--limit", "2", "--max-length", "64"]
    for name, argv, line in (
        (
            "eval",
            ["eval", "--model", tiny_hf_checkpoints["qwen2"], *bench, "--out", str(tmp_path / "r.json")],
            "alignx: error: the-full-disk: No space left on device",
        ),
        (
            "export",
            ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")],
            f"alignx: error: --out {tmp_path / 'hf'}: export failed (No space left on device: the-full-disk)",
        ),
    ):
        r, logs = _launch_patched_cli(tmp_path, LAST_WRITE_FAILS_ON_PROCESS_0, argv, f"logs-{name}")
        assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
        # on its own, not stopped by local.sh after process 0 failed
        assert "process 1 exited with status 1" in r.stderr, r.stderr[-2000:]
        assert line in logs, logs
        assert "alignx: error: --out failed on process 0 (its log has the error line)" in logs, logs
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "hf").exists()


def test_a_data_file_one_host_lacks_stops_every_process_before_the_workdir(tmp_path):
    """`launch/local.sh 2 alignx train` whose data.train is on process 0's disk only: both processes stop
    with one line each, exit 1, before the workdir is taken (process 1 refused alone; process 0 took the
    workdir and waited for it in the next collective)."""
    for i in (0, 1):
        (tmp_path / f"host{i}").mkdir()
    (tmp_path / "host0" / "rows.jsonl").write_text("")  # only its existence is checked before the join
    argv = ["train", *TRAIN, "--config.train.steps=1", "--config.workdir=w", "--config.data.train=rows.jsonl"]
    r = _on_own_disks(tmp_path, argv, str(tmp_path / "cache"), tmp_path / "logs", timeout=120)
    logs = _logs(tmp_path / "logs")
    assert r.returncode == 1 and "Traceback" not in logs, r.stderr[-2000:] + logs
    assert "process 0 exited with status 1" in r.stderr and "process 1 exited with status 1" in r.stderr
    assert "rows.jsonl: no such file or folder" in logs, logs
    assert "alignx: error: checking the input paths failed on process 1 (its log has the error line)" in logs
    assert not (tmp_path / "host0" / "w").exists() and not (tmp_path / "host1" / "w").exists()


@pytest.mark.skipif(not os.path.isfile(PSOUPS), reason="P-SOUPS file not available")
def test_a_sigterm_to_one_process_of_an_eval_is_one_line_on_the_other(tmp_path, tiny_hf_checkpoints):
    """SIGTERM to process 1 alone of a 2-process `alignx eval` (one host of a pod stopped) after its first
    batch: process 1 stops (143), process 0, whose next collective loses its peer, says so in one line and
    exits 1 at once (a 50-line gloo traceback, then JAX's shutdown barrier aborted it minutes later). Started
    without launch/local.sh, which would stop process 0 itself."""
    wrap = tmp_path / "stop_process_1.py"
    wrap.write_text(
        "import os, signal, sys\n"
        "from alignx_jax.evaluate import results\n"
        "append = results.PerExampleLog.append\n"
        "def then_stop(self, rows):\n"
        "    append(self, rows)\n"
        "    if os.environ['ALIGNX_PROCESS_ID'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "results.PerExampleLog.append = then_stop\n"
        "from alignx_jax.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["eval", "--model", tiny_hf_checkpoints["qwen2"], "--benchmark", f"p-soups={PSOUPS}"]
    argv += ["--method", "none", "--limit", "3", "--batch-size", "1", "--max-length", "64"]
    argv += ["--per-example", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "r.json")]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(str(tmp_path / "cache"), 1), ALIGNX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
    env.update(ALIGNX_NUM_PROCESSES="2", ALIGNX_CPU_COLLECTIVES="gloo")
    procs = [
        subprocess.Popen(
            [sys.executable, str(wrap), *argv],
            env=dict(env, ALIGNX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in (0, 1)
    ]
    try:
        (_, err0), (_, err1) = (p.communicate(timeout=90) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[1].returncode == 143, err1[-2000:]
    assert "alignx: stopped by SIGTERM" in err1, err1[-2000:]
    assert procs[0].returncode == 1 and "Traceback" not in err0, err0[-3000:]
    lines = [ln for ln in err0.splitlines() if "alignx" in ln]
    assert len(lines) == 1 and lines[0].startswith("alignx eval: another process of the job stopped ("), err0
    assert "Gloo" in lines[0] and not (tmp_path / "r.json").exists()
