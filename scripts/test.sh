#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite, slow end-to-end tests included.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
python -m pytest -q "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose." >&2
  exit 1
fi
exit "$code"
