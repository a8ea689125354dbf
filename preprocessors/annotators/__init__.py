"""Control-signal annotators: depth (MiDaS / Depth-Anything-V2), pose (DWPose ONNX), face (DWPose face points).

Models are loaded once per process (lru_cache) from the weights folder (see `preprocessors.weights`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

#: tasks whose annotator reads the source frames (not the job-size crop) and crops its own output, as official
SOURCE_FRAME_TASKS = {"pose", "face", "depth", "depthv2"}


def annotate(
    task: str, frames: Iterable[np.ndarray], info: dict[str, Any], size: tuple[int, int] | None = None
) -> np.ndarray:
    """uint8 RGB frames → (F, H, W, 3) float32 control frames in [0, 1].

    For SOURCE_FRAME_TASKS `frames` are the uncropped source frames and `size` (height, width) the crop to
    return: pose is detected and drawn, depth estimated and normalised, on the source frame, then cropped like
    the video (the official order).
    """
    if task in ("depth", "depthv2"):
        from preprocessors.annotators.depth import depth_frames

        if size is None:
            raise ValueError("depth needs the crop size: it runs on the uncropped source frames")
        return depth_frames(task, frames, size[0], size[1], info)
    if task in ("pose", "face"):
        from preprocessors.annotators.pose import pose_frames

        return pose_frames(task, frames, info, size)
    raise ValueError(f"no annotator for task {task!r}")
