#!/usr/bin/env bash
# The multi-host code path on one CPU machine: 2 processes x 4 emulated devices, gloo collectives.
# (tests/test_train_multiprocess.py checks this against 1 process x 8 devices.)
#   bash experiments/pod/local_2proc.sh --steps 300 --stop-after 20   (rerun: continues from the checkpoint)
set -euo pipefail
PORT=${PORT:-12355}
export JAX_PLATFORMS=cpu
for i in 0 1; do
  litejax train --distributed --coordinator "localhost:$PORT" --num-processes 2 --process-id $i \
    --devices 4 --resume-if-possible --ckpt-dir runs/local2/ckpt --metrics runs/local2/metrics.jsonl "$@" &
done
wait
