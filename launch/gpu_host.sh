#!/usr/bin/env bash
# Train on one GPU host with all of its GPUs (one process drives every local device).
#
#   launch/gpu_host.sh [--dry-run] CONFIG [--config.KEY=VALUE ...]
#
# e.g. launch/gpu_host.sh configs/llama3_8b_ica_gpu.py --config.workdir=runs/ica8b \
#          --config.model.hf_path=/models/Llama-3.1-8B-Instruct --config.data.train=/data/alignx
#
# --dry-run prints the environment and the command instead of running them.
# PYTHON (default: python3) picks the interpreter that has alignx-jax installed.
# Extra XLA flags can be appended through ALIGNX_EXTRA_XLA_FLAGS (XLA_FLAGS itself is replaced, with a warning).
set -euo pipefail

usage() { echo "usage: launch/gpu_host.sh [--dry-run] CONFIG [--config.KEY=VALUE ...]" >&2; exit 2; }

dry_run=0
args=()
for a in "$@"; do
  case "$a" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$a") ;;
  esac
done
[ "${#args[@]}" -ge 1 ] || usage
config="${args[0]}"
overrides=("${args[@]:1}")
case "$config" in --*) echo "gpu_host.sh: the first argument must be a config file, got '$config'" >&2; exit 2 ;; esac
for o in "${overrides[@]+"${overrides[@]}"}"; do
  case "$o" in --config.*=*) ;; *) echo "gpu_host.sh: overrides look like --config.KEY=VALUE, got '$o'" >&2; exit 2 ;; esac
done
if [ "$dry_run" = 0 ] && [ ! -f "$config" ]; then echo "gpu_host.sh: config file not found: $config" >&2; exit 2; fi

# XLA GPU flags (see the XLA GPU flag guidance used by JAX LLM trainers):
#  - latency hiding scheduler: overlap FSDP all-gathers / reduce-scatters with compute;
#  - larger collective combine thresholds: fewer, bigger NCCL calls for the per-layer FSDP traffic;
#  - XLA's own gemm choice (Triton or cuBLAS) is kept: forcing cuBLAS (--xla_gpu_enable_triton_gemm=false)
#    made the 1B bf16 DPO step slower on an H200 (BENCHMARKS.md section 8).
xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true"
xla_flags+=" --xla_gpu_all_gather_combine_threshold_bytes=134217728"
xla_flags+=" --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
xla_flags+=" --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
[ -n "${ALIGNX_EXTRA_XLA_FLAGS:-}" ] && xla_flags+=" ${ALIGNX_EXTRA_XLA_FLAGS}"
if [ -n "${XLA_FLAGS:-}" ]; then  # replaced below: the caller's flags were dropped without a word
  echo "gpu_host.sh: warning: XLA_FLAGS from the environment is replaced; give extra flags in ALIGNX_EXTRA_XLA_FLAGS" >&2
fi

env_vars=(
  "XLA_FLAGS=${xla_flags}"
  # the step uses nearly all HBM; preallocating 95% avoids fragmentation from the default 75%
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
  "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}"
)
cmd=("${PYTHON:-python3}" -m alignx_jax train "--config=${config}" "${overrides[@]+"${overrides[@]}"}")

if [ "$dry_run" = 1 ]; then
  for e in "${env_vars[@]}"; do printf 'export %q\n' "$e"; done
  printf -v line '%q ' "${cmd[@]}"; printf '%s\n' "${line% }"
  exit 0
fi
exec env "${env_vars[@]}" "${cmd[@]}"
