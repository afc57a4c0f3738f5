#!/usr/bin/env bash
# The one-shot GPU suite (bench/gpu_suite.py): bench/gpu_suite.sh [--dry-run] [--out DIR] [gpu_suite.py options]
# Runs from the repository root with $PYTHON if set, else .venv/bin/python if present, else python (or python3).
# Prints where the results went (DIR/gpu_suite.json and DIR/gpu_suite.md). Relative paths are taken from the
# repository root (where it runs); the default DIR is bench/_work/gpu_suite/results.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
elif command -v python >/dev/null 2>&1; then
    py=python
else
    py=python3
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_suite.py "$@"
