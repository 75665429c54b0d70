# Sourced by the entry scripts: create or reuse the virtual environment and install zstudio into it.
# torch is installed first and on its own, so pip never swaps a working build for another:
#   - already importable in the venv: kept (a CUDA build you installed stays);
#   - ZSTUDIO_TORCH set: that requirement (e.g. "torch==2.11.0" or a local wheel);
#   - an NVIDIA GPU present: PyPI's default build (CUDA);
#   - otherwise torch==2.13.0 (the CPU build these CI machines carry on disk).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZSTUDIO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "zstudio: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${ZSTUDIO_TORCH:-}" ]; then
        pip_install "$ZSTUDIO_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_install "torch>=2.5"
    else
        pip_install "torch==2.13.0"
    fi
fi
# spandrel (upscaler models) without its torchvision requirement: PyPI's torchvision would replace a CPU torch
# with a CUDA build; zstudio uses no torchvision code (zstudio.upscale.import_spandrel).
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('spandrel') is None)"; then
    pip_install --no-deps "spandrel>=0.4.2" && pip_install "einops>=0.7"
fi
pip_install -e "$ROOT${ZSTUDIO_EXTRAS:-}"
