"""Outpainting (grow the canvas on chosen sides) and reframe (put the clip on the job's aspect ratio).

Both place every source frame in a rectangle of the job canvas: the covered area keeps its pixels (mask 0),
everything else is gray with mask 1. The rectangle is the same for all frames.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from preprocessors.geometry import _interp, to_unit
from vace_local.core.bundle import GRAY
from vace_local.core.errors import InputError
from vace_local.core.media import VideoInfo, iter_frames
from vace_local.core.spec import JobSpec

BORDER_LEVEL = 24.0  # a row/column darker than this on every sampled frame counts as a letterbox bar


def outpaint_rect(src_w: int, src_h: int, H: int, W: int, sides: dict[str, bool], ratio: float) -> tuple[float, ...]:
    """(x, y, w, h) of the original inside the job canvas after growing the chosen sides by `ratio`.

    Pixels added per side: int(ratio * width) left/right, int(ratio * height) top/bottom (official
    OutpaintingAnnotator); the grown canvas is then fitted (not cropped) into the job size.
    """
    add_l = int(ratio * src_w) if sides["left"] else 0
    add_r = int(ratio * src_w) if sides["right"] else 0
    add_t = int(ratio * src_h) if sides["top"] else 0
    add_b = int(ratio * src_h) if sides["bottom"] else 0
    cw, ch = src_w + add_l + add_r, src_h + add_t + add_b
    s = min(W / cw, H / ch)
    ox, oy = (W - cw * s) / 2, (H - ch * s) / 2
    return ox + add_l * s, oy + add_t * s, src_w * s, src_h * s


def reframe_rect(src_w: int, src_h: int, H: int, W: int, zoom: float) -> tuple[float, ...]:
    """(x, y, w, h) of the clip centred on the job canvas, scaled between fit (zoom 0) and cover (zoom 1)."""
    s_fit, s_cover = min(W / src_w, H / src_h), max(W / src_w, H / src_h)
    s = s_fit + zoom * (s_cover - s_fit)
    return (W - src_w * s) / 2, (H - src_h * s) / 2, src_w * s, src_h * s


def _int_rect(rect: tuple[float, ...]) -> tuple[int, int, int, int]:
    x, y, w, h = rect
    x0, y0 = round(x), round(y)
    return x0, y0, max(1, round(x + w) - x0), max(1, round(y + h) - y0)


def place(frame: np.ndarray, rect: tuple[int, int, int, int], H: int, W: int) -> np.ndarray:
    """Resize `frame` to the rect and paste it (clipped) on a gray canvas; returns uint8-range float32."""
    x0, y0, rw, rh = rect
    canvas = np.full((H, W, 3), GRAY * 255.0, np.float32)
    img = cv2.resize(frame, (rw, rh), interpolation=_interp(frame.shape[0], frame.shape[1], rh, rw))
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(W, x0 + rw), min(H, y0 + rh)
    if cx1 > cx0 and cy1 > cy0:
        canvas[cy0:cy1, cx0:cx1] = img[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return canvas


def rect_mask(rect: tuple[int, int, int, int], H: int, W: int) -> np.ndarray:
    x0, y0, rw, rh = rect
    m = np.ones((H, W), np.float32)
    m[max(0, y0) : min(H, y0 + rh), max(0, x0) : min(W, x0 + rw)] = 0.0
    return m


def detect_borders(frames: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows/columns of black bars present on every sampled frame."""
    lum = frames.astype(np.float32).mean(axis=-1).max(axis=0)  # brightest value over frames, per pixel
    rows, cols = lum.max(axis=1), lum.max(axis=0)

    def run(v: np.ndarray) -> int:
        n = 0
        while n < len(v) and v[n] < BORDER_LEVEL:
            n += 1
        return n

    t, b, left, r = run(rows), run(rows[::-1]), run(cols), run(cols[::-1])
    h, w = lum.shape
    if h - t - b < h // 2:
        t = b = 0
    if w - left - r < w // 2:
        left = r = 0
    return t, b, left, r


def outpaint_frames(
    spec: JobSpec, vinfo: VideoInfo, vr: object, idx: list[int], info: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    H, W, c = spec.height, spec.width, spec.control
    crop = (0, 0, 0, 0)
    src_w, src_h = vinfo.width, vinfo.height
    if spec.task == "outpainting":
        if not 0.0 <= c.expand_ratio <= 1.0:  # 0 adds int(0 * w) = 0 px: the clip is only fitted (official)
            raise InputError("control.expand_ratio", f"must be within 0..1 for outpainting, got {c.expand_ratio}")
        sides = {"left": c.expand_left, "right": c.expand_right, "top": c.expand_top, "bottom": c.expand_bottom}
        if not any(sides.values()):
            sides["left"] = sides["right"] = True  # official default direction: left + right
        info["expand"] = [k for k, v in sides.items() if v]
        info["expand_ratio"] = c.expand_ratio
        rect = _int_rect(outpaint_rect(src_w, src_h, H, W, sides, c.expand_ratio))
    else:
        if not 0.0 <= c.zoom_factor <= 0.9:
            raise InputError("control.zoom_factor", f"must be within 0..0.9, got {c.zoom_factor}")
        if c.trim_borders:
            probe_idx = sorted({idx[int(i)] for i in np.linspace(0, len(idx) - 1, min(8, len(idx)))})
            crop = detect_borders(np.stack(list(iter_frames(vinfo, vr, probe_idx))))
            info["trimmed_borders"] = dict(zip(("top", "bottom", "left", "right"), crop, strict=True))
        src_h -= crop[0] + crop[1]
        src_w -= crop[2] + crop[3]
        rect = _int_rect(reframe_rect(src_w, src_h, H, W, c.zoom_factor))
        info["zoom_factor"] = c.zoom_factor
    info["video_rect"] = list(rect)
    t, b, left, r = crop
    hh, ww = vinfo.height, vinfo.width

    def transform(f: np.ndarray) -> np.ndarray:
        return place(f[t : hh - b, left : ww - r], rect, H, W)

    frames = to_unit(np.stack(list(iter_frames(vinfo, vr, idx, transform))))
    mask = rect_mask(rect, H, W)
    frames[:, mask > 0.5] = GRAY
    return frames, np.repeat(mask[None], len(frames), axis=0)
