"""Media I/O: decode videos (decord) and images (PIL, EXIF-aware), encode H.264 mp4 (imageio-ffmpeg).

Frames are numpy arrays: (F, H, W, 3) uint8 RGB for decoded/encoded video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vace_local.errors import InputError

# x264 settings per fal's `video_quality` (CRF) and `video_write_mode` (preset).
_CRF = {"low": 28, "medium": 23, "high": 18, "maximum": 12}
_PRESET = {"fast": "veryfast", "balanced": "medium", "small": "slow"}


@dataclass
class VideoClip:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: float

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps if self.fps else 0.0


def probe_video(path: str | Path, field: str = "video") -> tuple[int, float, int, int]:
    """(num_frames, fps, width, height) without decoding every frame."""
    vr = _open_video(path, field)
    h, w = vr[0].shape[:2]
    return len(vr), float(vr.get_avg_fps()), int(w), int(h)


def _open_video(path: str | Path, field: str):  # noqa: ANN202 - decord type
    import decord

    p = Path(path)
    if not p.is_file():
        raise InputError(field, f"file not found: {p}")
    try:
        vr = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises DECORDError / RuntimeError for anything unreadable
        raise InputError(field, f"not a readable video ({type(exc).__name__})") from exc
    if len(vr) == 0:
        raise InputError(field, "video has no frames")
    return vr


def read_video(path: str | Path, field: str = "video", indices: list[int] | None = None) -> VideoClip:
    """Decode (selected) frames of a video as RGB uint8; audio is ignored."""
    vr = _open_video(path, field)
    fps = float(vr.get_avg_fps()) or 16.0
    idx = list(range(len(vr))) if indices is None else [min(max(i, 0), len(vr) - 1) for i in indices]
    try:
        frames = vr.get_batch(idx).asnumpy()
    except Exception as exc:
        raise InputError(field, f"could not decode frames ({type(exc).__name__})") from exc
    return VideoClip(frames=np.ascontiguousarray(frames[..., :3]), fps=fps)


def load_image(path: str | Path, field: str = "image", mode: str | None = "RGB"):  # noqa: ANN201 - PIL.Image
    """Open an image honouring EXIF orientation; `mode=None` keeps its own mode (e.g. RGBA)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(field, f"file not found: {p}")
    try:
        with Image.open(p) as im:
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
    import imageio_ffmpeg

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError("write_video expects uint8 frames")
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video expects (F, H, W, 3) frames, got {frames.shape}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    path = Path(path)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,
        output_params=["-crf", str(_CRF[quality]), "-preset", _PRESET[write_mode], "-movflags", "+faststart"],
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def write_mask_video(masks: np.ndarray, path: str | Path, fps: float) -> Path:
    """Write (F, H, W) 0/1 masks as a white-on-black video (for previews; never read back by the engine)."""
    m = (np.asarray(masks) > 0.5).astype(np.uint8) * 255
    return write_video(np.repeat(m[..., None], 3, axis=-1), path, fps=fps, quality="maximum")
