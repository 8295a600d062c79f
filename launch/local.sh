#!/usr/bin/env bash
# Run any `alignx` command as N processes of one JAX job on this machine (127.0.0.1), each with
# DEVICES_PER_PROCESS CPU devices: a real multi-process run (gloo collectives) for testing what a pod does.
#
#   launch/local.sh [--dry-run] N alignx COMMAND [ARGS ...]
#   launch/local.sh [--dry-run] N python SCRIPT.py [ARGS ...]   (a script that calls
#       alignx_jax.distributed.initialize_from_env() itself, e.g. tests/mp_modes.py)
#
# e.g. launch/local.sh 2 alignx train --config=configs/tiny_cpu.py --config.workdir=runs/tiny2 --config.train.micro_batch=8
#      (2 processes x 4 devices = one 8-device mesh)
#
# Environment:
#   DEVICES_PER_PROCESS  CPU devices per process (default 4)
#   LOGDIR               where process_<i>.log go (default runs/local-logs/<time>-<pid>; printed)
#   PYTHON               interpreter with alignx-jax installed (default: .venv/bin/python if present, else python3)
#   COORDINATOR_PORT     coordinator port on 127.0.0.1 (default: a free one)
#   KILL_AFTER           seconds the others get, after one process failed and they had SIGTERM, before SIGKILL (default 30)
# Each process gets ALIGNX_COORDINATOR_ADDRESS / ALIGNX_NUM_PROCESSES / ALIGNX_PROCESS_ID, which `alignx`
# turns into jax.distributed.initialize(...) before it runs the command (alignx_jax/distributed.py).
# SIGTERM/SIGINT are forwarded to every process, once (each runs in a process group of its own, so that a
# terminal's Ctrl-C or a signal to this script's group reaches it from here alone), SIGHUP as SIGTERM;
# this script waits for them all. The exit status is 0 when all of them exit 0; otherwise
# the first failing status, after naming each failed process and the last lines of its log.
set -euo pipefail

usage() { echo "usage: launch/local.sh [--dry-run] N alignx COMMAND [ARGS ...] | N python SCRIPT [ARGS ...]" >&2; exit 2; }
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ "$#" -ge 3 ] || usage
n="$1"; shift
case "$n" in ''|*[!0-9]*) echo "local.sh: N must be a positive integer, got '$n'" >&2; exit 2 ;; esac
[ "${#n}" -le 6 ] || { echo "local.sh: N must be at most 999999, got '$n'" >&2; exit 2; }  # past 18 digits it wraps
n=$((10#$n))  # decimal: bash's arithmetic reads 08 as bad octal (no process ran, exit 0) and 010 as 8
[ "$n" -ge 1 ] || { echo "local.sh: N must be at least 1" >&2; exit 2; }
case "$1" in
  alignx|python) kind="$1" ;;
  *) echo "local.sh: the command starts with 'alignx' or 'python', got '$1'" >&2; exit 2 ;;
esac
shift
if [ "$kind" = python ] && [ ! -f "${1:-}" ]; then
  echo "local.sh: 'python' takes a script file, got '${1:-}' (for a command: N alignx COMMAND ...)" >&2; exit 2
fi
devices="${DEVICES_PER_PROCESS:-4}"
case "$devices" in ''|*[!0-9]*|???????*) echo "local.sh: DEVICES_PER_PROCESS must be a positive integer" >&2; exit 2 ;; esac
devices=$((10#$devices))  # 00 is 0 devices, 08 a decimal 8
[ "$devices" -ge 1 ] || { echo "local.sh: DEVICES_PER_PROCESS must be a positive integer" >&2; exit 2; }
kill_after="${KILL_AFTER:-30}"
# it is compared in the polling loop, where a word was an error line every 0.2 s and no SIGKILL ever
case "$kill_after" in ''|*[!0-9]*|??????*) echo "local.sh: KILL_AFTER must be a number of seconds, got '$kill_after'" >&2; exit 2 ;; esac
kill_after=$((10#$kill_after))

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
logdir="${LOGDIR:-runs/local-logs/$(date +%Y%m%d-%H%M%S)-$$}"
port="${COORDINATOR_PORT:-}"
if [ -z "$port" ]; then
  # set -e alone ended the script here without a word (exit 127 after bash's own line, or 1 for a PYTHON that ran)
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null)" \
    || { echo "local.sh: PYTHON '$py' could not run (give an interpreter with alignx-jax installed)" >&2; exit 2; }
fi
case "$port" in
  ''|*[!0-9]*|0*|??????*) echo "local.sh: COORDINATOR_PORT must be a port number (1-65535), got '$port'" >&2; exit 2 ;;
esac
[ "$port" -le 65535 ] || { echo "local.sh: COORDINATOR_PORT must be a port number (1-65535), got '$port'" >&2; exit 2; }

# XLA_FLAGS: keep the caller's flags, set the device count
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices}"
xla_flags="${xla_flags# }"; xla_flags="${xla_flags#"${xla_flags%%[![:space:]]*}"}"

common_env=(
  "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}"
  "XLA_FLAGS=${xla_flags}"
  "ALIGNX_COORDINATOR_ADDRESS=127.0.0.1:${port}"
  "ALIGNX_NUM_PROCESSES=${n}"
  "ALIGNX_CPU_COLLECTIVES=${ALIGNX_CPU_COLLECTIVES:-gloo}"
)
if [ "$kind" = alignx ]; then cmd=("$py" -m alignx_jax "$@"); else cmd=("$py" "$@"); fi

if [ "$dry_run" = 1 ]; then
  echo "# logs: ${logdir}/process_<i>.log"
  for ((i = 0; i < n; i++)); do
    printf -v line '%q ' env "${common_env[@]}" "ALIGNX_PROCESS_ID=$i" "${cmd[@]}"
    printf '%s > %q 2>&1 < /dev/null &\n' "${line% }" "${logdir}/process_${i}.log"
  done
  exit 0
fi

mkdir -p "$logdir"
echo "local.sh: $n processes x $devices CPU devices, coordinator 127.0.0.1:${port}; logs in ${logdir}/process_<i>.log" >&2

pids=()
cleanup_signal=""
forward() {
  cleanup_signal="$1"
  for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward TERM' HUP  # the terminal went away: the processes, in groups of their own, would not hear of it

# each process in a process group of its own (job control, for the launches only): a terminal's Ctrl-C or a
# signal to this script's group (`timeout`, a scheduler) reaches it once, through `forward`. In this group it
# got the terminal's SIGINT and then the forwarded one: `alignx train`'s second Ctrl-C, which stops at once
# without saving, while the others waited in a collective until JAX's shutdown timeout
set -m
for ((i = 0; i < n; i++)); do
  env "${common_env[@]}" "ALIGNX_PROCESS_ID=$i" "${cmd[@]}" > "${logdir}/process_${i}.log" 2>&1 < /dev/null &
  pids+=("$!")
done
set +m

# poll: a process that fails takes the job down (the others would block in a collective until the
# coordinator's heartbeat timeout), so the rest get SIGTERM, then SIGKILL after KILL_AFTER seconds
codes=(); for ((i = 0; i < n; i++)); do codes+=(""); done
running="$n"; failed_at=""; first_failed=""
while [ "$running" -gt 0 ]; do
  running=0
  for ((i = 0; i < n; i++)); do
    [ -n "${codes[$i]}" ] && continue
    if kill -0 "${pids[$i]}" 2>/dev/null; then running=$((running + 1)); continue; fi
    set +e; wait "${pids[$i]}"; rc=$?; set -e
    codes[$i]="$rc"
    if [ "$rc" != 0 ] && [ -z "$failed_at" ] && [ -z "$cleanup_signal" ]; then
      failed_at="$SECONDS"; first_failed="$i"
      echo "local.sh: process $i exited with status $rc; stopping the others" >&2
      for ((j = 0; j < n; j++)); do [ -z "${codes[$j]}" ] && kill -s TERM "${pids[$j]}" 2>/dev/null || true; done
    fi
  done
  if [ -n "$failed_at" ] && [ $((SECONDS - failed_at)) -ge "$kill_after" ]; then
    for ((j = 0; j < n; j++)); do [ -z "${codes[$j]}" ] && kill -s KILL "${pids[$j]}" 2>/dev/null || true; done
  fi
  # a signal to this script's group ends this `sleep` too: no reason to leave (set -e would end the script
  # at once, exit 143/130, its processes running on without it)
  if [ "$running" -gt 0 ]; then sleep 0.2 || true; fi
done

status=0
for ((i = 0; i < n; i++)); do
  rc="${codes[$i]}"
  if [ "$rc" != 0 ]; then
    why=""; [ -n "$first_failed" ] && [ "$i" != "$first_failed" ] && why=" (stopped after process ${first_failed} failed)"
    echo "local.sh: process $i exited with status ${rc}${why}; last lines of ${logdir}/process_${i}.log:" >&2
    tail -n 20 "${logdir}/process_${i}.log" | sed 's/^/  | /' >&2
    [ "$status" = 0 ] && status="$rc"
  fi
done
# the status of the process that failed first, not of those stopped because of it
[ -n "$first_failed" ] && status="${codes[$first_failed]}"
[ -n "$cleanup_signal" ] && echo "local.sh: forwarded SIG${cleanup_signal} to all processes" >&2
[ "$status" = 0 ] && echo "local.sh: all $n processes exited 0; logs in ${logdir}" >&2
exit "$status"
