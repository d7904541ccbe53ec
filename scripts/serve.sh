#!/usr/bin/env bash
# One command: install the project (into ./.venv) and start the service on the embedded defaults
# (tiny local model, local adapter store ./adapters); it prints how to call it. Ctrl-C stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export LORA_SAVE_PATH="${LORA_SAVE_PATH:-$ROOT/adapters}"
exec online-llm serve "$@"
