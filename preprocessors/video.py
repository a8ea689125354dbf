"""Decode the user's videos for a job: only the frames that are needed, in chunks.

Time sampling (`sample_indices`, docs/CONDITIONING.md): a clip with at least as many frames as the job is
spread over the whole job by the official VACE rule (`VaceVideoProcessor`, keep_last=True): the job's frames
sit at evenly spaced times from 0 to the middle of the clip's last frame, each showing the source frame on
screen at that time, so the first and last source frames are always used and nothing is padded. A clip with
fewer frames than the job uses every source frame once (a clip slower than the job fps keeps its real speed,
frames repeating, until the job is full) and the caller pads the rest at the end (gray + mask 1).
`match_input_num_frames` (see `plan_timing`) makes the job as long as the clip at the job fps instead.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from vace_local.errors import InputError
from vace_local.events import checkpoint

CHUNK = 16


@dataclass
class VideoInfo:
    path: Path
    field: str
    num_frames: int
    fps: float
    width: int  # as displayed (after rotation)
    height: int
    #: Display rotation from the container (clockwise degrees: 0, 90, 180, 270), for information only:
    #: decord (and the ffmpeg fallback) already return frames in display orientation.
    rotation: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def parse_display_rotation(ffmpeg_stderr: str) -> int:
    """Clockwise display rotation from `ffmpeg -i` output; 0 when it reports none.

    ffmpeg < 7.1 prints `displaymatrix: rotation of -90.00 degrees`, newer ones `Display Matrix: rotation of
    ...`; the matrix angle is counter-clockwise. Very old builds print a `rotate : 90` tag instead.
    """
    m = re.search(r"display\s*matrix: rotation of (-?[0-9.]+) degrees", ffmpeg_stderr, re.IGNORECASE)
    if m:
        return int(round(-float(m.group(1)))) % 360
    m = re.search(r"^\s*rotate\s*:\s*(-?[0-9]+)", ffmpeg_stderr, re.MULTILINE)
    return int(m.group(1)) % 360 if m else 0


@lru_cache(maxsize=64)
def _rotation(path: str) -> int:
    """Display rotation from container metadata (reported in the bundle info; decord applies it itself)."""
    import imageio_ffmpeg

    try:
        err = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path],
            capture_output=True, text=True, errors="replace", timeout=30,
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return 0
    return parse_display_rotation(err)


class _FfmpegReader:
    """Fallback for containers decord cannot open (GIF, some AVI/WebM): frames come from imageio-ffmpeg.

    It has the few `decord.VideoReader` members we use; `get_batch` is refused so `iter_frames` takes its
    sequential ffmpeg path.
    """

    def __init__(self, path: Path) -> None:
        import imageio_ffmpeg

        gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        try:
            meta = next(gen)
            w, h = meta["size"]
            self._first = np.frombuffer(next(gen), np.uint8).reshape(h, w, 3)
        finally:
            gen.close()
        self._fps = float(meta.get("fps") or 0.0)
        self._n = int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        if i != 0:
            raise IndexError("the ffmpeg fallback reader serves frame 0 only; use iter_frames")
        return self._first

    def get_avg_fps(self) -> float:
        return self._fps

    def get_batch(self, idx: list[int]) -> None:
        raise NotImplementedError("sequential ffmpeg decode")


def _reader(path: Path, field: str):  # noqa: ANN202 - decord.VideoReader or _FfmpegReader
    import decord

    if not path.is_file():
        raise InputError(field, f"file not found: {path.name}")
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
    except Exception as exc:  # decord raises DECORDError / RuntimeError for anything unreadable
        try:
            vr = _FfmpegReader(path)  # a format ffmpeg knows but decord does not (e.g. GIF)
        except Exception:  # noqa: BLE001 - not a video at all: report decord's verdict
            raise InputError(field, f"not a readable video ({type(exc).__name__})") from exc
    if len(vr) == 0:
        raise InputError(field, "video has no frames")
    return vr


def open_video(path: str | Path, field: str = "video") -> tuple[VideoInfo, object]:
    """Open and describe a video; errors name the input."""
    p = Path(path)
    vr = _reader(p, field)
    try:
        h, w = vr[0].shape[:2]
    except Exception as exc:
        raise InputError(field, f"could not decode the first frame ({type(exc).__name__})") from exc
    fps = float(vr.get_avg_fps() or 0.0)
    if not np.isfinite(fps) or fps <= 0:
        fps = 16.0
    # decord 0.6 decodes in display orientation (it applies the display matrix, measured for 90/180/270):
    # rotating again here would turn a phone video on its side. The angle is only recorded.
    return VideoInfo(p, field, len(vr), fps, int(w), int(h), _rotation(str(p))), vr


def probe(path: str | Path, field: str = "video") -> VideoInfo:
    return open_video(path, field)[0]


def keep_last_indices(src_frames: int, count: int) -> list[int]:
    """Official keep_last sampling: `count` evenly spaced times over [0, mid-time of the last frame].

    Source frame i is on screen over [i, i + 1] (in frame units); a time on a boundary belongs to the earlier
    frame, as the official `argmax` over closed intervals picks. First and last source frames are always used.
    """
    if count <= 1 or src_frames <= 1:
        return [0] * max(count, 0)
    x = np.linspace(0.0, src_frames - 0.5, count)
    return np.clip(np.ceil(x - 1e-9) - 1, 0, src_frames - 1).astype(int).tolist()


def frames_at_fps(src_frames: int, src_fps: float, job_fps: float) -> int:
    """How many job frames the clip lasts when played at its real speed at `job_fps`."""
    return max(1, int(np.ceil(src_frames / src_fps * job_fps - 1e-6)))


def sample_indices(src_frames: int, src_fps: float, job_fps: float, num_frames: int) -> list[int]:
    """Source index for each job frame (len <= num_frames; the caller pads the rest).

    Enough frames (src_frames >= num_frames): all `num_frames` spread over the whole clip (official keep_last,
    nothing padded). Fewer: every source frame at least once — `max(src_frames, real-speed length)` frames,
    capped at `num_frames` — so a short clip is never thinned out while gray frames are added after it.
    """
    count = min(num_frames, max(src_frames, frames_at_fps(src_frames, src_fps, job_fps)))
    return keep_last_indices(src_frames, count)


def iter_frames(
    info: VideoInfo, vr: object, indices: list[int], transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> Iterator[np.ndarray]:
    """Yield decoded (and transformed) frames in chunks so full-HD input never sits in memory at once."""
    for start in range(0, len(indices), CHUNK):
        idx = indices[start : start + CHUNK]
        checkpoint()  # a cancel lands between chunks and (below) between frames of slow annotators
        try:
            batch = vr.get_batch(idx).asnumpy()[..., :3]  # type: ignore[attr-defined]
        except Exception:  # decord fails on some tiny widths: let ffmpeg decode (it applies rotation too)
            batch = _ffmpeg_frames(info, idx)
        for frame in batch:
            checkpoint()
            yield transform(frame) if transform else frame


def _ffmpeg_frames(info: VideoInfo, indices: list[int]) -> np.ndarray:
    """Sequential decode with imageio-ffmpeg up to the last wanted frame (fallback path)."""
    import imageio_ffmpeg

    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    gen = imageio_ffmpeg.read_frames(str(info.path), pix_fmt="rgb24")
    try:
        meta = next(gen)
        w, h = meta["size"]
        for i, raw in enumerate(gen):
            if i in wanted:
                got[i] = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            if i >= max(wanted):
                break
    except Exception as exc:
        raise InputError(info.field, f"could not decode frames ({type(exc).__name__})") from exc
    finally:
        gen.close()
    last = max(got) if got else None
    if last is None:
        raise InputError(info.field, "could not decode any frame")
    return np.stack([got.get(i, got[last]) for i in indices])


def read_frames(
    info: VideoInfo, vr: object, indices: list[int], transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    return np.stack(list(iter_frames(info, vr, indices, transform)))
