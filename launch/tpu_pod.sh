#!/usr/bin/env bash
# Cloud TPU VM pod (e.g. v5e-32): the same command on every worker; JAX discovers the pod itself.
#   TPU_NAME=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh configs/isbi2012_unet.py gs://bucket/runs/isbi [overrides]
# The workdir must be a filesystem mounted on every worker (e.g. a GCS bucket through gcsfuse, or
# Filestore): all workers write checkpoints there and worker 0 writes the logs. Install once on all workers:
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command 'git clone <your jaxem repo> jaxem && cd jaxem && pip install -e ".[tpu]"'
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd jaxem && JAXEM_DISTRIBUTED=auto jaxem train --config $CONFIG --workdir $WORKDIR --no-progress $*"
