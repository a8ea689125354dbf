"""Control-signal annotators: depth (MiDaS / Depth-Anything-V2), pose (DWPose ONNX), face (DWPose face points).

Models are loaded once per process (lru_cache) from the weights folder (see `preprocessors.weights`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def annotate(task: str, frames: Iterable[np.ndarray], info: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """Uncropped uint8 RGB source frames → (F, H, W, 3) float32 control frames in [0, 1], `size` = (H, W).

    Every annotator runs on the source frame and its output is then cropped like the video (the official
    order): pose is detected and drawn, depth estimated and normalised, before the crop.
    """
    if task in ("depth", "depthv2"):
        from preprocessors.annotators.depth import depth_frames

        return depth_frames(task, frames, size[0], size[1], info)
    if task in ("pose", "face"):
        from preprocessors.annotators.pose import pose_frames

        return pose_frames(task, frames, info, size)
    raise ValueError(f"no annotator for task {task!r}")
