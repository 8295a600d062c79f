#!/usr/bin/env bash
# The product's CLI end to end on this machine's GPU, as README's GPU section runs it: launch/gpu_host.sh trains
# configs/tiny_pba.py (random init, synthetic users; model.dtype and attention_impl auto) and is sent SIGTERM
# mid-run, the same command resumes; then export, transformers' logits of the export on the GPU against JAX's
# (float32 at each matmul precision, bf16), eval on a P-SOUPS file and greedy generation.
#
#   scripts/gpu_smoke.sh OUT_DIR P_SOUPS_FILE
#
# OUT_DIR must be new or empty. PYTHON (default: python3) is the interpreter with alignx-jax and torch. Each
# step prints its exit status and seconds. An earlier form of these steps ran on an H100: its output is
# benchmarks/results/2026-12-06-h100/cli_smoke.log (BENCHMARKS.md section 8).
set -uo pipefail
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ $# -eq 2 ] || { usage >&2; exit 2; }
[ -f "$2" ] || { echo "gpu_smoke.sh: no such file: $2" >&2; exit 2; }
if [ -e "$1" ] && [ -n "$(ls -A "$1")" ]; then echo "gpu_smoke.sh: OUT_DIR is not empty: $1" >&2; exit 2; fi
mkdir -p "$1"
O=$(cd "$1" && pwd) BENCH=$(cd "$(dirname "$2")" && pwd)/$(basename "$2") PY=${PYTHON:-python3}
W=$O/w
cd "$(dirname "$0")/.." || exit 2  # the launcher and configs/ are named from the repository's root
step() { echo "== $*"; local s=$SECONDS; "$@"; local rc=$?; echo "   rc=$rc [$((SECONDS - s)) s]"; }
train=(launch/gpu_host.sh configs/tiny_pba.py "--config.workdir=$W" --config.model.dtype=auto
  --config.model.attention_impl=auto --config.train.steps=300 --config.checkpoint.every_steps=100)

PYTHON=$PY "${train[@]}" >"$O/train1.log" 2>&1 &
pid=$!  # gpu_host.sh execs the trainer: this is its process
for _ in $(seq 1 1800); do sleep 0.1; grep -qE '"step": 60[,}]' "$W/metrics.jsonl" 2>/dev/null && break; done
kill -TERM "$pid"
wait "$pid"
echo "first run rc=$? after SIGTERM"; grep -v "step/s" "$O/train1.log" | tail -3
grep -q "SIGTERM received: saved step" "$O/train1.log" || echo "gpu_smoke.sh: the first run saved no step on SIGTERM"
step env PYTHON="$PY" "${train[@]}" >"$O/train2.log" 2>&1
grep -v "step/s" "$O/train2.log" | tail -3
"$PY" - "$W/metrics.jsonl" <<'PY'
import json, sys
steps = [json.loads(line)["step"] for line in open(sys.argv[1]) if line.strip()]
print(f"metrics: {len(steps)} records, steps {steps[0]}..{steps[-1]}, each once: {sorted(set(steps)) == steps}")
PY
step "$PY" -m alignx_jax export --checkpoint "$W" --out "$O/hf"
step "$PY" -m alignx_jax eval --model "$O/hf" --benchmark "p-soups=$BENCH" --method pba --out "$O/eval.json"
step "$PY" -m alignx_jax generate --model "$O/hf" --prompt "How do I learn to cook?" --greedy --max-new-tokens 24
"$PY" - "$O/hf" <<'PY'
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from alignx_jax.hardware import matmul_precision
from alignx_jax.models.hf import load_pretrained

dev = "cuda" if torch.cuda.is_available() else "cpu"
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).to(dev)
ids = np.arange(5, 69)[None]
with torch.no_grad():
    ref = hf(torch.tensor(ids, device=dev)).logits.float().cpu().numpy()
print(f"JAX on {jax.devices()[0].device_kind}, transformers on {dev} (float32)")
for dtype, impl, precision in (("float32", "xla", "auto"), ("float32", "xla", "default"), ("bfloat16", "auto", "auto")):
    model = load_pretrained(sys.argv[1], dtype=dtype, attention_impl=impl)
    with matmul_precision(precision, dtype) as level:
        out = np.asarray(jax.jit(lambda x, m=model: m(x))(jnp.asarray(ids)).astype(jnp.float32))
    print(f"logits {dtype}, attention {impl}, matmul precision {precision} -> {level}: "
          f"max abs diff {np.abs(out - ref).max():.3g} (scale {np.abs(ref).max():.3g})")
PY
