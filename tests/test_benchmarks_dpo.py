"""benchmarks/dpo_step.py: the JAX train step and the TRL-style torch step compute the same thing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return load_benchmark("dpo_step")


def test_param_count_formula_matches_model(bench):
    from alignx_jax.models.decoder import param_count

    setup = bench.make_setup("tiny", 16, 1)
    policy, _ = bench.jax_models(setup)
    assert bench.param_counts(setup.hf_config)[0] == param_count(policy)


def test_batch_layout(bench):
    setup = bench.make_setup("tiny", 32, 3, seed=1)
    d = setup.data
    assert d["input_ids"].shape == (6, 32)
    # chosen i and rejected i share the prompt; every row scores its closing EOS and nothing past it
    np.testing.assert_array_equal(d["input_ids"][:3, :8], d["input_ids"][3:, :8])
    for i in range(6):
        n = int(d["attention_mask"][i].sum())
        assert (
            d["input_ids"][i, n - 1] == 2
            and d["loss_mask"][i, n - 1] == 1
            and d["loss_mask"][i, n:].sum() == 0
        )


def test_same_logps_and_losses(bench):
    """Same weights copied across: per-sequence log-probs, the first-step loss (policy vs a different
    reference) and the second-step loss (after one clipped AdamW update on each side) agree."""
    import torch

    setup = bench.make_setup("tiny", 48, 2, seed=3)
    policy, reference = bench.jax_models(setup)
    t_pol, t_ref = bench.torch_models(policy, reference)
    lp_jax = bench.jax_logps(policy, setup)
    with torch.no_grad():
        lp_torch = bench.torch_seq_logps(t_pol, bench.torch_batch(setup)).numpy()
    np.testing.assert_allclose(lp_jax, lp_torch, rtol=1e-5, atol=1e-3)

    jstep = bench.JaxStep(policy, reference, setup, chunk=16)  # chunked logps path too
    tstep = bench.TorchStep(t_pol, t_ref, setup)
    j1, t1 = jstep(), tstep()
    assert abs(j1 - np.log(2.0)) > 1e-3  # a distinct reference: the loss is not the trivial log 2
    assert abs(j1 - t1) < 1e-4
    j2, t2 = jstep(), tstep()
    assert abs(j2 - j1) > 1e-3  # the update moved the policy...
    assert abs(j2 - t2) < 1e-3  # ...the same way on both sides


def test_flops_and_peak(bench):
    setup = bench.make_setup("tiny", 64, 2)
    _, mm = bench.param_counts(setup.hf_config)
    f = bench.model_flops_per_step(setup.hf_config, 64, 2)
    # at least 8 N_mm per token (6 policy + 2 reference), plus attention
    assert f > 8 * mm * 2 * 2 * 64
    assert bench.measure_peak_flops(repeats=1) > 1e8


def test_bf16_steps_agree_with_float32(bench):
    """--dtype bfloat16: both sides compute in bf16 over float32 weights (JAX model.dtype, torch
    autocast) and land within bf16 rounding of the float32 loss; the bf16 peak is measured."""
    setup = bench.make_setup("tiny", 48, 2, seed=3)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        policy, reference = bench.jax_models(setup, dtype)
        t_pol, t_ref = bench.torch_models(policy, reference)
        jstep = bench.JaxStep(policy, reference, setup)
        losses[dtype] = (jstep(), bench.TorchStep(t_pol, t_ref, setup, dtype=dtype)())
    (j32, t32), (j16, t16) = losses["float32"], losses["bfloat16"]
    assert abs(j32 - t32) < 1e-4
    assert j16 != j32 and t16 != t32  # bf16 rounding shows: the dtype reached both sides
    assert abs(j16 - j32) < 0.02 and abs(t16 - t32) < 0.02
    assert bench.measure_peak_flops("bfloat16", repeats=1) > 1e8


def test_interleaved_rounds_count_each_steps_page_faults(bench):
    """A step that maps and touches 40 MB of fresh memory shows its page faults; one that allocates
    nothing shows fewer; every contender gets one time, loss and cost per round."""
    import mmap

    def fresh():
        m = mmap.mmap(-1, 40 << 20)  # anonymous pages: each first touch is a fault
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 1
        m.close()
        return 1.0

    res = bench.interleaved_rounds({"fresh": fresh, "idle": lambda: 0.0}, rounds=3)
    costs = res["os_costs"]
    assert res["losses"]["fresh"] == [1.0] * 3 and len(res["times"]["idle"]) == 3
    assert len(costs["fresh"]["kernel_seconds"]) == 3
    # 10240 pages of 4 KiB (20 where the kernel backs the mapping with 2 MiB pages)
    assert min(costs["fresh"]["page_faults"]) >= 20
    assert max(costs["idle"]["page_faults"]) < min(costs["fresh"]["page_faults"])


def test_run_warms_every_contender_in_the_timed_order(bench, tmp_path):
    """The whole benchmark on the tiny model: an untimed interleaved round after the warm-ups (its times
    kept apart), then per-round times and ratios of the timed rounds only; the losses run on from the
    warm-up (the second JAX loss is the first warm-up's successor, not a repeat)."""
    import json

    out = tmp_path / "out.json"
    argv = "--model-size tiny --seq-len 64 --batch 2 --steps 2 --warmup 1 --no-compile --json"
    assert bench.main([*argv.split(), str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["warm_round_seconds"]) == {"jax", "torch"}
    assert [len(v) for v in res["warm_round_seconds"].values()] == [1, 1]
    assert min(min(v) for v in res["warm_round_seconds"].values()) > 0
    assert len(res["jax_step_times"]) == len(res["jax_vs_torch_per_round"]) == 2
    assert res["jax_loss_step2"] != res["jax_loss"]
    assert abs(res["jax_loss"] - res["torch_loss"]) < 1e-4


def test_shared_prompt_layout_computes_the_same_steps(bench, tmp_path):
    """--layout shared_prompt hands the JAX step one row per pair (each prompt once): the same first-
    and second-step losses as torch's two rows, fewer tokens computed; `auto` picks it for P-SOUPS pairs
    (configs/demo_real.py's data.share_prompt) and two rows for the fixed ones."""
    import json

    setup = bench.make_setup("tiny", 0, 2, seed=3, pairs="psoups")
    shared = bench.jax_layout(setup, True)
    assert shared["input_ids"].shape[0] == 2 and "branch_ids" in shared
    real2, real1 = int(setup.data["attention_mask"].sum()), int(shared["attention_mask"].sum())
    prompts = setup.data["loss_mask"].argmax(1)[:2]
    assert real1 == real2 - int(prompts.sum())  # each pair's prompt runs once
    assert bench.jax_layout(setup, False) is setup.data

    out = tmp_path / "out.json"
    argv = "--model-size tiny --pairs psoups --batch 2 --steps 1 --warmup 1 --no-compile --json"
    assert bench.main([*argv.split(), str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["jax_layout"] == "shared_prompt"
    assert res["jax_tokens_computed_per_step"] < res["tokens_per_step"]
    assert res["cpu_mfu_pair_tokens"] > res["cpu_mfu"]
    # a distinct reference, so not log 2 (the tiny random models differ by ~6e-4 there), and equal to
    # torch's two-row loss far inside that
    assert abs(res["jax_loss"] - np.log(2.0)) > 2e-4
    assert abs(res["jax_loss"] - res["torch_loss"]) < 2e-5
    assert abs(res["jax_loss_step2"] - res["torch_loss_step2"]) < 1e-3
    assert abs(res["jax_loss_step2"] - res["jax_loss"]) > 1e-3

    argv = "--model-size tiny --seq-len 64 --batch 2 --steps 1 --warmup 0 --no-compile --json"
    assert bench.main([*argv.split(), str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["jax_layout"] == "two_rows" and res["jax_tokens_computed_per_step"] == res["tokens_per_step"]


def test_device_gpu_without_a_gpu_is_refused_in_one_line(bench, tmp_path, monkeypatch):
    """--device gpu where JAX or torch sees no GPU: one line, exit 1, no JSON (JAX ran on the CPU
    and torch's first .to("cuda") failed in a traceback)."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # what --device gpu sets, restored after
    out = tmp_path / "r.json"
    argv = ["--device", "gpu", "--model-size", "tiny", "--seq-len", "16", "--batch", "1", "--json", str(out)]
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert str(e.value).startswith("--device gpu: JAX or torch sees no GPU") and "\n" not in str(e.value)
    assert not out.exists()
