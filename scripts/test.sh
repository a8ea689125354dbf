#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU; GPU tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
