"""launch/*.sh: argument handling and the commands they generate (--dry-run); launch/local.sh's process
handling (exit status, logs, signal forwarding) with stand-in processes. Real multi-process runs:
tests/test_multiprocess.py."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, "launch", "gpu_host.sh")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "gpu_multihost.sh")
LOCAL = os.path.join(ROOT, "launch", "local.sh")
GPU_SMOKE = os.path.join(
    ROOT, "scripts", "gpu_smoke.sh"
)  # the CLI end to end on a GPU (BENCHMARKS.md section 8)


def _run(script, *args, env=None):
    return subprocess.run(
        ["bash", script, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, **(env or {})),
    )


@pytest.mark.parametrize("script", [GPU, TPU, SLURM, LOCAL, GPU_SMOKE], ids=os.path.basename)
def test_scripts_are_executable_and_help_prints_their_header(script):
    """README runs them as `launch/NAME.sh ...`: executable in the checkout (git keeps the mode)."""
    assert os.access(script, os.X_OK), f"{script} is not executable (git update-index --chmod=+x)"
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    with open(script, encoding="utf-8") as f:
        second_line = f.read().splitlines()[1].lstrip("# ")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == second_line, (r.returncode, r.stdout[:200])


def _last_command(out: str) -> list[str]:
    return shlex.split(out.strip().splitlines()[-1])


def test_gpu_dry_run_prints_env_and_command():
    r = _run(
        GPU,
        "--dry-run",
        "configs/llama3_8b_ica_gpu.py",
        "--config.workdir=runs/a b",
        "--config.model.hf_path=/m",
        env={"PYTHON": "/opt/py"},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    env = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    flags = env["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert all(f.startswith("--xla_gpu_") for f in flags)
    # forcing cuBLAS for every gemm made the 1B step slower on an H200 (BENCHMARKS.md section 8)
    assert not any(f.startswith("--xla_gpu_enable_triton_gemm") for f in flags)
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) > 0.75
    assert _last_command(r.stdout) == [
        "/opt/py",
        "-m",
        "alignx_jax",
        "train",
        "--config=configs/llama3_8b_ica_gpu.py",
        "--config.workdir=runs/a b",
        "--config.model.hf_path=/m",
    ]


def test_gpu_extra_flags_and_dry_run_anywhere():
    r = _run(GPU, "configs/x.py", "--dry-run", env={"ALIGNX_EXTRA_XLA_FLAGS": "--xla_dump_to=/tmp/d"})
    assert r.returncode == 0, r.stderr
    assert "--xla_dump_to=/tmp/d" in r.stdout
    assert _last_command(r.stdout)[-1] == "--config=configs/x.py"


@pytest.mark.parametrize("script, args", [(GPU, ()), (SLURM, ("--nodes", "2"))], ids=["gpu_host", "slurm"])
def test_gpu_a_callers_xla_flags_are_replaced_with_a_warning(script, args):
    """They were dropped without a word; ALIGNX_EXTRA_XLA_FLAGS is the way to add flags."""
    r = _run(script, "--dry-run", *args, "configs/x.py", env={"XLA_FLAGS": "--xla_dump_to=/tmp/d"})
    assert r.returncode == 0, r.stderr
    assert "--xla_dump_to" not in r.stdout
    name = os.path.basename(script)
    assert r.stderr == (
        f"{name}: warning: XLA_FLAGS from the environment is replaced; give extra flags in ALIGNX_EXTRA_XLA_FLAGS\n"
    )
    quiet = _run(script, "--dry-run", *args, "configs/x.py", env={"XLA_FLAGS": ""})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "usage"),
        (("--dry-run",), "usage"),
        (("--dry-run", "--config.train.steps=3"), "config file"),
        (("--dry-run", "configs/x.py", "steps=3"), "--config.KEY=VALUE"),
        (("configs/does_not_exist.py",), "not found"),
    ],
)
def test_gpu_bad_arguments(args, message):
    r = _run(GPU, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_tpu_dry_run_copies_installs_and_trains_on_all_workers():
    r = _run(
        TPU,
        "--dry-run",
        "--run-name",
        "r1",
        "my-tpu",
        "us-east5-a",
        "configs/llama3_8b_pba_tpu_v5p_64.py",
        "--config.workdir=gs://b/run 1",
        "--config.data.train=/mnt/d",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    mkdir, scp, ssh = (shlex.split(ln) for ln in lines)
    assert mkdir[-1] == "--command=mkdir -p alignx-jax"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[-1] == "my-tpu:alignx-jax/" and "--zone=us-east5-a" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))[len("--command=") :]
    parts = [shlex.split(p) for p in remote.split(" && ")]
    assert parts[0] == ["cd", "alignx-jax"]
    # a virtualenv, created once; pip only when pyproject.toml changed since the last install
    assert "python3 -m venv .venv" in remote and "cmp -s pyproject.toml .venv/alignx-installed.toml" in remote
    assert any(p[:3] == [".venv/bin/pip", "install", "-q"] and "jax[tpu]" in p for p in parts)
    assert not any(p[:1] == ["python3"] and "pip" in p for p in parts)  # never the system Python's pip
    # detached, one log per worker under logs/<run name>
    detached = remote[remote.index("{ nohup ") :]
    assert "> logs/r1/worker-$(hostname).log 2>&1 < /dev/null &" in detached
    assert "echo $! > logs/r1/worker-$(hostname).pid" in detached
    train = shlex.split(detached[len("{ nohup ") : detached.index(" > logs/r1/")])
    assert train == [
        ".venv/bin/python",
        "-m",
        "alignx_jax",
        "train",
        "--config=configs/llama3_8b_pba_tpu_v5p_64.py",
        "--config.workdir=gs://b/run 1",
        "--config.data.train=/mnt/d",
        "--config.train.distributed=true",
    ]


def test_tpu_options():
    r = _run(
        TPU,
        "--dry-run",
        "--no-copy",
        "--no-install",
        "--repo-dir",
        "src/ax",
        "--project=p1",
        "--run-name=x",
        "t",
        "z",
        "configs/c.py",
        "--config.workdir=gs://b/w",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "--project=p1" in shlex.split(lines[0])
    remote = next(a for a in shlex.split(lines[0]) if a.startswith("--command="))
    assert "pip" not in remote and "-m venv" not in remote
    assert remote.startswith(
        "--command=cd src/ax && mkdir -p logs/x && { nohup .venv/bin/python -m alignx_jax train"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("--dry-run", "t", "z"), "usage"),
        (("--dry-run", "--bogus", "t", "z", "c.py"), "unknown option"),
        (("--dry-run", "t", "--config.a=1", "z", "c.py"), "before the overrides"),
        (("--dry-run", "t", "z", "c.py", "extra"), "--config.KEY=VALUE"),
        (("--dry-run", "t", "z", "c.py"), "gs://"),
        (("--dry-run", "t", "z", "c.py", "--config.workdir=runs/w"), "local path"),
        (("--dry-run", "--run-name", "a b", "t", "z", "c.py"), "run names"),
        (("--dry-run", "--logs", "r", "t"), "usage"),
        (("--dry-run", "--stop=", "t", "z"), "--stop needs the run's name"),
        (("--dry-run", "t", "z", "elsewhere/c.py", "--config.workdir=gs://b/r"), "a path under configs/"),
        (("--dry-run", "t", "z", "configs/nope.py", "--config.workdir=gs://b/r"), "no such config"),
        # an option of another mode is refused, not dropped: a run starts on every worker, --logs follows NAME
        (
            ("--dry-run", "--worker", "3", "t", "z", "configs/c.py", "--config.workdir=gs://b/r"),
            "--worker applies to --logs and --stop",
        ),
        (("--dry-run", "--logs", "a", "--run-name", "b", "t", "z"), "--run-name applies to starting a run"),
        (
            ("--dry-run", "--no-copy", "--stop=a", "t", "z"),
            "--no-copy applies to starting a run, not to --stop",
        ),
        (("--dry-run", "--attach", "a", "--stop", "a", "t", "z"), "one of --logs/--attach and --stop"),
        (("--dry-run", "--repo-dir=", "--logs", "r", "t", "z"), "--repo-dir is a folder on the workers"),
        (("--dry-run", "--repo-dir", "~bob/ax", "--stop", "r", "t", "z"), "got '~bob/ax'"),
        (
            ("--dry-run", "--repo-dir", "my ax", "t", "z", "configs/c.py"),
            "scp may split others), got 'my ax'",
        ),
        (("--dry-run", "--repo-dir=a;b", "--logs", "r", "t", "z"), "got 'a;b'"),
    ],
)
def test_tpu_bad_arguments(args, message):
    r = _run(TPU, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def _documented(text: str, script: str, comments: bool = False) -> list[list[str]]:
    """Every `launch/<script> ...` command of a text (a README, or a script's comments), continuation
    lines joined."""
    lines = text.splitlines()
    if comments:
        lines = [re.sub(r"^#\s?", "", ln) if ln.startswith("#") else "" for ln in lines]
    out = []
    for i, ln in enumerate(lines):
        m = re.search(rf"launch/{re.escape(script)}\s(.*)", ln)
        if not m or "[" in m.group(1).split("--config.")[0]:  # usage lines: [--dry-run] ...
            continue
        cmd = m.group(1)
        while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
        out.append(shlex.split(cmd.split("   #")[0]))
    return out


def test_documented_tpu_commands_dry_run_with_a_bucket_workdir():
    docs = {"launch/tpu_pod.sh": _documented(open(TPU).read(), "tpu_pod.sh", comments=True)}
    readme = os.path.join(ROOT, "README.md")
    if os.path.isfile(readme):
        docs["README.md"] = _documented(open(readme).read(), "tpu_pod.sh")
    found = 0
    for where, commands in docs.items():
        for args in commands:
            if any(a.startswith(("--logs", "--stop", "--attach")) for a in args):
                continue
            r = _run(TPU, "--dry-run", *args)
            assert r.returncode == 0, (where, args, r.stderr)
            workdirs = [a for a in args if a.startswith("--config.workdir=")]
            assert workdirs and workdirs[0].startswith("--config.workdir=gs://"), (where, args)
            assert workdirs[0] in r.stdout.replace("\\", "")
            found += 1
    assert found >= 1


def test_tpu_repo_dir_under_the_home_folder_is_one_folder_for_ssh_and_scp():
    """`--repo-dir ~/ax`: scp copied to the home's ax/ while ssh's shell-quoted `\\~/ax` ran in a folder named ~."""
    r = _run(
        TPU, "--dry-run", "--repo-dir", "~/ax", "t", "z", "configs/tiny_cpu.py", "--config.workdir=gs://b/w"
    )
    assert r.returncode == 0, r.stderr
    mkdir, scp, start = (shlex.split(ln) for ln in r.stdout.strip().splitlines())
    assert mkdir[-1] == "--command=mkdir -p ax" and scp[-1] == "t:ax/"
    assert start[-1].startswith("--command=cd ax && ")


def test_tpu_logs_and_stop():
    r = _run(TPU, "--dry-run", "--repo-dir=ax", "--attach", "r1", "t", "z")
    assert r.returncode == 0, r.stderr
    cmd = _last_command(r.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t"] and "--worker=all" in cmd
    assert cmd[-1] == "--command=tail -n 100 -F ax/logs/r1/worker-*.log"
    r = _run(TPU, "--dry-run", "--worker", "3", "--logs", "r1", "t", "z")
    assert "--worker=3" in _last_command(r.stdout)
    r = _run(TPU, "--dry-run", "--worker=2", "--stop", "r1", "t", "z")
    assert r.returncode == 0 and "--worker=2" in _last_command(r.stdout), r.stderr
    r = _run(TPU, "--dry-run", "--stop", "r1", "t", "z")
    assert r.returncode == 0, r.stderr
    assert _last_command(r.stdout)[-1].startswith(
        "--command=kill -TERM $(cat alignx-jax/logs/r1/worker-$(hostname).pid)"
    )


def test_slurm_dry_run_one_process_per_host():
    r = _run(
        SLURM,
        "--dry-run",
        "--nodes",
        "4",
        "--partition=gpu",
        "--logdir",
        "/shared/logs",
        "configs/llama3_8b_ica_gpu.py",
        "--config.workdir=/shared/runs/a b",
        env={"PYTHON": "/opt/py"},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    env = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"  # every GPU of the host, not [SLURM_LOCALID]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
    cmd = _last_command(r.stdout)
    srun = cmd[: cmd.index("/opt/py")]
    assert srun[0] == "srun" and "--nodes=4" in srun and "--ntasks-per-node=1" in srun
    assert "--gpus-per-node=8" in srun and "--partition=gpu" in srun and "--kill-on-bad-exit=1" in srun
    assert "--output=/shared/logs/node-%n.log" in srun
    assert cmd[cmd.index("/opt/py") :] == [
        "/opt/py",
        "-m",
        "alignx_jax",
        "train",
        "--config=configs/llama3_8b_ica_gpu.py",
        "--config.workdir=/shared/runs/a b",
        "--config.train.distributed=true",
    ]


@pytest.mark.parametrize(
    "env, args, want",
    [
        ({"SLURM_GPUS_PER_NODE": "4"}, (), 4),
        ({"SLURM_GPUS_PER_NODE": "h100:4", "GPUS_PER_NODE": "2"}, (), 4),
        ({"GPUS_PER_NODE": "2"}, (), 2),
        ({"SLURM_GPUS_PER_NODE": "4"}, ("--gpus-per-node", "2"), 2),
    ],
    ids=["allocation", "typed-allocation", "env", "flag"],
)
def test_slurm_gpus_per_node_defaults_to_the_allocations(env, args, want):
    """Inside `salloc --gpus-per-node=4` srun must not ask for 8 (it fails on a 4-GPU node)."""
    r = _run(SLURM, "--dry-run", "--nodes", "2", *args, "configs/llama3_8b_ica_gpu.py", env=env)
    assert r.returncode == 0, r.stderr
    env_lines = [shlex.split(ln)[1] for ln in r.stdout.splitlines() if ln.startswith("export ")]
    assert "JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(want))) in env_lines
    assert f"--gpus-per-node={want}" in _last_command(r.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--dry-run", "c.py"), "--nodes"),
        (("--dry-run", "--nodes", "x", "c.py"), "integers"),
        (("--dry-run", "--nodes", "0", "c.py"), "positive integers, got '0'"),
        (("--dry-run", "--nodes", "2", "--gpus-per-node", "0", "c.py"), "positive integers, got '0'"),
        (("--dry-run", "--nodes", "2", "--gpus-per-node", "", "c.py"), "positive integers, got ''"),
        (("--dry-run", "--nodes", "2", "c.py", "steps=3"), "--config.KEY=VALUE"),
        (("--dry-run", "--nodes", "2", "--bogus", "c.py"), "unknown option"),
    ],
)
def test_slurm_bad_arguments(args, message):
    r = _run(SLURM, *args, env={"SLURM_JOB_NUM_NODES": ""})
    assert r.returncode == 2 and message in r.stderr, r.stderr


# ----------------------------------------------------------------------------- launch/local.sh


def test_local_dry_run_names_every_process():
    r = _run(
        LOCAL,
        "--dry-run",
        "3",
        "alignx",
        "train",
        "--config=configs/tiny_cpu.py",
        env={"DEVICES_PER_PROCESS": "2", "LOGDIR": "/tmp/l", "COORDINATOR_PORT": "4567", "PYTHON": "/opt/py"},
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.strip().splitlines() if not ln.startswith("#")]
    assert len(lines) == 3
    for i, ln in enumerate(lines):
        words = shlex.split(ln)
        assert words[-6:] == [">", f"/tmp/l/process_{i}.log", "2>&1", "<", "/dev/null", "&"]  # as launched
        env = dict(w.split("=", 1) for w in words[1:] if "=" in w and not w.startswith("--"))
        assert env["ALIGNX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567"
        assert env["ALIGNX_NUM_PROCESSES"] == "3" and env["ALIGNX_PROCESS_ID"] == str(i)
        assert env["ALIGNX_CPU_COLLECTIVES"] == "gloo"
        assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
        assert words[words.index("/opt/py") :][:5] == [
            "/opt/py",
            "-m",
            "alignx_jax",
            "train",
            "--config=configs/tiny_cpu.py",
        ]


@pytest.mark.parametrize(
    "args, message",
    [
        (("2",), "usage"),
        (("x", "alignx", "train"), "positive integer"),
        (("2", "pyton", "train"), "'alignx' or 'python'"),
        (("2", "python", "train"), "script file"),
        (("00", "alignx", "train"), "at least 1"),
        (("99999999999999999999", "alignx", "train"), "at most 999999"),
    ],
)
def test_local_bad_arguments(args, message):
    r = _run(LOCAL, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.parametrize("devices", ["0", "00", "x", "99999999999999999999"])
def test_local_bad_devices_per_process(devices):
    r = _run(LOCAL, "--dry-run", "2", "alignx", "train", env={"DEVICES_PER_PROCESS": devices})
    assert r.returncode == 2 and "DEVICES_PER_PROCESS must be a positive integer" in r.stderr, r.stderr


@pytest.mark.parametrize("kill_after", ["abc", "-1", "1.5"])
def test_local_bad_kill_after(kill_after):
    r = _run(LOCAL, "--dry-run", "2", "alignx", "train", env={"KILL_AFTER": kill_after})
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"local.sh: KILL_AFTER must be a number of seconds, got '{kill_after}'\n"


@pytest.mark.parametrize("port", ["abc", "0", "08", "70000"])
def test_local_bad_coordinator_port(port):
    r = _run(LOCAL, "--dry-run", "2", "alignx", "train", env={"COORDINATOR_PORT": port})
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"local.sh: COORDINATOR_PORT must be a port number (1-65535), got '{port}'\n"


@pytest.mark.parametrize("python", ["/nonexistent/python", "/bin/false"])
def test_local_an_interpreter_that_cannot_pick_the_port_is_named(tmp_path, python):
    """It ended under set -e: exit 127 after bash's `line 57: ...`, or exit 1 without a word."""
    r = _run(
        LOCAL, "2", "alignx", "train", env={"PYTHON": python, "COORDINATOR_PORT": "", "LOGDIR": str(tmp_path)}
    )
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr
        == f"local.sh: PYTHON '{python}' could not run (give an interpreter with alignx-jax installed)\n"
    )


@pytest.mark.parametrize("n, devices, count", [("08", "08", 8), ("010", "010", 10)])
def test_local_counts_with_leading_zeros_are_decimal(n, devices, count):
    """bash arithmetic reads 08 as a bad octal (no process ran, exit 0) and 010 as 8 (8 processes waiting
    for a 10-process job)."""
    r = _run(LOCAL, "--dry-run", n, "alignx", "train", env={"DEVICES_PER_PROCESS": devices})
    assert r.returncode == 0 and not r.stderr, r.stderr
    lines = [ln for ln in r.stdout.strip().splitlines() if not ln.startswith("#")]
    assert len(lines) == count
    env = dict(w.split("=", 1) for w in shlex.split(lines[-1]) if "=" in w and not w.startswith("--"))
    assert env["ALIGNX_NUM_PROCESSES"] == str(count) and env["ALIGNX_PROCESS_ID"] == str(count - 1)
    assert f"--xla_force_host_platform_device_count={count}" in env["XLA_FLAGS"].split()


def _stand_in(tmp_path, body: str) -> str:
    """A PYTHON for local.sh that runs `body` (bash) instead of alignx."""
    path = tmp_path / "fake_python"
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return str(path)


def test_local_failure_names_the_process_and_its_log(tmp_path):
    fake = _stand_in(
        tmp_path,
        'echo "process $ALIGNX_PROCESS_ID of $ALIGNX_NUM_PROCESSES"\n'
        'if [ "$ALIGNX_PROCESS_ID" = 1 ]; then echo "boom: bad things" >&2; exit 3; fi\n'
        "sleep 30\n",
    )
    t0 = time.time()
    r = _run(
        LOCAL,
        "2",
        "alignx",
        "eval",
        env={"PYTHON": fake, "LOGDIR": str(tmp_path / "logs"), "COORDINATOR_PORT": "1", "KILL_AFTER": "2"},
    )
    assert r.returncode == 3, r.stderr
    assert time.time() - t0 < 20  # the healthy process is stopped, not waited for
    assert "process 1 exited with status 3" in r.stderr and "boom: bad things" in r.stderr
    assert (tmp_path / "logs" / "process_0.log").read_text().startswith("process 0 of 2")


def _wait_until_ready(logs, n: int, seconds: float = 20) -> None:
    """Until each of the n stand-in processes has logged "ready" (its signal traps are set)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if all(
            (logs / f"process_{i}.log").exists() and "ready" in (logs / f"process_{i}.log").read_text()
            for i in range(n)
        ):
            return
        time.sleep(0.05)


def test_local_forwards_sigterm_and_succeeds(tmp_path):
    fake = _stand_in(
        tmp_path,
        "trap 'echo \"TERM in $ALIGNX_PROCESS_ID\"; exit 0' TERM\n"
        'echo "ready $ALIGNX_PROCESS_ID"\n'
        "while :; do sleep 0.1; done\n",
    )
    logs = tmp_path / "logs"
    env = dict(os.environ, PYTHON=fake, LOGDIR=str(logs), COORDINATOR_PORT="1")
    proc = subprocess.Popen(
        ["bash", LOCAL, "2", "alignx", "train"], env=env, stderr=subprocess.PIPE, text=True
    )
    _wait_until_ready(logs, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    for i in range(2):
        assert f"TERM in {i}" in (logs / f"process_{i}.log").read_text()
    assert "forwarded SIGTERM" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_local_a_signal_to_its_process_group_reaches_each_process_once_and_is_waited_for(tmp_path, sig):
    """A terminal's Ctrl-C (SIGINT to the foreground process group) or `timeout`'s SIGTERM to its group: each
    process gets the signal once (a second SIGINT is `alignx train`'s stop-now, nothing saved: 4 real
    processes then stopped unsaved, or hung 5 minutes in a collective), and local.sh waits for them and
    exits 0 (it used to exit 130/143 at once: its polling `sleep` died of the signal under set -e)."""
    fake = _stand_in(
        tmp_path,
        "n=0; trap 'n=$((n+1))' INT TERM\n"
        'echo "ready $ALIGNX_PROCESS_ID"\n'
        'while [ "$n" = 0 ]; do sleep 0.05; done\n'
        "for _ in 1 2 3 4 5 6 7 8 9 10; do sleep 0.1; done\n"  # a second delivery would arrive by now
        'echo "signals $n in $ALIGNX_PROCESS_ID"\n',
    )
    logs = tmp_path / "logs"
    env = dict(os.environ, PYTHON=fake, LOGDIR=str(logs), COORDINATOR_PORT="1")
    proc = subprocess.Popen(
        ["bash", LOCAL, "2", "alignx", "train"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        _wait_until_ready(logs, 2)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=20)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # local.sh's group; its processes are in groups of their own
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err
    assert f"forwarded {sig.name}" in err
    for i in range(2):  # waited for: each has finished, having had the signal once
        assert f"signals 1 in {i}" in (logs / f"process_{i}.log").read_text(), err


def test_the_multi_host_launchers_commands_record_a_start_up_sigterm(monkeypatch):
    """tpu_pod.sh and gpu_multihost.sh join the job with --config.train.distributed=true (no ALIGNX_*
    variables): `alignx train` must then record a SIGTERM that arrives during start-up instead of one
    host exiting alone (cli._exit_on_sigterm)."""
    from alignx_jax import cli, distributed

    for name in (distributed.ENV_COORDINATOR, distributed.ENV_DISTRIBUTED):
        monkeypatch.delenv(name, raising=False)
    slurm = _run(SLURM, "--dry-run", "--nodes", "2", "configs/llama3_8b_ica_gpu.py", "--config.workdir=/s/w")
    tpu = _run(
        TPU,
        "--dry-run",
        "--no-copy",
        "t",
        "z",
        "configs/llama3_8b_pba_tpu_v5p_64.py",
        "--config.workdir=gs://b/w",
    )
    remote = _last_command(tpu.stdout)[-1].split("nohup ", 1)[1].split(" >", 1)[0]
    for words in (_last_command(slurm.stdout), shlex.split(remote)):
        overrides = [w for w in words if w.startswith("--config.")]
        assert "--config.train.distributed=true" in overrides
        assert cli._joins_a_job(overrides)
    assert not cli._joins_a_job(["--config.workdir=/w"])
    assert not cli._joins_a_job(["--config.train.distributed=true", "--config.train.distributed=false"])
