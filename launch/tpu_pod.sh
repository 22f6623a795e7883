#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod slice (one JAX process per worker host).
#
#   launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project PROJECT] [--repo DIR] -- CMD [ARGS...]
#   launch/tpu_pod.sh --tpu my-v5e-32 --zone us-west4-a -- mtp train --config default --workdir /mnt/shared/run
#
# Every worker runs `cd DIR && MTP_DISTRIBUTED=auto CMD`: JAX finds the coordinator, the process
# count and this worker's index from the TPU metadata, so no MTP_COORDINATOR is needed. DIR
# (default ~/mtp) must hold this repository, installed, on every worker; the workdir must be
# a filesystem all workers share (e.g. an NFS mount; gs:// is not supported yet) so that checkpoints line up.
# --dry-run prints the gcloud command instead of running it.
set -euo pipefail

usage() {
  echo "usage: launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project PROJECT] [--repo DIR] -- CMD [ARGS...]" >&2
  exit 2
}

dry_run=0 tpu="" zone="" project="" repo="~/mtp"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tpu) tpu=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --project) project=${2:?}; shift 2 ;;
    --repo) repo=${2:?}; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch/tpu_pod.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || usage

remote="cd $repo && MTP_DISTRIBUTED=auto"
for arg in "$@"; do remote+=" $(printf '%q' "$arg")"; done
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote")
[[ -n "$project" ]] && cmd+=(--project="$project")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
