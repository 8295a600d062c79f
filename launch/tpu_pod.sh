#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: copy the repository to every worker, install it, and run
# `alignx train` on all workers at once (one process per host; jax.distributed wires them up).
#
#   launch/tpu_pod.sh [--dry-run] [--no-copy] [--no-install] [--repo-dir DIR] [--project P] \
#                     TPU_NAME ZONE CONFIG [--config.KEY=VALUE ...]
#
# e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a configs/llama3_8b_pba_tpu_v5p_64.py \
#          --config.workdir=gs://bucket/pba8b --config.model.hf_path=/mnt/llama --config.data.train=/mnt/alignx
#
# CONFIG is a path inside the repository (it is resolved on the workers). --dry-run prints the
# gcloud commands instead of running them. The workdir should be shared (e.g. gs://) so that every
# host writes its checkpoint shards to the same place.
set -euo pipefail

usage() {
  echo "usage: launch/tpu_pod.sh [--dry-run] [--no-copy] [--no-install] [--repo-dir DIR] [--project P] TPU_NAME ZONE CONFIG [--config.KEY=VALUE ...]" >&2
  exit 2
}

dry_run=0; copy=1; install=1; repo_dir="alignx-jax"; project=""
pos=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-copy) copy=0 ;;
    --no-install) install=0 ;;
    --repo-dir) [ "$#" -ge 2 ] || usage; repo_dir="$2"; shift ;;
    --repo-dir=*) repo_dir="${1#--repo-dir=}" ;;
    --project) [ "$#" -ge 2 ] || usage; project="$2"; shift ;;
    --project=*) project="${1#--project=}" ;;
    -h|--help) usage ;;
    --config.*) pos+=("$1") ;;
    -*) echo "tpu_pod.sh: unknown option '$1'" >&2; usage ;;
    *) pos+=("$1") ;;
  esac
  shift
done
[ "${#pos[@]}" -ge 3 ] || usage
tpu="${pos[0]}"; zone="${pos[1]}"; config="${pos[2]}"
overrides=("${pos[@]:3}")
for x in "$tpu" "$zone" "$config"; do
  case "$x" in --config.*) echo "tpu_pod.sh: TPU_NAME ZONE CONFIG come before the overrides" >&2; usage ;; esac
done
for o in "${overrides[@]+"${overrides[@]}"}"; do
  case "$o" in --config.*=*) ;; *) echo "tpu_pod.sh: overrides look like --config.KEY=VALUE, got '$o'" >&2; exit 2 ;; esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# shell-quote and join arguments (no trailing space)
quote() { local s; printf -v s '%q ' "$@"; printf '%s' "${s% }"; }
gcloud_base=(gcloud compute tpus tpu-vm)
common=("--zone=${zone}" "--worker=all")
[ -n "$project" ] && common+=("--project=${project}")

# The remote command: one string, every user value shell-quoted.
remote="cd $(printf '%q' "$repo_dir")"
if [ "$install" = 1 ]; then
  remote+=" && python3 -m pip install -q -e . 'jax[tpu]'"
fi
train=(python3 -m alignx_jax train "--config=${config}" "${overrides[@]+"${overrides[@]}"}" "--config.train.distributed=true")
remote+=" && $(quote "${train[@]}")"

cmds=()
if [ "$copy" = 1 ]; then
  # ship the working tree (not the venv or runs) to every worker
  cmds+=("$(quote "${gcloud_base[@]}" scp --recurse "${common[@]}" "$root/alignx_jax" "$root/configs" \
           "$root/pyproject.toml" "$root/README.md" "${tpu}:${repo_dir}/")")
fi
cmds+=("$(quote "${gcloud_base[@]}" ssh "$tpu" "${common[@]}" "--command=${remote}")")

for c in "${cmds[@]}"; do
  if [ "$dry_run" = 1 ]; then echo "$c"; else
    if [ "$copy" = 1 ] && [ "$c" = "${cmds[0]}" ]; then
      # scp needs the remote folder first
      "${gcloud_base[@]}" ssh "$tpu" "${common[@]}" "--command=mkdir -p $(printf '%q' "$repo_dir")"
    fi
    eval "$c"
  fi
done
