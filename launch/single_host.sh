#!/usr/bin/env bash
# Train on every accelerator of this machine (1..8 GPUs, or the CPU): one process, one mesh.
#   bash launch/single_host.sh configs/demo.py runs/exp1 [--config.train.steps=2000 ...]
# Data parallel over all local devices; data.batch_size is the global batch and must be a
# multiple of the device count. Install the GPU build first: pip install -e ".[cuda]".
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
exec jaxem train --config "$CONFIG" --workdir "$WORKDIR" "$@"
