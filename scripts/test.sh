#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite, slow end-to-end tests included.
export JAXEM_TEST_EXTRAS=1  # _venv.sh: also the test-only reference models (torch CPU, timm, segment-anything)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
python -m pytest -q --durations=30 "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose." >&2
  exit 1
fi
exit "$code"
