#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite, slow end-to-end tests included.
export JAXEM_TEST_EXTRAS=1  # _venv.sh: also the test-only reference models (torch CPU, timm, segment-anything)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# One XLA compilation cache for the whole run, shared by both workers and every subprocess: the
# suite compiles the same small networks in many tests and processes (15 % of tests/test_semi.py
# alone). It starts empty, so a clean checkout tests the compiler too; JAX_COMPILATION_CACHE_DIR,
# when set, is used (and kept) instead.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d -t jaxem-test-xla-cache.XXXXXX)"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0  # small programs too: most of the suite's are
set +e
# Two pytest-xdist workers, each test file on one worker (module fixtures are built once): much of
# the suite is single-threaded compilation and subprocess start-up, so two workers overlap on the
# 2-core CI machine. JAXEM_TEST_WORKERS=0 runs serially.
python -m pytest -q -n "${JAXEM_TEST_WORKERS:-2}" --dist loadfile --durations=30 "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose." >&2
  exit 1
fi
exit "$code"
