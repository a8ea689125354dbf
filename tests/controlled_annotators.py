"""Controlled DWPose models for tests: ONNX files with the official signatures and fixed, meaningful outputs.

Built with the `onnx` helper API (no training, no torch) and written under the official file names in a temp
annotator folder, so the real loader (`preprocessors.weights` → `preprocessors.annotators.pose`) reads them:

- detector `yolox_l.onnx`: input `images` (1, 3, 640, 640) float32 pixels, output `output` (1, 8400, 85) raw YOLOX
  rows (anchors at strides 8/16/32; x, y, log w, log h offsets, objectness, 80 class scores). It either never
  fires, or reports one person (score 0.81) at a known box given in detector-input pixels; optionally only when
  the input is BGR-ordered red content (mean of channel 2 above mean of channel 0).
- pose `dw-ll_ucoco_384.onnx`: input `input` (1, 3, 384, 288), outputs `simcc_x` (1, 133, 576) and `simcc_y`
  (1, 133, 768) with one peak per visible keypoint at a known skeleton (in model-input pixels, SimCC split 2);
  optionally shifted right by `shift_per_channel_diff` bins per unit of mean(channel 0) - mean(channel 2) of the
  normalised input, so the channel order reaching the model is visible in where the joints land.

The geometry helpers below restate the official mapping (onnxdet `preprocess`, onnxpose `bbox_xyxy2cs` /
`_fix_aspect_ratio`, wholebody `resize_image`) so tests can say where a joint must appear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocessors import weights

DET_IN = 640
POSE_H, POSE_W = 384, 288
SPLIT = 2
NUM_KPTS = 133
STRIDES = (8, 16, 32)
NUM_ANCHORS = sum((DET_IN // s) ** 2 for s in STRIDES)  # 8400
FACE = slice(23, 91)
MEAN = np.array([123.675, 116.28, 103.53])  # onnxpose.preprocess normalisation, applied to the BGR crop
STD = np.array([58.395, 57.12, 57.375])


def skeleton() -> tuple[np.ndarray, np.ndarray]:
    """A standing person facing the camera, in pose-model input pixels (288 x 384): COCO-17 body + 68 face points.

    Feet and hands have no response (score 0), as a model that does not see them.
    """
    pts = np.zeros((NUM_KPTS, 2), np.float32)
    vis = np.zeros(NUM_KPTS, bool)
    body = [(144, 70), (154, 62), (134, 62), (166, 66), (122, 66), (184, 110), (104, 110), (204, 165), (84, 165),
            (214, 215), (74, 215), (170, 215), (118, 215), (174, 280), (114, 280), (176, 340), (112, 340)]
    pts[:17], vis[:17] = body, True
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    pts[FACE] = np.stack([144 + 22 * np.cos(t), 68 + 28 * np.sin(t)], -1)
    vis[FACE] = True
    return pts, vis


def _save(graph, path: Path) -> Path:  # noqa: ANN001
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _channel_diff_nodes(prefix: str, inp: str) -> list:
    """Nodes computing `{prefix}d` = mean(channel 0) - mean(channel 2) of a (1, 3, H, W) input, shape (1, 1, 1)."""
    from onnx import helper, numpy_helper

    def const(name: str, value: np.ndarray):  # noqa: ANN202
        return helper.make_node("Constant", [], [prefix + name], value=numpy_helper.from_array(value, prefix + name))

    return [
        const("c0s", np.array([0], np.int64)), const("c0e", np.array([1], np.int64)),
        const("c2s", np.array([2], np.int64)), const("c2e", np.array([3], np.int64)),
        const("ax", np.array([1], np.int64)), const("shape", np.array([1, 1, 1], np.int64)),
        helper.make_node("Slice", [inp, prefix + "c0s", prefix + "c0e", prefix + "ax"], [prefix + "ch0"]),
        helper.make_node("Slice", [inp, prefix + "c2s", prefix + "c2e", prefix + "ax"], [prefix + "ch2"]),
        helper.make_node("ReduceMean", [prefix + "ch0"], [prefix + "m0"], keepdims=0),
        helper.make_node("ReduceMean", [prefix + "ch2"], [prefix + "m2"], keepdims=0),
        helper.make_node("Sub", [prefix + "m0", prefix + "m2"], [prefix + "d0"]),
        helper.make_node("Reshape", [prefix + "d0", prefix + "shape"], [prefix + "d"]),
    ]


def anchor_rows(box: tuple[float, float, float, float]) -> tuple[int, np.ndarray]:
    """The stride-32 anchor under the box centre and its raw (x, y, log w, log h) so it decodes to `box`."""
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    n, s = DET_IN // 32, 32
    gx, gy = int(cx // s), int(cy // s)
    index = (DET_IN // 8) ** 2 + (DET_IN // 16) ** 2 + gy * n + gx
    return index, np.array([cx / s - gx, cy / s - gy, np.log(w / s), np.log(h / s)], np.float32)


def write_detector(path: Path, box: tuple[float, float, float, float] | None, bgr_red_only: bool = False) -> Path:
    """YOLOX-L signature; one person at `box` (detector-input pixels) with score 0.81, or never (box=None).

    `bgr_red_only`: objectness scales with (mean(ch 2) - mean(ch 0)) / 20 clipped to [0, 1], so red content fires
    only when it arrives BGR-ordered.
    """
    from onnx import TensorProto, helper, numpy_helper

    base = np.zeros((1, NUM_ANCHORS, 85), np.float32)
    gated = np.zeros_like(base)
    if box is not None:
        i, raw = anchor_rows(box)
        base[0, i, :4], base[0, i, 5] = raw, 0.9
        gated[0, i, 4] = 0.9
    nodes = _channel_diff_nodes("g_", "images")
    if bgr_red_only:
        nodes += [
            helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(-1 / 20, np.float32))),
            helper.make_node("Mul", ["g_d", "scale"], ["g_raw"]),
            helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(0, np.float32))),
            helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.array(1, np.float32))),
            helper.make_node("Clip", ["g_raw", "lo", "hi"], ["gate"]),
        ]
    else:  # gate = 1, still reading the input
        nodes += [
            helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
            helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.float32))),
            helper.make_node("Mul", ["g_d", "zero"], ["g_zero"]),
            helper.make_node("Add", ["g_zero", "one"], ["gate"]),
        ]
    nodes += [
        helper.make_node("Constant", [], ["base"], value=numpy_helper.from_array(base, "base")),
        helper.make_node("Constant", [], ["gated"], value=numpy_helper.from_array(gated, "gated")),
        helper.make_node("Mul", ["gated", "gate"], ["obj"]),
        helper.make_node("Add", ["base", "obj"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "controlled_yolox",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, DET_IN, DET_IN])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, NUM_ANCHORS, 85])],
    )
    return _save(graph, path)


def write_pose(path: Path, shift_per_channel_diff: float = 0.0) -> Path:
    """RTMPose (DW-LL 384) signature returning `skeleton()`: peak value 1 at each visible keypoint, 0 elsewhere."""
    from onnx import TensorProto, helper, numpy_helper

    pts, vis = skeleton()
    nodes = _channel_diff_nodes("p_", "input")

    def const(name: str, value: np.ndarray):  # noqa: ANN202
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name))

    nodes += [const("shift", np.array(shift_per_channel_diff)), helper.make_node("Mul", ["p_d", "shift"], ["dx"]),
              const("one", np.array(1.0))]
    for axis, bins, coord, extra in (("x", POSE_W * SPLIT, pts[:, 0], "dx"), ("y", POSE_H * SPLIT, pts[:, 1], None)):
        nodes += [const(f"pos_{axis}", np.arange(bins)[None, None, :]),
                  const(f"target_{axis}", (coord * SPLIT)[None, :, None]),
                  const(f"vis_{axis}", vis.astype(np.float32)[None, :, None]),
                  const(f"inv_{axis}", np.array(1.0 / bins))]
        target = f"target_{axis}"
        if extra:
            nodes.append(helper.make_node("Add", [target, extra], [f"moved_{axis}"]))
            target = f"moved_{axis}"
        nodes += [
            helper.make_node("Sub", [f"pos_{axis}", target], [f"diff_{axis}"]),
            helper.make_node("Abs", [f"diff_{axis}"], [f"abs_{axis}"]),
            helper.make_node("Mul", [f"abs_{axis}", f"inv_{axis}"], [f"dist_{axis}"]),
            helper.make_node("Sub", ["one", f"dist_{axis}"], [f"peak_{axis}"]),
            helper.make_node("Mul", [f"peak_{axis}", f"vis_{axis}"], [f"simcc_{axis}"]),
        ]
    graph = helper.make_graph(
        nodes, "controlled_rtmpose",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, POSE_H, POSE_W])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, NUM_KPTS, POSE_W * SPLIT]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, NUM_KPTS, POSE_H * SPLIT])],
    )
    return _save(graph, path)


def annotator_dir(dest: Path, box: tuple[float, float, float, float] | None, bgr_red_only: bool = False,
                  shift_per_channel_diff: float = 0.0) -> Path:
    """A VACE_ANNOTATORS_DIR with the two DWPose files under their official names."""
    write_detector(dest / weights.FILES["pose_det"], box, bgr_red_only)
    write_pose(dest / weights.FILES["pose_est"], shift_per_channel_diff)
    return dest


# ---- the official geometry, restated (where a keypoint of the model input lands in the output frame) ----

def official_canvas_hw(h: int, w: int, short: int = 1024) -> tuple[int, int]:
    """wholebody.resize_image: short side to 1024, each side rounded to a multiple of 64."""
    k = short / min(h, w)
    return int(np.round(h * k / 64)) * 64, int(np.round(w * k / 64)) * 64


def detector_box_on_canvas(box640: tuple[float, float, float, float], ch: int, cw: int) -> np.ndarray:
    """onnxdet.preprocess: the image is scaled by r = min(640 / h, 640 / w) into the padded input."""
    return np.array(box640, np.float64) / min(DET_IN / ch, DET_IN / cw)


def model_to_image(pts: np.ndarray, box: np.ndarray) -> np.ndarray:
    """onnxpose: box → centre and scale x1.25, scale widened to 288:384, keypoint = p / size * scale + c - scale/2."""
    center = (box[:2] + box[2:]) / 2
    w, h = (box[2:] - box[:2]) * 1.25
    scale = np.array([w, w * POSE_H / POSE_W] if w > h * POSE_W / POSE_H else [h * POSE_W / POSE_H, h])
    return pts / np.array([POSE_W, POSE_H]) * scale + center - scale / 2


def canvas_to_output(pts: np.ndarray, canvas_hw: tuple[int, int], src_hw: tuple[int, int],
                     out_hw: tuple[int, int]) -> np.ndarray:
    """Canvas → source size (the annotator's resize back) → cover resize + centre crop to the job size."""
    (ch, cw), (h, w), (oh, ow) = canvas_hw, src_hw, out_hw
    s = max(oh / h, ow / w)
    sh, sw = max(oh, round(h * s)), max(ow, round(w * s))
    return pts * np.array([sw / cw, sh / ch]) - np.array([(sw - ow) // 2, (sh - oh) // 2])
