# Sourced by the other scripts: create .venv with jaxem and its dev extras when missing or stale.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
STAMP=.venv/.jaxem-installed
if [ -z "$PY" ]; then
  echo "jaxem needs Python >= 3.11 (python3.11 or python3 on PATH)." >&2
  exit 2
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "jaxem needs Python >= 3.11; $PY is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  # Debian/Ubuntu ship venv without ensurepip unless python3-venv is installed: fall back to virtualenv.
  "$PY" -m venv .venv 2>/dev/null || { rm -rf .venv; "$PY" -m pip install --quiet --user virtualenv && "$PY" -m virtualenv -q .venv; }
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch "$STAMP"
fi
# tests/test_foundation.py checks converted SAM / DINOv2 / MAE weights against the PyTorch models, so
# the test suite (scripts/test.sh sets JAXEM_TEST_EXTRAS=1) also gets torch's CPU wheel (the exact
# '+cpu' version: pip can never pull the multi-GB CUDA build instead), then timm and segment-anything
# without their dependencies: timm declares torchvision, and PyPI's torchvision does not import beside
# the CPU torch (the test stubs it); their small real dependencies (pyyaml, safetensors) are installed.
# Test-only: jaxem never imports them. If the install fails, those tests skip.
FOUNDATION_SPEC="torch==2.13.0+cpu timm==1.0.31 segment-anything==1.0"
FOUNDATION_STAMP=.venv/.jaxem-test-foundation
if [ "${JAXEM_TEST_EXTRAS:-0}" = 1 ] && [ "$(cat "$FOUNDATION_STAMP" 2>/dev/null)" != "$FOUNDATION_SPEC" ]; then
  if .venv/bin/python -m pip install --quiet "torch==2.13.0+cpu" pyyaml safetensors \
      && .venv/bin/python -m pip install --quiet --no-deps timm==1.0.31 segment-anything==1.0; then
    echo "$FOUNDATION_SPEC" > "$FOUNDATION_STAMP"
  else
    echo "warning: torch / timm / segment-anything could not be installed: tests/test_foundation.py skips." >&2
  fi
fi
# tests/test_ome_zarr.py validates the OME-Zarr metadata jaxem writes (images, `labels`, image-label)
# against ome-zarr-models (pydantic models of the NGFF 0.4 spec) and reads it back with ome-zarr's
# reader (no napari needed). Test-only: jaxem never imports them (they bring zarr 3, s3fs, pydantic;
# ~10 s from a local index). If the install fails, that test skips.
OME_ZARR_SPEC="ome-zarr==0.18.0 ome-zarr-models==1.7"
OME_ZARR_STAMP=.venv/.jaxem-test-ome-zarr
if [ "${JAXEM_TEST_EXTRAS:-0}" = 1 ] && [ "$(cat "$OME_ZARR_STAMP" 2>/dev/null)" != "$OME_ZARR_SPEC" ]; then
  # shellcheck disable=SC2086  # the spec is two requirements
  if .venv/bin/python -m pip install --quiet $OME_ZARR_SPEC; then
    echo "$OME_ZARR_SPEC" > "$OME_ZARR_STAMP"
  else
    echo "warning: ome-zarr could not be installed: tests/test_ome_zarr.py's schema check skips." >&2
  fi
fi
export PATH="$ROOT/.venv/bin:$PATH"
