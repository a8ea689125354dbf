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
from tests.media_helpers import LocalInputs
from vace_local.core.media import parse_display_rotation, probe, write_video
from vace_local.core.spec import JobSpec

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


def _rgba_half(path: Path, w: int = 128, h: int = 64) -> Path:
    """Left half opaque green, right half fully transparent."""
    from PIL import Image

    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[:, : w // 2, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_transparent_first_image_composes_with_the_task_frame(tmp_path):
    # Composition rule: where the end-frame image is generated (transparent, content_aware) the task's own
    # frame and mask stay (mask = product); only the opaque part replaces them with mask 0.
    from PIL import Image

    rng = np.random.default_rng(1)
    v = write_video(rng.integers(0, 255, (17, 64, 128, 3), dtype=np.uint8), tmp_path / "v.mp4", fps=16,
                    quality="maximum")
    first = _rgba_half(tmp_path / "half.png")
    mask = np.zeros((64, 128), np.uint8)
    mask[:, 96:] = 255  # inpaint only the right quarter
    Image.fromarray(mask).save(tmp_path / "m.png")
    base = build_bundle(JobSpec(width=128, height=64, num_frames=17, inputs={"video": "v"}), LocalInputs(video=v))

    b = build_bundle(JobSpec(width=128, height=64, num_frames=17, task="inpainting",
                             inputs={"video": "v", "mask_image": "m", "first_image": "f"},
                             control={"mask_tracker": "static"}),
                     LocalInputs(video=v, mask_image=tmp_path / "m.png", first_image=first))
    assert np.allclose(b.frames[0][:, :62], [0, 200 / 255, 0], atol=1e-6) and np.all(b.masks[0][:, :62] == 0)
    # transparent but kept by the inpainting mask: the original video pixels, mask 0 (1 x 0)
    assert np.all(b.masks[0][:, 66:94] == 0)
    assert np.array_equal(b.frames[0][:, 66:94], base.frames[0][:, 66:94])
    # transparent and inpainted: gray, mask 1
    assert np.all(b.masks[0][:, 98:] == 1) and np.all(b.frames[0][:, 98:] == 0.5)

    # with a control video (task none): the transparent part shows the control frame, generated
    c = build_bundle(JobSpec(width=128, height=64, num_frames=17, inputs={"video": "v", "first_image": "f"}),
                     LocalInputs(video=v, first_image=first))
    assert np.all(c.masks[0][:, 66:] == 1) and np.array_equal(c.frames[0][:, 66:], base.frames[0][:, 66:])
    assert np.all(c.masks[0][:, :62] == 0)


@pytest.mark.parametrize("mode", ["white", "content_aware"])
def test_rgba_end_frame_resize_has_no_halo(tmp_path, mode):
    # A white disc on a transparent *black* canvas, downscaled 4x: the hidden black must not bleed into the
    # edge (it gave a 0.75-gray ring). Composited on white the frame is pure white; content_aware keeps the
    # disc white and grays only the transparent part.
    from PIL import Image

    yy, xx = np.mgrid[:256, :256]
    disc = np.hypot(yy - 128, xx - 128) < 80
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[disc] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "disc.png")
    b = build_bundle(JobSpec(width=64, height=64, num_frames=17, inputs={"first_image": "f"},
                             control={"transparency_mode": mode}), LocalInputs(first_image=tmp_path / "disc.png"))
    f, m = b.frames[0], b.masks[0]
    if mode == "white":
        assert np.all(f == 1.0) and np.all(m == 0)
    else:
        assert np.all(f[m == 0] == 1.0) and np.all(f[m == 1] == 0.5)
        assert abs(m.mean() - (1 - np.pi * 20**2 / 64**2)) < 0.02


def test_16bit_images_are_scaled_not_clipped(tmp_path):
    # PIL's I;16 → RGB conversion clips at 255, so a 16-bit gray ramp became almost all white.
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    mask16 = np.zeros((32, 64), np.uint16)
    mask16[:, 32:] = 40000  # 61 % white: generate; PIL's clipping would turn 100 (0 in 8-bit: keep) to 100
    mask16[:, :32] = 100  # (masked, since any non-zero mask-image pixel is masked)
    Image.fromarray(mask16).save(tmp_path / "m16.png")
    s = JobSpec(width=64, height=64, num_frames=17, inputs={"first_image": "f", "reference_images": ["r"]})
    b = build_bundle(s, LocalInputs(first_image=tmp_path / "g16.png", reference_images=[tmp_path / "g16.png"]))
    expect = np.repeat((np.rint(ramp / 257.0) / 255.0)[..., None], 3, axis=-1)
    assert np.abs(b.frames[0] - expect).max() < 1e-6
    assert np.abs(b.reference_images[0] - expect).max() < 1e-6
    v = write_video(np.full((17, 32, 64, 3), 90, np.uint8), tmp_path / "v.mp4", fps=16, quality="maximum")
    m = build_bundle(JobSpec(task="inpainting", width=64, height=32, num_frames=17,
                             inputs={"video": "v", "mask_image": "m"}, control={"mask_tracker": "static"}),
                     LocalInputs(video=v, mask_image=tmp_path / "m16.png"))
    assert np.all(m.masks[:, :, :32] == 0) and np.all(m.masks[:, :, 32:] == 1)
