"""Which source frames a job uses (decoding itself is `vace_local.core.media`: only the frames needed, in chunks).

Time sampling (`sample_indices`, docs/CONDITIONING.md): a clip with at least as many frames as the job is
spread over the whole job by the official VACE rule (`VaceVideoProcessor`, keep_last=True): the job's frames
sit at evenly spaced times from 0 to the middle of the clip's last frame, each showing the source frame on
screen at that time, so the first and last source frames are always used and nothing is padded. A clip with
fewer frames than the job uses every source frame once (a clip slower than the job fps keeps its real speed,
frames repeating, until the job is full) and the caller pads the rest at the end (gray + mask 1).
`match_input_num_frames` (see `plan_timing`) makes the job as long as the clip at the job fps instead.
"""

from __future__ import annotations

import numpy as np

from vace_local.core.timing import frames_from_clip


def keep_last_indices(src_frames: int, count: int) -> list[int]:
    """Official keep_last sampling: `count` evenly spaced times over [0, mid-time of the last frame].

    Source frame i is on screen over [i, i + 1] (in frame units); a time on a boundary belongs to the earlier
    frame, as the official `argmax` over closed intervals picks. First and last source frames are always used.
    """
    if count <= 1 or src_frames <= 1:
        return [0] * max(count, 0)
    x = np.linspace(0.0, src_frames - 0.5, count)
    return np.clip(np.ceil(x - 1e-9) - 1, 0, src_frames - 1).astype(int).tolist()


def sample_indices(src_frames: int, src_fps: float, job_fps: float, num_frames: int) -> list[int]:
    """Source index for each job frame (len <= num_frames; the caller pads the rest).

    Enough frames (src_frames >= num_frames): all `num_frames` spread over the whole clip (official keep_last,
    nothing padded). Fewer: every source frame at least once — `max(src_frames, real-speed length)` frames,
    capped at `num_frames` — so a short clip is never thinned out while gray frames are added after it.
    """
    count = frames_from_clip(src_frames, src_fps, job_fps, num_frames)
    return keep_last_indices(src_frames, count)
