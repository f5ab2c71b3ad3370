#!/usr/bin/env bash
# Runs one command in ~/pr1_jax on EVERY worker of a TPU slice (the multi-host launch:
# each worker runs the same program; jax.distributed joins them).
#
#   tpu/run.sh NAME COMMAND...              # in the foreground (setup, quick checks)
#   tpu/run.sh --sync NAME COMMAND...       # first copy this checkout to every worker
#   tpu/run.sh --detach NAME COMMAND...     # a job: detached on every worker, survives a dropped ssh
#   tpu/run.sh --follow NAME                # the job's log on worker 0 (tail -F; Ctrl-C leaves the job)
#   tpu/run.sh --status NAME                # per worker: running or exited (with its status), last lines
#   tpu/run.sh --stop NAME                  # SIGTERM: checkpoint at the end of the step, exit 0
#
#   tpu/run.sh --sync --detach pr1 .venv/bin/python -m pr1_jax.train --config=configs/grounding.py ...
#
# Sets PR1_JAX_DISTRIBUTED=1, so pr1_jax.multihost.initialize_distributed() calls
# jax.distributed.initialize(), which finds the slice's workers itself. A detached job writes
# ~/pr1_jax/logs/job.log, job.pid and, when it ends, job.status on each worker; one job at a
# time. Optional: ZONE, PROJECT, REMOTE_DIR (default pr1_jax, under the home directory).
set -euo pipefail

usage() {
  echo "usage: tpu/run.sh [--sync] [--detach] NAME COMMAND... | --follow NAME | --status NAME | --stop NAME" >&2
  exit 2
}

SYNC=0 DETACH=0 MODE=run
while [[ ${1:-} == --* ]]; do
  case $1 in
    --sync) SYNC=1 ;;
    --detach) DETACH=1 ;;
    --follow | --status | --stop) MODE=${1#--} ;;
    *) usage ;;
  esac
  shift
done
NAME=${1:-}
[[ -n $NAME ]] || usage
shift
REMOTE_DIR=${REMOTE_DIR:-pr1_jax}
LOGS="\$HOME/$REMOTE_DIR/logs"  # expanded on the worker
FLAGS=()
[[ -n "${ZONE:-}" ]] && FLAGS+=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && FLAGS+=(--project="$PROJECT")

on() {  # on WORKER REMOTE_COMMAND: run it over ssh on one worker (0) or all of them
  gcloud compute tpus tpu-vm ssh "$NAME" --worker="$1" "${FLAGS[@]}" --command="$2"
}

case $MODE in
  follow) on 0 "tail -n 100 -F $LOGS/job.log"; exit ;;
  status)
    on all "if [ -f $LOGS/job.status ]; then echo \"\$(hostname): exited with status \$(cat $LOGS/job.status)\";
            elif [ -f $LOGS/job.pid ] && kill -0 \"\$(cat $LOGS/job.pid)\" 2>/dev/null; then
              echo \"\$(hostname): running (pid \$(cat $LOGS/job.pid))\";
            else echo \"\$(hostname): no job\"; fi; tail -n 3 $LOGS/job.log 2>/dev/null || true"
    exit ;;
  stop)  # the job's whole process group (it leads one: setsid)
    on all "[ -f $LOGS/job.pid ] && kill -TERM -- \"-\$(cat $LOGS/job.pid)\" 2>/dev/null && echo \"\$(hostname): SIGTERM sent\" || true"
    exit ;;
esac
[[ $# -gt 0 ]] || usage

if [[ $SYNC == 1 ]]; then  # tracked and new (not ignored) files of this checkout, no venv or runs
  cd "$(dirname "$0")/.."
  ARCHIVE=$(mktemp /tmp/pr1_jax.XXXXXX.tgz)
  git ls-files --cached --others --exclude-standard -z | tar czf "$ARCHIVE" --null -T -
  gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":/tmp/pr1_jax.tgz --worker=all "${FLAGS[@]}"
  on all "mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/pr1_jax.tgz -C ~/$REMOTE_DIR"
  rm -f "$ARCHIVE"
fi

printf -v CMD '%q ' "$@"
if [[ $DETACH == 0 ]]; then
  on all "cd ~/$REMOTE_DIR && PR1_JAX_DISTRIBUTED=1 $CMD"
  exit
fi
# Detached: setsid + nohup, so the job outlives the ssh session; its exit status is kept. The
# wrapper traps SIGTERM with a handler (not by ignoring it, which the job would inherit), so that
# after --stop it still records the job's status.
JOB="trap true TERM; cd ~/$REMOTE_DIR && PR1_JAX_DISTRIBUTED=1 $CMD; echo \$? > $LOGS/job.status"
on all "mkdir -p $LOGS && rm -f $LOGS/job.status && if [ -f $LOGS/job.pid ] && kill -0 \"\$(cat $LOGS/job.pid)\" 2>/dev/null;
        then echo \"\$(hostname): a job is running (pid \$(cat $LOGS/job.pid)); tpu/run.sh --stop first\" >&2; exit 2; fi;
        setsid nohup bash -c $(printf '%q' "$JOB") > $LOGS/job.log 2>&1 < /dev/null & echo \$! > $LOGS/job.pid;
        echo \"\$(hostname): started (pid \$!), log $LOGS/job.log\""
echo "follow: tpu/run.sh --follow $NAME    status: tpu/run.sh --status $NAME    stop: tpu/run.sh --stop $NAME"
