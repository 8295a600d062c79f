#!/usr/bin/env bash
# Train on several GPU hosts under SLURM: one process per host (`srun --ntasks-per-node=1`), each
# driving all of its GPUs; jax.distributed.initialize() reads the job from SLURM's environment.
# (One GPU host: launch/gpu_host.sh.)
#
#   launch/gpu_multihost.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P] [--account A] \
#                           [--time T] [--logdir DIR] CONFIG [--config.KEY=VALUE ...]
#
# e.g. (inside `salloc --nodes=4 --gpus-per-node=8`, or in an sbatch script, or alone: srun allocates)
#      launch/gpu_multihost.sh --nodes 4 configs/llama3_8b_ica_gpu.py --config.workdir=/shared/runs/ica8b \
#          --config.model.hf_path=/shared/models/Llama-3.1-8B-Instruct --config.data.train=/shared/data/alignx
#
# The workdir, model and data must be on storage every host sees (a shared file system or gs://).
# Logs: LOGDIR/node-<n>.log (default runs/slurm-logs/<job id or time>). A preempted or requeued job
# (`sbatch --requeue`) resumes from the workdir's last checkpoint when the same command runs again.
# --nodes and --gpus-per-node default to the allocation's (SLURM_JOB_NUM_NODES, SLURM_GPUS_PER_NODE), else
# GPUS_PER_NODE, else 8 GPUs.
# Environment: PYTHON (default python3), GPUS_PER_NODE, ALIGNX_EXTRA_XLA_FLAGS, the XLA/NCCL settings of gpu_host.sh.
set -euo pipefail

usage() {
  echo "usage: launch/gpu_multihost.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P] [--account A] [--time T] [--logdir DIR] CONFIG [--config.KEY=VALUE ...]" >&2
  exit 2
}

# inside an allocation its own GPU count per node (SLURM_GPUS_PER_NODE: "4" or "TYPE:4"), else GPUS_PER_NODE, else 8
slurm_gpus="${SLURM_GPUS_PER_NODE:-}"; slurm_gpus="${slurm_gpus##*:}"
dry_run=0; nodes="${SLURM_JOB_NUM_NODES:-}"; gpus="${slurm_gpus:-${GPUS_PER_NODE:-8}}"; partition=""; account=""; time_limit=""
logdir=""
args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --nodes|--gpus-per-node|--partition|--account|--time|--logdir)
      [ "$#" -ge 2 ] || usage
      case "$1" in
        --nodes) nodes="$2" ;; --gpus-per-node) gpus="$2" ;; --partition) partition="$2" ;;
        --account) account="$2" ;; --time) time_limit="$2" ;; --logdir) logdir="$2" ;;
      esac
      shift ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --config.*) args+=("$1") ;;
    -*) echo "gpu_multihost.sh: unknown option '$1'" >&2; usage ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ "${#args[@]}" -ge 1 ] || usage
config="${args[0]}"
overrides=("${args[@]:1}")
case "$config" in --*) echo "gpu_multihost.sh: the first argument must be a config file, got '$config'" >&2; exit 2 ;; esac
for o in "${overrides[@]+"${overrides[@]}"}"; do
  case "$o" in --config.*=*) ;; *) echo "gpu_multihost.sh: overrides look like --config.KEY=VALUE, got '$o'" >&2; exit 2 ;; esac
done
[ -n "$nodes" ] || { echo "gpu_multihost.sh: --nodes N (or run inside an allocation)" >&2; exit 2; }
for v in "$nodes" "$gpus"; do
  case "$v" in ''|*[!0-9]*|0*) echo "gpu_multihost.sh: --nodes and --gpus-per-node are positive integers, got '$v'" >&2; exit 2 ;; esac
done
if [ "$dry_run" = 0 ] && [ ! -f "$config" ]; then echo "gpu_multihost.sh: config file not found: $config" >&2; exit 2; fi
logdir="${logdir:-runs/slurm-logs/${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}"

# the same XLA GPU flags as one host (launch/gpu_host.sh)
xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true"
xla_flags+=" --xla_gpu_all_gather_combine_threshold_bytes=134217728"
xla_flags+=" --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
xla_flags+=" --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
[ -n "${ALIGNX_EXTRA_XLA_FLAGS:-}" ] && xla_flags+=" ${ALIGNX_EXTRA_XLA_FLAGS}"
if [ -n "${XLA_FLAGS:-}" ]; then  # replaced below: the caller's flags were dropped without a word
  echo "gpu_multihost.sh: warning: XLA_FLAGS from the environment is replaced; give extra flags in ALIGNX_EXTRA_XLA_FLAGS" >&2
fi
device_ids="$(seq -s, 0 $((gpus - 1)))"

env_vars=(
  "XLA_FLAGS=${xla_flags}"
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
  "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}"
  # JAX's SLURM detection assumes one process per GPU (local devices = [SLURM_LOCALID]); one process
  # per host drives all of them
  "JAX_LOCAL_DEVICE_IDS=${device_ids}"
)
srun_args=(srun "--nodes=${nodes}" --ntasks-per-node=1 "--gpus-per-node=${gpus}" --kill-on-bad-exit=1
  "--output=${logdir}/node-%n.log")
[ -n "$partition" ] && srun_args+=("--partition=${partition}")
[ -n "$account" ] && srun_args+=("--account=${account}")
[ -n "$time_limit" ] && srun_args+=("--time=${time_limit}")
# train.distributed=true: `alignx train` calls jax.distributed.initialize(), which reads SLURM_* (other
# commands: ALIGNX_DISTRIBUTED=1 in the environment does the same, alignx_jax/distributed.py)
cmd=("${PYTHON:-python3}" -m alignx_jax train "--config=${config}" "${overrides[@]+"${overrides[@]}"}"
  "--config.train.distributed=true")

if [ "$dry_run" = 1 ]; then
  for e in "${env_vars[@]}"; do printf 'export %q\n' "$e"; done
  printf -v line '%q ' "${srun_args[@]}" "${cmd[@]}"; printf '%s\n' "${line% }"
  exit 0
fi
mkdir -p "$logdir"
echo "gpu_multihost.sh: ${nodes} hosts x ${gpus} GPUs; logs in ${logdir}/node-<n>.log" >&2
exec env "${env_vars[@]}" "${srun_args[@]}" "${cmd[@]}"
