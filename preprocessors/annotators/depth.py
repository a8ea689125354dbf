"""Depth control frames the way official VACE builds them: on the source frame, normalised, then cropped.

Per frame: the depth model sees the whole uncropped source frame; its map is min-max normalised over that
frame (near = bright), resized back to the source size and only then cover-resized + centre-cropped to the job
size like the video, as 3 equal channels. Cropping first would renormalise the crop and change the values.

`depth` (MiDaS DPT-Hybrid): the official `dpt_hybrid-midas-501f0c75.pt` runs through controlnet-aux on the
frame with its short side capped at 1024 and both sides rounded to a multiple of 64 (official `resize_image`);
a transformers folder (Intel/dpt-hybrid-midas layout) uses its processor's 384×384 resize, because
transformers' DPT neck only accepts square token grids. `depthv2` (Depth-Anything-V2 vitl): its own
preprocessing (short side up to 518, multiples of 14, bicubic), from a transformers folder (`*-hf` layout) or the
official `depth_anything_v2_vitl.pth`, converted at load (`depth_anything_pth`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from preprocessors import weights
from preprocessors.geometry import cover_crop

#: (h, w, 3) uint8 RGB source frame → (h', w') float depth map, larger = nearer
DepthFn = Callable[[np.ndarray], np.ndarray]
MIDAS_MAX_SHORT_SIDE = 1024


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_depth_fn(model: Any, processor: Any) -> DepthFn:
    """Per-frame depth from a transformers-style depth model (`pixel_values` → `.predicted_depth`)."""
    import torch

    device = _device()
    model = model.to(device).eval()

    def run(frame: np.ndarray) -> np.ndarray:
        inputs = processor(images=frame, return_tensors="pt")  # the model's own resize / normalisation
        with torch.inference_mode():
            out = model(pixel_values=inputs["pixel_values"].to(device))
        return out.predicted_depth[0].float().cpu().numpy()

    return run


def _transformers_fn(path: str) -> DepthFn:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    return model_depth_fn(AutoModelForDepthEstimation.from_pretrained(path), AutoImageProcessor.from_pretrained(path))


def _midas_fn(path: str) -> DepthFn:
    import os

    from controlnet_aux import MidasDetector

    det = MidasDetector.from_pretrained(os.path.dirname(path), filename=os.path.basename(path))
    if _device() == "cuda":
        det = det.to("cuda")

    def run(frame: np.ndarray) -> np.ndarray:
        res = min(frame.shape[0], frame.shape[1], MIDAS_MAX_SHORT_SIDE)  # controlnet-aux rounds sides to 64 itself
        return det(frame, detect_resolution=res, image_resolution=res, output_type="np")[..., 0].astype(np.float32)

    return run


@lru_cache(maxsize=4)
def load_depth(task: str, annotators_dir: str) -> tuple[str, DepthFn]:
    """(backend name, per-frame depth function); cached per process and weights folder."""
    root = Path(annotators_dir)
    hf = weights.hf_dir(task, root)
    if hf is not None:
        return f"transformers:{hf.name}", _transformers_fn(str(hf))
    if task == "depth":
        return "controlnet-aux:midas-dpt-hybrid", _midas_fn(str(weights.resolve("depth", root)))
    from preprocessors.annotators import depth_anything_pth

    path = weights.resolve("depthv2", root)  # raises the clear "missing" error when absent
    model = depth_anything_pth.load_official(path)
    return "official-pth:depth-anything-v2-vitl", model_depth_fn(model, depth_anything_pth.image_processor())


def normalise(depth: np.ndarray) -> np.ndarray:
    """Per-frame min-max to 0..1 (a flat map becomes 0)."""
    d = depth.astype(np.float32)
    lo, hi = float(d.min()), float(d.max())
    return (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)


def depth_frames(task: str, source: Iterable[np.ndarray], height: int, width: int, info: dict[str, Any],
                 annotators_dir: Path | None = None) -> np.ndarray:
    """Uncropped source frames → (n, height, width, 3) float32 depth control frames in [0, 1]."""
    backend, fn = load_depth(task, str(weights.annotators_dir(annotators_dir)))
    info["annotator"] = backend
    out = []
    for frame in source:
        h, w = frame.shape[:2]
        d = normalise(fn(frame))
        if d.shape != (h, w):  # back onto the source frame (official), then cropped like the video
            shrink = d.shape[0] * d.shape[1] > h * w
            d = cv2.resize(d, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out.append(np.clip(cover_crop(d, height, width), 0.0, 1.0))
    info["depth_on"] = f"source frame {w}x{h}, normalised, then cropped"
    return np.repeat(np.stack(out)[..., None], 3, axis=-1)
