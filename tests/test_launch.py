"""launch/gpu_host.sh and launch/tpu_pod.sh: argument handling and the commands they generate (--dry-run)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, "launch", "gpu_host.sh")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")


def _run(script, *args, env=None):
    return subprocess.run(
        ["bash", script, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, **(env or {})),
    )


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
        "my-tpu",
        "us-east5-a",
        "configs/llama3_8b_pba_tpu_v5p_64.py",
        "--config.workdir=gs://b/run 1",
        "--config.data.train=/mnt/d",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    scp, ssh = shlex.split(lines[0]), shlex.split(lines[1])
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[-1] == "my-tpu:alignx-jax/" and "--zone=us-east5-a" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))[len("--command=") :]
    parts = [shlex.split(p) for p in remote.split(" && ")]
    assert parts[0] == ["cd", "alignx-jax"]
    assert any(p[:4] == ["python3", "-m", "pip", "install"] and "jax[tpu]" in p for p in parts)
    train = parts[-1]
    assert train == [
        "python3",
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
        "t",
        "z",
        "configs/c.py",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "--project=p1" in shlex.split(lines[0])
    remote = next(a for a in shlex.split(lines[0]) if a.startswith("--command="))
    assert "pip" not in remote and remote.startswith("--command=cd src/ax && python3 -m alignx_jax train")


@pytest.mark.parametrize(
    "args, message",
    [
        (("--dry-run", "t", "z"), "usage"),
        (("--dry-run", "--bogus", "t", "z", "c.py"), "unknown option"),
        (("--dry-run", "t", "--config.a=1", "z", "c.py"), "before the overrides"),
        (("--dry-run", "t", "z", "c.py", "extra"), "--config.KEY=VALUE"),
    ],
)
def test_tpu_bad_arguments(args, message):
    r = _run(TPU, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
