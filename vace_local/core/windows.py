"""The window plan of a long video: which frames each denoising window makes, what it keeps, its seed and prompt.

Wan / VACE are trained on 81-frame clips; past that the attention cost grows with the square of the length and
quality falls. A job longer than `window_frames` is therefore made of windows of exactly `window_frames` frames
(the trained length, 4k+1). Window k+1 starts `window_frames - overlap_frames` after window k; its first frames
(the overlap) are window k's last generated frames, given as kept control frames (mask 0, VACE `firstclip`).
The last window is moved back to end exactly at the job's last frame, so it keeps more frames (a longer
overlap) rather than changing length. Every window has its own seed (`seed + index`) and prompt (the schedule
entry in force at its first new frame).

A pure rule (core layer): the API process, the preprocessors and the run path all compute the same plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vace_local.core.spec import MAX_SEED, JobSpec, PromptAt


@dataclass(frozen=True)
class Window:
    index: int
    #: First timeline frame of the window (inclusive) and one past its last frame.
    start: int
    end: int
    #: Frames at the window's start kept from what came before (the previous window, or the clip `extend`s).
    overlap: int
    seed: int | None
    prompt: str

    @property
    def frames(self) -> int:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_prompt(prompts: list[PromptAt], default: str, first_new_frame: int) -> str:
    """The schedule's prompt in force at `first_new_frame` (the last entry starting at or before it); else the
    job's own prompt."""
    chosen = default
    for p in sorted(prompts, key=lambda p: p.start_frame):
        if p.start_frame <= first_new_frame:
            chosen = p.prompt
    return chosen


def plan_windows(total: int, window: int, overlap: int, *, seed: int | None, prompt: str = "",
                 prompts: list[PromptAt] | None = None, prefix: int = 0, prompt_offset: int = 0) -> list[Window]:
    """Windows covering `total` timeline frames.

    `prefix`: frames at the timeline's start that already exist (the tail of a clip being extended); the first
    window keeps them. `total <= window`: one window of `total` frames. Otherwise windows of exactly `window`
    frames starting every `window - overlap` frames, the last one aligned to end at `total`. `prompt_offset`
    maps timeline frames to the job's frame numbers of the prompt schedule (minus the prefix).
    """
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if not 1 <= overlap <= window - 4:
        raise ValueError(f"overlap {overlap} must be within 1..window-4 ({window - 4})")
    starts = [0]
    if total > window:
        step = window - overlap
        # The first window keeps `prefix` frames; a shorter prefix than the overlap shifts nothing.
        while starts[-1] + window < total:
            starts.append(starts[-1] + step)
        starts[-1] = total - window
    out: list[Window] = []
    prev_end = prefix
    for k, s in enumerate(starts):
        end = min(total, s + window)
        kept = max(0, prev_end - s) if k else prefix
        w_seed = None if seed is None else (seed + k) % (MAX_SEED + 1)
        first_new = max(0, s + kept - prompt_offset)
        out.append(Window(k, s, end, kept, w_seed, window_prompt(prompts or [], prompt, first_new)))
        prev_end = end
    return out


def spec_windows(spec: JobSpec, total: int | None = None, *, seed: int | None = None,
                 prefix: int = 0) -> list[Window]:
    """The plan of `spec` over `total` timeline frames (default: its num_frames)."""
    return plan_windows(total or spec.num_frames, spec.window_frames, spec.overlap_frames, seed=seed,
                        prompt=spec.prompt, prompts=spec.prompts, prefix=prefix, prompt_offset=prefix)
