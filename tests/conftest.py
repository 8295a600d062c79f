"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers (no downloads)."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shutil
import subprocess
import tempfile

import pytest

from alignx_jax import hardware

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# in-process `alignx train/eval/generate` calls leave the user's compilation cache alone;
# tests/test_compile_cache.py checks the cache in fresh processes
os.environ.setdefault("ALIGNX_COMPILE_CACHE", "0")
# one JAX compilation cache for the whole session, every xdist worker and every CLI subprocess the tests
# start (they compile the same tiny programs again and again: test_train.py 300 -> 218 s alone), in a
# temporary folder made by the controller, inherited by the workers, removed at the end; never the user's
_OWN_CACHE = None
if "ALIGNX_TEST_JAX_CACHE" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="alignx-tests-jax-cache-")
    os.environ["ALIGNX_TEST_JAX_CACHE"] = _OWN_CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["ALIGNX_TEST_JAX_CACHE"]
# programs compiled in under 0.2 s are not worth a file each
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
# tests compile hundreds of tiny programs and run each a few times: XLA's backend (LLVM) optimisation is
# most of their compile time and buys nothing here. Inherited by the CLI subprocesses the tests start;
# values are unchanged (HLO passes and buffer assignment still run), benchmarks/ and users keep -O2.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA's quicker CPU compile (hardware.FAST_CPU_COMPILE): the tests' tiny programs compile far more than
# they run (README, Tests). Probed once by the controller, then inherited by the workers and, through
# `xla_flags`, by every subprocess the tests start.
if "ALIGNX_TEST_XLA_FLAGS" not in os.environ:
    os.environ["ALIGNX_TEST_XLA_FLAGS"] = " ".join(hardware.fast_cpu_compile_flags())
TEST_XLA_FLAGS = os.environ["ALIGNX_TEST_XLA_FLAGS"].split()


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test subprocess: the tests' compile flags and `devices` CPU devices (default one)."""
    return " ".join(
        [*TEST_XLA_FLAGS, *([f"--xla_force_host_platform_device_count={devices}"] if devices else [])]
    )


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", os.path.join(root, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in TEST_XLA_FLAGS if f not in _flags])
# under `pytest -n N` the workers share the cores: torch's OpenMP threads spin at their barriers while a
# core runs the other worker (a 2-thread torch forward 2.3x slower than 1 thread beside one busy core)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _perturb(model, seed: int) -> None:
    """Randomise norm scales and biases too (HF inits them to 1 / 0, which would hide mapping bugs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_tiny_hf(kind: str, out_dir: str, *, seed: int = 0, max_shard_size: str | None = None) -> str:
    """Write a tiny `llama` (Llama-3.1 style: GQA, llama3 RoPE scaling, untied head) or `qwen2`
    (Qwen2.5 style: q/k/v biases, tied head) checkpoint with the shipped tokenizer to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer()
    vocab = len(tok)
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            **TINY,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            tie_word_embeddings=False,
            initializer_range=0.1,
            rms_norm_eps=1e-5,
            bos_token_id=tok.bos_token_id,
            eos_token_id=[tok.convert_tokens_to_ids("<|end_of_text|>"), tok.eos_token_id],
            pad_token_id=tok.pad_token_id,
        )
    elif kind == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab,
            **TINY,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            initializer_range=0.1,
            rms_norm_eps=1e-6,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    for name in os.listdir(TINY_TOKENIZER_DIR):
        shutil.copyfile(os.path.join(TINY_TOKENIZER_DIR, name), os.path.join(out_dir, name))
    return out_dir


@pytest.fixture(scope="session")
def tiny_hf_checkpoints(tmp_path_factory) -> dict[str, str]:
    """{'llama': dir, 'qwen2': dir}: tiny random HF checkpoints (llama one sharded into several files)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {
        "llama": build_tiny_hf("llama", str(root / "llama"), seed=0, max_shard_size="1MB"),
        "qwen2": build_tiny_hf("qwen2", str(root / "qwen2"), seed=1),
    }


# The files holding the long end-to-end runs (minutes each on 2 cores) go first, roughly longest first, so
# the short files fill in beside them instead of one worker running a long file alone at the end.
LONG_FILES = (
    "test_multiprocess.py",  # > 2 tests, so its worker does not also take the next file at the start
    "test_faults.py",
    "test_demo_real.py",
    "test_demo.py",
    "test_train.py",
    "test_pba_training.py",
    "test_gguf.py",
)


def pytest_configure(config):
    # xdist loadfile deals whole files from a queue (1 per worker at start, +1 while a worker's file has <= 2
    # tests left) in collection order only without --loadscope-reorder, its default sort by test count
    # (which put these 2-6-test files last): turned off here so LONG_FILES start first
    if getattr(config.option, "loadscopereorder", None):
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:  # the process that made the session's compilation cache
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: file order kept


def run_cli(args) -> subprocess.CompletedProcess:
    """`alignx ARGS` through `cli.main` in this test process, as `subprocess.run` would report it (returncode,
    stdout, stderr): its imports and compiled programs are already warm here. Tests of what needs a process
    of its own (a signal or a kill, a file-size limit, a device count, a second holder of a workdir) start
    one with `cli_env`."""
    from alignx_jax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["alignx", *map(str, args)], code, out.getvalue(), err.getvalue())


def psoups_rows_with_a_blank_profile(blank: str) -> list[dict]:
    """Two P-SOUPS rows, the second with the `profile` `blank` (PBA refuses it, ICA never reads it)."""
    return [
        {
            "prompt": f"p{i}",
            "chosen": "a",
            "rejected": "b",
            "ground_truth_persona": "g",
            "profile": blank if i == 1 else "Likes science",
            "Pair-wise Comparative Feedback": [{"prompt": "q", "chosen": "x", "rejected": "y"}],
        }
        for i in range(2)
    ]


def cli_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: `devices` CPU devices (default one), this checkout importable,
    and the session's JAX compilation cache, which the `run_cli` runs fill too, keeping every program."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = xla_flags(devices)
    return env


def count_reads(monkeypatch, root) -> collections.Counter:
    """Bytes read through Python's `open` from each file under `root` (keyed by its path) from now on: reads
    of a local file, and those of a gs:// file under the stand-in bucket (tests/test_remote_paths.py)."""
    import builtins

    read: collections.Counter = collections.Counter()
    real_open, root = builtins.open, os.fspath(root)

    class Counted(io.FileIO):  # the two calls BufferedReader reads a raw file with
        def readinto(self, b):
            n = super().readinto(b)
            read[self.name] += n or 0
            return n

        def readall(self):
            data = super().readall()
            read[self.name] += len(data)
            return data

    def counting_open(file, mode="r", encoding=None, **kwargs):
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if not path.startswith(root) or any(c in mode for c in "wax+") or set(kwargs) - {"errors", "newline"}:
            return real_open(file, mode, encoding=encoding, **kwargs)
        f = io.BufferedReader(Counted(path))
        return f if "b" in mode else io.TextIOWrapper(f, encoding=encoding, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return read


def save_tiny_hf(folder, *, seed: int = 0, **overrides):
    """A tiny random llama HF folder (our own export, the shipped tokenizer beside it) at `folder`; its
    DecoderConfig (`overrides` replace the defaults)."""
    from flax import nnx

    from alignx_jax.models.decoder import Decoder, DecoderConfig
    from alignx_jax.models.hf import save_hf
    from alignx_jax.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer()
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, head_dim=8)
    ids = dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    cfg = DecoderConfig(**{"vocab_size": len(tok), **sizes, **ids, **overrides})
    save_hf(Decoder(cfg, rngs=nnx.Rngs(seed)), str(folder), tokenizer_dir=TINY_TOKENIZER_DIR)
    return cfg
