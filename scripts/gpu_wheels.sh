#!/usr/bin/env bash
# Fetches the wheels that the lent GPU machine lacks (it has jax, flax, optax, orbax, tensorstore, scipy and
# torch on Python 3.12, but no network) into .whl/, for `benchmarks/gpu_checks.sh`.
#   bash scripts/gpu_wheels.sh        # here, once per session, before the device call
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl ml_collections==1.1.0 monai==1.6.1 mwatershed==0.5.4 \
  grain==0.2.18 array-record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0 fastremap==1.21.0 edt==3.1.2
ls -la .whl
