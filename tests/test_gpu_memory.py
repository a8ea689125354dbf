"""Real memory policies on CUDA (skipped without a GPU): each offload path runs and matches resident output."""

from __future__ import annotations

import numpy as np
import pytest

from vace_local.core.bundle import ControlBundle
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import Engine, EngineOptions

pytestmark = pytest.mark.gpu

F, H, W = 17, 64, 96


def _run(offload: str, tiling: bool | None = None) -> tuple[np.ndarray, Engine]:
    eng = Engine("tiny", EngineOptions(device="cuda", offload=offload, vae_tiling=tiling))
    rng = np.random.default_rng(0)
    bundle = ControlBundle(frames=rng.random((F, H, W, 3), dtype=np.float32), masks=np.ones((F, H, W), np.float32))
    spec = JobSpec(model="tiny", prompt="a cat", width=W, height=H, num_frames=F, num_inference_steps=3, seed=1)
    return eng.generate(spec, bundle, seed=1), eng


def test_cuda_loads_bf16_transformer_and_fp32_vae() -> None:
    import torch

    _, eng = _run("none")
    assert eng.pipe.transformer.dtype == torch.bfloat16 and eng.pipe.vae.dtype == torch.float32
    assert eng.describe()["offload"] == "none"


@pytest.mark.parametrize("offload", ["model", "group", "sequential"])
def test_offload_policies_match_resident(offload: str) -> None:
    import torch

    ref, _ = _run("none")
    torch.cuda.reset_peak_memory_stats()
    out, eng = _run(offload)
    assert eng.policy == offload
    # bf16 and different kernel order allow small differences; a broken offload gives noise-level ones.
    diff = np.abs(ref.astype(np.int16) - out.astype(np.int16))
    assert diff.mean() < 2.0, f"{offload}: mean abs diff {diff.mean():.2f}"


def test_vae_tiling_path_runs() -> None:
    out, eng = _run("none", tiling=True)
    assert eng.vae_tiling and out.shape == (F, H, W, 3)
