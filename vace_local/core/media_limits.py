"""The limits an input's declared size must pass before anything decodes it, and the facts vetting reports.

Pure Python, no decoder: the API process, the sandbox child (`vace_local.core.media_vet`) and the workers all
check against the same `MediaLimits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vace_local.core.config import VaceSettings, vace_settings
from vace_local.core.errors import InputError


@dataclass(frozen=True)
class MediaLimits:
    """What an input may declare before we decode it, and what its decoding child may use.

    Every limit is a `VACE_MEDIA_*` variable of the settings registry (core.config, where the defaults and
    meanings are), so the CLI, the API and the workers agree on one set without passing it around.
    """

    max_side: int  # VACE_MEDIA_MAX_SIDE: pixels per side, videos and images
    max_frames: int  # VACE_MEDIA_MAX_FRAMES
    max_seconds: float  # VACE_MEDIA_MAX_SECONDS
    max_image_pixels: int  # VACE_MEDIA_MAX_IMAGE_PIXELS: width x height of a still image
    max_decoded_pixels: int  # VACE_MEDIA_MAX_DECODED_PIXELS: width x height x frames
    memory_mb: int  # VACE_MEDIA_MEMORY_MB: address-space cap of the decoding child
    timeout_s: float  # VACE_MEDIA_TIMEOUT_S: wall-clock cap of the decoding child

    @classmethod
    def from_env(cls) -> MediaLimits:
        return cls.from_settings(vace_settings())

    @classmethod
    def from_settings(cls, s: VaceSettings) -> MediaLimits:
        return cls(max_side=s.media_max_side, max_frames=s.media_max_frames, max_seconds=s.media_max_seconds,
                   max_image_pixels=s.media_max_image_pixels, max_decoded_pixels=s.media_max_decoded_pixels,
                   memory_mb=s.media_memory_mb, timeout_s=s.media_timeout_s)


@dataclass
class MediaFacts:
    """What the sandbox reports back about a file that passed (sizes as displayed, after rotation)."""

    kind: str  # "video" or "image"
    width: int
    height: int
    num_frames: int = 1
    fps: float = 0.0
    duration: float = 0.0
    decoded: bool = False


# ---- limit checks ------------------------------------------------------------------------------------

def check_dimensions(field: str, width: int, height: int, limits: MediaLimits, what: str = "") -> None:
    if width <= 0 or height <= 0:
        raise InputError(field, f"declares an empty picture ({width}x{height}{what})")
    if max(width, height) > limits.max_side:
        raise InputError(field, f"declares {width}x{height} pixels{what}; at most {limits.max_side} a side is "
                         "accepted (VACE_MEDIA_MAX_SIDE)")


def check_image_pixels(field: str, width: int, height: int, limits: MediaLimits) -> None:
    check_dimensions(field, width, height, limits)
    if width * height > limits.max_image_pixels:
        raise InputError(field, f"declares {width}x{height} = {width * height} pixels; at most "
                         f"{limits.max_image_pixels} are accepted (VACE_MEDIA_MAX_IMAGE_PIXELS)")


def check_clip(field: str, width: int, height: int, frames: int, seconds: float, limits: MediaLimits) -> None:
    check_dimensions(field, width, height, limits)
    if frames > limits.max_frames:
        raise InputError(field, f"declares {frames} frames; at most {limits.max_frames} are accepted "
                         "(VACE_MEDIA_MAX_FRAMES)")
    if not math.isfinite(seconds) or seconds > limits.max_seconds:
        raise InputError(field, f"declares {seconds:.1f} s; at most {limits.max_seconds:g} s are accepted "
                         "(VACE_MEDIA_MAX_SECONDS)")
    if width * height * frames > limits.max_decoded_pixels:
        raise InputError(field, f"declares {frames} frames of {width}x{height}, {width * height * frames} pixels "
                         f"to decode; at most {limits.max_decoded_pixels} are accepted "
                         "(VACE_MEDIA_MAX_DECODED_PIXELS)")
