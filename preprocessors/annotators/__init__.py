"""Control-signal annotators: depth (MiDaS / Depth-Anything-V2), pose (DWPose ONNX), face (DWPose face points).

Models are loaded once per process (lru_cache) from the weights folder (see `preprocessors.weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def annotate(
    task: str, frames: np.ndarray, info: dict[str, Any], source: Callable[[], Iterable[np.ndarray]] | None = None
) -> np.ndarray:
    """(F, H, W, 3) uint8 RGB → (F, H, W, 3) float32 control frames in [0, 1].

    `source` yields the same frames uncropped at the source size: depth runs on them (official rule) and is
    cropped to the job size after normalisation.
    """
    if task in ("depth", "depthv2"):
        from preprocessors.annotators.depth import depth_frames

        return depth_frames(task, source() if source else frames, frames.shape[1], frames.shape[2], info)
    if task in ("pose", "face"):
        from preprocessors.annotators.pose import pose_frames

        return pose_frames(task, frames, info)
    raise ValueError(f"no annotator for task {task!r}")
