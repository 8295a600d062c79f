"""The DPO train step on an accelerator with each CPU-specific path switched on and off.

    python benchmarks/accelerator_step.py --model-size 1b --seq-len 1024 --batch 16 --json OUT.json

Several code paths were written for XLA's CPU backend (BENCHMARKS.md §1-§6). This times the step
`alignx train` compiles (`dpo_step.JaxStep`: the same model, batch layout, loss and optimizer) once
per variant, each in its own process (a fresh device and compiler), and reports each variant's
step time, tokens/s and MFU beside the default's, with its first-step loss (the variants compute
the same numbers, so the losses must agree to bf16 rounding):

* `default`: as `alignx train` compiles it here with the shipped GPU/TPU configs (token compaction on,
  `--attention-impl`, by default `auto`: cuDNN's flash kernel on a GPU for bf16, the XLA kernel in causal
  row blocks on a CPU; the platform's weight-gradient rule: plain autodiff off the CPU);
* `no_compact`: `data.compact_tokens=0` (token-wise layers on every padded position);
* `cudnn`: `model.attention_impl=cudnn` (jax.nn.dot_product_attention's cuDNN flash kernel);
* `xla`: `model.attention_impl=xla` (the XLA kernel in causal row blocks, which skip the masked upper
  triangle);
* `one_block`: the XLA attention kernel without causal row blocks (one block of all rows);
* `cpu_wgrad`: the CPU weight-gradient rule forced on (`models.matmul`: `x^T` written out behind
  an optimization barrier, float32 residuals), which `target_platform() == "cpu"` normally gates;
* `remat_full`: `model.remat=full` (per-layer rematerialization, the big-model configs' setting).

`one_block` and `cpu_wgrad` have no config key of their own (they are the model's CPU/off-CPU
choices): the child process patches the module constant or gate before tracing.
MFU counts the real tokens' model FLOPs (`dpo_step.model_flops_per_step`) against the measured
peak of a square matmul in `--dtype` (`dpo_step.measure_peak_flops`), and against `--datasheet-tflops`
when given (989 for an H100/H200 SXM's dense bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import dpo_step  # noqa: E402  (the step, the batch and the FLOP count this benchmark shares)

# launch/gpu_host.sh's XLA_PYTHON_CLIENT_MEM_FRACTION: JAX's default 0.75 leaves too little of the card for
# the 1B step at logps_chunk 1024-2048 (BENCHMARKS.md section 8)
LAUNCHER_MEM_FRACTION = "0.95"

VARIANTS: dict[str, str] = {
    "default": "as `alignx train` compiles it on this platform",
    "no_compact": "data.compact_tokens=0",
    "cudnn": "model.attention_impl=cudnn",
    "xla": "model.attention_impl=xla",
    "one_block": "XLA attention without causal row blocks",
    "cpu_wgrad": "the CPU weight-gradient rule (models.matmul) forced on",
    "remat_full": "model.remat=full",
}


def _patch(variant: str) -> None:
    if variant == "one_block":
        from alignx_jax.models import attention

        attention.ATTENTION_BLOCK_MIN = 1 << 30  # one block holds every row
    elif variant == "cpu_wgrad":
        from alignx_jax.models import matmul

        matmul.transposed_wgrad = lambda: True


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: compile, `--warmup` steps, `--steps` timed steps, the peak."""
    import jax
    import numpy as np

    v = args.variant
    _patch(v)
    setup = dpo_step.make_setup(args.model_size, args.seq_len, args.batch, seed=args.seed, pairs=args.pairs)
    tokens = int(np.asarray(setup.data["attention_mask"]).sum())
    flops = dpo_step.model_flops_per_step(setup.hf_config, setup.seq_len, args.batch, tokens)
    policy, reference = dpo_step.jax_models(
        setup,
        args.dtype,
        remat="full" if v == "remat_full" else args.remat,
        attention_impl={"cudnn": "cudnn", "xla": "xla", "one_block": "xla"}.get(v, args.attention_impl),
    )
    t0 = time.perf_counter()
    step = dpo_step.JaxStep(policy, reference, setup, chunk=args.chunk, compact=v != "no_compact")
    compile_s = time.perf_counter() - t0
    # what `--attention-impl auto` (or a variant's) became for these rows: the JSON names the kernel timed
    kernel = policy._attention_impl(setup.seq_len, cached=False, branches=False)
    del policy, reference
    losses = [step() for _ in range(args.warmup)]
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    hlo = step.compiled.as_text()
    peak = dpo_step.measure_peak_flops(args.dtype, repeats=5)
    sec = statistics.median(times)
    out = {
        "variant": v,
        "what": VARIANTS[v],
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "compile_seconds": compile_s,
        "attention_kernel": kernel,
        "peak_memory_bytes": step.peak_memory_bytes(),
        # whether XLA recomputed to fit the card (its recomputed FLOPs are in no MFU here)
        "remat_instructions": remat_instructions(hlo),
        "tokens_per_step": tokens,
        "model_flops_per_step": flops,
        "first_loss": losses[0],
        "losses": losses,
        "step_times": times,
        "step_seconds": sec,
        "tokens_per_sec": tokens / sec,
        "peak_flops": peak,
        "mfu": flops / sec / peak,
    }
    if args.datasheet_tflops:
        out["mfu_datasheet"] = flops / sec / (args.datasheet_tflops * 1e12)
    return out


def remat_instructions(hlo_text: str) -> int:
    """Instructions XLA's rematerialization pass added to fit the device's memory: it names each copy
    `NAME.remat` (`NAME.remat2` for a copy of a copy, `NAME.remat.1` where a name repeats)."""
    return len(re.findall(r"^\s*(?:ROOT\s+)?%?[\w.-]+\.remat\d*(?:\.\d+)?\s*=", hlo_text, flags=re.MULTILINE))


def _child_argv(args: argparse.Namespace, variant: str, out_path: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--json", out_path]
    for k in ("model_size", "seq_len", "batch", "pairs", "dtype", "steps", "warmup", "chunk", "remat"):
        argv += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    argv += ["--attention-impl", args.attention_impl, "--seed", str(args.seed)]
    if args.datasheet_tflops:
        argv += ["--datasheet-tflops", str(args.datasheet_tflops)]
    return argv


def _error_line(stderr: str) -> str:
    """The exception line of a child's traceback (its last line naming an Error or Exception)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
    return (named or lines or [""])[-1][:400]


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant of `--variants` in a child process; a failed or timed-out variant is recorded
    with the last line of its error, and the others still run."""
    import tempfile

    # the children run in the caller's environment; this process only records the machine, and must not
    # hold the accelerator memory JAX preallocates by default (75%) while they run
    env = dict(os.environ)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if not names:  # an empty list ran nothing and wrote a JSON of no variants
        raise SystemExit(f"--variants: none given; known: {', '.join(VARIANTS)}")
    # the children's model and rows: the shape as dpo_step records it (tied embeddings, rope theta), and
    # the length the rows have (--pairs psoups: the collated bucket, not --seq-len)
    setup = dpo_step.make_setup(args.model_size, args.seq_len, args.batch, seed=args.seed, pairs=args.pairs)
    out: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "model_size": args.model_size,
        "model_shape": {k: v for k, v in setup.hf_config.items() if k not in ("architectures", "model_type")},
        "params": dpo_step.param_counts(setup.hf_config)[0],
        "seq_len": setup.seq_len,
        "batch_pairs": args.batch,
        "pairs": args.pairs,
        "dtype": args.dtype,
        "remat": args.remat,
        "attention_impl": args.attention_impl,
        **dpo_step.common.machine(),
        "timing": "median of --steps steps after --warmup, one process per variant",
        "variants": {},
    }
    # each child runs as launch/gpu_host.sh starts `alignx train` (its memory fraction) unless the caller set it
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", LAUNCHER_MEM_FRACTION)
    out["xla_python_client_mem_fraction"] = env["XLA_PYTHON_CLIENT_MEM_FRACTION"]
    out["xla_flags"] = env.get("XLA_FLAGS", "")
    with tempfile.TemporaryDirectory() as tmp:
        for v in names:
            path = os.path.join(tmp, v + ".json")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(
                    _child_argv(args, v, path),
                    capture_output=True,
                    text=True,
                    timeout=args.variant_timeout,
                    env=env,
                )
                if proc.returncode == 0:
                    with open(path, encoding="utf-8") as f:
                        res = json.load(f)
                else:
                    res = {"variant": v, "error": _error_line(proc.stderr) or f"exit {proc.returncode}"}
            except subprocess.TimeoutExpired:
                res = {"variant": v, "error": f"timed out after {args.variant_timeout} s"}
            res["wall_seconds"] = time.perf_counter() - t0
            out["variants"][v] = res
            print(
                json.dumps({k: res.get(k) for k in ("variant", "step_seconds", "mfu", "first_loss", "error")})
            )
            sys.stdout.flush()
    base = out["variants"].get("default", {})
    for res in out["variants"].values():
        if "step_seconds" in res and "step_seconds" in base:
            # > 1: the variant is faster than the default
            res["speedup_vs_default"] = base["step_seconds"] / res["step_seconds"]
            res["loss_diff_vs_default"] = abs(res["first_loss"] - base["first_loss"])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="1b", choices=sorted(dpo_step.SIZES))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="pairs per step (2x sequences)")
    p.add_argument("--pairs", default="fixed", choices=["fixed", "psoups"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing (at least 1: the compile)")
    p.add_argument(
        "--chunk",
        type=int,
        default=1024,
        help="loss.logps_chunk (the shipped GPU/TPU configs' release recipe)",
    )
    p.add_argument("--remat", default="none", help="model.remat of every variant but remat_full")
    # auto: what the shipped GPU/TPU configs train with (a run of 2026-12-06 timed the xla default of then)
    p.add_argument(
        "--attention-impl",
        default="auto",
        help="model.attention_impl of every variant but cudnn, xla, one_block",
    )
    p.add_argument(
        "--variants",
        # cudnn is what `auto` runs on a GPU already (the default's attention_kernel says so): not twice
        default=",".join(v for v in VARIANTS if v != "cudnn"),
        help="comma-separated, of: " + ", ".join(VARIANTS),
    )
    p.add_argument(
        "--variant-timeout", type=float, default=600.0, help="seconds one variant's process may take"
    )
    p.add_argument("--datasheet-tflops", type=float, default=None, help="also report MFU against this peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child process: run this one variant
    p.add_argument("--json", default=None, metavar="OUT.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dpo_step.common.check_counts(batch=args.batch, steps=args.steps)
    args.warmup = max(1, args.warmup)  # the first step compiles nothing but still pays first-touch costs
    dpo_step.common.check_json_out(args.json)
    out = run_variant(args) if args.variant else run_all(args)
    if args.json:
        dpo_step.common.write_json_out(args.json, out)
    if not args.variant:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
