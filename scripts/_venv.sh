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
export PATH="$ROOT/.venv/bin:$PATH"
