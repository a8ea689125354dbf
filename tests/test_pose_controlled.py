"""Pose and face on controlled DWPose models (fixed, known outputs) through the real loader and build_bundle.

Each test checks one official rule (docs/conditioning/pose-face.md): the pipeline runs and draws when a person
is detected, estimates on the whole frame when none is, feeds BGR to both models, and draws on a 1024-short-side
canvas that is then resized, so the drawn area matches an official-style rendering at the job size.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocessors import build_bundle
from preprocessors.annotators import annotate
from tests import controlled_annotators as ca
from tests.media_helpers import LocalInputs
from vace_local.core.media import open_video, read_frames, write_video
from vace_local.core.spec import JobSpec

BOX = (200.0, 40.0, 440.0, 340.0)  # where the firing detector reports a person, in detector-input pixels
SRC_HW = (1080, 1920)  # talking_person.mp4
#: official draw_bodypose limbSeq (OpenPose-18, 1-based), the 17 drawn limbs
LIMB_SEQ = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
            (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
COCO_FOR_OPENPOSE = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]  # None = neck


def openpose18(pts: np.ndarray) -> np.ndarray:
    return np.array([(pts[5] + pts[6]) / 2 if i is None else pts[i] for i in COCO_FOR_OPENPOSE])


def talking_person(fixtures_dir: Path) -> Path:
    return fixtures_dir / "wan22" / "talking_person.mp4"


def run(tmp_path: Path, monkeypatch, video: Path, task: str, width: int, height: int, **models) -> object:  # noqa: ANN001
    folder = ca.annotator_dir(tmp_path / "annotators", **models)
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(folder))
    spec = JobSpec(task=task, width=width, height=height, num_frames=17, inputs={"video": "v"})
    return build_bundle(spec, LocalInputs(video=video))


def expected_points(box_on_canvas: np.ndarray, src_hw: tuple[int, int], out_hw: tuple[int, int],
                    model_pts: np.ndarray | None = None) -> np.ndarray:
    """Where the controlled skeleton's 133 keypoints land in the output frame (official geometry)."""
    canvas = ca.official_canvas_hw(*src_hw)
    pts = ca.model_to_image(ca.skeleton()[0] if model_pts is None else model_pts, box_on_canvas)
    return ca.canvas_to_output(pts, canvas, src_hw, out_hw)


def lit(frame: np.ndarray, xy: np.ndarray, r: int = 1) -> float:
    """Brightest channel value (0..255) within r pixels of a point."""
    x, y = int(round(xy[0])), int(round(xy[1]))
    return float(frame[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].max() * 255)


@pytest.mark.parametrize("task", ["pose", "face"])
def test_pose_and_face_draw_every_frame_with_firing_detector(fixtures_dir, tmp_path, monkeypatch, task):
    b = run(tmp_path, monkeypatch, talking_person(fixtures_dir), task, 832, 480, box=BOX)
    n = b.info["frames_from_video"]
    canvas = ca.official_canvas_hw(*SRC_HW)
    pts = expected_points(ca.detector_box_on_canvas(BOX, *canvas), SRC_HW, (480, 832))
    body, face = openpose18(pts[:17]), pts[ca.FACE]
    for frame in b.frames[:n]:
        assert all(lit(frame, p) > 60 for p in face)  # every face dot, both tasks
        if task == "pose":
            assert all(lit(frame, p) > 60 for p in body)  # every joint, neck included
            neck, r_shoulder = body[1], body[2]
            r, g, bl = frame[tuple(np.round((neck + r_shoulder)[::-1] / 2).astype(int))] * 255
            assert bl > 100 and r < 40  # first limb: BGR (255, 0, 0) x 0.6 on the canvas → RGB blue, as official
        else:
            assert lit(frame, body[4]) == 0 and lit(frame, body[10]) == 0  # no wrist, no ankle: face only
        assert frame[:40, :40].max() == 0 and frame[-40:, -40:].max() == 0  # black away from the person
    assert b.info["annotator"] == "dwpose-onnx" and b.info["pose_whole_frame_estimates"] == 0


def test_silent_detector_estimates_pose_on_the_whole_frame(fixtures_dir, tmp_path, monkeypatch):
    b = run(tmp_path, monkeypatch, talking_person(fixtures_dir), "pose", 832, 480, box=None)
    n = b.info["frames_from_video"]
    ch, cw = ca.official_canvas_hw(*SRC_HW)
    joints = openpose18(expected_points(np.array([0.0, 0.0, cw, ch]), SRC_HW, (480, 832))[:17])
    inside = joints[(joints[:, 0] >= 0) & (joints[:, 0] < 832) & (joints[:, 1] >= 0) & (joints[:, 1] < 480)]
    assert len(inside) >= 6  # the whole-frame box is padded x1.25 and widened to 3:4: the head falls outside
    for frame in b.frames[:n]:
        assert frame.max() > 0.5  # not black
        assert all(lit(frame, p) > 60 for p in inside)
    assert b.info["pose_whole_frame_estimates"] == n  # no person passed: one estimate per frame on the whole frame


def test_bgr_reaches_detector_and_pose_model(tmp_path, monkeypatch):
    """Red frames: the detector fires only on BGR input; the pose model's joints move with the channel order."""
    src_hw, out_hw = (384, 640), (192, 320)
    video = write_video(np.full((17, *src_hw, 3), (220, 40, 40), np.uint8), tmp_path / "red.mp4", fps=16,
                        quality="maximum")
    shift = 20.0  # SimCC bins per unit of mean(channel 0) - mean(channel 2), normalised input
    b = run(tmp_path, monkeypatch, video, "pose", out_hw[1], out_hw[0], box=(250.0, 100.0, 390.0, 300.0),
            bgr_red_only=True, shift_per_channel_diff=shift)
    n = b.info["frames_from_video"]

    vinfo, vr = open_video(video, "video")
    rgb = read_frames(vinfo, vr, [0])[0].reshape(-1, 3).mean(0)
    norm = (rgb[::-1] - ca.MEAN) / ca.STD  # the model input is BGR, normalised with the official constants
    box = ca.detector_box_on_canvas((250.0, 100.0, 390.0, 300.0), *ca.official_canvas_hw(*src_hw))
    nose = {}
    for order, ch in (("bgr", norm), ("rgb", (rgb - ca.MEAN) / ca.STD)):
        model_pts = ca.skeleton()[0].copy()
        model_pts[:, 0] += shift * (ch[0] - ch[2]) / ca.SPLIT
        nose[order] = expected_points(box, src_hw, out_hw, model_pts)[0]
    assert abs(nose["bgr"][0] - nose["rgb"][0]) > 20  # the two orders are far apart
    for frame in b.frames[:n]:
        assert lit(frame, nose["bgr"]) > 60 and lit(frame, nose["rgb"], r=2) == 0
    assert b.info["pose_whole_frame_estimates"] == 0  # the detector fired: it saw BGR


def official_style(canvas_pts: np.ndarray, canvas_hw: tuple[int, int], src_hw: tuple[int, int],
                   out_hw: tuple[int, int], body: bool) -> np.ndarray:
    """Reference rendering from the official rule: draw on the 1024-short-side canvas (limb half-width 4, joints
    radius 4, face dots radius 3; limbs x 0.6 first, then joints), resize to the source, cover-crop to the job."""
    canvas = np.zeros((*canvas_hw, 3), np.uint8)
    if body:
        op = openpose18(canvas_pts[:17])
        for a, b in LIMB_SEQ:
            (x1, y1), (x2, y2) = op[a - 1], op[b - 1]
            angle = np.degrees(np.arctan2(y1 - y2, x1 - x2))
            cv2.ellipse(canvas, (int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(np.hypot(x1 - x2, y1 - y2) / 2), 4),
                        int(angle), 0, 360, (255, 255, 255), -1)
        canvas = (canvas * 0.6).astype(np.uint8)
        for x, y in op:
            cv2.circle(canvas, (int(x), int(y)), 4, (255, 255, 255), -1)
    for x, y in canvas_pts[ca.FACE]:
        cv2.circle(canvas, (int(x), int(y)), 3, (255, 255, 255), -1)
    (h, w), (oh, ow) = src_hw, out_hw
    up = h * w > canvas_hw[0] * canvas_hw[1]
    src = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LANCZOS4 if up else cv2.INTER_AREA)
    s = max(oh / h, ow / w)
    sh, sw = max(oh, round(h * s)), max(ow, round(w * s))
    scaled = cv2.resize(src, (sw, sh), interpolation=cv2.INTER_AREA)
    top, left = (sh - oh) // 2, (sw - ow) // 2
    return scaled[top : top + oh, left : left + ow].astype(np.float32) / 255


def foreground(img: np.ndarray) -> np.ndarray:
    return img.max(-1) > 0.1


@pytest.mark.parametrize(("task", "width", "height"), [("pose", 832, 480), ("pose", 1280, 720), ("face", 832, 480)])
def test_drawn_area_matches_official_style_rendering(fixtures_dir, tmp_path, monkeypatch, task, width, height):
    """One real 1080p frame through the annotator (build_bundle runs the same call on every frame)."""
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(ca.annotator_dir(tmp_path / "annotators", box=BOX)))
    vinfo, vr = open_video(talking_person(fixtures_dir), "video")
    info: dict = {}
    ours = foreground(annotate(task, read_frames(vinfo, vr, [0]), info, (height, width))[0])
    assert info["pose_canvas"] == [1792, 1024]
    canvas = ca.official_canvas_hw(*SRC_HW)
    canvas_pts = ca.model_to_image(ca.skeleton()[0], ca.detector_box_on_canvas(BOX, *canvas))
    ref = foreground(official_style(canvas_pts, canvas, SRC_HW, (height, width), body=task == "pose"))
    ratio = ours.sum() / ref.sum()
    iou = (ours & ref).sum() / (ours | ref).sum()
    print(f"{task} {width}x{height}: area {ratio:.3f}x, IoU {iou:.3f} vs the official-style rendering")
    assert 0.8 <= ratio <= 1.25 and iou > 0.75, (ratio, iou)
