"""benchmarks/accelerator_step.py: each variant of the train step in its own process, same numbers."""

from __future__ import annotations

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return load_benchmark("accelerator_step")


def test_variants_agree_and_a_failed_variant_is_recorded(bench, monkeypatch):
    """The blocked and one-block attention kernels give the same first loss in separate processes;
    cuDNN attention cannot run on a CPU and is recorded with its error line while the others run.
    The children get the launcher's memory fraction."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    flags = "--model-size tiny --seq-len 64 --batch 2 --dtype float32 --steps 1 --warmup 1"
    args = bench.build_parser().parse_args([*flags.split(), "--variants", "default,cudnn,xla,one_block"])
    out = bench.run_all(args)
    default, cudnn, one_block = (out["variants"][v] for v in ("default", "cudnn", "one_block"))
    assert default["step_seconds"] > 0 and one_block["step_seconds"] > 0
    assert default["model_flops_per_step"] == one_block["model_flops_per_step"] > 0
    assert one_block["loss_diff_vs_default"] < 1e-5
    # the default's attention is auto, on a CPU the xla kernel: the same program as the xla variant
    assert args.attention_impl == "auto" and out["variants"]["xla"]["loss_diff_vs_default"] == 0.0
    assert default["attention_kernel"] == one_block["attention_kernel"] == "xla"
    assert one_block["speedup_vs_default"] > 0
    # a CPU has no device memory limit to fit: nothing is rematerialized
    assert default["remat_instructions"] == 0
    assert "step_seconds" not in cudnn and "cudnn" in cudnn["error"].lower()
    assert out["xla_python_client_mem_fraction"] == "0.95" and args.chunk == 1024


def test_unknown_variant_is_refused(bench):
    args = bench.build_parser().parse_args(["--variants", "default,flash"])
    with pytest.raises(SystemExit, match="unknown flash"):
        bench.run_all(args)


def test_error_line_is_the_exception(bench):
    stderr = "Traceback (most recent call last):\n  File x\njaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: oom\n\nnote\n"
    assert bench._error_line(stderr) == "jaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: oom"


def test_remat_instructions_counts_the_copies_xla_named(bench):
    hlo = """
  %fusion.12 = f32[8,64]{1,0} fusion(f32[8,64]{1,0} %p0), kind=kLoop
  %fusion.12.remat = f32[8,64]{1,0} fusion(f32[8,64]{1,0} %p0), kind=kLoop
  ROOT %dot.3.remat2 = f32[8,8]{1,0} dot(%a, %b), metadata={op_name="remat"}
  %fusion.12.remat.1 = f32[8,64]{1,0} fusion(f32[8,64]{1,0} %p0), kind=kLoop
  %add.1 = f32[8]{0} add(%fusion.12.remat, %x)
"""
    assert bench.remat_instructions(hlo) == 3


def test_the_json_records_the_shape_and_length_the_variants_ran(bench, monkeypatch):
    """The model shape as dpo_step records it (the 1B's tied embeddings and rope theta were missing) and the
    rows' length (--pairs psoups: the collated bucket, not --seq-len); no variant list is refused, not run as
    an empty JSON."""
    import subprocess

    def no_child(*a, **k):
        raise subprocess.TimeoutExpired("child", 1)

    monkeypatch.setattr(bench.subprocess, "run", no_child)
    args = bench.build_parser().parse_args(["--pairs", "psoups", "--batch", "2", "--variants", "default"])
    out = bench.run_all(args)
    setup = bench.dpo_step.make_setup("1b", 1024, 2, pairs="psoups")
    assert out["model_shape"]["tie_word_embeddings"] is True and out["model_shape"]["rope_theta"] == 500000.0
    assert out["model_shape"]["hidden_size"] == 2048 and "architectures" not in out["model_shape"]
    assert out["seq_len"] == setup.seq_len < 1024
    assert out["variants"]["default"]["error"] == "timed out after 600.0 s"
    for empty in ("", ","):
        with pytest.raises(SystemExit, match="--variants: none given"):
            bench.run_all(bench.build_parser().parse_args(["--variants", empty]))


def test_the_parent_preallocates_no_accelerator_memory_and_the_children_keep_the_callers_env(
    bench, monkeypatch
):
    """The parent records the machine (JAX's backend) while the children run: it must not preallocate the
    accelerator's memory (JAX's default 75%) the children measure with; the children get the caller's
    environment unchanged, their memory fraction added."""
    import os
    import subprocess

    seen = []

    def child(argv, **k):
        seen.append(dict(k["env"]))
        raise subprocess.TimeoutExpired("child", 1)

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(bench.subprocess, "run", child)
    bench.run_all(bench.build_parser().parse_args(["--model-size", "tiny", "--variants", "default"]))
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in seen[0] and seen[0]["XLA_PYTHON_CLIENT_MEM_FRACTION"]
