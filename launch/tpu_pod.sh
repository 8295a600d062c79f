#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: copy the package to every worker, install it into a virtualenv
# there (once), and start `alignx train` on all workers at once, detached (one process per host;
# jax.distributed wires them up). The run survives the ssh session; each worker logs to
# REPO_DIR/logs/RUN_NAME/worker-<hostname>.log.
#
#   launch/tpu_pod.sh [--dry-run] [--no-copy] [--no-install] [--repo-dir DIR] [--project P] \
#                     [--run-name NAME] [--local-workdir] TPU_NAME ZONE CONFIG [--config.KEY=VALUE ...]
#   launch/tpu_pod.sh [--dry-run] [--repo-dir DIR] [--project P] [--worker W] --logs NAME TPU_NAME ZONE
#   launch/tpu_pod.sh [--dry-run] [--repo-dir DIR] [--project P] [--worker W] --stop NAME TPU_NAME ZONE
#
# e.g. launch/tpu_pod.sh --run-name pba8b my-v5p-64 us-east5-a configs/llama3_8b_pba_tpu_v5p_64.py \
#          --config.workdir=gs://my-bucket/pba8b --config.model.hf_path=/mnt/llama --config.data.train=/mnt/alignx
#      launch/tpu_pod.sh --logs pba8b my-v5p-64 us-east5-a     # follow every worker's log (Ctrl-C stops tailing)
#      launch/tpu_pod.sh --stop pba8b my-v5p-64 us-east5-a     # SIGTERM on every worker: save and exit
#
# A v5p-64 is 32 chips on 8 hosts of 4 chips: 8 workers, 8 processes. CONFIG is a file under configs/
# (copied with alignx_jax/, pyproject.toml and README.md; resolved on the workers). The workdir must be shared by every host (gs://...): each
# host writes its checkpoint shards there; --local-workdir allows a path (an NFS mount on every host).
# --dry-run prints the gcloud commands instead of running them. Rerunning the same command resumes
# from the workdir's last checkpoint (after a preemption, recreate the slice and rerun it).
# --repo-dir DIR: the code's folder on the workers (default alignx-jax, under the home folder; ~/DIR is DIR).
#   One word of letters, digits and . _ / + @ % = : , - (the old scp protocol splits others).
# --attach is --logs. --worker W: one worker's log instead of all (--logs), or SIGTERM on that worker alone
# (--stop; the others agree on the stop at their next step).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_pod.sh [--dry-run] [--no-copy] [--no-install] [--repo-dir DIR] [--project P] [--run-name NAME] [--local-workdir] TPU_NAME ZONE CONFIG [--config.KEY=VALUE ...]
       launch/tpu_pod.sh [--dry-run] [--repo-dir DIR] [--project P] [--worker W] --logs|--attach NAME TPU_NAME ZONE
       launch/tpu_pod.sh [--dry-run] [--repo-dir DIR] [--project P] [--worker W] --stop NAME TPU_NAME ZONE
EOF
  exit 2
}

dry_run=0; copy=1; install=1; repo_dir="alignx-jax"; project=""; run_name=""; local_workdir=0
mode="train"; worker="all"
pos=(); train_only=(); worker_given=""; modes=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-copy) copy=0; train_only+=("$1") ;;
    --no-install) install=0; train_only+=("$1") ;;
    --local-workdir) local_workdir=1; train_only+=("$1") ;;
    --repo-dir) [ "$#" -ge 2 ] || usage; repo_dir="$2"; shift ;;
    --repo-dir=*) repo_dir="${1#--repo-dir=}" ;;
    --project) [ "$#" -ge 2 ] || usage; project="$2"; shift ;;
    --project=*) project="${1#--project=}" ;;
    --run-name) [ "$#" -ge 2 ] || usage; run_name="$2"; train_only+=("$1"); shift ;;
    --run-name=*) run_name="${1#--run-name=}"; train_only+=("--run-name") ;;
    --worker) [ "$#" -ge 2 ] || usage; worker="$2"; worker_given="$1"; shift ;;
    --worker=*) worker="${1#--worker=}"; worker_given="--worker" ;;
    --logs|--attach) [ "$#" -ge 2 ] || usage; mode="logs"; run_name="$2"; modes+=("$1"); shift ;;
    --logs=*|--attach=*) mode="logs"; run_name="${1#*=}"; modes+=("${1%%=*}") ;;
    --stop) [ "$#" -ge 2 ] || usage; mode="stop"; run_name="$2"; modes+=("$1"); shift ;;
    --stop=*) mode="stop"; run_name="${1#--stop=}"; modes+=("--stop") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --config.*) pos+=("$1") ;;
    -*) echo "tpu_pod.sh: unknown option '$1'" >&2; usage ;;
    *) pos+=("$1") ;;
  esac
  shift
done
# each option applies to one mode: the others would be dropped without a word (--worker 3 started training on
# every worker; --logs a --run-name b followed run b)
if [ "${#modes[@]}" -gt 1 ]; then
  echo "tpu_pod.sh: give one of --logs/--attach and --stop, got ${modes[*]}" >&2; exit 2
fi
if [ "$mode" = "train" ] && [ -n "$worker_given" ]; then
  echo "tpu_pod.sh: --worker applies to --logs and --stop (a run starts on every worker)" >&2; exit 2
fi
if [ "$mode" != "train" ] && [ "${#train_only[@]}" -gt 0 ]; then
  echo "tpu_pod.sh: ${train_only[0]} applies to starting a run, not to ${modes[0]}" >&2; exit 2
fi
# ~/DIR as DIR: a relative path starts at the remote home for ssh and scp alike, where %q made ~ a literal
# folder for ssh (the code went to ~/DIR, the run to ~/\~/DIR); an empty one copied to the remote /
case "$repo_dir" in "~/"?*) repo_dir="${repo_dir#"~/"}" ;; esac
case "$repo_dir" in
  ""|"~"*) echo "tpu_pod.sh: --repo-dir is a folder on the workers (relative to the home folder, or absolute), got '$repo_dir'" >&2; exit 2 ;;
  # scp's remote path is split by the workers' shell under the old scp protocol (not under SFTP): one word only
  *[!A-Za-z0-9._/+@%=:,-]*) echo "tpu_pod.sh: --repo-dir uses letters, digits and . _ / + @ % = : , - (scp may split others), got '$repo_dir'" >&2; exit 2 ;;
esac
case "$run_name" in
  *[!A-Za-z0-9._-]*) echo "tpu_pod.sh: run names use letters, digits, . _ -, got '$run_name'" >&2; exit 2 ;;
esac

# shell-quote and join arguments (no trailing space)
quote() { local s; printf -v s '%q ' "$@"; printf '%s' "${s% }"; }
gcloud_base=(gcloud compute tpus tpu-vm)

run_cmds() {  # print (--dry-run) or run each command string
  local c
  for c in "$@"; do
    if [ "$dry_run" = 1 ]; then echo "$c"; else eval "$c"; fi
  done
}

if [ "$mode" != "train" ]; then
  [ "${#pos[@]}" -eq 2 ] || usage
  [ -n "$run_name" ] || { echo "tpu_pod.sh: --$mode needs the run's name" >&2; exit 2; }
  tpu="${pos[0]}"; zone="${pos[1]}"
  common=("--zone=${zone}" "--worker=${worker}")
  [ -n "$project" ] && common+=("--project=${project}")
  logs="$(printf '%q' "$repo_dir")/logs/${run_name}"
  if [ "$mode" = "logs" ]; then
    remote="tail -n 100 -F ${logs}/worker-*.log"
  else
    remote="kill -TERM \$(cat ${logs}/worker-\$(hostname).pid) && echo \"\$(hostname): SIGTERM sent\""
  fi
  run_cmds "$(quote "${gcloud_base[@]}" ssh "$tpu" "${common[@]}" "--command=${remote}")"
  exit 0
fi

[ "${#pos[@]}" -ge 3 ] || usage
tpu="${pos[0]}"; zone="${pos[1]}"; config="${pos[2]}"
overrides=("${pos[@]:3}")
for x in "$tpu" "$zone" "$config"; do
  case "$x" in --config.*) echo "tpu_pod.sh: TPU_NAME ZONE CONFIG come before the overrides" >&2; usage ;; esac
done
workdir=""
for o in "${overrides[@]+"${overrides[@]}"}"; do
  case "$o" in --config.*=*) ;; *) echo "tpu_pod.sh: overrides look like --config.KEY=VALUE, got '$o'" >&2; exit 2 ;; esac
  case "$o" in --config.workdir=*) workdir="${o#--config.workdir=}" ;; esac
done
if [ "$local_workdir" = 0 ]; then
  case "$workdir" in
    *://*) ;;
    "") echo "tpu_pod.sh: give --config.workdir=gs://BUCKET/RUN (shared by every host)" >&2; exit 2 ;;
    *) echo "tpu_pod.sh: --config.workdir=$workdir is a local path: every host must write the same" \
         "workdir (gs://BUCKET/RUN), or pass --local-workdir for a shared mount" >&2; exit 2 ;;
  esac
fi
[ -n "$run_name" ] || run_name="$(date +%Y%m%d-%H%M%S)"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$copy" = 1 ]; then  # the workers get configs/ (below) and read CONFIG from there
  case "$config" in
    configs/*) [ -f "$root/$config" ] || { echo "tpu_pod.sh: no such config: $root/$config" >&2; exit 2; } ;;
    *) echo "tpu_pod.sh: CONFIG is a path under configs/ (what is copied to the workers), got '$config'" >&2; exit 2 ;;
  esac
fi
common=("--zone=${zone}" "--worker=all")
[ -n "$project" ] && common+=("--project=${project}")

# The remote command: one string, every user value shell-quoted.
repo_q="$(printf '%q' "$repo_dir")"
logs="logs/${run_name}"
remote="cd ${repo_q} && mkdir -p ${logs}"
if [ "$install" = 1 ]; then
  # a virtualenv beside the code, installed once (again only when pyproject.toml changed)
  remote+=" && { [ -x .venv/bin/python ] || python3 -m venv .venv; }"
  remote+=" && { cmp -s pyproject.toml .venv/alignx-installed.toml || { .venv/bin/pip install -q -U pip"
  remote+=" && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]' && cp pyproject.toml .venv/alignx-installed.toml; }; }"
fi
train=(.venv/bin/python -m alignx_jax train "--config=${config}" "${overrides[@]+"${overrides[@]}"}" "--config.train.distributed=true")
# detached: nohup, stdin closed, output to this host's log; the pid file is what --stop signals
remote+=" && { nohup $(quote "${train[@]}") > ${logs}/worker-\$(hostname).log 2>&1 < /dev/null &"
remote+=" echo \$! > ${logs}/worker-\$(hostname).pid; echo \"\$(hostname): started, log ${repo_q}/${logs}/worker-\$(hostname).log\"; }"

cmds=()
if [ "$copy" = 1 ]; then
  cmds+=("$(quote "${gcloud_base[@]}" ssh "$tpu" "${common[@]}" "--command=mkdir -p ${repo_q}")")
  # ship the working tree (not the venv or runs) to every worker
  cmds+=("$(quote "${gcloud_base[@]}" scp --recurse "${common[@]}" "$root/alignx_jax" "$root/configs" \
           "$root/pyproject.toml" "$root/README.md" "${tpu}:${repo_dir}/")")
fi
cmds+=("$(quote "${gcloud_base[@]}" ssh "$tpu" "${common[@]}" "--command=${remote}")")
run_cmds "${cmds[@]}"
if [ "$dry_run" = 0 ]; then
  echo "tpu_pod.sh: run '${run_name}' started on every worker of ${tpu}; logs: ${repo_dir}/${logs}/worker-<host>.log" >&2
  echo "  follow: launch/tpu_pod.sh --logs ${run_name} ${tpu} ${zone}   stop (saves): --stop ${run_name}" >&2
else
  echo "# run name: ${run_name}; logs: ${repo_dir}/${logs}/worker-<host>.log" >&2
fi
