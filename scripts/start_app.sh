#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the main job: for now one generation with the resident engine.
# Without the real weights (not cached, hub unreachable) it says so in one line and uses the embedded default.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/zstudio" info
exec "$VENV/bin/zstudio" generate "${ZSTUDIO_PROMPT:-A cozy evening street in Kyoto, cinematic lighting, soft rain}" \
    --preset 1024 "$@"
