#!/usr/bin/env bash
# The main job on a fresh machine: install harmonylite into .venv and run the narrated demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q . 2>&1 | grep -v -E '^(WARNING|  )' || true
exec .venv/bin/python scripts/demo.py "$@"
