"""Regression checks of the exact conditioning (control frames, masks, references) against the VACE rules.

Each test pins a deviation that was found by measuring bundles built from real encodes (ffmpeg) and images.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from preprocessors import build_bundle
from preprocessors.testing import LocalInputs
from preprocessors.video import parse_display_rotation, probe
from vace_local.media import write_video
from vace_local.spec import JobSpec

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def _quadrants(n: int = 5, w: int = 64, h: int = 32) -> np.ndarray:
    f = np.zeros((n, h, w, 3), np.uint8)
    f[:, : h // 2, : w // 2] = (255, 0, 0)
    f[:, : h // 2, w // 2 :] = (0, 255, 0)
    f[:, h // 2 :, w // 2 :] = (0, 0, 255)
    return f


def _ffmpeg_first_frame(path: Path, w: int, h: int) -> np.ndarray:
    """ffmpeg's own decode (autorotate on): the display orientation every player shows."""
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    assert len(raw) == w * h * 3, "ffmpeg display size differs from ours"
    return np.frombuffer(raw, np.uint8).reshape(h, w, 3)


def test_parse_display_rotation_both_ffmpeg_formats():
    assert parse_display_rotation("    Side data:\n      displaymatrix: rotation of -90.00 degrees\n") == 90
    assert parse_display_rotation("      Display Matrix: rotation of 90.00 degrees\n") == 270
    assert parse_display_rotation("      Display Matrix: rotation of -180.00 degrees\n") == 180
    assert parse_display_rotation("    Metadata:\n      rotate          : 90\n") == 90
    assert parse_display_rotation("Stream #0:0: Video: h264, 64x32") == 0


@pytest.mark.parametrize("angle", [90, -90, 180])
def test_rotated_video_is_decoded_once_in_display_orientation(tmp_path, angle):
    # decord already applies the display matrix: rotating again turned phone videos on their side whenever
    # the ffmpeg binary printed the matrix in the format the old parser knew.
    src = write_video(_quadrants(), tmp_path / "src.mp4", fps=16, quality="maximum")
    dst = tmp_path / "rot.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-display_rotation", str(angle), "-i", str(src), "-c", "copy",
                    str(dst)], check=True)
    info = probe(dst)
    assert info.rotation == (-angle) % 360  # detected...
    w, h = (32, 64) if angle % 180 else (64, 32)
    assert (info.width, info.height) == (w, h)
    ref = _ffmpeg_first_frame(dst, w, h)
    b = build_bundle(JobSpec(width=w, height=h, num_frames=17, inputs={"video": "v"}), LocalInputs(video=dst))
    assert np.abs(b.frames[0] * 255.0 - ref).mean() < 1.0  # ...and applied exactly once
    assert b.info["source_rotation"] == info.rotation
