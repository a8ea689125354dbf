"""Benchmark: decode + cover-resize + flow mask tracking at 832x480 (goal >= 30 frames/s on a 2-core CPU).

Usage: .venv/bin/python scripts/bench_preprocess.py [--video V --mask M --repeat N]
Default input: the 1280x720 boxing-cats fixture (81 frames) with its first-frame mask.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from preprocessors.geometry import cover_crop
from preprocessors.images import mask_image
from preprocessors.tracking import FlowTracker
from preprocessors.video import sample_indices
from vace_local.core.media import open_video, read_frames

FIX = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "vace"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", default=str(FIX / "test.mp4"))
    ap.add_argument("--mask", default=str(FIX / "mask_test.png"))
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    W, H = a.width, a.height
    best: dict[str, float] = {}
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        info, vr = open_video(a.video)
        idx = sample_indices(info.num_frames, info.fps, 16, 81)
        frames = read_frames(info, vr, idx, lambda f: cover_crop(f, H, W))
        t1 = time.perf_counter()
        m0 = mask_image(Path(a.mask), info.width, info.height, H, W)
        tracker = FlowTracker(frames[0], m0)
        areas = [m0.mean()] + [tracker.step(f).mean() for f in frames[1:]]
        t2 = time.perf_counter()
        n = len(frames)
        for k, v in (("decode+resize", n / (t1 - t0)), ("flow tracking", n / (t2 - t1)), ("total", n / (t2 - t0))):
            best[k] = max(best.get(k, 0.0), v)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"input {info.width}x{info.height} @ {info.fps:g} fps, {n} frames → {W}x{H}")
    for k, v in best.items():
        print(f"{k:14} {v:7.1f} frames/s (best of {a.repeat})")
    ar = np.array(areas) / areas[0]
    print(f"mask area vs frame 0: min {ar.min():.2f}x, max {ar.max():.2f}x")


if __name__ == "__main__":
    main()
