"""Time sampling, mask pairing and mask reading follow the official VACE rules (docs/CONDITIONING.md).

Clips are written with imageio-ffmpeg with their frame index painted in as binary bands, run through
`vace-local preprocess`, and the control video is decoded back (imageio-ffmpeg, not our decoder) to read which
source frame each job frame shows. The expected ids come from an independent transcription of the official
`VaceVideoProcessor._get_frameid_bbox_adjust_last` (keep_last=True): per-frame [start, end] intervals,
`linspace(0, mid-time of the last frame, n)`, first interval containing each time.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from preprocessors import build_bundle
from tests.media_helpers import LocalInputs
from vace_local.cli import app
from vace_local.core.spec import JobSpec

W, H = 128, 80  # source size = job size: no resize, so the painted bands survive exactly
BITS = 10  # H / BITS = 8-pixel bands, one per bit of the frame index (up to 1023)


def write_clip(path: Path, frames: np.ndarray, fps: float) -> Path:
    """Encode uint8 RGB frames with imageio-ffmpeg (H.264, near lossless)."""
    writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                         pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
                                         output_params=["-crf", "4"], macro_block_size=4)
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f).tobytes())
    writer.close()
    return path


def painted_clip(path: Path, n: int, fps: float) -> Path:
    """n frames whose index is painted as BITS horizontal bands (white = bit set, black = clear)."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    band = H // BITS
    for i in range(n):
        for b in range(BITS):
            if (i >> b) & 1:
                frames[i, b * band : (b + 1) * band] = 255
    return write_clip(path, frames, fps)


def read_painted(frames: np.ndarray) -> list[int | None]:
    """The painted index of each frame; None for a gray (padded) frame."""
    band = frames.shape[1] // BITS
    out: list[int | None] = []
    for f in frames.astype(np.float32) / 255.0:
        levels = [f[b * band + 2 : (b + 1) * band - 2].mean() for b in range(BITS)]
        if all(0.3 < v < 0.7 for v in levels):
            out.append(None)
            continue
        assert all(v < 0.2 or v > 0.8 for v in levels), f"unreadable bands {levels}"
        out.append(sum(1 << b for b, v in enumerate(levels) if v > 0.5))
    return out


def decode(path: Path) -> np.ndarray:
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    return np.stack([np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in gen])


def official_keep_last(n_src: int, fps: float, n_out: int) -> list[int]:
    """Transcription of the official keep_last frame choice (decord timestamps of a constant-rate clip)."""
    stamps = np.array([[i / fps, (i + 1) / fps] for i in range(n_src)], dtype=np.float32)
    duration = stamps[-1].mean()
    t = np.linspace(0.0, duration, n_out)
    inside = np.logical_and(t[:, None] >= stamps[None, :, 0], t[:, None] <= stamps[None, :, 1])
    return np.argmax(inside, axis=1).tolist()


def preprocess(out: Path, *args: str) -> dict:
    res = CliRunner().invoke(app, ["preprocess", "--out", str(out), "--size", f"{W}*{H}", *args])
    assert res.exit_code == 0, res.output
    return json.loads((out / "bundle.json").read_text())


@pytest.mark.parametrize(
    "n_src,fps,num_frames",
    [
        (106, 30.0, 81),  # talking_person's shape: old rule gave 57 real + 24 gray frames
        (300, 30.0, 81),  # 10 s: old rule ended on frame 296 of 299
        (40, 8.0, 17),
        (57, 24.0, 33),
    ],
)
def test_clip_with_enough_frames_is_spread_by_keep_last(tmp_path, n_src, fps, num_frames):
    clip = painted_clip(tmp_path / "clip.mp4", n_src, fps)
    info = preprocess(tmp_path / "out", "--video", str(clip), "--num-frames", str(num_frames), "--fps", "16")
    shown = read_painted(decode(tmp_path / "out" / "control.mp4"))
    expect = official_keep_last(n_src, fps, num_frames)
    assert None not in shown, f"{shown.count(None)} padded frames"
    assert len(shown) == num_frames
    assert max(abs(a - b) for a, b in zip(shown, expect, strict=True)) <= 1
    assert shown[0] == 0 and shown[-1] == n_src - 1  # first and last source frames always used
    assert info["sampled_frame_ids"] == shown  # bundle.json says what the control video shows
    assert info["padded_frames"] == 0 and info["padding"] is None and info["time_sampling"] == "keep_last"


def test_short_clip_uses_every_frame_then_pads(tmp_path):
    # 10 frames at 32 fps into 17 at 16 fps: every source frame once (official sampling of a short clip), then
    # 7 gray frames; the old real-speed rule kept every other frame (5) and padded 12.
    clip = painted_clip(tmp_path / "short.mp4", 10, 32.0)
    info = preprocess(tmp_path / "out", "--video", str(clip), "--num-frames", "17", "--fps", "16")
    shown = read_painted(decode(tmp_path / "out" / "control.mp4"))
    assert shown == list(range(10)) + [None] * 7
    assert info["padding"] == {"frames": 7, "at": "end", "first_padded_frame": 10}
    assert info["time_sampling"] == "short_clip_padded"


def test_slow_clip_that_fills_the_job_keeps_real_speed(tmp_path):
    # 60 frames at 10 fps (6 s) into 81 at 16 fps: 96 frames at real speed, so the job is full without padding;
    # every source frame shows, some twice, from the first to the last.
    clip = painted_clip(tmp_path / "slow.mp4", 60, 10.0)
    b = build_bundle(JobSpec(width=W, height=H, num_frames=81, inputs={"video": "v"}), LocalInputs(video=clip))
    shown = read_painted((b.frames * 255 + 0.5).astype(np.uint8))
    assert shown == b.info["sampled_frame_ids"] and sorted(set(shown)) == list(range(60)) and shown == sorted(shown)
    assert b.info["padded_frames"] == 0 and b.info["time_sampling"] == "keep_last_repeating"


def test_talking_person_81_frames_no_padding(fixtures_dir):
    s = JobSpec(width=64, height=48, num_frames=81, inputs={"video": "v"})
    b = build_bundle(s, LocalInputs(video=fixtures_dir / "wan22" / "talking_person.mp4"))
    ids = b.info["sampled_frame_ids"]
    assert b.info["source_frames"] == 106 and b.info["padded_frames"] == 0 and len(ids) == 81
    assert ids[0] == 0 and ids[-1] == 105
    assert max(abs(a - e) for a, e in zip(ids, official_keep_last(106, 30.0, 81), strict=True)) <= 1
    assert min(f.std() for f in b.frames) > 0.02  # every frame is real content, none gray


def _parity_masks(n: int) -> np.ndarray:
    """Mask video frame j: the left half white when j is even, the right half when odd."""
    m = np.zeros((n, H, W, 3), np.uint8)
    m[0::2, :, : W // 2] = 255
    m[1::2, :, W // 2 :] = 255
    return m


@pytest.mark.parametrize("n_video,n_mask,num_frames", [(24, 12, 17), (12, 24, 17), (40, 30, 17)])
def test_mask_video_paired_over_the_common_length(tmp_path, n_video, n_mask, num_frames):
    v = painted_clip(tmp_path / "v.mp4", n_video, 16.0)
    m = write_clip(tmp_path / "m.mp4", _parity_masks(n_mask), 16.0)
    s = JobSpec(width=W, height=H, num_frames=num_frames, inputs={"video": "v", "mask_video": "m"})
    b = build_bundle(s, LocalInputs(video=v, mask_video=m))
    common = min(n_video, n_mask)
    assert b.info["mask_pairing"] == {"video_frames": n_video, "mask_frames": n_mask, "paired_frames": common}
    u8 = (b.frames * 255 + 0.5).astype(np.uint8)
    shown = read_painted(u8)
    real = [i for i in shown if i is not None]
    assert real == official_keep_last(common, 16.0, min(common, num_frames))
    for k, i in enumerate(real):  # paired by index: mask frame i goes with video frame i
        half = slice(0, W // 2) if i % 2 == 0 else slice(W // 2, W)
        assert b.masks[k][:, half].min() == 1.0 and b.masks[k].sum() == H * W // 2


def test_red_on_black_mask_video_is_a_mask(tmp_path):
    v = write_clip(tmp_path / "v.mp4", np.full((17, H, W, 3), 150, np.uint8), 16.0)
    red = np.zeros((17, H, W, 3), np.uint8)
    for i, f in enumerate(red):
        cv2.ellipse(f, (30 + 3 * i, 32), (22, 14), 0, 0, 360, (255, 0, 0), -1)
    drawn = (red[..., 0] > 127).mean()
    m = write_clip(tmp_path / "m.mp4", red, 16.0)
    s = JobSpec(task="inpainting", width=W, height=H, num_frames=17, inputs={"video": "v", "mask_video": "m"})
    got = build_bundle(s, LocalInputs(video=v, mask_video=m)).masks.mean()
    assert abs(got - drawn) <= 0.01 * drawn, (got, drawn)  # the mean of RGB (85 < 127) read it as 0 %


def test_mask_image_soft_edge_counts_as_masked(tmp_path):
    v = write_clip(tmp_path / "v.mp4", np.full((17, H, W, 3), 150, np.uint8), 16.0)
    arr = np.zeros((H, W), np.uint8)
    arr[16:48, 32:64] = 255
    arr[16:48, 64:72] = 40  # a soft edge: official plain inpainting masks any non-zero pixel
    Image.fromarray(arr).save(tmp_path / "m.png")
    s = JobSpec(task="inpainting", width=W, height=H, num_frames=17, inputs={"video": "v", "mask_image": "m"},
                control={"mask_tracker": "static"})
    b = build_bundle(s, LocalInputs(video=v, mask_image=tmp_path / "m.png"))
    assert np.array_equal(b.masks[0], (arr > 0).astype(np.float32))


def test_bundle_json_reports_the_rules(tmp_path):
    v = painted_clip(tmp_path / "v.mp4", 24, 16.0)
    m = write_clip(tmp_path / "m.mp4", _parity_masks(12), 16.0)
    info = preprocess(tmp_path / "out", "--task", "inpainting", "--video", str(v), "--mask-video", str(m),
                      "--num-frames", "17")
    assert (info["task"], info["width"], info["height"], info["num_frames"], info["fps"]) == ("inpainting", W, H,
                                                                                             17, 16)
    assert info["sampled_frame_ids"] == list(range(12))
    assert info["padding"] == {"frames": 5, "at": "end", "first_padded_frame": 12}
    assert info["mask_source"] == "mask_video" and info["mask_pairing"]["paired_frames"] == 12
    assert info["source_frames"] == 24 and info["source_size"] == [W, H]
    assert info["files"]["control"] == "control.mp4" and (tmp_path / "out" / "mask.mp4").is_file()
    masks = decode(tmp_path / "out" / "mask.mp4")[..., 0] > 127
    assert abs(info["masked_fraction"] - masks.mean()) < 0.01
    assert info["control_options"]["mask_tracker"]  # the options the job ran with


def test_outpainting_aspect_rule_is_measured(tmp_path):
    """Deliberate difference (docs/CONDITIONING.md): a job of fixed size fits the expanded canvas (gray bands);
    fal's aspect_ratio=auto sizes the job from the expanded canvas, the official rule."""
    from server.dialects.common import SourceInfo
    from server.dialects.fal.serving import outpaint_aspect, output_size

    v = write_clip(tmp_path / "v.mp4", np.full((17, 180, 320, 3), 150, np.uint8), 16.0)  # 16:9, as 1280x720

    def generated(width: int, height: int) -> float:
        s = JobSpec(task="outpainting", width=width, height=height, num_frames=17, inputs={"video": "v"},
                    control={"expand_left": True, "expand_right": True, "expand_ratio": 0.25})
        return float(build_bundle(s, LocalInputs(video=v)).masks.mean())

    assert abs(generated(416, 240) - 0.567) < 0.01  # fixed 16:9-ish job: 56.7 % generated
    src = SourceInfo(num_frames=17, fps=16.0, width=320, height=180)
    w, h = output_size("240p", "auto", src, outpaint_aspect(src, True, True, False, False, 0.25))
    assert abs(generated(w, h) - 1 / 3) < 0.01  # canvas-shaped job: 33.3 %, as official
