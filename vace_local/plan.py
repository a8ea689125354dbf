"""The job's plan: the one place that decides its frame count, fps and the length it returns.

`match_input_timing` is the rule for `match_input_num_frames` / `match_input_frames_per_second`; a dialect that
probes the input video at submit (fal, AI/ML) calls it to size the job and its server-side caps, and the run
path calls it through `plan_job` when the job still carries the switches. `plan_job` adds the temporal plan
(generate every stride-th frame, interpolate back) and hands everything on as one `JobPlan`, so no later stage
reads facts back out of the control bundle.

This module imports no torch and no decoder at import time: the API process uses the rule too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vace_local.spec import MAX_FRAMES, MIN_FRAMES, JobSpec

if TYPE_CHECKING:
    import numpy as np

    from vace_local.interpolate import TemporalPlan

#: The fps range a matched input rate is clamped to (JobSpec.fps).
MIN_FPS, MAX_FPS = 1, 60


def _frames_4k1(n: int) -> int:
    """Smallest 4k+1 >= n within the model's frame range (the VAE needs 4k+1 frames)."""
    return int(min(MAX_FRAMES, max(MIN_FRAMES, 4 * max(0, math.ceil((n - 1) / 4)) + 1)))


@dataclass(frozen=True)
class InputTiming:
    """The job's timing after the match_input_* switches."""

    #: Frames to generate: 4k+1 within the model's range.
    num_frames: int
    fps: int
    #: Frames to return when fewer than `num_frames` come from the input (the 4k+1 padding is trimmed off).
    keep_frames: int | None
    #: What was changed and why, for the submit log.
    notes: tuple[str, ...] = ()


def match_input_timing(num_frames: int, fps: int, *, match_frames: bool, match_fps: bool, source_frames: int,
                       source_fps: float) -> InputTiming:
    """Apply the switches against an input video of `source_frames` at `source_fps` (0 fps: no video facts).

    fps: the input's rate rounded and clamped to 1..60. Frames: how long the clip lasts at the job fps, rounded
    up to 4k+1 (the preprocessors pad with gray / mask 1) and clamped to the model's range. Returned: the frames
    the control video draws from the input (a short clip is never thinned out, as `sample_indices` builds it),
    when that is fewer than the generated count.
    """
    notes: list[str] = []
    known = source_fps > 0
    if match_fps and known:
        fps = max(MIN_FPS, min(MAX_FPS, int(round(source_fps))))
        notes.append(f"frames_per_second matched to the input: {fps}")
    n = num_frames
    if match_frames and known:
        # The clip's duration at the job rate (the control video is resampled to that rate).
        n = max(1, math.ceil(source_frames / source_fps * fps - 1e-6))
        notes.append(f"num_frames matched to the input: {n} frames at {fps} fps")
        if n > MAX_FRAMES:
            notes.append(f"input is longer than {MAX_FRAMES} frames; output capped at {MAX_FRAMES}")
    n4 = _frames_4k1(n)
    if n4 != n:
        notes.append(f"num_frames {n} rounded to {n4} (the model needs 4k+1 frames)")
    keep = None
    if match_frames and known:
        from_input = min(n4, max(source_frames, n))
        keep = from_input if from_input < n4 else None
    if keep:
        notes.append(f"output trimmed back to the input's {keep} frames")
    return InputTiming(n4, fps, keep, tuple(notes))


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


def input_timing(spec: JobSpec, video: Path | None) -> InputTiming | None:
    """The match_input_* timing of `spec` against its (local) input video; None when nothing is to match."""
    c = spec.control
    if video is None or not (c.match_input_num_frames or c.match_input_frames_per_second):
        return None
    from vace_local.media import probe_video

    frames, fps, _, _ = probe_video(video, "video")
    return match_input_timing(spec.num_frames, spec.fps, match_frames=c.match_input_num_frames,
                              match_fps=c.match_input_frames_per_second, source_frames=frames, source_fps=fps)


def with_timing(spec: JobSpec, timing: InputTiming | None) -> JobSpec:
    """`spec` with the timing's frame count and fps."""
    if timing is None:
        return spec
    return spec.model_copy(update={"num_frames": timing.num_frames, "fps": timing.fps})


def plan_job(spec: JobSpec, video: Path | None) -> JobPlan:
    """The whole plan for `spec` with its resolved input video. A missing RIFE model fails here, before any
    preprocessing or generation."""
    from vace_local.interpolate import get_interpolator, plan_for_spec

    timing = input_timing(spec, video)
    spec = with_timing(spec, timing)
    temporal = plan_for_spec(spec)
    if temporal.active:
        get_interpolator(spec.temporal.interpolator)
    keep = spec.control.output_num_frames or (timing.keep_frames if timing else None)
    return JobPlan(spec, temporal, temporal.generation_spec(spec), keep)
