"""Loading a real-architecture model (tests/realarch.py) the lean way, as a user's `--model DIR` does.

- The plan is made before a byte is loaded, from the configs on the meta device; its counts match the files.
- On CPU, `auto` dtype is bf16 when the fp32 weights would not fit in the host RAM (fp32 doubled the weights).
- When nothing fits, one InsufficientMemory error with the numbers, before loading.
- The chosen dtype / policy and the numbers behind them are in the load log and in each job's metadata.
- Host memory: a resident load's peak RSS stays within 1.3 x the bf16 weight bytes + 1.5 GB (bench_load.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vace_local.core.errors import InsufficientMemory
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import Engine, EngineOptions
from vace_local.engine.memory import GIB, HOST_RESERVE
from vace_local.engine.models import model_size
from vace_local.run.job import run_job


def file_params(path: Path) -> dict[str, int]:
    """Parameters per component as stored in the safetensors files (read from their headers)."""
    from safetensors import safe_open

    out: dict[str, int] = {}
    for comp in ("transformer", "transformer_2", "text_encoder", "vae"):
        total = 0
        for f in sorted((path / comp).glob("*.safetensors")) if (path / comp).is_dir() else []:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    n = 1
                    for d in st.get_slice(key).get_shape():
                        n *= d
                    total += n
        if total:
            out[comp] = total
    return out


def weight_bytes(path: Path, dtype_bytes: int) -> int:
    """Bytes of the pipeline in a dtype (VAE in fp32), from the file headers — independent of the planner."""
    p = file_params(path)
    return dtype_bytes * (p["transformer"] + p.get("transformer_2", 0) + p["text_encoder"]) + 4 * p["vae"]


def test_meta_counts_match_the_files(realarch_wan21: Path, realarch_wan22: Path) -> None:
    for path in (realarch_wan21, realarch_wan22):
        size, files = model_size(path), file_params(path)
        assert size.transformer.params == files["transformer"]
        assert size.text_encoder.params == files["text_encoder"] and size.vae.params == files["vae"]
        assert size.experts == (2 if "transformer_2" in files else 1)


def test_cpu_auto_picks_bf16_when_fp32_does_not_fit_and_says_why(realarch_wan21_narrow_vae: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = realarch_wan21_narrow_vae
    fp32, bf16 = weight_bytes(path, 4), weight_bytes(path, 2)
    host = HOST_RESERVE + (fp32 + bf16) // 2  # bf16 fits, fp32 does not
    with caplog.at_level(logging.INFO, logger="vace_local.engine.engine"):
        eng = Engine(str(path), EngineOptions(device="cpu", host_ram=host))
    import torch

    assert eng.pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert eng.pipe.text_encoder.dtype == torch.bfloat16 and eng.pipe.vae.dtype == torch.float32
    plan = eng.describe()["memory_plan"]
    assert (plan["dtype"], plan["offload"]) == ("bf16", "none") and plan["free_ram_bytes"] == host
    assert plan["ram_need_bytes"] <= host < HOST_RESERVE + fp32
    assert abs(plan["weights_bytes"] - bf16) < 0.01 * bf16  # only the fp32-kept norms differ
    assert "fp32 would need" in plan["reason"] and f"free RAM {host / GIB:.1f} GiB" in plan["reason"]
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "memory plan: dtype bf16" in log and f"free RAM {host / GIB:.1f} GiB" in log

    res = run_job(JobSpec(model=str(path), prompt="a cat", width=64, height=48, num_frames=17,
                          num_inference_steps=2, seed=1), tmp_path, engine=eng)
    meta = json.loads(res.metadata_path.read_text())
    assert meta["model"]["memory_plan"] == plan and meta["model"]["dtype"] == "bfloat16"


def test_cpu_auto_keeps_fp32_when_it_fits(realarch_wan21: Path) -> None:
    """The planner alone (no load): with room for fp32, CPU stays fp32 as before."""
    from vace_local.engine.memory import plan_memory

    fp32 = weight_bytes(realarch_wan21, 4)
    plan = plan_memory(model_size(realarch_wan21), device="cpu", free_vram=None, free_ram=HOST_RESERVE + fp32 + GIB)
    assert plan.dtype == "fp32" and plan.fits and abs(plan.footprint.total - fp32) < 0.001 * fp32


def test_nothing_fits_is_one_error_with_the_numbers(realarch_wan21: Path) -> None:
    bf16 = weight_bytes(realarch_wan21, 2)
    host = HOST_RESERVE // 2
    with pytest.raises(InsufficientMemory) as err:
        Engine(str(realarch_wan21), EngineOptions(device="cpu", host_ram=host))
    msg = str(err.value)
    assert "does not fit" in msg and f"free RAM {host / GIB:.1f} GiB" in msg and "no CUDA device" in msg
    assert f"bf16 weights {bf16 / GIB:.1f} GiB" in msg and "\n" not in msg


def _bench_load(path: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "load", "--dir", str(path),
                           *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_resident_load_peak_rss_within_target(realarch_wan21: Path) -> None:
    """Target: peak host RSS <= 1.3 x bf16 weight bytes + 1.5 GB. `auto` on a box whose RAM does not hold the
    fp32 weights must load bf16 (main loaded fp32 on CPU: ~3 x the bf16 bytes with the mapped files)."""
    bf16, fp32 = weight_bytes(realarch_wan21, 2), weight_bytes(realarch_wan21, 4)
    host_gb = (HOST_RESERVE + (fp32 + bf16) // 2) / 1e9
    rec = _bench_load(realarch_wan21, "--host-ram-gb", f"{host_gb:.4f}")
    assert rec["loaded_dtype"] == "bfloat16" and rec["memory_plan"]["dtype"] == "bf16"
    peak = max(s["VmHWM_gb"] for s in rec["stages"]) * 1e9
    assert peak <= 1.3 * bf16 + 1.5e9, rec["stages"]


@pytest.mark.gpu
def test_cuda_resident_load_goes_straight_to_the_gpu(realarch_wan21: Path) -> None:
    """On CUDA a resident load reads each tensor from the file to the GPU: no host copy of the weights."""
    bf16 = weight_bytes(realarch_wan21, 2)
    rec = _bench_load(realarch_wan21, "--device", "cuda", "--dtype", "bf16")
    assert rec["policy"] == "none"
    loaded = next(s for s in rec["stages"] if s["stage"] == "loaded")
    imported = next(s for s in rec["stages"] if s["stage"] == "imported")
    assert max(s["VmHWM_gb"] for s in rec["stages"]) * 1e9 <= 1.3 * bf16 + 1.5e9, rec["stages"]
    # anonymous host memory grows by the CUDA context, not by the weights
    assert (loaded["RssAnon_gb"] - imported["RssAnon_gb"]) * 1e9 < 0.25 * bf16 + 1.0e9, rec["stages"]
