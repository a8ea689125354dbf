"""Still images: reference images (fitted on white), first/last frames (cover-cropped, RGBA-aware), masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocessors.geometry import GRAY_U8, binarize, cover_crop, cover_crop_mask, fit_on_canvas, stretch_to
from vace_local.core.errors import InputError
from vace_local.core.media import load_image
from vace_local.core.spec import MAX_REFERENCE_IMAGES


def _to_8bit(im):  # noqa: ANN001, ANN202 - PIL.Image in and out
    """16-bit / 32-bit gray images scaled to 8-bit "L": PIL's own convert clips them (mid-gray → white)."""
    from PIL import Image

    if im.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255.0
    elif im.mode != "F" or (a.size and a.max() > 255.0):
        a = a / 257.0  # 0..65535 → 0..255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _rgba(path: Path, field: str) -> np.ndarray:
    """(H, W, 4) float32 0..255, alpha 255 where the image has no transparency."""
    im = _to_8bit(load_image(path, field=field, mode=None))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("LA", "PA"):
        im = im.convert("RGBA")
    if im.mode != "RGBA":
        im = im.convert("RGB").convert("RGBA")
    return np.asarray(im, dtype=np.float32)


def _composite(rgba: np.ndarray, background: float) -> np.ndarray:
    a = rgba[..., 3:4] / 255.0
    return rgba[..., :3] * a + background * (1.0 - a)


def reference_images(paths: list[Path], height: int, width: int) -> list[np.ndarray]:
    """Each image composited onto white (RGBA) and fitted, not cropped, on a white canvas; user order kept."""
    if len(paths) > MAX_REFERENCE_IMAGES:
        raise InputError(
            "reference_images", f"at most {MAX_REFERENCE_IMAGES} reference images are allowed, got {len(paths)}"
        )
    out = []
    for i, p in enumerate(paths):
        rgb = _composite(_rgba(Path(p), f"reference_images[{i}]"), 255.0)
        canvas, _ = fit_on_canvas(rgb, height, width, fill=255.0)
        out.append(np.clip(canvas / 255.0, 0.0, 1.0).astype(np.float32))
    return out


def frame_image(
    path: Path, field: str, height: int, width: int, transparency_mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """A first/last image as a real frame: (frame (H, W, 3) in [0, 1], mask (H, W) 0/1).

    Opaque pixels are kept (mask 0). Transparent pixels follow `transparency_mode`: `content_aware` → gray
    and generated (mask 1); `white` / `black` → composited onto that colour and kept.
    """
    rgba = _rgba(Path(path), field)
    # Resize premultiplied colour: the RGB hidden under transparent pixels must not bleed into the edges
    # (a white subject on a transparent black canvas would get a dark halo).
    a = rgba[..., 3:4] / 255.0
    scaled = cover_crop(np.concatenate([rgba[..., :3] * a, a], axis=-1), height, width)
    alpha = np.clip(scaled[..., 3], 0.0, 1.0)
    premul = np.clip(scaled[..., :3], 0.0, 255.0 * alpha[..., None])
    if transparency_mode == "content_aware":
        transparent = alpha < 0.5
        rgb = premul / np.maximum(alpha, 1e-6)[..., None]
        rgb[transparent] = GRAY_U8
        mask = transparent.astype(np.float32)
    elif transparency_mode in ("white", "black"):
        rgb = premul + (255.0 if transparency_mode == "white" else 0.0) * (1.0 - alpha[..., None])
        mask = np.zeros(alpha.shape, dtype=np.float32)
    else:
        raise InputError("control.transparency_mode", f"unknown transparency mode '{transparency_mode}'")
    return np.clip(rgb / 255.0, 0.0, 1.0).astype(np.float32), mask


def mask_image(
    path: Path, video_w: int, video_h: int, height: int, width: int, field: str = "mask_image"
) -> np.ndarray:
    """A still mask (white = generate) mapped onto the video's frame, then cover-cropped like the video.

    Any non-zero pixel is masked (official plain inpainting, `mask > 0`): soft edges count as masked.
    """
    im = _to_8bit(load_image(path, field=field, mode=None))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        gray = _composite(rgba, 0.0).mean(axis=-1)  # transparent = black = keep
    else:
        gray = np.asarray(im.convert("L"), dtype=np.float32)
    check_mask_shape(field, gray.shape[1], gray.shape[0], video_w, video_h)
    on_video = stretch_to(binarize(gray, threshold=0.0), video_h, video_w)
    return cover_crop_mask(on_video, height, width)


#: Largest factor a mask is stretched by in one direction (its aspect over the video's, or the reverse) to pair
#: it with the video; beyond it (a portrait mask for a landscape video) it was made for another picture.
MAX_MASK_STRETCH = 2.0


def check_mask_shape(field: str, mw: int, mh: int, vw: int, vh: int) -> float:
    """How much pairing stretches the mask onto the video's frame (1.0: same aspect); any size is accepted, and
    an aspect ratio that differs is mapped corner to corner (`stretch_to`), refused only beyond
    `MAX_MASK_STRETCH`."""
    stretch = max((mw / mh) / (vw / vh), (vw / vh) / (mw / mh))
    if stretch > MAX_MASK_STRETCH:
        raise InputError(field, f"mask is {mw}x{mh} but the video is {vw}x{vh}: pairing them would stretch the mask "
                                f"{stretch:.2f}x in one direction (at most {MAX_MASK_STRETCH:g}x); was it made for "
                                "another video?")
    return stretch
