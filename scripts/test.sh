#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the linter and the test suite (CPU, tiny checkpoints).
set -euo pipefail
ZSTUDIO_EXTRAS="[test]"
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m ruff check src tests
"$VENV/bin/python" -m ruff format --check src tests
"$VENV/bin/python" -m pytest -q "$@"
