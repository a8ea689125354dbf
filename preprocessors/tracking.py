"""Propagate a first-frame mask through a clip: `sam2` (official), `flow` (OpenCV DIS optical flow) or `static`.

`auto` (the default) follows official VACE: SAM2.1 Hiera-L seeded with the user's mask when the sam2 package
and `sam2/sam2.1_hiera_large.pt` are present; otherwise the flow tracker, which needs no weights. The choice and
its reason are returned so the job's metadata can say which tracker ran and why.

Flow tracker: per frame, dense flow prev → cur is computed at a reduced working size. Flow at an object's
edge is unreliable (patch-based flow smears the background's motion into it, which makes a naive warp leave a
trail behind a moving subject), so the subject's motion is taken from the mask's eroded interior and
extrapolated to the edge and beyond by normalised convolution. The per-frame backward maps are composed
into one map back to frame 0, and the first mask is resampled through it: edges stay crisp and no blur
accumulates over a long clip.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from preprocessors import weights
from vace_local.core.errors import InputError
from vace_local.core.events import checkpoint

if TYPE_CHECKING:
    from vace_local.core.media import VideoInfo

log = logging.getLogger(__name__)

FLOW_SIZE = 416  # working long side: masks need region accuracy, and this keeps the tracker real-time on CPU
ERODE = 12  # interior depth (working px): beyond the flow's patch footprint at the edge


def _work_size(h: int, w: int) -> tuple[int, int]:
    s = min(1.0, FLOW_SIZE / max(h, w))
    return max(8, round(h * s)), max(8, round(w * s))


class FlowTracker:
    """Incremental tracker: feed frames one by one (the benchmark and the CLI stream frames)."""

    def __init__(self, first_frame: np.ndarray, first_mask: np.ndarray) -> None:
        self.h, self.w = first_mask.shape
        self.wh, self.ww = _work_size(self.h, self.w)
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        self.dis.setFinestScale(1)
        self.prev = self._gray(first_frame)
        self.m0 = cv2.resize(first_mask.astype(np.float32), (self.ww, self.wh), interpolation=cv2.INTER_AREA)
        gx, gy = np.meshgrid(np.arange(self.ww, dtype=np.float32), np.arange(self.wh, dtype=np.float32))
        self.grid = np.stack([gx, gy], axis=-1)
        self.phi = self.grid.copy()  # current frame pixel → frame-0 coordinates
        self.cur_mask = (self.m0 >= 0.5).astype(np.float32)

    def _gray(self, frame: np.ndarray) -> np.ndarray:
        g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        return cv2.resize(g, (self.ww, self.wh), interpolation=cv2.INTER_AREA)

    def _object_flow(self, flow: np.ndarray) -> np.ndarray:
        """Flow inside the eroded mask, extrapolated outward (normalised convolution)."""
        if self.cur_mask.sum() < 1:
            return np.zeros_like(flow)
        dist = cv2.distanceTransform(self.cur_mask.astype(np.uint8), cv2.DIST_L2, 3)
        inner = (dist >= min(float(ERODE), 0.6 * float(dist.max()))).astype(np.float32)
        sigma = max(3.0, 0.25 * float(np.sqrt(inner.sum())))
        # the extrapolated field is smooth: blur on a 4x smaller grid (a wide kernel at full size is the cost)
        small = (max(2, self.ww // 4), max(2, self.wh // 4))
        den = cv2.GaussianBlur(cv2.resize(inner, small, interpolation=cv2.INTER_AREA), (0, 0), sigma / 4)
        num = cv2.GaussianBlur(cv2.resize(flow * inner[..., None], small, interpolation=cv2.INTER_AREA), (0, 0),
                               sigma / 4)
        den = cv2.resize(den, (self.ww, self.wh), interpolation=cv2.INTER_LINEAR)
        num = cv2.resize(num, (self.ww, self.wh), interpolation=cv2.INTER_LINEAR)
        med = np.median(flow[inner > 0.5], axis=0) if (inner > 0.5).any() else np.zeros(2, np.float32)
        ext = np.where(den[..., None] > 1e-3, num / np.maximum(den, 1e-6)[..., None], med)
        return (inner[..., None] * flow + (1.0 - inner[..., None]) * ext).astype(np.float32)

    def step(self, frame: np.ndarray) -> np.ndarray:
        """Mask (H, W) float32 0/1 for the next frame."""
        cur = self._gray(frame)
        fwd = self._object_flow(self.dis.calc(self.prev, cur, None))
        # backward map cur → prev: x - f(x - f(x)) (one fixed-point step on the forward field)
        guess = self.grid - fwd
        back = self.grid - cv2.remap(fwd, guess[..., 0], guess[..., 1], cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REPLICATE)
        self.phi = cv2.remap(self.phi, back[..., 0], back[..., 1], cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        soft = cv2.remap(self.m0, self.phi[..., 0], self.phi[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        self.cur_mask = (soft >= 0.5).astype(np.float32)
        self.prev = cur
        full = cv2.resize(soft, (self.w, self.h), interpolation=cv2.INTER_LINEAR)
        return (full >= 0.5).astype(np.float32)


def track_flow(frames: np.ndarray, first_mask: np.ndarray) -> np.ndarray:
    out = np.empty(frames.shape[:3], np.float32)
    out[0] = (first_mask >= 0.5).astype(np.float32)
    tracker = FlowTracker(frames[0], first_mask)
    for i in range(1, len(frames)):
        checkpoint()
        out[i] = tracker.step(frames[i])
    return out


def choose_tracker(requested: str, annotators_dir: Path | None = None) -> tuple[str, str]:
    """(tracker that runs, why): `auto` is SAM2 when the package and the local SAM2.1 checkpoint exist, else flow.

    `auto` never downloads: a missing checkpoint falls back to flow (and says so) instead of fetching 900 MB.
    """
    tracker, reason = _choose(requested, annotators_dir)
    log.info("mask tracker %s (%s)", tracker, reason)
    return tracker, reason


def _choose(requested: str, annotators_dir: Path | None) -> tuple[str, str]:
    if requested != "auto":
        return requested, f"mask_tracker '{requested}' requested"
    if importlib.util.find_spec("sam2") is None:
        return "flow", "auto: the sam2 package is not installed (pip install 'vace-local[sam2]')"
    ckpt = weights.annotators_dir(annotators_dir) / weights.FILES["sam2"]
    if not ckpt.is_file():
        return "flow", f"auto: {ckpt.name} not found in {ckpt.parent}"
    from preprocessors.sam2_track import sidecar

    kind = "a non-default SAM2 config from its sidecar" if sidecar(ckpt).is_file() else "official SAM2.1 Hiera-L"
    return "sam2", f"auto: sam2 package and {ckpt.name} found in {ckpt.parent} ({kind})"


def track_sam2_on_source(video: VideoInfo, idx: list[int], mask_path: Path, height: int, width: int,
                         annotators_dir: Path | None = None) -> np.ndarray:
    """Official order: SAM2 on the uncropped source frames, seeded with the mask at the source size; each mask is
    then cover-cropped like the video. (F, height, width) float32 0/1."""
    from preprocessors.geometry import cover_crop_mask
    from preprocessors.images import mask_image
    from preprocessors.sam2_track import track_sam2
    from vace_local.core.media import open_video, read_frames

    vinfo, reader = open_video(video.path, video.field)
    first = mask_image(mask_path, vinfo.width, vinfo.height, vinfo.height, vinfo.width)
    masks = track_sam2(read_frames(vinfo, reader, idx), first, annotators_dir)
    return np.stack([cover_crop_mask(m, height, width) for m in masks])


def track_mask(frames: np.ndarray, first_mask: np.ndarray, backend: str = "auto",
               annotators_dir: Path | None = None) -> np.ndarray:
    """One binary mask (F, H, W) per frame from the first-frame mask."""
    if backend == "auto":
        backend = choose_tracker(backend, annotators_dir)[0]
    if backend == "flow":
        return track_flow(frames, first_mask)
    if backend == "sam2":
        from preprocessors.sam2_track import track_sam2

        return track_sam2(frames, first_mask, annotators_dir)
    if backend == "static":
        return np.repeat((first_mask >= 0.5).astype(np.float32)[None], len(frames), axis=0)
    raise InputError("control.mask_tracker", f"unknown mask tracker '{backend}' (auto, flow, sam2 or static)")
