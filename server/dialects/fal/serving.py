"""fal `fal-ai/wan-vace-14b` request schemas (all six endpoints) and their translation into a `JobSpec`.

Pure code: no HTTP, no job store. Field names, defaults and ranges follow the published fal schema
(shared/seeds/001, 002; reference/client-protocols.md §4), so that a fal client's request validates here
exactly as it would at fal. The translation needs facts about the input video (size, fps, frame count) for
`resolution="auto"`, `aspect_ratio="auto"` and the `match_input_*` switches; the route probes the resolved
video and passes them in as a `SourceInfo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.dialects import PROMPT_MAX_CHARS
from vace_local.spec import MAX_FRAMES, MAX_SEED, ControlOptions, JobInputs, JobSpec, OutputOptions, TemporalOptions

FAL_APP_ID = "fal-ai/wan-vace-14b"
#: Sub-paths of the app: "" is the base (task-selectable) endpoint.
FAL_ENDPOINTS = ("", "depth", "pose", "inpainting", "outpainting", "reframe")

FAL_NEGATIVE_PROMPT = (
    "letterboxing, borders, black bars, bright colors, overexposed, static, blurred details, subtitles, "
    "style, artwork, painting, picture, still, overall gray, worst quality, low quality, JPEG compression "
    "residue, ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "malformed limbs, fused fingers, still picture, cluttered background, three legs, many people in the "
    "background, walking backwards"
)

Resolution = Literal["auto", "240p", "360p", "480p", "580p", "720p"]
AspectRatio = Literal["auto", "16:9", "1:1", "9:16"]

#: Short side per tier (multiples of 16; 360p → 352, 580p → 576).
SHORT_SIDE = {"240p": 240, "360p": 352, "480p": 480, "580p": 576, "720p": 720}
#: Landscape 16:9 sizes; 480p is Wan's own 832x480 and 240p its half.
LANDSCAPE = {"240p": (416, 240), "360p": (640, 352), "480p": (832, 480), "580p": (1024, 576), "720p": (1280, 720)}
#: Without an input video, "auto" resolution means Wan's native 480p.
DEFAULT_TIER = "480p"
#: Tasks whose control signal comes from `video_url`.
VIDEO_TASKS = ("depth", "pose", "inpainting", "outpainting", "reframe")
MAX_SIDE = 2048


class FieldError(ValueError):
    """A request field that passed its own schema but cannot be used in combination (named for the 422)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class SourceInfo:
    """What the route learned by probing the resolved input video."""

    num_frames: int
    fps: float
    width: int
    height: int


@dataclass
class Translation:
    """A JobSpec plus the dialect-only facts the routes need (and the notes shown in the status logs)."""

    spec: JobSpec
    sync_mode: bool = False
    notes: list[str] = field(default_factory=list)
    #: Accepted fields that have no local effect (kept for the job record).
    ignored: dict[str, Any] = field(default_factory=dict)


class _Common(BaseModel):
    """Fields shared by all six endpoints."""

    #: Unknown fields are ignored as at fal; NaN / Infinity are refused as "not a finite number".
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(..., max_length=PROMPT_MAX_CHARS)
    negative_prompt: str = Field(FAL_NEGATIVE_PROMPT, max_length=PROMPT_MAX_CHARS)
    match_input_num_frames: bool = False
    num_frames: int = Field(81, ge=17, le=241)
    match_input_frames_per_second: bool = False
    frames_per_second: int = Field(16, ge=5, le=30)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    resolution: Resolution = "auto"
    aspect_ratio: AspectRatio = "auto"
    num_inference_steps: int = Field(30, ge=2, le=50)
    guidance_scale: float = Field(5.0, ge=1.0, le=10.0)
    sampler: Literal["unipc", "dpm++", "euler"] = "unipc"
    shift: float = Field(5.0, ge=1.0, le=15.0)
    video_url: str | None = None
    first_frame_url: str | None = None
    last_frame_url: str | None = None
    enable_safety_checker: bool = False
    enable_prompt_expansion: bool = False
    acceleration: Literal["none", "low", "regular"] = "regular"
    video_quality: Literal["low", "medium", "high", "maximum"] = "high"
    video_write_mode: Literal["fast", "balanced", "small"] = "balanced"
    num_interpolated_frames: int = Field(0, ge=0, le=5)
    temporal_downsample_factor: int = Field(0, ge=0, le=5)
    enable_auto_downsample: bool = False
    auto_downsample_min_fps: float = Field(15.0, ge=1.0, le=60.0)
    interpolator_model: Literal["rife", "film"] = "film"
    sync_mode: bool = False
    transparency_mode: Literal["content_aware", "white", "black"] = "content_aware"
    return_frames_zip: bool = False


class _WithRefs(_Common):
    ref_image_urls: list[str] | None = None


class FalBaseRequest(_WithRefs):
    """`fal-ai/wan-vace-14b`: every source at once, task-selectable (mask image wins over mask video)."""

    task: Literal["depth", "pose", "inpainting", "outpainting", "reframe"] = "depth"
    mask_video_url: str | None = None
    mask_image_url: str | None = None
    preprocess: bool = False


class FalPoseRequest(_WithRefs):
    video_url: str
    preprocess: bool = False


class FalDepthRequest(FalPoseRequest):
    pass


class FalInpaintingRequest(_WithRefs):
    video_url: str
    mask_video_url: str | None = None
    mask_image_url: str | None = None
    preprocess: bool = False


class FalOutpaintingRequest(_WithRefs):
    video_url: str
    expand_left: bool = False
    expand_right: bool = False
    expand_top: bool = False
    expand_bottom: bool = False
    expand_ratio: float = Field(0.25, ge=0.0, le=1.0)


class FalReframeRequest(_Common):
    prompt: str = Field("", max_length=PROMPT_MAX_CHARS)
    video_url: str
    match_input_num_frames: bool = True
    match_input_frames_per_second: bool = True
    zoom_factor: float = Field(0.0, ge=0.0, le=0.9)
    trim_borders: bool = True
    #: Older reframe schema name for num_interpolated_frames.
    temporal_upsample_factor: int | None = Field(None, ge=0, le=5)


FAL_SCHEMAS: dict[str, type[_Common]] = {
    "": FalBaseRequest,
    "depth": FalDepthRequest,
    "pose": FalPoseRequest,
    "inpainting": FalInpaintingRequest,
    "outpainting": FalOutpaintingRequest,
    "reframe": FalReframeRequest,
}


# --- geometry and timing (shared with the AI/ML dialect, whose fields mirror fal's) -------------------------

def _round16(x: float) -> int:
    return max(16, int(math.floor(x / 16.0 + 0.5)) * 16)


def auto_tier(source: SourceInfo | None) -> str:
    """Largest tier whose short side the input reaches (240p at least, 720p at most)."""
    if source is None:
        return DEFAULT_TIER
    short = min(source.width, source.height)
    best = "240p"
    for tier, side in SHORT_SIDE.items():
        if short >= side:
            best = tier
    return best


def output_size(
    resolution: str, aspect_ratio: str, source: SourceInfo | None, canvas_aspect: float | None = None
) -> tuple[int, int]:
    """(width, height), multiples of 16. `canvas_aspect` (w/h) overrides the source's for "auto" aspect
    (outpainting grows the canvas, so its output follows the expanded shape)."""
    tier = auto_tier(source) if resolution == "auto" else resolution
    if aspect_ratio == "16:9":
        return LANDSCAPE[tier]
    if aspect_ratio == "9:16":
        w, h = LANDSCAPE[tier]
        return h, w
    short = SHORT_SIDE[tier]
    if aspect_ratio == "1:1":
        return short, short
    aspect = canvas_aspect or (source.width / source.height if source else LANDSCAPE[tier][0] / short)
    if abs(aspect - 16 / 9) < 0.02:
        return LANDSCAPE[tier]
    if abs(aspect - 9 / 16) < 0.01:
        w, h = LANDSCAPE[tier]
        return h, w
    if aspect >= 1:
        return min(_round16(short * aspect), MAX_SIDE), short
    return short, min(_round16(short / aspect), MAX_SIDE)


def frames_4k1(n: int) -> int:
    """Smallest 4k+1 ≥ n, within the model's 17..241 range (the VAE needs 4k+1 frames)."""
    n = max(17, min(n, MAX_FRAMES))
    return n if n % 4 == 1 else min((n - 1) // 4 * 4 + 5, MAX_FRAMES)


def timing(
    num_frames: int, fps: int, match_frames: bool, match_fps: bool, source: SourceInfo | None, notes: list[str]
) -> tuple[int, int, int | None]:
    """(num_frames, fps, output_num_frames) after the match_input_* switches; frame counts are rounded up to
    4k+1, and output_num_frames is the matched count to trim the output back to (None when nothing to trim)."""
    out_fps = fps
    if match_fps and source is not None and source.fps > 0:
        out_fps = max(1, min(60, int(round(source.fps))))
        notes.append(f"frames_per_second matched to the input: {out_fps}")
    n = num_frames
    if match_frames and source is not None:
        # The input's duration at the output rate (the control video is resampled to that rate).
        n = max(1, int(math.floor(source.num_frames * out_fps / source.fps + 1e-6))) if source.fps else n
        notes.append(f"num_frames matched to the input: {n} frames at {out_fps} fps")
        if n > MAX_FRAMES:
            notes.append(f"input is longer than {MAX_FRAMES} frames; output capped at {MAX_FRAMES}")
    n4 = frames_4k1(n)
    if n4 != n:
        notes.append(f"num_frames {n} rounded to {n4} (the model needs 4k+1 frames)")
    trim = n if match_frames and source is not None and n < n4 else None
    if trim:
        notes.append(f"output trimmed back to the input's {n} frames")
    return n4, out_fps, trim


def temporal_options(req: Any, notes: list[str]) -> TemporalOptions:
    """fal's downsample/interpolation extras. 'film' is served by the built-in optical-flow interpolator, and so
    is 'rife' when no RIFE weights are installed: both are valid fal values, so a fal client never fails on them."""
    from vace_local.interpolate import rife_model_path

    k = req.num_interpolated_frames
    if getattr(req, "temporal_upsample_factor", None) is not None and not k:
        k = req.temporal_upsample_factor
    used = bool(k or req.temporal_downsample_factor or req.enable_auto_downsample)
    interp = "flow"
    if req.interpolator_model == "rife":
        if rife_model_path().is_file():
            interp = "rife"
        elif used:
            notes.append(f"interpolator_model 'rife': no RIFE weights at {rife_model_path()} (VACE_RIFE_ONNX), "
                         "served by the built-in optical-flow interpolator")
    if req.interpolator_model == "film" and used:
        notes.append("interpolator_model 'film' is served by the built-in optical-flow interpolator")
    return TemporalOptions(
        num_interpolated_frames=k,
        temporal_downsample_factor=req.temporal_downsample_factor,
        enable_auto_downsample=req.enable_auto_downsample,
        auto_downsample_min_fps=req.auto_downsample_min_fps,
        interpolator=interp,
    )


def outpaint_aspect(source: SourceInfo | None, left: bool, right: bool, top: bool, bottom: bool,
                    ratio: float) -> float | None:
    """Aspect (w/h) of the expanded canvas, matching the annotator's int(ratio·side) per expanded side."""
    if source is None:
        return None
    w = source.width + int(ratio * source.width) * (int(left) + int(right))
    h = source.height + int(ratio * source.height) * (int(top) + int(bottom))
    return w / h


# --- fal → JobSpec -----------------------------------------------------------------------------------------

def fal_task(endpoint: str, req: _Common) -> str:
    """The JobSpec task of a request; the base endpoint without a video is text/reference-to-video."""
    if endpoint:
        return endpoint
    assert isinstance(req, FalBaseRequest)
    if not req.video_url:
        return "none"
    if "task" not in req.model_fields_set and (req.mask_video_url or req.mask_image_url):
        return "inpainting"
    return req.task


def fal_to_jobspec(endpoint: str, req: _Common, *, model: str, source: SourceInfo | None = None) -> Translation:
    """Translate a validated fal request of `endpoint` ("" = base) into a JobSpec for `model`.

    Raises pydantic.ValidationError (field-named) when the combination is invalid for the JobSpec.
    """
    notes: list[str] = []
    task = fal_task(endpoint, req)
    num_frames, fps, trim = timing(req.num_frames, req.frames_per_second, req.match_input_num_frames,
                                   req.match_input_frames_per_second, source, notes)

    canvas_aspect = None
    # With a probed source the switches are applied here (the counts above, logged at submit); the run path
    # re-applies them only when the route could not probe, so server-side caps on num_frames still hold.
    control: dict[str, Any] = {
        "transparency_mode": req.transparency_mode,
        "match_input_num_frames": req.match_input_num_frames and source is None,
        "match_input_frames_per_second": req.match_input_frames_per_second and source is None,
        "output_num_frames": trim,
    }
    if task in ("depth", "pose") and hasattr(req, "preprocess"):
        control["preprocess"] = req.preprocess
    if isinstance(req, FalOutpaintingRequest):
        control.update(expand_left=req.expand_left, expand_right=req.expand_right, expand_top=req.expand_top,
                       expand_bottom=req.expand_bottom, expand_ratio=req.expand_ratio)
        canvas_aspect = outpaint_aspect(source, req.expand_left, req.expand_right, req.expand_top,
                                        req.expand_bottom, req.expand_ratio)
    if isinstance(req, FalReframeRequest):
        control.update(zoom_factor=req.zoom_factor, trim_borders=req.trim_borders)
    width, height = output_size(req.resolution, req.aspect_ratio, source, canvas_aspect)

    mask_video = getattr(req, "mask_video_url", None)
    mask_image = getattr(req, "mask_image_url", None)
    if mask_video and mask_image:
        # Precedence as each endpoint documents it: the base endpoint prefers the mask image,
        # the inpainting endpoint the mask video.
        if endpoint == "":
            notes.append("mask_video_url ignored: mask_image_url is given")
            mask_video = None
        else:
            notes.append("mask_image_url ignored: mask_video_url is given")
            mask_image = None
    if task in VIDEO_TASKS and not req.video_url:
        raise FieldError("video_url", f"required (a non-empty URL) for the {task} task")
    if (mask_video or mask_image) and not req.video_url:
        raise FieldError("mask_image_url" if mask_image else "mask_video_url",
                         "a mask needs video_url (the video it applies to)")
    if task == "inpainting" and not (mask_video or mask_image):
        raise FieldError("mask_video_url", "inpainting needs mask_video_url or mask_image_url")
    inputs = JobInputs(
        video=req.video_url,
        mask_video=mask_video if task == "inpainting" or endpoint == "" else None,
        mask_image=mask_image if task == "inpainting" or endpoint == "" else None,
        reference_images=list(getattr(req, "ref_image_urls", None) or []),
        first_image=req.first_frame_url,
        last_image=req.last_frame_url,
    )
    spec = JobSpec(
        model=model,
        task=task,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or None,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        flow_shift=req.shift,
        sampler=req.sampler,
        acceleration=req.acceleration,
        seed=-1 if req.seed is None else req.seed,
        inputs=inputs,
        control=ControlOptions(**control),
        temporal=temporal_options(req, notes),
        output=OutputOptions(video_quality=req.video_quality, video_write_mode=req.video_write_mode,
                             frames_zip=req.return_frames_zip),
        enable_safety_checker=req.enable_safety_checker,
        enable_prompt_expansion=req.enable_prompt_expansion,
    )
    return Translation(spec=spec, sync_mode=req.sync_mode, notes=notes)


def parse_fal_request(endpoint: str, body: Any) -> _Common:
    """Validate a request body against the endpoint's schema (raises pydantic.ValidationError)."""
    if endpoint not in FAL_SCHEMAS:
        raise KeyError(endpoint)
    return FAL_SCHEMAS[endpoint].model_validate(body)
