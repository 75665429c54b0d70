#!/usr/bin/env bash
# Set everything up on a fresh machine, then serve the studio: web UI at http://localhost:7860, API at /api/v1
# and /v1/images/generations, docs at /docs. Without the real weights (not cached, hub unreachable) it says so in
# one line and serves the embedded default. Extra arguments go to `zstudio serve` (e.g. --port, --model, --token).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec "$VENV/bin/zstudio" serve "$@"
