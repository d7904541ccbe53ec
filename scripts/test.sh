#!/usr/bin/env bash
# One command: install what the tests need (into ./.venv) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
exec python -m pytest -q -p no:cacheprovider --timeout=600 "$@"
