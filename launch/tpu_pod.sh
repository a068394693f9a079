#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: create the TPU VM (if needed), copy this
# checkout to every worker, install, start the same command on all workers, and
# stream worker 0's log. Every worker runs one JAX process; jax.distributed
# initialises itself from the TPU metadata (emo_jax/parallel/distributed.py); each
# process reads its own shard of the documents and saves its own data position in the
# checkpoint; all processes write their shards of the orbax checkpoint.
#
#   TPU_NAME=emo-v5p ZONE=us-east5-a ACCELERATOR=v5p-128 PROJECT=my-project \
#   RUN_DIR=/mnt/gcs/emo_1b14b BUCKET=my-bucket \
#     bash launch/tpu_pod.sh [--dry-run] --config configs/emo_1b14b.yaml data.data_dir=/mnt/gcs/data
#
# --dry-run prints every command (gcloud and local) it would run, and runs none.
# RUN_DIR and data_dir must be one shared file system seen by every worker (orbax
# writes each host's shards of a checkpoint into the same directory): with BUCKET set,
# setup mounts gs://$BUCKET at /mnt/gcs on every worker with gcsfuse.
#
# Subcommands via ACTION=create|setup|train|logs|stop|delete (default: create+setup+train).
# Preemption: the VM sends SIGTERM to the workers; the processes agree on one step, all
# save it and exit, and running this script again (ACTION=train) resumes from it. The
# checkpoint must be resumed by the same number of processes (the same slice size).
# ACTION=stop sends SIGTERM to every worker's training process (a clean, saved stop).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:=v5p-128}" "${PROJECT:?set PROJECT}"
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
RUN_DIR=${RUN_DIR:-runs/$TPU_NAME}
ACTION=${ACTION:-all}
REMOTE_DIR=emo_jax
TARBALL=/tmp/emo_jax_src.tar.gz

# Runs a command, or prints it (shell-quoted, one line) under --dry-run.
run() {
  if (( DRY_RUN )); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
gc() { run gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
on_all() { gc ssh "$TPU_NAME" --worker=all --command "$1"; }

# v4-N / v5p-N: N TensorCores = N/2 chips, 4 chips per host, one JAX process per host.
if [[ $ACCELERATOR =~ ^v(4|5p)-([0-9]+)$ ]]; then
  chips=$(( BASH_REMATCH[2] / 2 )); hosts=$(( chips > 4 ? chips / 4 : 1 ))
  echo "# $ACCELERATOR: $chips chips on $hosts host(s), one JAX process each; the mesh must use $chips devices"
fi

if [[ $ACTION == all || $ACTION == create ]]; then
  if (( DRY_RUN )); then
    echo "# create only if 'describe' fails (the TPU VM does not exist yet):"
    gc describe "$TPU_NAME"
    gc create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ${SPOT:+--spot}
  elif ! gc describe "$TPU_NAME" >/dev/null 2>&1; then
    gc create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ${SPOT:+--spot}
  fi
fi
if [[ $ACTION == all || $ACTION == setup ]]; then
  run git archive --format=tar.gz -o "$TARBALL" HEAD
  gc scp "$TARBALL" "$TPU_NAME":~/emo_jax_src.tar.gz --worker=all
  on_all "mkdir -p $REMOTE_DIR && tar -xzf ~/emo_jax_src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
PYTHON=python3 bash launch/setup.sh && .venv/bin/python -m pip install -q 'jax[tpu]' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  if [[ -n ${BUCKET:-} ]]; then
    on_all "sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && (mountpoint -q /mnt/gcs || \
gcsfuse --implicit-dirs $BUCKET /mnt/gcs)"
  fi
fi
if [[ $ACTION == all || $ACTION == train ]]; then
  args=$(printf '%q ' "$@")
  # nohup + a log file per worker: the run survives a dropped ssh session.
  on_all "cd $REMOTE_DIR && nohup .venv/bin/emo-jax train ${args}train.run_dir=$RUN_DIR \
train.progress_bar=false > train.log 2>&1 & echo \$! > train.pid"
fi
if [[ $ACTION == stop ]]; then
  on_all "kill -TERM \$(cat $REMOTE_DIR/train.pid)"
fi
if [[ $ACTION == all || $ACTION == train || $ACTION == logs ]]; then
  gc ssh "$TPU_NAME" --worker=0 --command "tail -n +1 -F $REMOTE_DIR/train.log"
fi
if [[ $ACTION == delete ]]; then
  gc delete "$TPU_NAME" --quiet
fi
