"""Basics the engine needs: task none, no video, reference images, first/last frames, masks, timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessors import build_bundle, plan_timing
from preprocessors.video import keep_last_indices
from tests.media_helpers import LocalInputs, index_video
from vace_local.core.errors import InputError
from vace_local.core.media import write_video
from vace_local.core.spec import JobSpec

FIX = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason="shared fixtures folder ../shared/fixtures absent")


def spec(**kw) -> JobSpec:
    base = {"width": 128, "height": 64, "num_frames": 17, "fps": 16}
    base.update(kw)
    return JobSpec(**base)


def test_no_video_is_gray_with_mask_one():
    b = build_bundle(spec(), LocalInputs())
    assert b.frames.shape == (17, 64, 128, 3) and b.masks.shape == (17, 64, 128)
    assert np.all(b.frames == 0.5) and np.all(b.masks == 1.0)


def test_none_task_spreads_a_clip_with_enough_frames(tmp_path):
    # 32 frames at 32 fps (1 s) into 17 frames: official keep_last spreads the 17 over the whole clip (first and
    # last source frames used), nothing padded — not 16 real-speed frames + 1 gray frame.
    v = index_video(tmp_path / "v.mp4", 32, 32.0, width=96, height=64, step=6)
    b = build_bundle(spec(), LocalInputs(video=v))
    b.check(17, 64, 128)
    levels = b.frames.mean(axis=(1, 2, 3)) * 255
    expect = 16 + 6 * np.array(keep_last_indices(32, 17))
    assert np.abs(levels - expect).max() < 3.0
    assert abs(levels[-1] - (16 + 6 * 31)) < 3.0
    assert np.all(b.masks == 1.0)
    assert b.info["frames_from_video"] == 17 and b.info["padded_frames"] == 0


def test_long_clip_is_resampled_over_its_whole_duration(tmp_path):
    v = index_video(tmp_path / "v.mp4", 40, 8.0, step=5)  # 5 s at 8 fps, longer than 17 frames at 16 fps
    b = build_bundle(spec(), LocalInputs(video=v))
    levels = b.frames.mean(axis=(1, 2, 3)) * 255
    # official VACE keep_last: uniform over the whole clip, not truncated, ending on the last source frame
    assert np.abs(levels - (16 + 5 * np.array(keep_last_indices(40, 17)))).max() < 3.0
    assert abs(levels[-1] - (16 + 5 * 39)) < 3.0  # the clip's last frame is reached
    assert b.info["padded_frames"] == 0


def test_cover_crop_keeps_center_without_distortion(tmp_path):
    # 64x64 source with a vertical stripe pattern: left half red, right half blue → centre crop of 128x64
    f = np.zeros((5, 64, 64, 3), np.uint8)
    f[:, :, :32, 0] = 255
    f[:, :, 32:, 2] = 255
    v = write_video(f, tmp_path / "sq.mp4", fps=16, quality="maximum")
    b = build_bundle(spec(), LocalInputs(video=v))
    fr = b.frames[0]
    # cover: 64x64 → 128x128, crop rows 32..96: left half still red, right half blue
    assert fr[:, :60, 0].mean() > 0.9 and fr[:, :60, 2].mean() < 0.1
    assert fr[:, 68:, 2].mean() > 0.9 and fr[:, 68:, 0].mean() < 0.1


def test_mask_video_resized_and_rebinarised(tmp_path):
    f = np.full((17, 64, 96, 3), 200, np.uint8)
    v = write_video(f, tmp_path / "v.mp4", fps=16, quality="maximum")
    m = np.zeros((17, 32, 48, 3), np.uint8)  # half-size mask video, same aspect
    m[:, :, 24:] = 255
    mv = write_video(m, tmp_path / "m.mp4", fps=16)
    b = build_bundle(spec(task="inpainting", inputs={"video": "x", "mask_video": "y"}),
                     LocalInputs(video=v, mask_video=mv))
    assert set(np.unique(b.masks)) <= {0.0, 1.0}
    assert b.masks[:, :, :60].max() == 0.0 and b.masks[:, :, 68:].min() == 1.0
    # generated region is neutral gray, kept region is the video
    assert np.all(b.frames[:, :, 68:] == 0.5)
    assert abs(b.frames[:, :, :60].mean() - 200 / 255) < 0.02


@pytest.mark.parametrize("kind", ["mask_video", "mask_image"])
def test_mask_of_another_aspect_is_cropped_with_the_videos_box(tmp_path, kind):
    """Issue 22: an 832x480 mask with a 1280x720 video was refused (aspect ratios 2.5% apart). The mask is mapped
    onto the video's frame, corner to corner, and cropped with the video's box: here a 4:3 mask (120x90) whose top
    15% is masked, with a 16:9 video (160x90), for an 80x48 job. Cropped on its own (cover-crop of the 4:3 mask)
    the masked band would be 3 rows; with the video's box it is the video's top 15%: 7 rows."""
    v = write_video(np.full((17, 90, 160, 3), 200, np.uint8), tmp_path / "v.mp4", fps=16, quality="maximum")
    m = np.zeros((17, 90, 120, 3), np.uint8)
    m[:, :13] = 255  # rows 0..12 of 90 (14.4%)
    inputs, extra = {"video": "x", kind: "y"}, {}
    if kind == "mask_video":
        local = LocalInputs(video=v, mask_video=write_video(m, tmp_path / "m.mp4", fps=16, quality="maximum"))
    else:
        Image.fromarray(m[0]).save(tmp_path / "m.png")
        local = LocalInputs(video=v, mask_image=tmp_path / "m.png")
        extra = {"control": {"mask_tracker": "static"}}
    b = build_bundle(spec(task="inpainting", width=80, height=48, inputs=inputs, **extra), local)
    rows = b.masks.mean(axis=(0, 2))
    assert rows[:6].min() == 1.0 and rows[8:].max() == 0.0, rows[:10]
    if kind == "mask_video":
        assert b.info["mask_pairing"]["mask_stretch"] == pytest.approx(4 / 3, abs=1e-3)
    # the issue's own sizes (scaled by 1/8: 104x60 mask, 160x90 video) pair too
    small = write_video(np.zeros((17, 60, 104, 3), np.uint8), tmp_path / "s.mp4", fps=16)
    assert build_bundle(spec(task="inpainting", width=80, height=48, inputs={"video": "x", "mask_video": "y"}),
                        LocalInputs(video=v, mask_video=small)).masks.max() == 0.0


def test_reference_images_fitted_on_white_in_order(tmp_path):
    red = tmp_path / "red.png"
    Image.new("RGB", (50, 100), (255, 0, 0)).save(red)  # tall: fitted → 32x64 in the middle
    blue = tmp_path / "blue.jpg"
    Image.new("RGB", (300, 100), (0, 0, 255)).save(blue)  # wide: 128x43 centred
    b = build_bundle(spec(), LocalInputs(reference_images=[red, blue]))
    r, bl = b.reference_images
    assert r.shape == (64, 128, 3)
    assert np.all(r[:, :40] == 1.0) and np.all(r[:, 90:] == 1.0)  # white sides, nothing cropped
    assert np.allclose(r[:, 50:78], [1.0, 0.0, 0.0], atol=0.01)
    assert np.all(bl[:8] == 1.0) and np.all(bl[-8:] == 1.0)
    assert np.allclose(bl[30:34, :], [0.0, 0.0, 1.0], atol=0.05)


def test_too_many_references_and_bad_image(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    with pytest.raises(InputError) as e:
        build_bundle(spec(), LocalInputs(reference_images=[img] * 6))
    assert e.value.field == "reference_images"
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError) as e:
        build_bundle(spec(), LocalInputs(reference_images=[img, img, bad]))
    assert e.value.field == "reference_images[2]"


def test_first_last_frames_kept_exactly(tmp_path):
    first = tmp_path / "first.png"
    Image.new("RGB", (128, 64), (10, 20, 30)).save(first)
    last = tmp_path / "last.png"
    Image.new("RGB", (256, 128), (200, 100, 50)).save(last)
    b = build_bundle(spec(), LocalInputs(first_image=first, last_image=last))
    assert np.array_equal(b.frames[0], np.broadcast_to(np.array([10, 20, 30], np.float32) / 255, (64, 128, 3)))
    assert np.allclose(b.frames[-1], np.array([200, 100, 50]) / 255, atol=1e-6)
    assert np.all(b.masks[0] == 0) and np.all(b.masks[-1] == 0)
    assert np.all(b.frames[1:-1] == 0.5) and np.all(b.masks[1:-1] == 1)


@pytest.mark.parametrize("mode", ["content_aware", "white", "black"])
def test_rgba_first_image_transparency(tmp_path, mode):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (0, 200, 0)
    rgba[:, :32, 3] = 255  # left half opaque green, right half fully transparent
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    b = build_bundle(spec(width=64, height=64, control={"transparency_mode": mode}), LocalInputs(first_image=p))
    assert np.allclose(b.frames[0][:, :30], [0, 200 / 255, 0], atol=1e-6)
    assert np.all(b.masks[0][:, :30] == 0)
    if mode == "content_aware":
        assert np.all(b.frames[0][:, 34:] == 0.5) and np.all(b.masks[0][:, 34:] == 1)
    else:
        bg = 1.0 if mode == "white" else 0.0
        assert np.all(b.frames[0][:, 34:] == bg) and np.all(b.masks[0] == 0)


@needs_fixtures
def test_opaque_rgba_fixture_is_kept_whole():
    # snake.png is stored as RGBA but every pixel is opaque: nothing may be generated on frame 0.
    b = build_bundle(spec(width=64, height=64), LocalInputs(first_image=FIX / "vace" / "snake.png"))
    assert np.all(b.masks[0] == 0) and b.frames[0].std() > 0.05


def test_plan_timing_follows_input(tmp_path):
    v = index_video(tmp_path / "v.mp4", 50, 25.0)  # 2 s at 25 fps
    r = LocalInputs(video=v)
    s = spec(control={"match_input_num_frames": True})
    assert plan_timing(s, r).num_frames == 33  # 2 s at 16 fps = 32 frames → next 4k+1
    s2 = spec(control={"match_input_num_frames": True, "match_input_frames_per_second": True})
    out = plan_timing(s2, r)
    assert (out.fps, out.num_frames) == (25, 53)  # 50 → 53
    assert plan_timing(spec(), r) == spec()
    b = build_bundle(out, r)
    b.check(53, 64, 128)
    assert b.info["frames_from_video"] == 50


def test_unreadable_and_empty_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(InputError) as e:
        build_bundle(spec(), LocalInputs(video=bad))
    assert e.value.field == "video"
    with pytest.raises(InputError) as e:
        build_bundle(spec(), LocalInputs(video=tmp_path / "missing.mp4"))
    assert e.value.field == "video"


def test_mask_not_matching_video(tmp_path):
    """Only a mask that pairing would stretch past 2x in one direction is refused (made for another video)."""
    v = index_video(tmp_path / "v.mp4", 17, 16.0, width=96, height=64)
    m = index_video(tmp_path / "m.mp4", 17, 16.0, width=32, height=64)  # portrait mask, landscape video: 3x
    s = spec(task="inpainting", inputs={"video": "x", "mask_video": "y"})
    with pytest.raises(InputError) as e:
        build_bundle(s, LocalInputs(video=v, mask_video=m))
    assert e.value.field == "mask_video" and "stretch the mask 3.00x" in e.value.message
    img = tmp_path / "mi.png"
    Image.new("L", (10, 40)).save(img)
    with pytest.raises(InputError) as e:
        build_bundle(spec(task="inpainting", inputs={"video": "x", "mask_image": "y"}),
                     LocalInputs(video=v, mask_image=img))
    assert e.value.field == "mask_image"


@needs_fixtures
@pytest.mark.parametrize(
    "name,fps,expect_from_video",
    [
        ("vace/test.mp4", 16.0, 81),  # 720p 16 fps 5.06 s
        ("wan22/talking_person.mp4", 30.0, 81),  # 1080p 30 fps 106 frames + audio → spread over 81
        ("vace/test2.mp4", 25.0, 25),  # portrait full-range 1 s, 25 frames: each once, then padding
        ("wan22/pose_skeleton.mp4", 50.0, 81),  # 50 fps MPEG-4 Part 2, 7 s → resampled to 81
    ],
)
def test_real_videos_none_task(name, fps, expect_from_video):
    s = spec(width=64, height=48, num_frames=81)
    b = build_bundle(s, LocalInputs(video=FIX / name))
    b.check(81, 48, 64)
    assert abs(b.info["source_fps"] - fps) < 0.1
    assert b.info["frames_from_video"] == expect_from_video
    assert b.frames[:expect_from_video].std() > 0.02  # real content, not gray
    assert np.all(b.frames[expect_from_video:] == 0.5)


@needs_fixtures
def test_full_range_video_matches_its_first_frame_image():
    # test.jpg is the first frame of the full-range (yuvj420p) test2.mp4: levels must not be squashed.
    s = spec(width=128, height=192, num_frames=17)
    b = build_bundle(s, LocalInputs(video=FIX / "vace" / "test2.mp4", first_image=None))
    ref = build_bundle(s, LocalInputs(first_image=FIX / "vace" / "test.jpg")).frames[0]
    assert abs(b.frames[0].mean() - ref.mean()) < 0.02
    assert np.abs(b.frames[0] - ref).mean() < 0.04


def test_gif_video_decodes_through_the_ffmpeg_fallback(tmp_path):
    """decord cannot open GIFs; ffmpeg can, so a GIF is a valid video input."""
    from PIL import Image

    imgs = [Image.fromarray(np.full((48, 64, 3), 20 + 20 * i, np.uint8)) for i in range(10)]
    gif = tmp_path / "clip.gif"
    imgs[0].save(gif, save_all=True, append_images=imgs[1:], duration=100, loop=0)  # 10 fps
    b = build_bundle(spec(), LocalInputs(video=gif))
    b.check(17, 64, 128)
    assert b.info["frames_from_video"] == 16  # 1 s at 10 fps → 16 frames at 16 fps, then padding
    levels = b.frames[:16].mean(axis=(1, 2, 3)) * 255
    assert abs(levels[0] - 20) < 3 and abs(levels[15] - 200) < 3
