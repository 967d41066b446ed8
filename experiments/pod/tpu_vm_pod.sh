#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (e.g. v5e-32 = 8 hosts x 4 chips): the same command on every host.
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a CKPT=gs://my-bucket/litejax/run1 bash experiments/pod/tpu_vm_pod.sh
# jax.distributed.initialize() finds the coordinator and process ids from the TPU metadata, process 0
# logs and writes metrics, and every host writes its own shards of each checkpoint to $CKPT (which
# must be shared: a GCS bucket). Rerunning the same command resumes from the newest checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CKPT:?set CKPT (gs://...)}"
CONFIG=${CONFIG:-configs/tiny.yaml}
REPO=${REPO:-https://github.com/your-org/litejax.git}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d litejax ] || git clone $REPO litejax
  cd litejax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  litejax train --distributed --config $CONFIG --ckpt-dir $CKPT --resume-if-possible --metrics metrics.jsonl $*
"
