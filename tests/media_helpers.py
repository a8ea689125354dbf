"""Test helpers: synthetic media (real ffmpeg encodes, no mocks), whole-clip decoding and PSNR scores.

Not part of the product: the run path decodes only the frames a job needs (vace_local.core.media), and nothing
there measures quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vace_local.core.inputs import ResolvedInputs
from vace_local.core.media import open_video, read_frames, write_video
from vace_local.engine.interpolate import PairInterpolator, interpolate_clip

#: The real resolved-inputs type (all local paths); tests build it directly.
LocalInputs = ResolvedInputs


def index_video(path: Path, n: int, fps: float, width: int = 96, height: int = 64, step: int = 4) -> Path:
    """Uniform frames whose gray level encodes the frame index (level = 16 + step * i): sampling is visible."""
    levels = (16 + step * np.arange(n)).clip(0, 255).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (n, height, width, 3)).copy()
    return write_video(frames, path, fps=fps, quality="maximum")


def moving_square(
    n: int, width: int, height: int, size: int = 20, speed: tuple[float, float] = (2.0, 1.0), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A textured square moving over a textured background: (frames uint8, true masks float32 0/1)."""
    rng = np.random.default_rng(seed)
    import cv2

    bg = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 1.0)
    bg = cv2.normalize(bg, None, 0, 255, cv2.NORM_MINMAX)
    tex = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (0, 0), 1.0)
    tex = cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX)
    frames = np.empty((n, height, width, 3), np.uint8)
    masks = np.zeros((n, height, width), np.float32)
    for i in range(n):
        x = min(max(int(round(width * 0.15 + speed[0] * i)), 0), width - size)
        y = min(max(int(round(height * 0.2 + speed[1] * i)), 0), height - size)
        f = bg.copy()
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, width), min(y + size, height)
        f[y0:y1, x0:x1] = tex[y0 - y : y1 - y, x0 - x : x1 - x]
        frames[i] = f
        masks[i, y0:y1, x0:x1] = 1.0
    return frames, masks


@dataclass
class VideoClip:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: float

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps if self.fps else 0.0


def read_video(path: str | Path, field: str = "video", indices: list[int] | None = None) -> VideoClip:
    """Decode (selected) frames of a video as RGB uint8, rotation applied; audio is ignored."""
    info, vr = open_video(path, field)
    idx = list(range(info.num_frames)) if indices is None else [min(max(i, 0), info.num_frames - 1) for i in indices]
    return VideoClip(frames=read_frames(info, vr, idx), fps=info.fps)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def held_out_psnr(frames: np.ndarray, stride: int, interpolator: str | PairInterpolator) -> float:
    """Mean PSNR of the frames dropped by keeping every stride-th frame and interpolating them back."""
    keep = frames[::stride]
    n = (len(keep) - 1) * stride + 1
    rebuilt = interpolate_clip(keep, stride, interpolator)
    scores = [psnr(rebuilt[i], frames[i]) for i in range(n) if i % stride]
    return float(np.mean(scores))
