#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the project into it; sourced by serve.sh and test.sh.
# Usage: source scripts/setup_env.sh [extras]   (extras: "test" for the test dependencies)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ONLINE_LLM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Without a GPU, install the CPU build of torch first (a cached local wheel where one exists), so the
# project's torch range is already satisfied and pip never pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "torch>=2.4,<2.15"
  else
    "$VENV/bin/python" -m pip install -q torch==2.13.0 \
      || "$VENV/bin/python" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
SPEC="$ROOT"
[ -n "$EXTRAS" ] && SPEC="$ROOT[$EXTRAS]"
"$VENV/bin/python" -m pip install -q -e "$SPEC"
export PATH="$VENV/bin:$PATH"
