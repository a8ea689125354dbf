"""Spatial helpers: cover-resize + centre-crop (video, masks), fit on a canvas (reference images).

Everything works on numpy arrays so the same transform is applied to frames and masks; masks are
re-binarised after every resize because the model thresholds them and soft edges would shift the region.
"""

from __future__ import annotations

import cv2
import numpy as np

GRAY_U8 = 127.5  # neutral gray in 0..255 (0 in [-1, 1]); kept as float in memory


def _interp(src_h: int, src_w: int, dst_h: int, dst_w: int) -> int:
    """AREA when shrinking (anti-aliased), CUBIC when enlarging: the official resize is bicubic + antialias."""
    return cv2.INTER_AREA if dst_h * dst_w < src_h * src_w else cv2.INTER_CUBIC


def cover_box(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[int, int, int, int, int, int]:
    """Scaled size and crop offsets for a cover resize: (scaled_h, scaled_w, top, left, dst_h, dst_w)."""
    scale = max(dst_h / src_h, dst_w / src_w)
    sh, sw = max(dst_h, round(src_h * scale)), max(dst_w, round(src_w * scale))
    return sh, sw, (sh - dst_h) // 2, (sw - dst_w) // 2, dst_h, dst_w


def cover_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize so the image covers (height, width) without distortion, then centre-crop to exactly that size."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    sh, sw, top, left, _, _ = cover_box(h, w, height, width)
    out = cv2.resize(img, (sw, sh), interpolation=_interp(h, w, sh, sw))
    return out[top : top + height, left : left + width]


def stretch_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to exactly (height, width), aspect ignored: a mask made at another size is mapped onto the video's
    frame (its corners on the video's corners), so the video's crop box then applies to both alike."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    return cv2.resize(img, (width, height), interpolation=_interp(h, w, height, width))


def cover_crop_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Same transform as `cover_crop` for a 0/1 mask, re-binarised at 0.5 (float32 0/1)."""
    m = cover_crop(mask.astype(np.float32), height, width)
    return (m >= 0.5).astype(np.float32)


def binarize(mask: np.ndarray, threshold: float = 127.0) -> np.ndarray:
    """uint8 (or 0..255 float) mask → float32 0/1; mid-gray threshold (VACE's own `> 0` keeps codec noise)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., :3].mean(axis=-1) if m.shape[-1] >= 3 else m[..., 0]
    return (m > threshold).astype(np.float32)


def fit_on_canvas(
    img: np.ndarray, height: int, width: int, fill: float = 255.0
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fit (no crop) and centre on a canvas of `fill`; returns (canvas, (top, left, h, w) of the image)."""
    h, w = img.shape[:2]
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    resized = img if (nh, nw) == (h, w) else cv2.resize(img, (nw, nh), interpolation=_interp(h, w, nh, nw))
    canvas = np.full((height, width) + img.shape[2:], fill, dtype=np.float32)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return canvas, (top, left, nh, nw)


def to_unit(frames_u8: np.ndarray) -> np.ndarray:
    """uint8 / 0..255 float → float32 in [0, 1]."""
    return np.clip(np.asarray(frames_u8, dtype=np.float32) / 255.0, 0.0, 1.0)
