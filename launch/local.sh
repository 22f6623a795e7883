#!/usr/bin/env bash
# Run N JAX processes of one command on this machine (127.0.0.1), each with its own simulated
# CPU devices: the local stand-in for a multi-host run.
#
#   launch/local.sh [--dry-run] N CMD [ARGS...]
#   launch/local.sh 2 mtp train --config configs/tiny.py --workdir /tmp/mh
#
# Environment: MTP_LOCAL_DEVICES (CPU devices per process, default 4), MTP_PORT (coordinator
# port, default: a free one). Each process gets MTP_COORDINATOR, MTP_NUM_PROCESSES,
# MTP_PROCESS_ID (read by mtp.distributed.initialize) and its output prefixed with "[i] ".
# Exits with the first nonzero status, after stopping the other processes.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh [--dry-run] N CMD [ARGS...]   (N >= 1 processes)" >&2
  exit 2
fi
n=$1; shift
devices=${MTP_LOCAL_DEVICES:-4}
port=${MTP_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    printf 'MTP_COORDINATOR=127.0.0.1:%s MTP_NUM_PROCESSES=%s MTP_PROCESS_ID=%s JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=%s' \
      "$port" "$n" "$i" "$devices"
    printf ' %q' "$@"
    printf '\n'
  done
  exit 0
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  (
    export MTP_COORDINATOR=127.0.0.1:$port MTP_NUM_PROCESSES=$n MTP_PROCESS_ID=$i JAX_PLATFORMS=cpu
    export XLA_FLAGS=--xla_force_host_platform_device_count=$devices
    # exec so the pid we kill is the command itself; the prefixer is a separate process.
    exec "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2)
  ) &
  pids+=($!)
done

status=0
live=("${pids[@]}")
while ((${#live[@]} > 0)); do
  set +e
  wait -n -p done_pid "${live[@]}"
  rc=$?
  set -e
  still=()
  for pid in "${live[@]}"; do [[ $pid != "$done_pid" ]] && still+=("$pid"); done
  live=("${still[@]}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch/local.sh: a process (pid $done_pid) exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
wait  # the output prefixers
exit $status
