"""Soak: consecutive jobs in one worker-like process must not grow its memory (scripts/soak.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _soak_module():  # noqa: ANN202 - scripts/ is not a package
    spec = importlib.util.spec_from_file_location("soak_script", ROOT / "scripts" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_growth_is_measured_against_the_warmup_high_water_mark() -> None:
    growth = _soak_module().growth
    flat = [{"rss_mib": v} for v in (1000, 1012, 1004, 1011, 1006, 1010)]  # allocator noise only
    leak = [{"rss_mib": v} for v in (1000, 1000, 1010, 1020, 1030, 1040)]  # 10 MiB per job
    assert growth(flat, "rss_mib")["growth_frac"] <= 0.0  # never above what the warm-up jobs reached
    g = growth(leak, "rss_mib")
    assert g["growth_frac"] == pytest.approx(0.04) and g["slope_mib_per_job"] == pytest.approx(10.0)
    assert growth(flat[:3], "rss_mib") is None  # too few jobs after the warm-up to say anything


@pytest.mark.slow
def test_consecutive_jobs_through_run_job_keep_rss_flat(tmp_path: Path) -> None:
    """Six tiny jobs (fetch, preprocess, generate, mp4 + control encode) in one process: < 2 % RSS growth."""
    out = tmp_path / "soak.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VACE_CACHE_DIR": str(ROOT / ".cache" / "test-models")}
    env.pop("VACE_REQUIRE_CUDA", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--jobs", "6", "--size", "32x32x17",
                           "--steps", "1", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    res = json.loads(out.read_text())
    assert [s["job"] for s in res["samples"]] == [1, 2, 3, 4, 5, 6]
    assert all(s["rss_mib"] > 100 and s["stages_s"]["generate"] > 0 for s in res["samples"])
    assert res["rss"]["growth_frac"] < 0.02, res["rss"]
    assert proc.returncode == 0 and res["ok"], proc.stderr[-2000:]
