#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one device call (about 6 minutes on an H100):
#   bash scripts/gpu_wheels.sh                      # here first: ml_collections + monai wheels
#   device run: command "bash benchmarks/gpu_checks.sh", carry [".whl"], timeout_s 600
# Writes $OUT/{gpu.txt,models.json,models_nonorm.json,inference.json,pytest.txt,errors.log}: 6 files
# (the device tool returns at most 8).
#   models.json     #5: 3D U-Net training step throughput and MFU in bfloat16 (goal >= 35 %)
#   inference.json  #8: blockwise overhead at 1 GiB and MONAI sliding_window_inference side by side
# SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh: the same steps at toy sizes on a
# CPU, to check the script before spending device time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
  MODELS_ARGS="--small --steps 1" INFER_ARGS="--gib 0.005 --width 4 --block 32 64 64 --batch 2"
else
  MODELS_ARGS="--dtype bfloat16" INFER_ARGS="--gib 1 --width 16 --block 64 128 128 --batch 8"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PYTHON -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() {  # run NAME SECONDS CMD...: JSON to $OUT/NAME, the log's tail to stdout
  local name=$1 seconds=$2; shift 2
  echo "== $name" | tee -a "$OUT/errors.log"
  timeout "$seconds" "$@" > "$OUT/$name" 2>> "$OUT/errors.log"; echo "rc=$?"; tail -c 1500 "$OUT/$name"
}
# shellcheck disable=SC2086  # the argument lists are meant to split
run models.json 180 $PYTHON benchmarks/models.py --models unet3d unet3d_aniso unet3d_resnet18 $MODELS_ARGS
run models_nonorm.json 90 $PYTHON benchmarks/models.py --models unet3d $MODELS_ARGS --set norm=none  # if MFU is low: the norms' share
run inference.json 180 $PYTHON benchmarks/inference.py $INFER_ARGS --monai
run pytest.txt 90 $PYTHON -m pytest -q -x -p no:cacheprovider tests/test_models_unet.py tests/test_blockwise.py tests/test_conv_cpu.py
