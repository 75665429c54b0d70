#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the linter and the test suite (CPU, tiny checkpoints).
set -euo pipefail
ZSTUDIO_EXTRAS="[test]"
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
# The browser tests drive Debian's chromium (Playwright's own browser download cannot work offline).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "zstudio: installing chromium for the browser tests" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# pngcheck: an independent decoder's checks of the PNGs zstudio's own encoder writes (tests/test_png.py).
if ! command -v pngcheck >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "zstudio: installing pngcheck for the PNG encoder's tests" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pngcheck >/dev/null
fi
# CJK and emoji fonts, so the Chinese page's screenshots show characters rather than boxes.
if ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK" && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "zstudio: installing CJK and emoji fonts for the browser tests" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk fonts-noto-color-emoji >/dev/null
fi
"$VENV/bin/python" -m ruff check src tests
"$VENV/bin/python" -m ruff format --check src tests
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning "$@"
