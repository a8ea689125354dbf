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
# System packages some tests use, installed when missing and we can (root + apt-get, one apt-get run);
# otherwise say so and carry on: those tests then skip with the reason.
# - chromium: the playground's browser test drives it through Playwright (Playwright's own browser download
#   is not used);
# - postgresql: the store tests also run against a real server the suite starts itself (tests/pg_server.py:
#   initdb + pg_ctl in a temp dir).
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
            || echo "setup: could not install ${missing[*]}; the tests that need them will skip" >&2
    else
        echo "setup: ${missing[*]} not found and not installable here (needs root and apt-get); the tests that" \
             "need them will skip" >&2
    fi
fi
echo "vace-local installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
