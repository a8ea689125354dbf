"""The job's plan: its frame count, fps, windows and the length it returns, decided once before preprocessing.

`plan_job` applies the match_input_* timing rule (`vace_local.core.timing`) when the job still carries the switches,
adds the temporal plan (generate every stride-th frame, interpolate back), the window plan of a long video
(`vace_local.core.windows`) and, for `inputs.extend`, the clip's kept tail, and hands everything on as one
`JobPlan`, so no later stage reads facts back out of the control bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vace_local.core.errors import InputError
from vace_local.core.spec import JobSpec, PromptAt, round_frames_4k1
from vace_local.core.timing import frames_at_fps, with_timing
from vace_local.core.windows import Window, spec_windows

if TYPE_CHECKING:
    import numpy as np

    from vace_local.engine.interpolate import TemporalPlan


@dataclass(frozen=True)
class ExtendPlan:
    """Continuing a clip: its frames at the job fps, and how many of its last frames the first window keeps."""

    source: Path
    #: Source frame shown by each clip frame at the job fps (real speed).
    source_ids: list[int]
    #: The clip's last `prefix` frames start the timeline (kept, mask 0).
    prefix: int
    #: Frames to generate after the clip.
    new_frames: int
    output: str  # "full" | "continuation"

    def as_dict(self) -> dict[str, object]:
        return {"source_frames": len(self.source_ids), "kept_frames": self.prefix, "new_frames": self.new_frames,
                "output": self.output}


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
    #: The denoising windows over the generated timeline (one window: a short job).
    windows: tuple[Window, ...] = ()
    #: Frames of the generated timeline (an extended clip's kept tail, then the generated frames).
    timeline_frames: int = 0
    extend: ExtendPlan | None = None

    @property
    def windowed(self) -> bool:
        """Generated window by window (a long job or a continuation) rather than in one run."""
        return len(self.windows) > 1 or self.extend is not None

    def windows_info(self) -> list[dict[str, object]]:
        return [w.as_dict() for w in self.windows]

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
        if self.extend is not None:
            return frames[self.extend.prefix: keep]
        if keep and not self.spec.temporal.num_interpolated_frames and keep < len(frames):
            return frames[:keep]
        return frames


def plan_job(spec: JobSpec, video: Path | None, *, seed: int | None = None, extend: Path | None = None) -> JobPlan:
    """The whole plan for `spec` with its resolved input video (and the clip to extend). A missing RIFE model
    fails here, before any preprocessing or generation. `seed`: the job's resolved seed (window k: seed + k)."""
    from preprocessors.build import input_timing
    from vace_local.engine.interpolate import get_interpolator, plan_for_spec

    if extend is not None:
        return _plan_extend(spec, video, extend, seed)
    timing = input_timing(spec, video)
    spec = with_timing(spec, timing)
    temporal = plan_for_spec(spec)
    if temporal.active:
        get_interpolator(spec.temporal.interpolator)
    keep = spec.control.output_num_frames or (timing.keep_frames if timing else None)
    generation = temporal.generation_spec(spec)
    if temporal.stride > 1:  # the schedule counts job frames; windows count generated ones
        generation = generation.model_copy(update={"prompts": [
            PromptAt(start_frame=-(-p.start_frame // temporal.stride), prompt=p.prompt) for p in spec.prompts]})
    windows = spec_windows(generation, seed=seed)
    _check_schedule(spec, windows, temporal.stride)
    return JobPlan(spec, temporal, generation, keep, tuple(windows), generation.num_frames)


def _check_schedule(spec: JobSpec, windows: list[Window], stride: int = 1, prefix: int = 0) -> None:
    """Every prompt-schedule entry must be the prompt of some window (else it would be accepted and unused)."""
    starts = [max(0, (w.start + w.overlap - prefix) * stride) for w in windows]
    at = [p.start_frame for p in spec.prompts]
    used = {max((i for i, a in enumerate(at) if a <= s), key=lambda i: at[i], default=-1) for s in starts}
    for i, p in enumerate(spec.prompts):
        if i not in used:
            raise InputError(f"prompts[{i}]", f"no window would use this prompt (start_frame {p.start_frame}): each "
                                              "window takes the entry in force at its first new frame, and this "
                                              f"job's windows start new frames at {', '.join(map(str, starts))} "
                                              f"(window_frames {spec.window_frames}, overlap_frames "
                                              f"{spec.overlap_frames})")


def _plan_extend(spec: JobSpec, video: Path | None, extend: Path, seed: int | None) -> JobPlan:
    """A continuation: the timeline is the clip's last `overlap_frames` frames (kept) + `extend_frames` new ones.

    The job's control video / mask (if any) covers the new frames. A timeline that fits one window is generated
    at the next 4k+1 length and trimmed back."""
    from preprocessors.build import input_timing
    from vace_local.core.media import probe_video
    from vace_local.engine.interpolate import plan_for_spec

    if spec.temporal.temporal_downsample_factor or spec.temporal.enable_auto_downsample or \
            spec.temporal.num_interpolated_frames:
        raise InputError("extend_frames", "a continuation does not combine with temporal downsampling or "
                                          "interpolation")
    src_frames, src_fps, _, _ = probe_video(extend, "extend")
    fps = spec.fps
    if spec.control.match_input_frames_per_second:
        timing = input_timing(spec, extend)
        fps = timing.fps if timing else fps
    ids = [min(src_frames - 1, int(i * src_fps / fps + 1e-6)) for i in range(frames_at_fps(src_frames, src_fps, fps))]
    new = int(spec.extend_frames or 0)
    prefix = min(spec.overlap_frames, len(ids))
    timeline = prefix + new
    gen_timeline = timeline if timeline > spec.window_frames else round_frames_4k1(timeline, lo=None, hi=None)
    cont = round_frames_4k1(gen_timeline - prefix, lo=None, hi=None)  # the bundle: 4k+1 frames from the new ones
    spec = spec.model_copy(update={"num_frames": cont, "fps": fps})
    temporal = plan_for_spec(spec)
    windows = spec_windows(spec, gen_timeline, seed=seed, prefix=prefix)
    _check_schedule(spec, windows, prefix=prefix)
    ext = ExtendPlan(extend, ids, prefix, new, spec.extend_output)
    return JobPlan(spec, temporal, spec, timeline, tuple(windows), gen_timeline, ext)
