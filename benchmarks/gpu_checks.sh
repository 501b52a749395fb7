#!/usr/bin/env bash
# The GPU measurements, in one device call of a few minutes (an H100/H200 lent to the session):
#   bash scripts/gpu_wheels.sh                      # here first: the wheels the GPU image lacks
#   device run: "BUDGET=480 bash benchmarks/gpu_checks.sh", carry [".whl"], timeout_s 540
# STAGE=next (default) writes $OUT/{gpu.txt,models.json,torch.json,pytest.txt,inference.json,ssl.json,errors.log}:
#            unet3d_wide and unet3d training-step MFU in bfloat16 (#5's goal >= 35 % was met on an
#            H100 on 2026-11-26: 39.5 %), the unet3d step against its PyTorch twin (eager and
#            torch.compile), the model, blockwise and layer tests on the GPU at highest matmul
#            precision, 1 GiB blockwise inference against MONAI (and from uint8, normalised on the
#            device, as `jaxem predict` runs it), and the MoCo/SimCLR pretraining
#            step beside the supervised one (ssl.json; never yet measured on a GPU).
# STAGE=inference writes $OUT/{gpu.txt,inference.json,errors.log}: issue #24's table, best of 3, from
#            uint8 then float32 input: jaxem predict's path, jaxem.infer.device by blocks of 4^3
#            chunks and of 9^3 (the whole 1 GiB volume: no tile runs twice), MONAI (a) with the volume in GPU memory and (b) zarr -> zarr by 128x512x512
#            blocks ("STAGE=inference BUDGET=480 bash benchmarks/gpu_checks.sh", timeout_s 540).
# STAGE=profile writes $OUT/{gpu.txt,profile.json,conv.json,models.json,errors.log}: where the 3D
#            U-Net step's time goes (kernels by HLO op), the convolution library's ceiling per
#            U-Net level, and the step without norm layers and with batch norm.
# The calls of 2026-11-25 ran earlier stages of this script (mfu, profile, tune, final) at the
# commits benchmarks/results/2026-11-25_h200/README.md names.
# Steps run in order and are skipped once BUDGET seconds (default 400) are spent, so what is done
# comes back before the call's limit. SMOKE=1 PYTHON=.venv/bin/python runs every step at toy sizes
# on a CPU, to check the script before spending device time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
STAGE=${STAGE:-next}
BUDGET=${BUDGET:-400}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  for wheel in .whl/*.whl; do  # one at a time: a wheel for another Python (a CPU dry run) is skipped
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
      || echo "== not installed: $wheel" | tee -a "$OUT/errors.log"
  done
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
  M="--small --steps 1"; C="--small --steps 1"; P="--small"; I="--gib 0.005 --width 4 --block 32 64 64 --batch 2"
  T="--small --steps 1"; S="--small --steps 1"
else
  M="--dtype bfloat16 --steps 20"; C=""; P=""; I="--gib 1 --width 16 --block 64 128 128 --batch 8"
  T="--dtype bfloat16 --steps 20"; S="--steps 10"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
$PYTHON -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
START=$SECONDS
run() {  # run FILE SECONDS CMD...: stdout appended to $OUT/FILE, stderr to errors.log, a summary here
  local file=$1 seconds=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then echo "== skipped (budget spent): $*" | tee -a "$OUT/errors.log"; return; fi
  [ "$seconds" -gt "$left" ] && seconds=$left
  echo "== $* (limit ${seconds}s)" | tee -a "$OUT/errors.log"
  local t0=$SECONDS
  timeout "$seconds" "$@" >> "$OUT/$file" 2>> "$OUT/errors.log"; local rc=$?
  echo "rc=$rc in $((SECONDS - t0))s"
}
summary() {  # one line per record of the JSON objects concatenated in $OUT/*.json
  ls "$OUT"/*.json >/dev/null 2>&1 || return 0
  $PYTHON - "$OUT"/*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    text, pos, dec = open(path).read(), 0, json.JSONDecoder()
    while text[pos:].strip():
        obj, end = dec.raw_decode(text[pos:].lstrip()); pos = len(text) - len(text[pos:].lstrip()) + end
        for r in obj.get("top", [])[:14]:
            print(path.rsplit("/", 1)[-1], f'{r["ms_per_step"]:8.2f} ms {r["calls_per_step"]:4.0f}x', r["kernel"][:50], "|", r["hlo"][:110])
        if "top" in obj:
            print(path.rsplit("/", 1)[-1], "kernel ms per step", round(obj["kernel_ms_per_step"], 2))
            continue
        rows = obj.get("results") or obj.get("levels") or [obj]
        for r in rows:
            r = {k: ({"step_s": v["step_s"], "mfu": v["mfu"]} if k.startswith("torch") and isinstance(v, dict) else v)
                 for k, v in r.items()}
            keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                    if k in ("model", "method", "convs", "input", "set", "step_s", "mfu", "tflops", "seconds", "level")
                    or "overhead" in k or "monai" in k or k.endswith("_s") or k.startswith(("jaxem_", "torch", "device_block"))}
            print(path.rsplit("/", 1)[-1], json.dumps(keep))
PY
}
# shellcheck disable=SC2086  # the argument lists are meant to split
if [ "$STAGE" = next ]; then
  run models.json 120 $PYTHON benchmarks/models.py --models unet3d_wide unet3d $M
  run torch.json 90 $PYTHON benchmarks/torch_unet.py --models unet3d $T --modes eager
  run torch.json 150 $PYTHON benchmarks/torch_unet.py --models unet3d $T --modes compiled
  run pytest.txt 120 env JAX_DEFAULT_MATMUL_PRECISION=highest $PYTHON -m pytest -q -p no:cacheprovider tests/test_models_unet.py tests/test_blockwise.py tests/test_conv_cpu.py
  run inference.json 200 $PYTHON benchmarks/inference.py $I --monai
  run inference.json 120 $PYTHON benchmarks/inference.py $I --uint8
  run ssl.json 90 $PYTHON benchmarks/ssl_step.py $S
elif [ "$STAGE" = inference ]; then  # issue #24: jaxem zarr -> zarr vs MONAI (a) in memory, (b) zarr -> zarr
  run inference.json 300 $PYTHON benchmarks/inference.py $I --uint8 --monai --monai-block 128 512 512 --device-blocks 4 9 --repeat 3
  run inference.json 200 $PYTHON benchmarks/inference.py $I --monai --monai-block 128 512 512 --device-blocks 4 9 --repeat 3
elif [ "$STAGE" = profile ]; then
  run profile.json 90 $PYTHON benchmarks/profile_step.py --model unet3d $P --top 30
  run conv.json 60 $PYTHON benchmarks/conv_ceiling.py $C
  run models.json 90 $PYTHON benchmarks/models.py --models unet3d $M --set norm=none
  run models.json 90 $PYTHON benchmarks/models.py --models unet3d $M --set norm=batch
else
  echo "STAGE must be next, inference or profile, got $STAGE" >&2
  exit 2
fi
echo "== stage $STAGE done in $((SECONDS - START))s"
summary
