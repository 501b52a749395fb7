#!/usr/bin/env bash
# Run one training job as N cooperating processes on this machine (the multi-host code path,
# as the tests use it): each process sees DEVICES_PER_PROCESS fake CPU devices (or its share of
# the GPUs via CUDA_VISIBLE_DEVICES), talks to the coordinator on 127.0.0.1:PORT, and feeds only
# its own rows of every batch. All processes write the same workdir (orbax coordinates saves).
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 bash launch/local_multiprocess.sh configs/demo.py runs/mp [overrides]
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
  JAXEM_COORDINATOR="127.0.0.1:${PORT}" JAXEM_NUM_PROCESSES="$NUM_PROCESSES" JAXEM_PROCESS_ID="$i" \
  JAXEM_CPU_COLLECTIVES=gloo \
    jaxem train --config "$CONFIG" --workdir "$WORKDIR" --no-progress "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
