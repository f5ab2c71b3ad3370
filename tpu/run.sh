#!/usr/bin/env bash
# Runs one command in ~/pr1_jax on EVERY worker of a TPU slice (the multi-host launch:
# each worker runs the same program; jax.distributed joins them).
#
#   tpu/run.sh NAME COMMAND...                 # e.g. tpu/run.sh pr1 bash tpu/setup.sh
#   tpu/run.sh --sync NAME COMMAND...          # first copy this checkout to every worker
#   tpu/run.sh pr1 .venv/bin/python -m pr1_jax.train --config=configs/grounding.py ...
#
# Sets PR1_JAX_DISTRIBUTED=1, so pr1_jax.multihost.initialize_distributed() calls
# jax.distributed.initialize(), which finds the slice's workers itself. Optional: ZONE,
# PROJECT, REMOTE_DIR (default ~/pr1_jax).
set -euo pipefail

SYNC=0
if [[ ${1:-} == --sync ]]; then SYNC=1; shift; fi
NAME=${1:?usage: tpu/run.sh [--sync] NAME COMMAND...}
shift
[[ $# -gt 0 ]] || { echo "usage: tpu/run.sh [--sync] NAME COMMAND..." >&2; exit 2; }
REMOTE_DIR=${REMOTE_DIR:-pr1_jax}
FLAGS=(--worker=all)
[[ -n "${ZONE:-}" ]] && FLAGS+=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && FLAGS+=(--project="$PROJECT")

if [[ $SYNC == 1 ]]; then  # tracked and new (not ignored) files of this checkout, no venv or runs
  cd "$(dirname "$0")/.."
  ARCHIVE=$(mktemp /tmp/pr1_jax.XXXXXX.tgz)
  git ls-files --cached --others --exclude-standard -z | tar czf "$ARCHIVE" --null -T -
  gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":/tmp/pr1_jax.tgz "${FLAGS[@]}"
  gcloud compute tpus tpu-vm ssh "$NAME" "${FLAGS[@]}" \
    --command="mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/pr1_jax.tgz -C ~/$REMOTE_DIR"
  rm -f "$ARCHIVE"
fi

printf -v CMD '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$NAME" "${FLAGS[@]}" \
  --command="cd ~/$REMOTE_DIR && PR1_JAX_DISTRIBUTED=1 $CMD"
