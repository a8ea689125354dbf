"""Inpainting, outpainting, reframe and control composition: numerical checks of the VACE rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocessors import build_bundle
from preprocessors.outpaint import detect_borders
from tests.media_helpers import LocalInputs
from vace_local.core.errors import InputError
from vace_local.core.media import write_video
from vace_local.core.spec import JobSpec


def _video(path, w=96, h=64, n=17, fps=16, color=(200, 60, 30)):
    f = np.empty((n, h, w, 3), np.uint8)
    f[:] = color
    return write_video(f, path, fps=fps, quality="maximum")


def test_inpainting_with_mask_image_static(tmp_path):
    v = _video(tmp_path / "v.mp4")
    m = tmp_path / "m.png"
    arr = np.zeros((64, 96), np.uint8)
    arr[16:48, 24:72] = 255
    arr[0, 0] = 90  # a soft pixel: masked, as official plain inpainting (`mask > 0`)
    Image.fromarray(arr).save(m)
    s = JobSpec(task="inpainting", width=96, height=64, num_frames=17,
                inputs={"video": "v", "mask_image": "m"}, control={"mask_tracker": "static"})
    b = build_bundle(s, LocalInputs(video=v, mask_image=m))
    assert np.all(b.masks[:, 16:48, 24:72] == 1) and b.masks[:, 0, 0].min() == 1
    assert b.masks.sum() == 17 * (32 * 48 + 1)
    assert np.all(b.frames[:, 16:48, 24:72] == 0.5)
    assert np.abs(b.frames[:, 1:10, 1:10] - np.array([200, 60, 30]) / 255).max() < 0.03


@pytest.mark.parametrize(
    "sides,rect",
    [
        # 96x64 source, ratio 0.5, left only: canvas 144x64 fitted in 128x64 → scale 0.889; original at x=43
        ({"expand_left": True}, (43, 4, 85, 56)),
        # all four sides: canvas 192x128 → scale 0.5 → original 48x32 in the middle
        ({"expand_left": True, "expand_right": True, "expand_top": True, "expand_bottom": True}, (40, 16, 48, 32)),
    ],
)
def test_outpaint_geometry(tmp_path, sides, rect):
    v = _video(tmp_path / "v.mp4")
    s = JobSpec(task="outpainting", width=128, height=64, num_frames=17, inputs={"video": "v"},
                control={"expand_ratio": 0.5, **sides})
    b = build_bundle(s, LocalInputs(video=v))
    x, y, w, h = b.info["video_rect"]
    assert (x, y, w, h) == rect
    inside = np.zeros((64, 128), bool)
    inside[y : y + h, x : x + w] = True
    assert np.all(b.masks[:, inside] == 0) and np.all(b.masks[:, ~inside] == 1)
    assert np.all(b.frames[:, ~inside] == 0.5)
    core = b.frames[:, y + 2 : y + h - 2, x + 2 : x + w - 2]
    assert np.abs(core - np.array([200, 60, 30]) / 255).max() < 0.03  # original pixels kept


def test_outpaint_ratio_edges(tmp_path):
    v = _video(tmp_path / "v.mp4")
    # ratio 0 is in the published 0..1 range: int(0 * w) = 0 px added, the clip is fitted (96x64 → 96x64 in
    # 128x64, gray pillars with mask 1), nothing of the original is generated.
    s = JobSpec(task="outpainting", width=128, height=64, num_frames=17, inputs={"video": "v"},
                control={"expand_left": True, "expand_ratio": 0.0})
    b = build_bundle(s, LocalInputs(video=v))
    assert b.info["video_rect"] == [16, 0, 96, 64]
    assert np.all(b.masks[:, :, 16:112] == 0) and np.all(b.masks[:, :, :16] == 1) and np.all(b.masks[:, :, 112:] == 1)
    assert np.all(b.frames[:, :, :16] == 0.5) and np.all(b.frames[:, :, 112:] == 0.5)
    # ratio 1 on left + right: canvas 288x64 → scale 4/9: original 43x28 in the middle third
    s1 = s.model_copy(update={"control": s.control.model_copy(update={"expand_right": True, "expand_ratio": 1.0})})
    assert build_bundle(s1, LocalInputs(video=v)).info["video_rect"] == [43, 18, 42, 28]
    bad = s.model_copy(update={"control": s.control.model_copy(update={"expand_ratio": 1.5})})  # unvalidated
    with pytest.raises(InputError) as e:
        build_bundle(bad, LocalInputs(video=v))
    assert e.value.field == "control.expand_ratio"
    with pytest.raises(ValueError, match="expand_ratio"):
        JobSpec(task="outpainting", inputs={"video": "v"}, control={"expand_ratio": 1.5})


def test_reframe_trims_letterbox_and_zooms(tmp_path):
    # 128x96 frame with 16-px black bars top and bottom around a 128x64 picture, reframed to portrait 64x128
    f = np.zeros((17, 96, 128, 3), np.uint8)
    f[:, 16:80] = (30, 160, 220)
    v = write_video(f, tmp_path / "lb.mp4", fps=16, quality="maximum")
    assert detect_borders(f[:4]) == (16, 16, 0, 0)
    fit = build_bundle(JobSpec(task="reframe", width=64, height=128, num_frames=17, inputs={"video": "v"},
                               control={"zoom_factor": 0.0}), LocalInputs(video=v))
    assert fit.info["video_rect"] == [0, 48, 64, 32]  # 128x64 fitted: 64x32, centred; bars removed
    assert np.all(fit.masks[:, 48:80] == 0) and np.all(fit.masks[:, :48] == 1) and np.all(fit.masks[:, 80:] == 1)
    assert np.all(fit.frames[:, :48] == 0.5)
    assert np.abs(fit.frames[:, 50:78, 2:62] - np.array([30, 160, 220]) / 255).max() < 0.03
    zoom = build_bundle(JobSpec(task="reframe", width=64, height=128, num_frames=17, inputs={"video": "v"},
                                control={"zoom_factor": 0.5}), LocalInputs(video=v))
    x, y, w, h = zoom.info["video_rect"]
    assert (w, h) == (160, 80) and x < 0  # halfway between fit (x1) and cover (x4): x2.5
    assert zoom.masks[0].mean() < fit.masks[0].mean()
    keep = build_bundle(JobSpec(task="reframe", width=64, height=128, num_frames=17, inputs={"video": "v"},
                                control={"trim_borders": False}), LocalInputs(video=v))
    assert keep.info["video_rect"] == [0, 40, 64, 48]  # bars kept: 128x96 fitted → 64x48


def test_control_task_without_preprocess_uses_video_verbatim(tmp_path):
    v = _video(tmp_path / "v.mp4")
    s = JobSpec(task="pose", width=96, height=64, num_frames=17, inputs={"video": "v"},
                control={"preprocess": False})
    b = build_bundle(s, LocalInputs(video=v))
    assert np.all(b.masks == 1) and np.abs(b.frames - np.array([200, 60, 30]) / 255).max() < 0.03
    assert b.info["preprocess"] is False


def test_first_frame_combines_with_inpainting(tmp_path):
    v = _video(tmp_path / "v.mp4")
    mv = write_video(np.full((17, 64, 96, 3), 255, np.uint8), tmp_path / "m.mp4", fps=16)
    img = tmp_path / "first.png"
    Image.new("RGB", (96, 64), (0, 255, 0)).save(img)
    s = JobSpec(task="inpainting", width=96, height=64, num_frames=17,
                inputs={"video": "v", "mask_video": "m", "first_image": "f"})
    b = build_bundle(s, LocalInputs(video=v, mask_video=mv, first_image=img))
    assert np.allclose(b.frames[0], [0, 1, 0]) and np.all(b.masks[0] == 0)
    assert np.all(b.frames[1:] == 0.5) and np.all(b.masks[1:] == 1)
