"""Where the JAX DPO step's time goes on CPU: per-op totals from one profiled step.

    python benchmarks/profile_step.py [--model-size s] [--seq-len 512] [--batch 2] [--pairs fixed|psoups]
        [--dtype float32|bfloat16] [--scan-layers 1] [--remat none] [--chunk 0] [--top 25] [--dump-hlo OUT.txt]
        [--trace-warmup 1] [--json OUT.json]

Runs `alignx_jax.train`'s step (built by dpo_step.JaxStep) under `jax.profiler.trace`, then sums
`event.duration_ns` by event name from the xplane with `jax.profiler.ProfileData` (no TensorBoard
needed) and prints the machine, then the top ops with their share of the step (`--json`: the same
as JSON). Look a fusion name up in the optimized HLO (`--dump-hlo`) to see what it computes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="s")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--pairs", default="fixed", choices=("fixed", "psoups"), help="as dpo_step.py --pairs")
    p.add_argument("--dtype", default="float32", help="model.dtype (compute); parameters stay float32")
    p.add_argument("--scan-layers", type=int, default=1)
    p.add_argument("--remat", default="none")
    p.add_argument("--chunk", type=int, default=0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dump-hlo", default=None)
    p.add_argument("--trace-warmup", type=int, default=1, help="traced steps run and discarded first")
    p.add_argument("--no-dots", action="store_true", help="list only non-matmul ops (the fusion overheads)")
    p.add_argument("--json", default=None, help="write the timings and the machine here too")
    args = p.parse_args(argv)
    import _smollm2 as common

    from alignx_jax import paths

    common.check_json_out(args.json)
    # refused before the model is built and compiled, not when the compiled step is written
    problem = (
        None if args.dump_hlo is None else paths.refuse_unwritable("--dump-hlo", args.dump_hlo, folder=False)
    )
    if problem:
        raise SystemExit(problem)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    machine = common.machine()
    print(f"machine: {machine['machine']} ({machine['cpu_count']} CPUs, jax {machine['jax_backend']})")
    out = run(args)
    if args.json:
        common.write_json_out(args.json, {**out, **machine, "args": vars(args)})
    return 0


def run(args: argparse.Namespace) -> dict:
    """Profile the step and print where its time goes; the same figures as a dict."""
    import dpo_step as b
    import jax

    from alignx_jax import allocator, paths

    setup = b.make_setup(args.model_size, args.seq_len, args.batch, pairs=args.pairs)
    pol, ref = b.jax_models(setup, args.dtype, scan_layers=bool(args.scan_layers), remat=args.remat)
    step = b.JaxStep(pol, ref, setup, chunk=args.chunk)
    if args.dump_hlo:
        paths.write_all({args.dump_hlo: step.compiled.as_text().encode("utf-8")})
    step()
    t0 = time.perf_counter()
    step()
    unprofiled = time.perf_counter() - t0
    print(f"unprofiled step: {unprofiled:.3f} s  load {os.getloadavg()}  allocator {allocator.active()}")
    for _ in range(args.trace_warmup):
        # a first traced step can fault its temporaries in afresh (the profiler's buffers take memory
        # the allocator had kept for them): trace once more and keep the second
        with tempfile.TemporaryDirectory() as d, jax.profiler.trace(d):
            step()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
        (pb,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(pb)
    # XLA's CPU thunks run on a few worker threads at once: sum each op over all threads, and skip
    # the Python and executor lines (they span the whole step)
    tot: dict[str, float] = collections.defaultdict(float)
    cnt: dict[str, int] = collections.defaultdict(int)
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python" or not line.name.startswith("tf_"):
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    continue
                tot[ev.name] += ev.duration_ns / 1e9
                cnt[ev.name] += 1
    busy = sum(tot.values())
    cats: dict[str, float] = collections.defaultdict(float)
    for name, sec in tot.items():
        kind = (
            "matmul (ynn/xnn/dot)"
            if name.startswith(("ynn", "xnn", "dot", "onednn"))
            else "broadcast (zero-fill)"
            if "broadcast" in name and "fusion" not in name.replace("wrapped_broadcast", "")
            else "copy/transpose"
            if name.startswith(("copy", "transpose"))
            else "other elementwise/reduce"
        )
        cats[kind] += sec
    print(f"profiled step wall {wall:.3f} s; op time summed over threads {busy:.3f} s")
    for kind, sec in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:26s} {sec:7.3f} s {100 * sec / busy:5.1f}%")
    scopes = op_scopes(step.compiled.as_text())
    by_scope: dict[tuple[str, str], float] = collections.defaultdict(float)
    for name, sec in tot.items():
        if args.no_dots and name.startswith(("ynn", "xnn", "dot", "onednn")):
            continue
        by_scope[scopes.get(name, ("?", "other"))] += sec
    print("by pass and scope (the op's jax.named_scope / metadata):")
    for (pas, scope), sec in sorted(by_scope.items(), key=lambda kv: -kv[1]):
        if sec >= 0.005 * busy:
            print(f"  {pas:10s} {scope:16s} {sec:7.3f} s {100 * sec / busy:5.1f}%")
    listed = [
        (n, t) for n, t in tot.items() if not (args.no_dots and n.startswith(("ynn", "xnn", "dot", "onednn")))
    ]
    top = sorted(listed, key=lambda kv: -kv[1])[: args.top]
    for name, sec in top:
        pas, scope = scopes.get(name, ("?", "other"))
        print(f"{sec:8.3f} s {100 * sec / busy:5.1f}%  x{cnt[name]:<4d} {name:34s} {pas}/{scope}")
    return {
        "unprofiled_step_seconds": unprofiled,
        "profiled_step_seconds": wall,
        "op_seconds_over_threads": busy,
        "load_average": list(os.getloadavg()),
        "categories": dict(cats),
        "by_scope": [{"pass": pas, "scope": scope, "seconds": sec} for (pas, scope), sec in by_scope.items()],
        "top_ops": [
            {
                "name": n,
                "seconds": sec,
                "count": cnt[n],
                "pass": scopes.get(n, ("?", "other"))[0],
                "scope": scopes.get(n, ("?", "other"))[1],
            }
            for n, sec in top
        ],
    }


SCOPES = (
    "sequence_logps",
    "window_logps",
    "flat_logps",
    "attention",
    "mlp",
    "final_norm",
    "embed",
    "layers",
    "pair_logps",
)


def op_scopes(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (pass, scope) from the optimized HLO's metadata op_name: pass is
    `backward` (transpose(jvp(...))), `policy fwd` (jvp(...)), `reference` (pair_logps outside any
    autodiff) or `update`; scope is the first of SCOPES in the op_name (`lm_head` for the log-prob
    functions, `layers` for what the layer scan does outside attention/mlp, `model` for the rest
    of the forward)."""
    import re

    out: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r'%([\w.\-]+) = .*?op_name="([^"]*)"', hlo):
        name, op = m.group(1), m.group(2)
        pas = (
            "backward"
            if "transpose(jvp" in op
            else "policy fwd"
            if "jvp(" in op
            else "reference"
            if "pair_logps" in op
            else "update"
        )
        scope = next((s for s in SCOPES if s in op), "other")
        scope = {
            "sequence_logps": "lm_head",
            "window_logps": "lm_head",
            "flat_logps": "lm_head",
            "pair_logps": "model",
        }.get(scope, scope)
        out.setdefault(name, (pas, scope))
    return out


if __name__ == "__main__":
    import _smollm2  # beside this script, which Python puts first on sys.path

    _smollm2.preload_allocator()  # before JAX starts: the allocator `alignx` runs CPU jobs with
    sys.exit(main())
