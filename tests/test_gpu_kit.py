"""The GPU kit on the CPU: fail-fast without CUDA, the bench's time budget and --append, the wheel pins.

These run everywhere (no `gpu` mark): they prove that a device session's script stops at once instead of
skipping, and that a call cut short keeps and extends its figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    if "VACE_REQUIRE_CUDA" not in extra:
        env.pop("VACE_REQUIRE_CUDA", None)
    return env


@no_cuda
def test_bench_exits_2_without_cuda_when_cuda_is_required(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--tiny", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=_env(VACE_REQUIRE_CUDA="1"))
    assert proc.returncode == 2 and "CUDA not available" in proc.stderr
    assert not out.exists()  # nothing was benchmarked on the CPU


@no_cuda
def test_gpu_tests_fail_instead_of_skipping_when_cuda_is_required() -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu_memory.py", "-q", "-p", "no:cacheprovider"]
    required = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env=_env(VACE_REQUIRE_CUDA="1"))
    assert required.returncode == 2 and "CUDA is not available" in required.stdout + required.stderr
    normal = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert normal.returncode == 0 and "skipped" in normal.stdout  # CI on CPU: still skipped


def test_bench_append_keeps_measured_modes_and_budget_skips_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    measured = {"model": "tiny", "size": "32x32x17", "s_per_step": 0.5, "e2e_est_s": 20.0, "bench_wall_s": 30.0}
    prev = {"environment": {"device": "earlier"}, "matmul_peak": {"tflops": 1.0}, "args": {}, "vae": {},
            "records": [{"mode": "stock", **measured}, {"mode": "bf16", **measured, "s_per_step": 0.25},
                        {"mode": "cfg_batch", "model": "tiny", "size": "32x32x17", "skipped": "time budget"}]}
    out.write_text(json.dumps(prev))
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--tiny", "--sizes", "32x32x17", "--modes",
                           "bf16,cfg_batch,fp8_storage", "--append", "--budget-s", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    recs = {r["mode"]: r for r in res["records"]}
    assert recs["stock"] == prev["records"][0] and recs["bf16"] == prev["records"][1]  # kept, not re-run
    assert recs["cfg_batch"]["skipped"].startswith("time budget") and recs["cfg_batch"]["run"] == 1
    assert recs["fp8_storage"]["skipped"].startswith("time budget")
    assert len(res["records"]) == 4  # the retried mode replaced its old record
    assert [r["environment"]["device"] for r in res["runs"]] == ["earlier", "cpu"]
    assert "fp8_storage" in res["table"]


def test_device_wheels_are_pinned_inside_the_project_requirements() -> None:
    pins = dict(re.findall(r"^\s+([A-Za-z0-9_.-]+)==([0-9][^\s]*)", (ROOT / "scripts" / "device_wheels.sh").read_text(),
                           re.MULTILINE))
    assert {"diffusers", "pydantic", "ftfy", "imageio-ffmpeg", "torchao"} <= set(pins)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["fast"]]
    checked = 0
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        if name in pins:
            assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {req.specifier}"
            checked += 1
    assert checked >= 5
