"""Control-signal annotators: depth (MiDaS / Depth-Anything-V2), pose (DWPose ONNX), face (DWPose face points).

Models are loaded once per process (lru_cache) from the weights folder (see `preprocessors.weights`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def annotate(task: str, frames: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """(F, H, W, 3) uint8 RGB → (F, H, W, 3) float32 control frames in [0, 1]."""
    if task in ("depth", "depthv2"):
        from preprocessors.annotators.depth import depth_frames

        return depth_frames(task, frames, info)
    if task in ("pose", "face"):
        from preprocessors.annotators.pose import pose_frames

        return pose_frames(task, frames, info)
    raise ValueError(f"no annotator for task {task!r}")
