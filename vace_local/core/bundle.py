"""`ControlBundle`: what the preprocessors hand to the engine — exactly what the VACE model is conditioned on.

Conventions (ali-vilab/VACE; each rule with its source and test in docs/CONDITIONING.md):
- `frames`: (F, H, W, 3) float32 in [0, 1]; regions to generate are neutral gray 0.5 (never black).
- `masks`: (F, H, W) float32, exactly 0 or 1; 1 (white) = generate, 0 (black) = keep.
- `reference_images`: each (H, W, 3) float32 in [0, 1], already fitted on a white canvas of the job size,
  in the user's order (the engine compensates for diffusers' reversal).
F, H and W equal the job's num_frames, height and width exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

GRAY = 0.5


@dataclass
class ControlBundle:
    frames: np.ndarray
    masks: np.ndarray
    reference_images: list[np.ndarray] = field(default_factory=list)
    #: Free-form facts about how the bundle was built (task, backends, source fps...), saved in metadata.
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def blank(cls, num_frames: int, height: int, width: int) -> ControlBundle:
        """No video: gray frames, generate everything (text-to-video / reference-to-video)."""
        frames = np.full((num_frames, height, width, 3), GRAY, dtype=np.float32)
        masks = np.ones((num_frames, height, width), dtype=np.float32)
        return cls(frames=frames, masks=masks)

    def check(self, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError unless the bundle matches the job geometry and conventions exactly."""
        if self.frames.shape != (num_frames, height, width, 3):
            raise ValueError(f"control frames shape {self.frames.shape} != {(num_frames, height, width, 3)}")
        if self.masks.shape != (num_frames, height, width):
            raise ValueError(f"mask shape {self.masks.shape} != {(num_frames, height, width)}")
        if self.frames.dtype != np.float32 or self.masks.dtype != np.float32:
            raise ValueError("control frames and masks must be float32")
        if self.frames.size and (self.frames.min() < 0.0 or self.frames.max() > 1.0):
            raise ValueError("control frames must lie in [0, 1]")
        if not np.isin(self.masks, (0.0, 1.0)).all():
            raise ValueError("masks must be binary (0 = keep, 1 = generate)")
        for i, ref in enumerate(self.reference_images):
            if ref.shape != (height, width, 3):
                raise ValueError(f"reference image {i} shape {ref.shape} != {(height, width, 3)}")
