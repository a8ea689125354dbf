"""Depth maps: per-frame min-max normalised to 0..1 (near = bright), 3-channel gray.

`depth`: MiDaS DPT-Hybrid — the official `dpt_hybrid-midas-501f0c75.pt` through controlnet-aux, or the same
model in transformers format (Intel/dpt-hybrid-midas layout). `depthv2`: Depth-Anything-V2 through the
transformers depth-estimation pipeline (the `*-hf` repos).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from preprocessors import weights
from vace_local.errors import ModelNotFoundError

DepthFn = Callable[[np.ndarray], np.ndarray]


def _pipeline_fn(path: str) -> DepthFn:
    import torch
    from PIL import Image
    from transformers import pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipeline("depth-estimation", model=path, device=device)

    def run(frame: np.ndarray) -> np.ndarray:
        out = pipe(Image.fromarray(frame))
        return out["predicted_depth"].float().cpu().numpy().squeeze()

    return run


def _midas_fn(path: str) -> DepthFn:
    import os

    import torch
    from controlnet_aux import MidasDetector

    det = MidasDetector.from_pretrained(os.path.dirname(path), filename=os.path.basename(path))
    if torch.cuda.is_available():
        det = det.to("cuda")

    def run(frame: np.ndarray) -> np.ndarray:
        res = min(frame.shape[0], frame.shape[1], 1024) // 64 * 64 or 64
        return det(frame, detect_resolution=res, image_resolution=res, output_type="np")[..., 0].astype(np.float32)

    return run


@lru_cache(maxsize=4)
def load_depth(task: str, annotators_dir: str) -> tuple[str, DepthFn]:
    """(backend name, per-frame depth function); cached per process and weights folder."""
    hf = weights.hf_dir(task)
    if hf is not None:
        return f"transformers:{hf.name}", _pipeline_fn(str(hf))
    if task == "depth":
        return "controlnet-aux:midas-dpt-hybrid", _midas_fn(str(weights.resolve("depth")))
    path = weights.resolve("depthv2")  # raises the clear "missing" error when absent
    raise ModelNotFoundError(
        f"{path} is the original Depth-Anything-V2 checkpoint; depthv2 runs the transformers format: put "
        f"depth-anything/Depth-Anything-V2-Large-hf in {weights.annotators_dir() / weights.HF_DIRS['depthv2']}"
    )


def depth_frames(task: str, frames: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    backend, fn = load_depth(task, str(weights.annotators_dir()))
    info["annotator"] = backend
    out = np.empty(frames.shape, np.float32)
    h, w = frames.shape[1:3]
    for i, frame in enumerate(frames):
        d = fn(frame)
        if d.shape != (h, w):
            d = cv2.resize(d, (w, h), interpolation=cv2.INTER_CUBIC)
        lo, hi = float(d.min()), float(d.max())
        d = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
        out[i] = np.clip(d, 0.0, 1.0)[..., None]
    return out
