"""Media I/O: decode videos (decord, via preprocessors.video) and images (PIL, EXIF-aware), encode H.264 mp4.

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
    """(num_frames, fps, width, height as displayed) without decoding every frame."""
    from preprocessors.video import probe

    info = probe(path, field)
    return info.num_frames, info.fps, info.width, info.height


def read_video(path: str | Path, field: str = "video", indices: list[int] | None = None) -> VideoClip:
    """Decode (selected) frames of a video as RGB uint8, rotation applied; audio is ignored."""
    from preprocessors.video import open_video, read_frames

    info, vr = open_video(path, field)
    idx = list(range(info.num_frames)) if indices is None else [min(max(i, 0), info.num_frames - 1) for i in indices]
    return VideoClip(frames=read_frames(info, vr, idx), fps=info.fps)


def load_image(path: str | Path, field: str = "image", mode: str | None = "RGB"):  # noqa: ANN201 - PIL.Image
    """Open an image honouring EXIF orientation; `mode=None` keeps its own mode (e.g. RGBA).

    The declared size is checked against `MediaLimits` from the header, before any pixel is decoded, so a
    74-byte PNG declaring 50000x50000 is an input error naming the field, not a 10 GB allocation."""
    from PIL import ImageOps, UnidentifiedImageError

    from vace_local.media_vet import MediaLimits, check_image_pixels, open_image_header

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
