"""Control-signal annotators: depth (MiDaS / Depth-Anything-V2), pose (DWPose ONNX), face (DWPose face points).

Models are loaded once per process and weights folder (lru_cache); see `preprocessors.weights`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vace_local.core.spec import TASKS


def annotate(task: str, frames: Iterable[np.ndarray], info: dict[str, Any], size: tuple[int, int],
             annotators_dir: Path | None = None) -> np.ndarray:
    """Uncropped uint8 RGB source frames → (F, H, W, 3) float32 control frames in [0, 1], `size` = (H, W).

    Every annotator runs on the source frame and its output is then cropped like the video (the official
    order): pose is detected and drawn, depth estimated and normalised, before the crop. `annotators_dir`:
    the weights folder (None: the default, see `preprocessors.weights`).
    """
    family = TASKS[task].annotator if task in TASKS else None
    if family == "depth":
        from preprocessors.annotators.depth import depth_frames

        return depth_frames(task, frames, size[0], size[1], info, annotators_dir)
    if family == "pose":
        from preprocessors.annotators.pose import pose_frames

        return pose_frames(task, frames, info, size, annotators_dir)
    raise ValueError(f"no annotator for task {task!r}")
