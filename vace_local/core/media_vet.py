"""Vet one media file against the size limits, then decode it: the code the sandbox child runs.

Run as `python -m vace_local.core.media_vet` by `vace_local.core.sandbox`, never in the API process or in a worker
that holds a model: a decoder that a crafted file makes abort or allocate tens of GB (an mp4 whose `stts`
declares 2^31-1 samples makes decord ask for ~51 GB) takes down only this child. The child caps its own
address space and CPU time before it imports any decoder.

Order of checks, cheapest first, so a bomb is refused before anything is decoded:
1. the container header (`ffmpeg -i` for videos, PIL's header parse for images and GIFs): sides, duration,
   GIF canvas x frame count;
2. the demuxer's own facts once opened (decord's frame count and rate);
3. with `decode=True`, every frame through the same reader the worker uses (images: a full PIL load).
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vace_local.core.errors import InputError
from vace_local.core.media_limits import (
    MediaFacts,
    MediaLimits,
    check_clip,
    check_dimensions,
    check_image_pixels,
)

# ---- headers (nothing decoded) ---------------------------------------------------------------------------

_DURATION_RE = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO_SIZE_RE = re.compile(r"Stream #\S+.*?: Video: .*?, (\d{1,6})x(\d{1,6})(?=[ ,\[]|$)", re.MULTILINE)


def container_header(path: Path, timeout_s: float) -> tuple[int, int, float | None] | None:
    """(width, height, duration or None) of the first video stream per `ffmpeg -i` (demuxer only, no decode);
    None when ffmpeg names no video stream."""
    import imageio_ffmpeg

    try:
        err = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
                             capture_output=True, text=True, timeout=timeout_s, errors="replace").stderr
    except subprocess.TimeoutExpired:
        return None
    size = _VIDEO_SIZE_RE.search(err)
    if not size:
        return None
    dur = _DURATION_RE.search(err)
    seconds = int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur else None
    return int(size.group(1)), int(size.group(2)), seconds


def gif_header(path: Path, field: str, limits: MediaLimits) -> tuple[int, int, int]:
    """(width, height, frames) of a GIF's canvas; PIL counts the frames by walking the blocks, undecoded."""
    from vace_local.core.media import open_image_header

    with open_image_header(path, field) as im:
        w, h = im.size
        check_dimensions(field, w, h, limits, " (GIF canvas)")
        frames = int(getattr(im, "n_frames", 1))
    if frames > limits.max_frames:
        raise InputError(field, f"declares {frames} frames (GIF); at most {limits.max_frames} are accepted "
                         "(VACE_MEDIA_MAX_FRAMES)")
    return w, h, frames


# ---- vetting -------------------------------------------------------------------------------------------

def vet_video(path: Path, field: str, limits: MediaLimits, decode: bool) -> MediaFacts:
    from vace_local.core.media import _FfmpegReader, iter_frames, open_video

    if not path.is_file():
        raise InputError(field, "file not found")
    with open(path, "rb") as f:
        is_gif = f.read(6) in (b"GIF87a", b"GIF89a")
    header = container_header(path, limits.timeout_s)
    if is_gif:  # ffmpeg composes every GIF frame on the full canvas: canvas x frames is what decoding costs
        w, h, frames = gif_header(path, field, limits)
        check_clip(field, w, h, frames, (header[2] or 0.0) if header else 0.0, limits)
    elif header is not None:
        w, h, seconds = header
        check_dimensions(field, w, h, limits)
        if seconds is not None and seconds > limits.max_seconds:
            raise InputError(field, f"declares {seconds:.1f} s; at most {limits.max_seconds:g} s are accepted "
                             "(VACE_MEDIA_MAX_SECONDS)")
    info, reader = open_video(path, field)
    check_clip(field, info.width, info.height, info.num_frames, info.duration, limits)
    decoded = False
    if decode and not isinstance(reader, _FfmpegReader):
        # decord decodes in this process: run every frame through the worker's own reader, here, where a crash
        # costs nothing. (The ffmpeg fallback decodes in its own subprocess and cannot take the worker down.)
        for _ in iter_frames(info, reader, list(range(info.num_frames))):
            pass
        decoded = True
    return MediaFacts("video", info.width, info.height, info.num_frames, info.fps, info.duration, decoded)


def vet_image(path: Path, field: str, limits: MediaLimits, decode: bool) -> MediaFacts:
    from vace_local.core.media import load_image, open_image_header

    with open_image_header(path, field) as im:
        w, h = im.size
    check_image_pixels(field, w, h, limits)
    if decode:
        load_image(path, field, mode=None)
    return MediaFacts("image", w, h, decoded=decode)


def limit_self(limits: MediaLimits) -> None:
    """Cap this process's address space and CPU time (inherited by the ffmpeg it starts)."""
    mem = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(limits.timeout_s) + 5  # a backstop: the parent's wall-clock limit normally fires first
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))


def main(argv: list[str]) -> int:
    """argv: kind (video|image), field, path, decode (0|1), limits JSON. One JSON line on stdout."""
    kind, field, path, decode, limits_json = argv
    limits = MediaLimits(**json.loads(limits_json))
    limit_self(limits)
    vet = vet_video if kind == "video" else vet_image
    try:
        facts = vet(Path(path), field, limits, decode == "1")
        out: dict[str, Any] = {"facts": asdict(facts)}
    except InputError as exc:
        out = {"refused": exc.message}
    except MemoryError:
        out = {"failed": f"the decoder ran out of its {limits.memory_mb} MB memory limit (VACE_MEDIA_MEMORY_MB)"}
    except Exception as exc:  # noqa: BLE001 - any decoder error is the file's fault here
        out = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
