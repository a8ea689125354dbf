#!/usr/bin/env python
"""Researcher entry point: the same code and flags as `vace-local generate`.

Example: python scripts/generate.py --model tiny --prompt "a cat boxing" --size 832x480 --num-frames 17 --steps 2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vace_local.cli import generate_app  # noqa: E402

if __name__ == "__main__":
    generate_app()
