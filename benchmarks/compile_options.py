"""One DPO step compiled under several sets of XLA CPU options: compile seconds and step seconds.

    python benchmarks/compile_options.py [--model-size demo] [--seq-len 512] [--batch 16] [--rounds 6] \
        [--pairs fixed|psoups] [--dtype float32|bfloat16] [--no-compact] [--only NAME ...] [--json OUT.json]

Each variant is the same `alignx_jax.train` step (dpo_step.JaxStep: same weights, same batch) compiled with
its options passed per compilation (`compiled = jit(...).lower(...).compile(compiler_options=...)`), so all
of them live in one process and are timed in turn, one call of each per round in a rotating order (load
changes on a shared machine hit every variant alike):

* `default`: XLA's own settings;
* `fast_compile`: `alignx_jax.hardware.FAST_CPU_COMPILE` (XLA's older CPU loop emitters, what `alignx demo`
  and the tests turn on);
* `O0`: the backend optimisation level 0 that `JAX_DISABLE_MOST_OPTIMIZATIONS=1` sets (the tests' setting);
* `O0_fast_compile`: both;
* `onednn`: `alignx_jax.hardware.ONEDNN_DOTS`, each matrix product handed to oneDNN instead of YNNPACK (what
  `model.cpu_matmul=onednn` compiles with; `auto` takes it for wide float32 models on Intel CPUs).

JSON: per variant `compile_seconds` (`lower(...).compile()` alone; tracing and lowering are shared),
`step_seconds` (median over rounds) with its per-round list, `step_vs_default_per_round`, and the first
step's loss (every variant must agree), with the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _smollm2 as common  # noqa: E402  (the machine description every benchmark reports)
import dpo_step  # noqa: E402

O0 = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def variants() -> dict[str, dict]:
    from alignx_jax.hardware import FAST_CPU_COMPILE, ONEDNN_DOTS

    name, value = FAST_CPU_COMPILE.lstrip("-").split("=")
    fast = {name: value == "true"}
    return {
        "default": {},
        "fast_compile": fast,
        "O0": O0,
        "O0_fast_compile": {**O0, **fast},
        "onednn": dict(ONEDNN_DOTS),
    }


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    setup = dpo_step.make_setup(args.model_size, args.seq_len, args.batch, pairs=args.pairs)
    steps, out = {}, {"variants": {}}
    for name, opts in variants().items():
        if args.only and name not in args.only:
            continue
        policy, reference = dpo_step.jax_models(setup, args.dtype)
        step = dpo_step.JaxStep(policy, reference, setup, compact=args.compact, compiler_options=opts)
        out["variants"][name] = {
            "compiler_options": opts,
            "compile_seconds": step.compile_seconds,
            "first_loss": step(),
        }
        steps[name] = step
        print(f"{name}: compiled in {step.compile_seconds:.2f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    base = times.get("default")
    for name, ts in times.items():
        v = out["variants"][name]
        v["step_seconds"] = statistics.median(ts)
        v["step_seconds_per_round"] = ts
        if base:
            v["step_vs_default_per_round"] = [t / b for t, b in zip(ts, base)]
    out.update(
        model_size=args.model_size,
        seq_len=setup.seq_len,
        batch=args.batch,
        pairs=args.pairs,
        dtype=args.dtype,
        compact=args.compact,
        **common.machine(),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="demo", choices=sorted(dpo_step.SIZES))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="pairs per step")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--pairs", default="fixed", choices=["fixed", "psoups"], help="as dpo_step.py's --pairs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument(
        "--no-compact", dest="compact", action="store_false", help="data.compact_tokens=0 (the demo's)"
    )
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    args = p.parse_args(argv)
    common.check_counts(batch=args.batch, rounds=args.rounds)
    common.check_json_out(args.json)
    out = run(args)
    if args.json:
        common.write_json_out(args.json, out)
    for name, v in out["variants"].items():
        rel = v.get("step_vs_default_per_round")
        print(
            f"{name:16s} compile {v['compile_seconds']:6.2f} s  step {v['step_seconds']:.3f} s"
            + (
                f"  vs default {statistics.median(rel):.3f} (per round {', '.join(f'{x:.2f}' for x in rel)})"
                if rel
                else ""
            )
            + f"  loss {v['first_loss']:.6f}"
        )
    return 0


if __name__ == "__main__":
    common.preload_allocator()  # before JAX starts
    sys.exit(main())
