"""Benchmark: the cost of one live preview (x0 → Wan 2.1 latent→RGB projection → animated WebP) against one
denoising step of a real-architecture model, on this machine's CPU.

Usage: PYTHONPATH=. .venv/bin/python scripts/bench_preview.py [--size 416x240 --frames 17 --steps 3 --layers 2
       --vae-base-dim 16 --repeat 20 --json docs/bench/preview-cpu.json]

The model is `tests/realarch.py`'s Wan2.1-VACE-1.3B architecture (real widths, real VAE / UMT5 / UniPC configs)
at `--layers` transformer blocks (the real 1.3B has 30, the 14B 40 at 3.3× the width), so the measured step is
far cheaper than a real one and the ratio printed is an upper bound (so is the small default size: a step grows
faster than linearly with the latent, a preview linearly). The VAE only encodes the control video and decodes the
result here, in neither timing, so a narrow one (same class) saves minutes. CFG is on (guidance 5), as in real jobs. The
preview is replayed `--repeat` times on the run's own x0 (median), and also on a latent of the hosted size
(832×480×81 frames: 21 latent frames of 60×104).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def preview_cost(x0, repeat: int) -> float:  # noqa: ANN001 - torch.Tensor
    """Median seconds of one preview as the tap makes it: x0 from (x_t, v, σ), projection, WebP write."""
    from vace_local.engine.preview import flow_x0, latent_to_rgb, write_strip

    times = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeat):
            t = time.perf_counter()
            write_strip(latent_to_rgb(flow_x0(x0, x0, 0.5)), Path(d) / "p.webp")
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="416x240")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vae-base-dim", type=int, default=16, help="96 = the real VAE; it is in neither timing")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.realarch import build_wan21_vace
    from vace_local.core.bundle import ControlBundle
    from vace_local.core.events import Progress
    from vace_local.core.spec import JobSpec
    from vace_local.engine.engine import Engine, EngineOptions
    from vace_local.engine.preview import Preview, preview_scope

    w, h = (int(x) for x in a.size.split("x"))
    model = build_wan21_vace(num_layers=a.layers, vae_base_dim=a.vae_base_dim)
    engine = Engine(str(model), EngineOptions(device="cpu"))
    spec = JobSpec(model=str(model), prompt="a lighthouse at dusk", width=w, height=h, num_frames=a.frames,
                   num_inference_steps=a.steps, guidance_scale=5.0, seed=1)
    rng = np.random.default_rng(0)
    bundle = ControlBundle(frames=rng.random((a.frames, h, w, 3), dtype=np.float32),
                           masks=np.ones((a.frames, h, w), dtype=np.float32))
    stamps: list[float] = []
    got: list[Preview] = []

    def on_progress(p: Progress) -> None:
        if p.stage == "generate":
            stamps.append(time.perf_counter())

    # a preview after the last step only, so the steps timed (all but the last) carry no preview work
    stamps.append(time.perf_counter())
    with preview_scope(a.steps, got.append):
        engine.sample(spec, bundle, seed=1, on_progress=on_progress)
    steps = [b - c for c, b in zip(stamps[:-2], stamps[1:-1], strict=True)][1:]  # first step: warm-up, dropped
    step_s = statistics.median(steps)
    run_s = preview_cost(got[-1].x0, a.repeat)
    hosted = torch.randn(1, 16, 21, 60, 104)
    hosted_s = preview_cost(hosted, a.repeat)
    out = {
        "model": f"realarch wan21-vace 1.3B width, {a.layers} layers (tests/realarch.py)",
        "size": f"{w}x{h}x{a.frames}", "steps_timed": len(steps), "step_s": round(step_s, 4),
        "preview_s": round(run_s, 5), "preview_over_step": round(run_s / step_s, 5),
        "latent": list(got[-1].x0.shape), "preview_hosted_832x480x81_s": round(hosted_s, 5),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "date": time.strftime("%Y-%m-%d")},
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
