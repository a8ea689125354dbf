"""Temporal downsampling plan and frame interpolation (fal's downsample / interpolation extras).

Generating costs roughly linearly in frames, so a job may generate every s-th frame (s = d + 1 for a
`temporal_downsample_factor` d) and interpolate the rest back; `num_interpolated_frames` k then adds k
frames between every output pair (the fps scales by k + 1 so the duration stays). Interpolators:

- `flow` (built-in default): OpenCV DIS optical flow both ways, intermediate flows by the Super-SloMo
  linear combination, backward warping of both neighbours and an occlusion-aware blend (pixels whose
  forward/backward flows disagree are trusted less). No weights needed.
- `rife`: a RIFE network exported to ONNX, run with onnxruntime, when its weights file is present
  (`VACE_RIFE_ONNX`, default `~/.cache/vace-local/rife.onnx`); otherwise a clear error.
- `film` is not bundled; it is served by `flow`.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vace_local.core.config import vace_settings
from vace_local.core.errors import InputError
from vace_local.core.spec import round_frames_4k1

if TYPE_CHECKING:
    from vace_local.core.bundle import ControlBundle
    from vace_local.core.spec import JobSpec

#: Smallest clip worth generating (the VAE needs 4k+1 frames; 5 is the shortest with motion).
MIN_GENERATED_FRAMES = 5

#: (frame a, frame b, times in (0, 1)) → one frame per time.
PairInterpolator = Callable[[np.ndarray, np.ndarray, Sequence[float]], list[np.ndarray]]


@dataclass(frozen=True)
class TemporalPlan:
    """How many frames to preprocess, generate and finally write for one job."""

    #: Output frames per generated frame interval (d + 1); 1 = no downsampling.
    stride: int
    #: Frames the control bundle is built for at the job fps: (gen_frames - 1) * stride + 1 ≥ num_frames.
    bundle_frames: int
    #: Frames the model generates (4k+1).
    gen_frames: int
    #: Frames of the job before `num_interpolated_frames` (the requested count).
    num_frames: int
    #: Extra frames between each pair of job frames (num_interpolated_frames).
    extra: int
    fps: float

    @property
    def active(self) -> bool:
        return self.stride > 1 or self.extra > 0

    @property
    def output_frames(self) -> int:
        return (self.num_frames - 1) * (self.extra + 1) + 1

    @property
    def output_fps(self) -> float:
        return self.fps * (self.extra + 1)

    def bundle_spec(self, spec: JobSpec) -> JobSpec:
        """The spec the preprocessors build the full-rate control bundle for."""
        return spec.model_copy(update={"num_frames": self.bundle_frames}) if self.stride > 1 else spec

    def generation_spec(self, spec: JobSpec) -> JobSpec:
        """The spec the engine generates: fewer frames at the lower rate (validated limits do not apply)."""
        if self.stride == 1:
            return spec
        return spec.model_copy(update={"num_frames": self.gen_frames, "fps": spec.fps / self.stride})

    def subsample(self, bundle: ControlBundle) -> ControlBundle:
        """Keep every stride-th frame and mask of a bundle built for `bundle_frames`."""
        if self.stride == 1:
            return bundle
        from vace_local.core.bundle import ControlBundle

        info = dict(bundle.info, temporal_stride=self.stride, generated_frames=self.gen_frames)
        return ControlBundle(
            frames=np.ascontiguousarray(bundle.frames[:: self.stride]),
            masks=np.ascontiguousarray(bundle.masks[:: self.stride]),
            reference_images=bundle.reference_images,
            info=info,
        )

    def restore(self, frames: np.ndarray, interpolator: str = "flow") -> np.ndarray:
        """Interpolate generated frames back to the job rate, trim to the job length, add the extra frames."""
        if not self.active:
            return frames
        factor = self.stride * (self.extra + 1)
        out = interpolate_clip(frames, factor, interpolator)
        return out[: self.output_frames]


def auto_downsample_factor(fps: float, min_fps: float) -> int:
    """Largest d keeping the generated rate fps/(d+1) at or above `min_fps` (0..5)."""
    return max(0, min(5, int(math.floor(fps / min_fps + 1e-9)) - 1))


def plan_temporal(num_frames: int, fps: float, *, downsample: int = 0, auto: bool = False,
                  auto_min_fps: float = 15.0, extra: int = 0, exact: bool = False) -> TemporalPlan:
    """The plan for a job of `num_frames` at `fps`.

    An explicit `downsample` wins; otherwise `auto` picks the largest factor keeping ≥ `auto_min_fps`. A
    factor that would not reduce the generated frame count is lowered until it does (or to 0), and one that
    generates no fewer frames than a smaller factor is lowered to that one. `exact` (a last image must land
    on the job's last frame) accepts only strides whose generated frames end exactly on it, so nothing the
    user placed at the end is trimmed away.
    """
    d = downsample if downsample > 0 else (auto_downsample_factor(fps, auto_min_fps) if auto else 0)

    def gen_for(stride: int) -> int:
        return max(MIN_GENERATED_FRAMES, round_frames_4k1(math.ceil((num_frames - 1) / stride) + 1, lo=None, hi=None))

    stride = d + 1
    while stride > 1:
        gen = gen_for(stride)
        if gen < num_frames and (not exact or (gen - 1) * stride + 1 == num_frames):
            # 4k+1 rounding can make a smaller stride generate just as few frames: less to interpolate.
            while not exact and stride > 2 and gen_for(stride - 1) == gen:
                stride -= 1
            return TemporalPlan(stride=stride, bundle_frames=(gen - 1) * stride + 1, gen_frames=gen,
                                num_frames=num_frames, extra=extra, fps=fps)
        stride -= 1
    return TemporalPlan(stride=1, bundle_frames=num_frames, gen_frames=num_frames, num_frames=num_frames,
                        extra=extra, fps=fps)


def plan_for_spec(spec: JobSpec) -> TemporalPlan:
    t = spec.temporal
    return plan_temporal(spec.num_frames, spec.fps, downsample=t.temporal_downsample_factor,
                         auto=t.enable_auto_downsample, auto_min_fps=t.auto_downsample_min_fps,
                         extra=t.num_interpolated_frames, exact=bool(spec.inputs.last_image))


# --- interpolators ---------------------------------------------------------------------------------------

def crossfade_pair(a: np.ndarray, b: np.ndarray, ts: Sequence[float]) -> list[np.ndarray]:
    """Linear blend: the baseline every motion-aware interpolator must beat."""
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    return [np.clip((1 - t) * fa + t * fb + 0.5, 0, 255).astype(np.uint8) for t in ts]


def _gray(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def _flows(a: np.ndarray, b: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    ga, gb = _gray(a), _gray(b)
    if method == "farneback":
        def calc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return cv2.calcOpticalFlowFarneback(x, y, None, 0.5, 5, 21, 5, 7, 1.5, 0)
    else:
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        dis.setUseSpatialPropagation(True)

        def calc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return dis.calc(x, y, None)
    return calc(ga, gb), calc(gb, ga)


def _warp(img: np.ndarray, flow: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Backward warp: out(x) = img(x + flow(x)), bilinear, border replicated."""
    import cv2

    m = grid + flow
    return cv2.remap(img, m[..., 0], m[..., 1], interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def flow_pair(a: np.ndarray, b: np.ndarray, ts: Sequence[float], method: str = "dis") -> list[np.ndarray]:
    """Bidirectional optical-flow interpolation of frames between `a` (t=0) and `b` (t=1)."""
    h, w = a.shape[:2]
    f01, f10 = _flows(a, b, method)
    grid = np.dstack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)))
    # Forward/backward consistency: where following a flow and coming back misses, the pixel is occluded.
    err0 = np.linalg.norm(f01 + _warp(f10, f01, grid), axis=-1)
    err1 = np.linalg.norm(f10 + _warp(f01, f10, grid), axis=-1)
    scale = 1.0 + 0.01 * max(h, w)
    vis0 = np.exp(-(err0 / scale) ** 2).astype(np.float32)
    vis1 = np.exp(-(err1 / scale) ** 2).astype(np.float32)
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    out = []
    for t in ts:
        ft0 = -(1 - t) * t * f01 + t * t * f10
        ft1 = (1 - t) * (1 - t) * f01 - t * (1 - t) * f10
        i0, i1 = _warp(fa, ft0, grid), _warp(fb, ft1, grid)
        w0 = (1 - t) * (_warp(vis0, ft0, grid) + 1e-3)
        w1 = t * (_warp(vis1, ft1, grid) + 1e-3)
        mix = (w0[..., None] * i0 + w1[..., None] * i1) / (w0 + w1)[..., None]
        out.append(np.clip(mix + 0.5, 0, 255).astype(np.uint8))
    return out


def rife_model_path() -> Path:
    """`VACE_RIFE_ONNX` (default ~/.cache/vace-local/rife.onnx)."""
    return vace_settings().rife_path


class RifeOnnx:
    """A RIFE network exported to ONNX. Accepted signatures: (img0, img1, timestep) with NCHW float inputs
    in [0, 1] (timestep as (1,1,H,W), (1,1,1,1), (1,) or a scalar), or one 6/7-channel input
    (img0 ‖ img1 [‖ timestep plane]). Sizes are padded to a multiple of 32 as RIFE requires."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise InputError(
                "interpolator_model",
                f"RIFE weights not found at {path} (set VACE_RIFE_ONNX to a RIFE .onnx file, or use the built-in "
                "optical-flow interpolator: interpolator 'flow' / fal's 'film')",
            )
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
        self.inputs = self.session.get_inputs()
        if len(self.inputs) not in (1, 3):
            raise InputError("interpolator_model", f"unsupported RIFE ONNX signature: {len(self.inputs)} inputs")

    def __call__(self, a: np.ndarray, b: np.ndarray, ts: Sequence[float]) -> list[np.ndarray]:
        h, w = a.shape[:2]
        ph, pw = (-h) % 32, (-w) % 32

        def prep(img: np.ndarray) -> np.ndarray:
            x = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge").astype(np.float32) / 255.0
            return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

        x0, x1 = prep(a), prep(b)
        out = []
        for t in ts:
            if len(self.inputs) == 3:
                rank = len(self.inputs[2].shape)
                tt = {0: np.array(t, np.float32), 1: np.array([t], np.float32)}.get(rank)
                if tt is None:
                    dims = self.inputs[2].shape
                    full = not isinstance(dims[2], int) or dims[2] != 1
                    tt = np.full((1, 1, x0.shape[2], x0.shape[3]) if full else (1, 1, 1, 1), t, np.float32)
                feed = {self.inputs[0].name: x0, self.inputs[1].name: x1, self.inputs[2].name: tt}
            else:
                parts = [x0, x1]
                if self.inputs[0].shape[1] == 7:
                    parts.append(np.full((1, 1, x0.shape[2], x0.shape[3]), t, np.float32))
                feed = {self.inputs[0].name: np.concatenate(parts, axis=1)}
            y = self.session.run(None, feed)[0][0, :3, :h, :w].transpose(1, 2, 0)
            out.append(np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return out


def get_interpolator(name: str) -> PairInterpolator:
    """'flow' (or 'film', served by it), 'farneback', 'crossfade' or 'rife' (needs its ONNX weights)."""
    if name in ("flow", "film", "dis"):
        return flow_pair
    if name == "farneback":
        return lambda a, b, ts: flow_pair(a, b, ts, method="farneback")
    if name == "crossfade":
        return crossfade_pair
    if name == "rife":
        return RifeOnnx(rife_model_path())
    raise InputError("interpolator", f"unknown interpolator '{name}' (flow, film, farneback, crossfade, rife)")


def interpolate_clip(frames: np.ndarray, factor: int, interpolator: str | PairInterpolator = "flow") -> np.ndarray:
    """Insert factor-1 frames between each pair: (F, H, W, 3) uint8 → ((F-1)·factor + 1, H, W, 3)."""
    frames = np.asarray(frames)
    if factor <= 1 or len(frames) < 2:
        return frames
    fn = get_interpolator(interpolator) if isinstance(interpolator, str) else interpolator
    ts = [i / factor for i in range(1, factor)]
    out = [frames[0]]
    for a, b in zip(frames[:-1], frames[1:], strict=True):
        out.extend(fn(a, b, ts))
        out.append(b)
    return np.stack(out)


def write_frames_zip(frames: np.ndarray, path: Path) -> Path:
    """Every frame as a PNG (frame_00000.png ...) in one zip (fal's return_frames_zip)."""
    import cv2

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, frame in enumerate(frames):
            ok, buf = cv2.imencode(".png", np.ascontiguousarray(frame[..., ::-1]))
            if not ok:
                raise RuntimeError(f"PNG encoding failed for frame {i}")
            zf.writestr(f"frame_{i:05d}.png", buf.tobytes())
    return path
