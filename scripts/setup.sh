#!/usr/bin/env bash
# Create .venv and install vace-local with every extra (idempotent). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip setuptools
# torch first, on its own: a CUDA box gets its CUDA build; torchvision must match it.
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || .venv/bin/pip install --quiet torch torchvision
# sam2 is an sdist: build it without its CUDA extension (CPU machines; on CUDA rebuild with SAM2_BUILD_CUDA=1)
# against the torch above, rather than a fresh torch that build isolation would download.
export SAM2_BUILD_CUDA=0
.venv/bin/python -c "import sam2" 2>/dev/null || .venv/bin/pip install --quiet --no-build-isolation "sam2==1.1.0"
.venv/bin/pip install --quiet -e ".[all,dev]"
echo "vace-local installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
