#!/usr/bin/env bash
# Create .venv and install vace-local with every extra (idempotent). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, on its own: a CUDA box gets its CUDA build; torchvision must match it.
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || .venv/bin/pip install --quiet torch torchvision
.venv/bin/pip install --quiet -e ".[all,dev]"
echo "vace-local installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
