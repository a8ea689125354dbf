"""The job's plan: its frame count, fps and the length it returns, decided once before preprocessing.

`plan_job` applies the match_input_* timing rule (`vace_local.timing`) when the job still carries the switches,
adds the temporal plan (generate every stride-th frame, interpolate back) and hands everything on as one
`JobPlan`, so no later stage reads facts back out of the control bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vace_local.spec import JobSpec
from vace_local.timing import with_timing

if TYPE_CHECKING:
    import numpy as np

    from vace_local.interpolate import TemporalPlan


@dataclass(frozen=True)
class JobPlan:
    """What the plan stage decided, for the stages after it."""

    #: The job after match_input_* (the input's length / rate); what the metadata records.
    spec: JobSpec
    temporal: TemporalPlan
    #: What the model generates: every stride-th frame at the lower rate (the expanded prompt is set later).
    generation: JobSpec
    #: Trim the output to this many frames (None: keep all).
    keep_frames: int | None

    @property
    def bundle_spec(self) -> JobSpec:
        """The spec the preprocessors build the full-rate control bundle for."""
        return self.temporal.bundle_spec(self.spec)

    @property
    def output_fps(self) -> float:
        return self.temporal.output_fps

    def trim(self, frames: np.ndarray) -> np.ndarray:
        """Give back exactly `keep_frames` (not after num_interpolated_frames, which changes the count)."""
        keep = self.keep_frames
        if keep and not self.spec.temporal.num_interpolated_frames and keep < len(frames):
            return frames[:keep]
        return frames


def plan_job(spec: JobSpec, video: Path | None) -> JobPlan:
    """The whole plan for `spec` with its resolved input video. A missing RIFE model fails here, before any
    preprocessing or generation."""
    from preprocessors.build import input_timing
    from vace_local.interpolate import get_interpolator, plan_for_spec

    timing = input_timing(spec, video)
    spec = with_timing(spec, timing)
    temporal = plan_for_spec(spec)
    if temporal.active:
        get_interpolator(spec.temporal.interpolator)
    keep = spec.control.output_num_frames or (timing.keep_frames if timing else None)
    return JobPlan(spec, temporal, temporal.generation_spec(spec), keep)
