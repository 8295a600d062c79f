"""Step time and memory of the JAX DPO train step as model size, sequence length and batch double.

    python benchmarks/scaling.py [--base-size xs] [--seq-len 128] [--batch 1] [--steps 3] [--json OUT.json]

From a base point (model size, L, B) it doubles one factor at a time: model width (hidden,
intermediate and heads x2, so ~x4 matmul params per layer), sequence length, and batch (pairs).
Each row is the median step time of `alignx_jax.train.step.make_train_step` (jitted, params and
optimizer state donated, as `alignx train` runs it) and XLA's per-device bytes for the step
(`compiled.memory_analysis()`: arguments + outputs - donated + temporaries). CPU only, small sizes.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _dpo_step():
    spec = importlib.util.spec_from_file_location("dpo_step", os.path.join(HERE, "dpo_step.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def wider(size: dict[str, int]) -> dict[str, int]:
    out = dict(size)
    out.update(
        hidden_size=2 * size["hidden_size"],
        intermediate_size=2 * size["intermediate_size"],
        num_attention_heads=2 * size["num_attention_heads"],
        num_key_value_heads=2 * size["num_key_value_heads"],
    )
    return out


def measure(bench, size: dict[str, int], seq_len: int, batch: int, steps: int, chunk: int) -> dict:
    name = f"scaling_{size['hidden_size']}"
    bench.SIZES[name] = size
    setup = bench.make_setup(name, seq_len, batch)
    policy, reference = bench.jax_models(setup)
    step = bench.JaxStep(policy, reference, setup, chunk=chunk)
    del policy, reference
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tokens = int(setup.data["attention_mask"].sum())  # real tokens, as dpo_step.py counts them
    row = {
        "hidden": size["hidden_size"],
        "layers": size["num_hidden_layers"],
        "params": bench.param_counts(setup.hf_config)[0],
        "seq_len": seq_len,
        "batch_pairs": batch,
        "tokens": tokens,
        "positions": 2 * batch * seq_len,
        "step_seconds": sec,
        "tokens_per_sec": tokens / sec,
        "flops_per_sec": bench.model_flops_per_step(setup.hf_config, seq_len, batch, tokens) / sec,
        "memory_bytes": step.peak_memory_bytes(),
    }
    del step
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-size", default="xs")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bench = _dpo_step()
    if args.base_size not in bench.SIZES:  # a KeyError traceback otherwise
        raise SystemExit(f"unknown --base-size {args.base_size!r}; one of {', '.join(bench.SIZES)}")
    bench.common.check_counts(seq_len=args.seq_len, batch=args.batch, steps=args.steps)
    bench.common.check_json_out(args.json)
    base = dict(bench.SIZES[args.base_size])
    L, B = args.seq_len, args.batch
    points = [
        ("base", base, L, B),
        ("2x width", wider(base), L, B),
        ("4x width", wider(wider(base)), L, B),
        ("2x seq", base, 2 * L, B),
        ("4x seq", base, 4 * L, B),
        ("2x batch", base, L, 2 * B),
        ("4x batch", base, L, 4 * B),
    ]
    rows = []
    for label, size, seq, batch in points:
        row = {"point": label, **measure(bench, size, seq, batch, args.steps, args.chunk)}
        rows.append(row)
        print(
            f"{label:10s} hidden {row['hidden']:5d} params {row['params'] / 1e6:6.1f}M seq {seq:5d} "
            f"batch {batch:3d}  {row['step_seconds']:7.3f} s/step  {row['tokens_per_sec']:8.0f} tok/s  "
            f"{row['flops_per_sec'] / 1e9:6.1f} GFLOP/s  {row['memory_bytes'] / 2**20:8.1f} MiB",
            flush=True,
        )
    out = {"rows": rows, "load_average": list(os.getloadavg()), **bench.common.machine()}
    if args.json:
        bench.common.write_json_out(args.json, out)
    return 0


if __name__ == "__main__":
    import _smollm2  # beside this script, which Python puts first on sys.path

    _smollm2.preload_allocator()  # before JAX starts: the allocator `alignx` runs CPU jobs with
    sys.exit(main())
