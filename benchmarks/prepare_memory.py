"""Peak memory of reading a data set: `alignx data prepare` (streamed into array_record) against the raw-file
reader training uses on parquet/JSON paths (`schema.load_rows`, every row held), on synthetic AlignX rows.

    python benchmarks/prepare_memory.py [--users 500] [--pairs-per-user 40] --json OUT.json

Each reader runs in a process of its own (`sources.prepare`, what `alignx data prepare` calls, and
`schema.load_rows`), so
its peak resident set is its own (the child's VmHWM); `baseline` is a child that imports the
same modules and reads nothing. TFDS's writer buffers up to 1 GiB of serialized rows in memory before it
spills them to disk (tensorflow_datasets/core/shuffle.py, MAX_MEM_BUFFER_SIZE), which caps `prepare` above
that size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _smollm2 as common  # noqa: E402  (the --json checks and the CPU every benchmark names)

IMPORTS = (
    "import tensorflow_datasets, pyarrow.parquet; from alignx_jax.data import schema, sources, tfds_builder"
)


def _child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python; its wall time and its own peak RSS (MiB), which it prints last."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # VmHWM: this process image's peak (ru_maxrss would carry the forking parent's over the exec)
    code += "; print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    peak_kib = int(r.stdout.split()[-1])  # Linux: KiB
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": round(peak_kib / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--pairs-per-user", type=int, default=40)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    common.check_counts(users=a.users, pairs_per_user=a.pairs_per_user)
    common.check_json_out(a.json)
    with tempfile.TemporaryDirectory() as tmp:
        from alignx_jax.data import synth

        world = synth.generate_world(a.users, a.pairs_per_user, 0)
        data = synth.write_world(world, tmp)["data"]
        rows = len(world.rows)
        del world
        result = {
            "rows": rows,
            "parquet_mib": round(os.path.getsize(data) / 2**20, 1),
            "baseline": _child(IMPORTS),
            "prepare": _child(
                IMPORTS + "; import sys; sources.prepare(sys.argv[1], sys.argv[2])",
                data,
                os.path.join(tmp, "p"),
            ),
            "load_rows": _child(IMPORTS + "; import sys; schema.load_rows(sys.argv[1])", data),
        }
    # the CPU's name and features, as every benchmark's JSON names them (platform.processor() is 'x86_64')
    result.update(machine=common.cpu_model(), cpu=common.cpu_features(), cpu_count=os.cpu_count())
    common.write_json_out(a.json, result, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
