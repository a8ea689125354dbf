"""DWPose with onnxruntime: YOLOX-L person boxes → DW-LL (RTMPose, SimCC) 133 whole-body keypoints.

Follows VACE's PoseBodyFaceVideoAnnotator (vace/annotators/pose.py, dwpose/*.py): each source frame is turned
to BGR (both models were trained on BGR), resized so its short side is 1024 (rounded to multiples of 64), the
people are detected and drawn on a black canvas of that size (limb width 4, joint radius 4, face dots radius 3),
the canvas is flipped back to RGB and resized to the job size by the video's cover-resize + centre crop. When
no box passes the threshold the pose model runs on the whole frame (onnxpose.py). Rules and their tests:
docs/CONDITIONING.md (pose and face). `pose` draws the 18 OpenPose
body points and limbs plus the 68 face points (no hands); `face` draws only the face points.
Fallback when the DWPose ONNX files are missing: controlnet-aux OpenPose (body) if `pose/body_pose_model.pth`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from preprocessors import weights
from preprocessors.geometry import cover_box, cover_crop
from vace_local.core.errors import ModelNotFoundError

DET_SIZE = 640
POSE_W, POSE_H = 288, 384  # DW-LL ucoco 384 input; the real size is read from the ONNX file when it is fixed
SIMCC_SPLIT = 2.0
SCORE_THR = 0.3
NMS_THR = 0.45
BOX_PADDING = 1.25
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
#: official RESIZE_SIZE: detection and drawing happen on a canvas with this short side
CANVAS_SHORT_SIDE = 1024
STICK_WIDTH, JOINT_RADIUS, FACE_RADIUS = 4, 4, 3  # pixels on that canvas
LIMB_ALPHA = 0.6
# OpenPose-18 order from COCO-17 indices (-1 = neck, the mean of the shoulders)
OPENPOSE_FROM_COCO = [0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
#: drawn into a BGR canvas (flipped to RGB at the end, as the official annotator does)
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
FACE = slice(23, 91)

Person = tuple[np.ndarray, np.ndarray]  # (133, 2) points in image pixels, (133,) scores


class DWPose:
    """The two official ONNX models; every method takes BGR uint8 images."""

    def __init__(self, det_path: str, pose_path: str) -> None:
        import onnxruntime as ort

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.det = ort.InferenceSession(det_path, providers=providers)
        self.pose = ort.InferenceSession(pose_path, providers=providers)
        h, w = self.pose.get_inputs()[0].shape[2:]
        self.pose_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else (POSE_H, POSE_W)

    def boxes(self, bgr: np.ndarray) -> np.ndarray:
        """Person boxes (N, 4) xyxy in image pixels (score = objectness x person class > 0.3, NMS 0.45)."""
        h, w = bgr.shape[:2]
        r = min(DET_SIZE / h, DET_SIZE / w)
        rh, rw = int(h * r), int(w * r)
        padded = np.full((DET_SIZE, DET_SIZE, 3), 114, np.uint8)
        padded[:rh, :rw] = cv2.resize(bgr, (rw, rh), interpolation=cv2.INTER_LINEAR)
        inp = padded.transpose(2, 0, 1)[None].astype(np.float32)
        out = self.det.run(None, {self.det.get_inputs()[0].name: inp})[0][0]
        grids, strides = [], []
        for s in (8, 16, 32):
            n = DET_SIZE // s
            yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
            grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
            strides.append(np.full((n * n, 1), s))
        grid, stride = np.concatenate(grids), np.concatenate(strides)
        xy = (out[:, :2] + grid) * stride
        wh = np.exp(np.clip(out[:, 2:4], -10, 10)) * stride
        score = out[:, 4] * out[:, 5]  # objectness x person-class probability
        keep = score > SCORE_THR
        if not keep.any():
            return np.zeros((0, 4), np.float32)
        b = np.concatenate([xy[keep] - wh[keep] / 2, xy[keep] + wh[keep] / 2], 1) / r
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)
        idx = cv2.dnn.NMSBoxes(xywh.tolist(), score[keep].tolist(), SCORE_THR, NMS_THR)
        return b[np.array(idx, int).reshape(-1)].astype(np.float32)

    def keypoints(self, bgr: np.ndarray, box: np.ndarray) -> Person:
        """Points and scores for one person box: the box padded x1.25 to the model's aspect, SimCC argmax."""
        ph, pw = self.pose_hw
        cx, cy = (box[:2] + box[2:]) / 2
        bw, bh = (box[2:] - box[:2]) * BOX_PADDING
        if bw * ph > bh * pw:
            bh = bw * ph / pw
        else:
            bw = bh * pw / ph
        k = pw / max(bw, 1e-3)
        m = np.array([[k, 0, pw / 2 - k * cx], [0, k, ph / 2 - k * cy]], np.float32)
        crop = cv2.warpAffine(bgr, m, (pw, ph), flags=cv2.INTER_LINEAR).astype(np.float32)
        inp = ((crop - MEAN) / STD).transpose(2, 0, 1)[None]
        sx, sy = self.pose.run(None, {self.pose.get_inputs()[0].name: inp})
        x, y = sx[0].argmax(-1) / SIMCC_SPLIT, sy[0].argmax(-1) / SIMCC_SPLIT
        scores = np.minimum(sx[0].max(-1), sy[0].max(-1))
        pts = np.stack([(x - m[0, 2]) / k, (y - m[1, 2]) / k], -1)
        pts[scores <= 0] = -1  # no response: not a point
        return pts, scores

    def __call__(self, bgr: np.ndarray) -> tuple[list[Person], bool]:
        """Every detected person; with no box, one estimate on the whole frame (second value True)."""
        boxes = self.boxes(bgr)
        if len(boxes):
            return [self.keypoints(bgr, b) for b in boxes], False
        h, w = bgr.shape[:2]
        return [self.keypoints(bgr, np.array([0, 0, w, h], np.float32))], True


def _openpose18(pts: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-17 → OpenPose-18 points and visibility (neck = mean of the shoulders, visible if both are)."""
    coco, cs = pts[:17], scores[:17]
    op = np.array([coco[i] if i >= 0 else (coco[5] + coco[6]) / 2 for i in OPENPOSE_FROM_COCO])
    ok = np.array([cs[i] > SCORE_THR if i >= 0 else min(cs[5], cs[6]) > SCORE_THR for i in OPENPOSE_FROM_COCO])
    return op, ok


def draw(canvas: np.ndarray, people: list[Person], body: bool, face: bool) -> None:
    """OpenPose-style drawing in the official order: every limb (ellipse, half-width 4, colour x 0.6), then every
    joint (radius 4), then the face dots (radius 3, score >= 0.3). `canvas` is BGR, sized like the image."""
    if body:
        skeletons = [_openpose18(pts, scores) for pts, scores in people]
        for op, ok in skeletons:
            for li, (a, b) in enumerate(LIMBS):
                if ok[a] and ok[b]:
                    (x1, y1), (x2, y2) = op[a], op[b]
                    length = float(np.hypot(x1 - x2, y1 - y2))
                    angle = float(np.degrees(np.arctan2(y1 - y2, x1 - x2)))
                    poly = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), STICK_WIDTH),
                                            int(angle), 0, 360, 1)
                    cv2.fillConvexPoly(canvas, poly, [int(c * LIMB_ALPHA) for c in COLORS[li]])
        for op, ok in skeletons:
            for i in range(18):
                if ok[i]:
                    cv2.circle(canvas, (int(op[i, 0]), int(op[i, 1])), JOINT_RADIUS, COLORS[i], -1)
    if face:
        for pts, scores in people:
            for (x, y), s in zip(pts[FACE], scores[FACE], strict=True):
                if s >= SCORE_THR and int(x) > 0 and int(y) > 0:
                    cv2.circle(canvas, (int(x), int(y)), FACE_RADIUS, (255, 255, 255), -1)


def canvas_size(height: int, width: int) -> tuple[int, int]:
    """Official `resize_image`: short side scaled to 1024, both sides rounded to a multiple of 64."""
    k = CANVAS_SHORT_SIDE / min(height, width)
    return max(64, int(np.round(height * k / 64)) * 64), max(64, int(np.round(width * k / 64)) * 64)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lanczos when enlarging, area when shrinking (the official annotator's choice both ways)."""
    up = height * width > img.shape[0] * img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_LANCZOS4 if up else cv2.INTER_AREA)


def render(model: DWPose, task: str, rgb: np.ndarray, size: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """One RGB source frame → the pose map (uint8 RGB) and whether the whole frame was estimated.

    The map has the source size, or with `size` (height, width) the source's cover-resize + centre crop to it:
    the canvas is resized once to the scaled source size (official: to the source, then the video processor's
    resize; same geometry, one resample less).
    """
    h, w = rgb.shape[:2]
    ch, cw = canvas_size(h, w)
    image = _resize(np.ascontiguousarray(rgb[..., ::-1]), ch, cw)  # BGR, as both models expect
    people, whole_frame = model(image)
    canvas = np.zeros((ch, cw, 3), np.uint8)
    draw(canvas, people, body=task == "pose", face=True)
    if size is None:
        return np.ascontiguousarray(_resize(canvas, h, w)[..., ::-1]), whole_frame
    sh, sw, top, left, oh, ow = cover_box(h, w, *size)
    return np.ascontiguousarray(_resize(canvas, sh, sw)[top : top + oh, left : left + ow, ::-1]), whole_frame


@lru_cache(maxsize=2)
def load_pose(annotators_dir: str) -> tuple[str, Any]:
    """DWPose if its two ONNX files resolve; else controlnet-aux OpenPose when its body model is present."""
    root = Path(annotators_dir)
    try:
        return "dwpose-onnx", DWPose(str(weights.resolve("pose_det", root)), str(weights.resolve("pose_est", root)))
    except ModelNotFoundError as missing:
        body = root / "pose" / "body_pose_model.pth"
        if not body.is_file():
            raise missing
    from controlnet_aux import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    return "controlnet-aux-openpose", OpenposeDetector(Body(str(body)))


def pose_frames(
    task: str, frames: Iterable[np.ndarray], info: dict[str, Any], size: tuple[int, int] | None = None,
    annotators_dir: Path | None = None,
) -> np.ndarray:
    """Source RGB frames → float32 [0, 1] pose maps, cover-cropped to `size` (height, width) when given."""
    backend, model = load_pose(str(weights.annotators_dir(annotators_dir)))
    info["annotator"] = backend
    out, whole = [], 0
    for frame in frames:
        if isinstance(model, DWPose):
            img, whole_frame = render(model, task, frame, size)
            whole += whole_frame
            info["pose_canvas"] = list(canvas_size(*frame.shape[:2])[::-1])  # [w, h]
        else:
            if task == "face":
                raise ModelNotFoundError(f"task 'face' needs the DWPose files ({weights.DOWNLOAD_HINT})")
            res = min(frame.shape[0], frame.shape[1], 1024) // 64 * 64 or 64
            img = model(frame, detect_resolution=res, image_resolution=res, output_type="np")
            img = cv2.resize(img, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_NEAREST)
            img = cover_crop(img, *size) if size else img
        out.append(img)
    if isinstance(model, DWPose):
        info["pose_whole_frame_estimates"] = whole  # frames where no person box passed the threshold
    return np.stack(out).astype(np.float32) / 255.0
