#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: create the TPU VM (if needed), copy this
# checkout to every worker, install, start the same command on all workers, and
# stream worker 0's log. jax.distributed initialises itself from the TPU metadata
# (emo_jax.train.loop.maybe_initialize_distributed); each host reads its own shard
# of the data (grain, jax.process_index) and all hosts write the orbax checkpoint.
#
#   TPU_NAME=emo-v5p ZONE=us-east5-a ACCELERATOR=v5p-128 PROJECT=my-project \
#   RUN_DIR=/mnt/gcs/emo_1b14b BUCKET=my-bucket \
#     bash launch/tpu_pod.sh --config configs/emo_1b14b.yaml data.data_dir=/mnt/gcs/data
#
# RUN_DIR and data_dir must be one shared file system seen by every worker (orbax
# writes each host's shards of a checkpoint into the same directory): with BUCKET set,
# setup mounts gs://$BUCKET at /mnt/gcs on every worker with gcsfuse.
#
# Subcommands via ACTION=create|setup|train|logs|delete (default: create+setup+train).
# Preemption: the VM sends SIGTERM; the loop saves a final checkpoint and exits, and
# running this script again resumes from the latest checkpoint in RUN_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:=v5p-128}" "${PROJECT:?set PROJECT}"
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
RUN_DIR=${RUN_DIR:-runs/$TPU_NAME}
ACTION=${ACTION:-all}
REMOTE_DIR=emo_jax
gc() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
on_all() { gc ssh "$TPU_NAME" --worker=all --command "$1"; }

if [[ $ACTION == all || $ACTION == create ]]; then
  if ! gc describe "$TPU_NAME" >/dev/null 2>&1; then
    gc create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ${SPOT:+--spot}
  fi
fi
if [[ $ACTION == all || $ACTION == setup ]]; then
  git archive --format=tar.gz -o /tmp/emo_jax_src.tar.gz HEAD
  gc scp /tmp/emo_jax_src.tar.gz "$TPU_NAME":~/emo_jax_src.tar.gz --worker=all
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
  on_all "cd $REMOTE_DIR && nohup .venv/bin/emo-jax train $args train.run_dir=$RUN_DIR \
    train.progress_bar=false > train.log 2>&1 &"
fi
if [[ $ACTION == all || $ACTION == train || $ACTION == logs ]]; then
  gc ssh "$TPU_NAME" --worker=0 --command "tail -n +1 -F $REMOTE_DIR/train.log"
fi
if [[ $ACTION == delete ]]; then
  gc delete "$TPU_NAME" --quiet
fi
