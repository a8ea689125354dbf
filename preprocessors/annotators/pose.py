"""DWPose with onnxruntime: YOLOX-L person boxes → DW-LL (RTMPose, SimCC) 133 whole-body keypoints.

`pose` draws the 18 OpenPose body points and limbs plus the 68 face points on black (hands not drawn, as in
VACE's default pose annotator); `face` draws only the face points (white dots, radius 3). Fallback when the
DWPose ONNX files are missing: controlnet-aux OpenPose (body) if its weights are in `pose/body_pose_model.pth`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from preprocessors import weights
from vace_local.errors import ModelNotFoundError

DET_SIZE = 640
POSE_W, POSE_H = 288, 384
SIMCC_SPLIT = 2.0
SCORE_THR = 0.3
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
# OpenPose-18 order from COCO-17 indices (-1 = neck, the mean of the shoulders)
OPENPOSE_FROM_COCO = [0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
FACE = slice(23, 91)


class DWPose:
    def __init__(self, det_path: str, pose_path: str) -> None:
        import onnxruntime as ort

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.det = ort.InferenceSession(det_path, providers=providers)
        self.pose = ort.InferenceSession(pose_path, providers=providers)

    def boxes(self, rgb: np.ndarray) -> np.ndarray:
        """Person boxes (N, 4) xyxy in image pixels."""
        h, w = rgb.shape[:2]
        r = min(DET_SIZE / h, DET_SIZE / w)
        padded = np.full((DET_SIZE, DET_SIZE, 3), 114, np.float32)
        padded[: round(h * r), : round(w * r)] = cv2.resize(rgb[..., ::-1], (round(w * r), round(h * r)))
        out = self.det.run(None, {self.det.get_inputs()[0].name: padded.transpose(2, 0, 1)[None]})[0][0]
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
        idx = cv2.dnn.NMSBoxes([[*bb[:2], *(bb[2:] - bb[:2])] for bb in b.tolist()], score[keep].tolist(),
                               SCORE_THR, 0.45)
        return b[np.array(idx, int).reshape(-1)].astype(np.float32)

    def keypoints(self, rgb: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(133, 2) points in image pixels and (133,) scores for one person box."""
        cx, cy = (box[:2] + box[2:]) / 2
        bw, bh = (box[2:] - box[:2]) * 1.25
        if bw * POSE_H > bh * POSE_W:
            bh = bw * POSE_H / POSE_W
        else:
            bw = bh * POSE_W / POSE_H
        k = POSE_W / max(bw, 1e-3)
        m = np.array([[k, 0, POSE_W / 2 - k * cx], [0, k, POSE_H / 2 - k * cy]], np.float32)
        crop = cv2.warpAffine(rgb, m, (POSE_W, POSE_H), flags=cv2.INTER_LINEAR).astype(np.float32)
        inp = ((crop - MEAN) / STD).transpose(2, 0, 1)[None]
        sx, sy = self.pose.run(None, {self.pose.get_inputs()[0].name: inp})
        x, y = sx[0].argmax(-1) / SIMCC_SPLIT, sy[0].argmax(-1) / SIMCC_SPLIT
        scores = np.minimum(sx[0].max(-1), sy[0].max(-1))
        pts = np.stack([(x - m[0, 2]) / k, (y - m[1, 2]) / k], -1)
        return pts, scores

    def __call__(self, rgb: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.keypoints(rgb, b) for b in self.boxes(rgb)]


def draw(canvas: np.ndarray, pts: np.ndarray, scores: np.ndarray, body: bool, face: bool) -> None:
    """OpenPose-style drawing: limbs as ellipses (width 4, colours x 0.6), joints radius 4, face dots radius 3."""
    if body:
        coco, cs = pts[:17], scores[:17]
        op = np.array([coco[i] if i >= 0 else (coco[5] + coco[6]) / 2 for i in OPENPOSE_FROM_COCO])
        ok = np.array([cs[i] > SCORE_THR if i >= 0 else min(cs[5], cs[6]) > SCORE_THR for i in OPENPOSE_FROM_COCO])
        for li, (a, b) in enumerate(LIMBS):
            if ok[a] and ok[b]:
                (x1, y1), (x2, y2) = op[a], op[b]
                length = float(np.hypot(x1 - x2, y1 - y2))
                angle = float(np.degrees(np.arctan2(y1 - y2, x1 - x2)))
                poly = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), 4),
                                        int(angle), 0, 360, 1)
                cv2.fillConvexPoly(canvas, poly, [int(c * 0.6) for c in COLORS[li]])
        for i in range(18):
            if ok[i]:
                cv2.circle(canvas, (int(op[i, 0]), int(op[i, 1])), 4, COLORS[i], -1)
    if face:
        for (x, y), s in zip(pts[FACE], scores[FACE], strict=True):
            if s > SCORE_THR:
                cv2.circle(canvas, (int(x), int(y)), 3, (255, 255, 255), -1)


@lru_cache(maxsize=2)
def load_pose(annotators_dir: str) -> tuple[str, Any]:
    """DWPose if its two ONNX files resolve; else controlnet-aux OpenPose when its body model is present."""
    try:
        return "dwpose-onnx", DWPose(str(weights.resolve("pose_det")), str(weights.resolve("pose_est")))
    except ModelNotFoundError as missing:
        body = weights.annotators_dir() / "pose" / "body_pose_model.pth"
        if not body.is_file():
            raise missing
    from controlnet_aux import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    return "controlnet-aux-openpose", OpenposeDetector(Body(str(body)))


def pose_frames(task: str, frames: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    backend, model = load_pose(str(weights.annotators_dir()))
    info["annotator"] = backend
    out = np.zeros(frames.shape, np.uint8)
    for i, frame in enumerate(frames):
        if isinstance(model, DWPose):
            for pts, scores in model(frame):
                draw(out[i], pts, scores, body=task == "pose", face=True)
        else:
            if task == "face":
                raise ModelNotFoundError(f"task 'face' needs the DWPose files ({weights.DOWNLOAD_HINT})")
            res = min(frame.shape[0], frame.shape[1], 1024) // 64 * 64 or 64
            img = model(frame, detect_resolution=res, image_resolution=res, output_type="np")
            out[i] = cv2.resize(img, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_NEAREST)
    return out.astype(np.float32) / 255.0
