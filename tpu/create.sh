#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, directly or as a queued resource (waits for capacity).
#
#   tpu/create.sh NAME ACCELERATOR_TYPE [--queued] [--spot]
#   ZONE=us-west4-a tpu/create.sh pr1 v5litepod-8 --queued --spot
#
# ACCELERATOR_TYPE as gcloud names it: v4-8, v5litepod-8/16/32 (v5e), v5p-8, v6e-8, ...
# The runtime image follows from the TPU generation (override with RUNTIME=...).
# Optional: ZONE (else gcloud's compute/zone), PROJECT (else gcloud's project).
set -euo pipefail

NAME=${1:?usage: tpu/create.sh NAME ACCELERATOR_TYPE [--queued] [--spot]}
TYPE=${2:?usage: tpu/create.sh NAME ACCELERATOR_TYPE [--queued] [--spot]}
shift 2
QUEUED=0
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    --spot) EXTRA+=(--spot) ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

case "$TYPE" in
  v4-*) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
  v5litepod-*|v5e-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}
COMMON=(--accelerator-type="$TYPE")
[[ -n "${ZONE:-}" ]] && COMMON+=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && COMMON+=(--project="$PROJECT")

if [[ $QUEUED == 1 ]]; then
  gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${COMMON[@]}" \
    --runtime-version="$RUNTIME" "${EXTRA[@]}"
  echo "queued; watch it with: gcloud compute tpus queued-resources describe $NAME ${ZONE:+--zone=$ZONE}"
else
  gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" --version="$RUNTIME" "${EXTRA[@]}"
fi
