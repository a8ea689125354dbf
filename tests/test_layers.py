"""The import layers of pyproject.toml [tool.importlinter] hold, and every vace_local module is placed in one.

scripts/test.sh runs `lint-imports` too; this test makes a plain `pytest` catch a wrong import (about 1 s).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> dict[str, dict]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in cfg["contracts"]}


def test_import_contracts_hold(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe), "--no-logo", "--cache-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in out.stdout, out.stdout[-2000:]


def test_every_vace_local_module_has_a_layer() -> None:
    """vace_local spans two layers (core below the preprocessors, run path above), so a new module must say
    which it belongs to; otherwise the layers contract would not check it."""
    named = {m.strip() for layer in _contracts()["layers"]["layers"] for m in layer.replace("|", ":").split(":")}
    modules = {f"vace_local.{p.stem}" for p in (ROOT / "vace_local").glob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), f"add these to a layer in pyproject.toml: {sorted(modules - named)}"
