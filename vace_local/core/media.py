"""Media I/O: decode videos (decord, ffmpeg fallback) and images (PIL, EXIF-aware), encode H.264 mp4.

Frames are numpy arrays: (F, H, W, 3) uint8 RGB for decoded/encoded video. The lowest layer that touches
media: the preprocessors, the run path and the sandbox's vetting child all decode through here.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from vace_local.core.errors import InputError
from vace_local.core.events import checkpoint

# x264 settings per fal's `video_quality` (CRF) and `video_write_mode` (preset).
_CRF = {"low": 28, "medium": 23, "high": 18, "maximum": 12}
_PRESET = {"fast": "veryfast", "balanced": "medium", "small": "slow"}


# ---- video decoding -------------------------------------------------------------------------------------

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


def probe_video(path: str | Path, field: str = "video") -> tuple[int, float, int, int]:
    """(num_frames, fps, width, height as displayed) without decoding every frame."""
    info = probe(path, field)
    return info.num_frames, info.fps, info.width, info.height


def open_image_header(path: Path, field: str):  # noqa: ANN201 - PIL.Image, header parsed only
    """PIL reads only the header here; the caller checks the size (`check_image_pixels`) before `load()`."""
    from PIL import Image, UnidentifiedImageError

    # MediaLimits decide, with a message naming the field: PIL's own bomb check would raise
    # DecompressionBombError (an internal error to the user) or let 179 Mpx through.
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(field, "not a readable image") from exc


def load_image(path: str | Path, field: str = "image", mode: str | None = "RGB"):  # noqa: ANN201 - PIL.Image
    """Open an image honouring EXIF orientation; `mode=None` keeps its own mode (e.g. RGBA).

    The declared size is checked against `MediaLimits` from the header, before any pixel is decoded, so a
    74-byte PNG declaring 50000x50000 is an input error naming the field, not a 10 GB allocation."""
    from PIL import ImageOps, UnidentifiedImageError

    from vace_local.core.media_limits import MediaLimits, check_image_pixels

    p = Path(path)
    if not p.is_file():
        raise InputError(field, f"file not found: {p}")
    with open_image_header(p, field) as im:
        check_image_pixels(field, im.width, im.height, MediaLimits.from_env())
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(field, "not a readable image") from exc
    return im.convert(mode) if mode and im.mode != mode else im


def write_video(
    frames: np.ndarray,
    path: str | Path,
    fps: float,
    quality: str = "high",
    write_mode: str = "balanced",
) -> Path:
    """Encode (F, H, W, 3) uint8 RGB as H.264 yuv420p; odd sizes are padded to even by edge replication."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError("write_video expects uint8 frames")
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video expects (F, H, W, 3) frames, got {frames.shape}")
    writer = VideoWriter(path, fps, quality, write_mode)
    writer.write(frames)
    writer.close()
    return Path(path)


class VideoWriter:
    """An H.264 yuv420p encoder fed a few frames at a time (a long video is encoded window by window, so its
    frames never all sit in memory); odd sizes are padded to even by edge replication."""

    def __init__(self, path: str | Path, fps: float, quality: str = "high", write_mode: str = "balanced") -> None:
        self.path, self.fps, self.quality, self.write_mode = Path(path), fps, quality, write_mode
        self._writer = None
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        """Append (n, H, W, 3) uint8 frames."""
        import imageio_ffmpeg

        h, w = frames.shape[1:3]
        if h % 2 or w % 2:
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            h, w = frames.shape[1:3]
        if self._writer is None:
            self._writer = imageio_ffmpeg.write_frames(
                str(self.path), (w, h), fps=self.fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
                quality=None, macro_block_size=1,
                output_params=["-crf", str(_CRF[self.quality]), "-preset", _PRESET[self.write_mode], "-movflags",
                               "+faststart"],
                ffmpeg_log_level="error",
            )
            self._writer.send(None)
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
        self.frames += len(frames)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_mask_video(masks: np.ndarray, path: str | Path, fps: float) -> Path:
    """Write (F, H, W) 0/1 masks as a white-on-black video (for previews; never read back by the engine)."""
    m = (np.asarray(masks) > 0.5).astype(np.uint8) * 255
    return write_video(np.repeat(m[..., None], 3, axis=-1), path, fps=fps, quality="maximum")
