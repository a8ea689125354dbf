#!/usr/bin/env python
"""Soak: N consecutive jobs in one worker-like process, memory recorded after each.

Users of other Wan servers report resident memory climbing job after job until the process is killed.
This runs the worker's own path — one engine loaded once (`get_engine`, as `Worker.load` does), then
`run_job` per job: fetch (a reference image), preprocess, generate, encode the mp4 and metadata — and
records the process RSS (and, on CUDA, allocated / reserved device memory) after every job. Growth is
measured from job 2 on (the first jobs fill caches: text embeddings, kernels, allocator pools).

    .venv/bin/python scripts/soak.py                         # 30 jobs, tiny model, CPU
    .venv/bin/python scripts/soak.py --device cuda --jobs 10 --out soak-cuda.json

Exits 1 when RSS grew by more than --max-growth after job 2 (so a device script can flag a leak).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Jobs before the baseline: the first fill the text cache, allocator pools and lazily built kernels.
WARMUP_JOBS = 2


def rss_mib() -> float:
    """Resident set size of this process, from /proc (no psutil needed on the device image)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS in /proc/self/status")


def cuda_mib(device: str) -> dict[str, float]:
    import torch

    if not device.startswith("cuda"):
        return {}
    return {"cuda_allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
            "cuda_reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1)}


def growth(samples: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """Growth of `key` after the warm-up jobs, against their high-water mark; and the slope per job.

    `growth_frac` = (max over the later jobs − max over the warm-up jobs) / the latter: allocator noise of a
    few MiB either way stays near 0, a leak of a little per job adds up over the run.
    """
    warm = [s[key] for s in samples[:WARMUP_JOBS] if key in s]
    after = [s[key] for s in samples[WARMUP_JOBS:] if key in s]
    if not warm or len(after) < 2:
        return None
    base = max(warm)
    n = len(after)
    mean_x, mean_y = (n - 1) / 2, sum(after) / n
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(after)) / sum((i - mean_x) ** 2 for i in range(n))
    return {"baseline_mib": base, "max_mib": max(after), "last_mib": after[-1],
            "growth_frac": round((max(after) - base) / base, 5) if base else 0.0,
            "slope_mib_per_job": round(slope, 3)}


def write_reference(path: Path, width: int, height: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(path)
    return path


def soak(jobs: int, width: int, height: int, frames: int, steps: int, device: str, model: str = "tiny",
         on_job: Any = None) -> dict[str, Any]:
    """Run `jobs` jobs through `run_job` on one engine; return the per-job samples and the growth figures."""
    from vace_local.core.spec import JobSpec
    from vace_local.engine.engine import EngineOptions, get_engine
    from vace_local.run.job import run_job

    t = time.perf_counter()
    engine = get_engine(model, EngineOptions(device=device))
    load_s = time.perf_counter() - t
    work = Path(tempfile.mkdtemp(prefix="vace-soak-"))
    samples: list[dict[str, Any]] = []
    try:
        ref = write_reference(work / "ref.png", width, height)
        loaded = {"rss_mib": rss_mib(), **cuda_mib(engine.device)}
        for i in range(jobs):
            spec = JobSpec(model=model, prompt=f"soak job {i}: a red fox runs through snow", width=width,
                           height=height, num_frames=frames, num_inference_steps=steps, seed=i,
                           inputs={"reference_images": [str(ref)]}, output={"save_control": True})
            out_dir = work / f"job{i}"
            t = time.perf_counter()
            result = run_job(spec, out_dir, engine=engine)
            wall = time.perf_counter() - t
            if not result.video_path.stat().st_size:
                raise RuntimeError(f"job {i} wrote an empty video")
            shutil.rmtree(out_dir)  # the worker keeps outputs on disk; disk is not what this measures
            sample = {"job": i + 1, "wall_s": round(wall, 3), "rss_mib": rss_mib(), **cuda_mib(engine.device),
                      "stages_s": {k: round(v, 3) for k, v in result.timings.items()}}
            samples.append(sample)
            if on_job is not None:
                on_job(sample)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gc.collect()
    result: dict[str, Any] = {
        "model": model, "device": engine.device, "size": f"{width}x{height}x{frames}", "steps": steps,
        "jobs": jobs, "warmup_jobs": WARMUP_JOBS, "load_s": round(load_s, 2), "after_load": loaded,
        "samples": samples, "rss": growth(samples, "rss_mib"),
    }
    if engine.device.startswith("cuda"):
        result["cuda_allocated"] = growth(samples, "cuda_allocated_mib")
        result["cuda_reserved"] = growth(samples, "cuda_reserved_mib")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=30)
    p.add_argument("--size", default="64x48x17", help="WIDTHxHEIGHTxFRAMES of every job")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", default="tiny", help="model name (tiny: built offline)")
    p.add_argument("--max-growth", type=float, default=0.02, help="fail (exit 1) above this RSS growth")
    p.add_argument("--out", default=None, help="JSON results file (rewritten after the run)")
    args = p.parse_args(argv)
    if args.jobs < WARMUP_JOBS + 2:
        p.error(f"--jobs must be >= {WARMUP_JOBS + 2}: growth is measured after {WARMUP_JOBS} warm-up jobs")
    w, h, f = (int(x) for x in args.size.lower().split("x"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from vace_local.core.config import vace_settings

    if vace_settings().require_cuda and not torch.cuda.is_available():
        print("soak.py: CUDA not available and VACE_REQUIRE_CUDA=1 is set", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    partial: list[dict[str, Any]] = []

    def on_job(sample: dict[str, Any]) -> None:
        print(json.dumps(sample), flush=True)
        partial.append(sample)
        if args.out:  # a run stopped at a time limit still leaves the samples it took
            Path(args.out).write_text(json.dumps({"partial": True, "device": device, "samples": partial}, indent=2))

    res = soak(args.jobs, w, h, f, args.steps, device, args.model, on_job=on_job)
    res["max_growth"] = args.max_growth
    res["ok"] = res["rss"]["growth_frac"] < args.max_growth
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
