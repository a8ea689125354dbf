"""The match_input_* timing rule: how many frames at which fps a job gets from its input video.

`match_input_timing` is the one rule for `match_input_num_frames` / `match_input_frames_per_second`: a dialect
that probes the input at submit (fal, AI/ML) calls it to size the job, the preprocessors' `plan_timing` and the
run path's plan call it when the job still carries the switches. It sits in the core layer (no torch, no decoder
at import time, no probing: callers pass the input's facts) because the API process and the preprocessors
both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vace_local.core.spec import JobSpec, max_job_frames, round_frames_4k1


def frames_at_fps(src_frames: int, src_fps: float, job_fps: float) -> int:
    """How many job frames the clip lasts when played at its real speed at `job_fps`."""
    return max(1, math.ceil(src_frames / src_fps * job_fps - 1e-6))


def frames_from_clip(src_frames: int, src_fps: float, job_fps: float, num_frames: int) -> int:
    """How many of a job's `num_frames` the control video draws from the clip: every source frame at least
    once (a short clip is never thinned out), its real-speed length when longer, at most `num_frames`."""
    return min(num_frames, max(src_frames, frames_at_fps(src_frames, src_fps, job_fps)))


#: The fps range a matched input rate is clamped to (JobSpec.fps).
MIN_FPS, MAX_FPS = 1, 60


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
                       source_fps: float, max_frames: int | None = None, cap_hint: str = "") -> InputTiming:
    """Apply the switches against an input video of `source_frames` at `source_fps` (0 fps: no video facts).

    fps: the input's rate rounded and clamped to 1..60. Frames: how long the clip lasts at the job fps, rounded
    up to 4k+1 (the preprocessors pad with gray / mask 1) and clamped to the model's range. Returned: the frames
    the control video draws from the input (a short clip is never thinned out, as `sample_indices` builds it),
    when that is fewer than the generated count. A long input is generated whole, in windows, up to
    `max_frames` (default: the job maximum, VACE_MAX_FRAMES); `cap_hint` is added to the note when it is cut.
    """
    cap = max_frames or max_job_frames()
    cap_hint = cap_hint or ("" if max_frames else " (VACE_MAX_FRAMES)")
    notes: list[str] = []
    known = source_fps > 0
    if match_fps and known:
        fps = max(MIN_FPS, min(MAX_FPS, int(round(source_fps))))
        notes.append(f"frames_per_second matched to the input: {fps}")
    n = num_frames
    if match_frames and known:
        # The clip's duration at the job rate (the control video is resampled to that rate).
        n = frames_at_fps(source_frames, source_fps, fps)
        notes.append(f"num_frames matched to the input: {n} frames at {fps} fps")
        if n > cap:
            notes.append(f"input is longer than {cap} frames; output capped at {cap}{cap_hint}")
    n4 = round_frames_4k1(n, hi=cap if match_frames and known else None)
    if n4 != n:
        notes.append(f"num_frames {n} rounded to {n4} (the model needs 4k+1 frames)")
    keep = None
    if match_frames and known:
        from_input = frames_from_clip(source_frames, source_fps, fps, n4)
        keep = from_input if from_input < n4 else None
    if keep:
        notes.append(f"output trimmed back to the input's {keep} frames")
    return InputTiming(n4, fps, keep, tuple(notes))


def with_timing(spec: JobSpec, timing: InputTiming | None) -> JobSpec:
    """`spec` with the timing's frame count and fps."""
    if timing is None:
        return spec
    return spec.model_copy(update={"num_frames": timing.num_frames, "fps": timing.fps})
