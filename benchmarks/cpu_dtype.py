"""float32 or bf16 on this CPU? The two dtypes side by side, interleaved rounds in one process.

    python benchmarks/cpu_dtype.py [--p-soups FILE] [--pairs 16] [--rounds 3] --json OUT.json

* matmul: `models.matmul.dense` (what every projection of the model runs) on a SmolLM2 gate
  projection, 2688x576 @ 576x1536, float32 kernel; bf16 casts the input and kernel and accumulates
  in float32. GFLOP/s, median over rounds of 10 calls.
* scoring: `alignx eval`'s scorer (`evaluate.evaluate`, PBA prompts, batch 8) with the real
  SmolLM2-135M-Instruct (`make real-model`) on a seeded sample of `--pairs` pairs of a P-SOUPS file
  balanced across personas, at `model.dtype` float32 and bfloat16; pairs/s, median over rounds,
  and whether the two dtypes made the same chosen > rejected decisions.

`bf16_vs_float32` (>1: bf16 faster) is what to read: CPUs with AMX run bf16 products several times
faster than float32, an Intel one with AVX-512-BF16 alone slower, an AMD Zen 4 one 1.6x (BENCHMARKS.md §4), and the
`model.dtype` of a CPU recipe (configs/demo_real.py) should follow it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _smollm2 as common  # noqa: E402

DTYPES = ("float32", "bfloat16")


def matmul_gflops(dtype: str, calls: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    from alignx_jax.models.matmul import dense

    n, i, o = 2688, 576, 1536
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, i)), dtype)
    w = jnp.asarray(rng.standard_normal((i, o)), jnp.float32)
    f = jax.jit(lambda x, w: dense(x, w).astype(jnp.float32).sum())
    f(x, w).block_until_ready()
    t = time.perf_counter()
    for _ in range(calls):
        f(x, w).block_until_ready()
    return 2 * n * i * o * calls / (time.perf_counter() - t) / 1e9


def score(model_dir: str, path: str, dtype: str) -> tuple[float, list[bool]]:
    from alignx_jax import evaluate as ev

    settings = ev.EvalSettings(method="pba", persona=None, preference="golden", batch_size=8, max_length=1024)
    per_example = os.path.join(os.path.dirname(path), f"per_example.{dtype}.jsonl")
    if os.path.exists(per_example):  # evaluate resumes from a per-example file: each round scores anew
        os.remove(per_example)
    t = time.perf_counter()
    ev.evaluate(
        model_dir,
        [ev.BenchmarkSpec("p-soups", path, "p-soups")],
        settings,
        per_example=per_example,
        dtype=dtype,
    )
    seconds = time.perf_counter() - t
    with open(per_example, encoding="utf-8") as f:
        rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["index"])
    return seconds, [bool(r["correct"]) for r in rows]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from alignx_jax import real_model
    from alignx_jax.data.benchmarks import balanced_sample

    with open(args.p_soups, encoding="utf-8") as f:
        rows = json.load(f)
    model_dir = real_model.smollm2_dir()
    gflops: dict[str, list[float]] = {d: [] for d in DTYPES}
    pairs_s: dict[str, list[float]] = {d: [] for d in DTYPES}
    decisions: dict[str, list[bool]] = {}
    with tempfile.TemporaryDirectory(prefix="alignx-dtype-") as tmp:
        sample = os.path.join(tmp, "pairs.json")
        with open(sample, "w", encoding="utf-8") as f:
            json.dump([rows[i] for i in balanced_sample(rows, args.pairs, args.seed)], f)
        for d in DTYPES:  # warm-up: compiles (and the compilation cache) out of the timed rounds
            matmul_gflops(d, calls=1)
            score(model_dir, sample, d)
        for r in range(args.rounds):
            for d in DTYPES:
                gflops[d].append(matmul_gflops(d))
                seconds, decisions[d] = score(model_dir, sample, d)
                pairs_s[d].append(args.pairs / seconds)
                print(
                    f"round {r}: {d}: matmul {gflops[d][-1]:.0f} GFLOP/s, scoring {pairs_s[d][-1]:.2f} pairs/s"
                )
    med = {d: statistics.median(pairs_s[d]) for d in DTYPES}
    return {
        **common.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "p_soups": os.path.abspath(args.p_soups),
        "pairs": args.pairs,
        "rounds": args.rounds,
        "matmul_gflops": {d: statistics.median(v) for d, v in gflops.items()},
        "matmul_gflops_per_round": gflops,
        "scoring_pairs_per_s": med,
        "scoring_pairs_per_s_per_round": pairs_s,
        "bf16_vs_float32": {
            "matmul": statistics.median(gflops["bfloat16"]) / statistics.median(gflops["float32"]),
            "scoring": med["bfloat16"] / med["float32"],
        },
        "same_decisions": decisions["float32"] == decisions["bfloat16"],
        "load_average_end": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from alignx_jax.demo import DEFAULT_PSOUPS

    p.add_argument("--p-soups", default=DEFAULT_PSOUPS)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="out", default=None)
    args = p.parse_args(argv)
    common.check_counts(pairs=args.pairs, rounds=args.rounds)
    common.check_json_out(args.out, (("--p-soups", args.p_soups),))
    out = run(args)
    print(
        json.dumps(
            {k: out[k] for k in ("machine", "cpu", "matmul_gflops", "scoring_pairs_per_s", "bf16_vs_float32")}
        )
    )
    if args.out:
        common.write_json_out(args.out, out, indent=1)
    return 0


if __name__ == "__main__":
    common.preload_allocator()  # before JAX starts: the allocator `alignx` runs CPU jobs with
    sys.exit(main())
