"""OpenAI videos API (`client.videos`) request schema and its translation into a `JobSpec`.

Pure code: no HTTP, no job store, no media decoding. Field names and defaults follow the `openai` SDK's
`VideoCreateParams` (`prompt`, `model` = sora-2, `seconds` = "4", `size` = "720x1280", `input_reference`);
the VACE controls are extra body fields (the SDK's `extra_body`), validated like the other dialects. The SDK
always sends `multipart/form-data`, so every value may arrive as a string: numbers and booleans are parsed
from their text (`"30"`, `"true"`), which is why this model is not strict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.core import ApiError, validation_error
from server.dialects import PROMPT_MAX_CHARS
from server.dialects.fal.serving import frames_4k1
from vace_local.spec import (
    MAX_FRAMES,
    MAX_REFERENCE_IMAGES,
    MAX_SEED,
    MIN_FRAMES,
    Acceleration,
    ControlOptions,
    JobInputs,
    JobSpec,
    Sampler,
    Task,
)

FPS = 16
DEFAULT_MODEL = "sora-2"
DEFAULT_SECONDS = "4"
DEFAULT_SIZE = "720x1280"
#: OpenAI's model names (and their dated snapshots): all answered by the served VACE model.
OPENAI_MODEL_RE = re.compile(r"^sora-2(-pro)?(-\d{4}-\d{2}-\d{2})?$")
MIN_SECONDS, MAX_SECONDS = (MIN_FRAMES - 1) / FPS, (MAX_FRAMES - 1) / FPS
MAX_SIDE = 2048
SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
#: Tasks that read a control video.
VIDEO_TASKS = ("depth", "depthv2", "pose", "face", "inpainting", "outpainting", "reframe")
#: JobSpec / JobInputs names → this dialect's (errors name the user's field).
FIELD_NAMES = {"width": "size", "height": "size", "num_frames": "seconds"}
#: Media extras (URLs, data URIs or files uploaded here); only `input_reference` may be a file part.
MEDIA_FIELDS = ("video", "mask_video", "mask_image", "first_image", "last_image", "reference_images")


class InputReferenceObject(BaseModel):
    """The JSON form of `input_reference` (`ImageInputReferenceParam`)."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = None
    file_id: str | None = None


class VideoCreateRequest(BaseModel):
    """Body of `POST /v1/videos`: OpenAI's fields plus the VACE extras (all optional)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS)
    model: str = Field(DEFAULT_MODEL, min_length=1, max_length=255)
    seconds: str = DEFAULT_SECONDS
    size: str = DEFAULT_SIZE
    #: A URL / data URI, or `{"image_url": …}`; a file part is handled by the route before validation.
    input_reference: InputReferenceObject | str | None = None
    # ---- VACE extras (the SDK's extra_body) ----
    task: Task | None = None
    negative_prompt: str | None = Field(None, max_length=PROMPT_MAX_CHARS)
    video: str | None = None
    mask_video: str | None = None
    mask_image: str | None = None
    first_image: str | None = None
    last_image: str | None = None
    reference_images: list[str] = Field(default_factory=list, max_length=MAX_REFERENCE_IMAGES)
    num_inference_steps: int | None = Field(None, ge=1, le=100,
                                            validation_alias=AliasChoices("num_inference_steps", "steps"))
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0)
    flow_shift: float | None = Field(None, gt=0.0, le=30.0)
    context_scale: float | None = Field(None, ge=0.0, le=2.0)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    sampler: Sampler | None = None
    acceleration: Acceleration | None = None
    #: False: `video` already is the control signal (a depth / pose video), used as is.
    preprocess: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty or only whitespace")
        return v

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        """A number of seconds (text or number) within what the model can generate at 16 fps."""
        if isinstance(v, bool):
            raise ValueError("must be a number of seconds such as \"4\"")
        if isinstance(v, int | float):
            v = f"{v:g}"
        if not isinstance(v, str):
            return v
        try:
            s = float(v.strip())
        except ValueError:
            raise ValueError("must be a number of seconds such as \"4\"") from None
        if not MIN_SECONDS <= s <= MAX_SECONDS:
            raise ValueError(f"must be within {MIN_SECONDS:g}..{MAX_SECONDS:g} seconds at {FPS} fps "
                             f"({MIN_FRAMES}..{MAX_FRAMES} frames)")
        return f"{s:g}"

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v.strip()

    @field_validator("video", "mask_video", "mask_image", "first_image", "last_image", "negative_prompt",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("reference_images", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        """A single form field arrives as one string; empty entries are dropped."""
        if isinstance(v, str):
            v = [v]
        return [x for x in v if not (isinstance(x, str) and not x.strip())] if isinstance(v, list) else v


def parse_size(v: str) -> tuple[int, int]:
    """`"WxH"` → (width, height); both multiples of 16 within 16..2048 (what the engine accepts)."""
    m = SIZE_RE.match(v.strip())
    if not m:
        raise ValueError("must be WIDTHxHEIGHT in pixels, e.g. \"1280x720\"")
    w, h = int(m.group(1)), int(m.group(2))
    for name, x in (("width", w), ("height", h)):
        if not 16 <= x <= MAX_SIDE or x % 16:
            raise ValueError(f"{name} {x} must be a multiple of 16 within 16..{MAX_SIDE}")
    return w, h


def frames_for(seconds: str) -> int:
    """Frames for a duration at 16 fps (seconds·16 + 1), rounded up to the 4k+1 the model needs."""
    return frames_4k1(round(float(seconds) * FPS) + 1)


def seconds_text(num_frames: int, fps: int) -> str:
    """The clip's duration as the SDK types it (a string); the inverse of `frames_for` for whole seconds."""
    return f"{(num_frames - 1) / fps:g}"


@dataclass(frozen=True)
class Reference:
    """`input_reference` once its kind is known: `value` is a URL, a data URI or our own upload URL."""

    kind: Literal["image", "video"]
    value: str


def _validation(exc: ValidationError, names: dict[str, str]) -> ApiError:
    """Pydantic errors → one 400 naming the field, without pydantic's "Value error, " prefix."""
    err = validation_error(exc, names)
    err.message = err.message.replace("Value error, ", "")
    err.args = (err.message,)
    return err


def parse_request(body: dict[str, Any]) -> VideoCreateRequest:
    """Validate a request body; an unknown field is OpenAI's `unknown_parameter`, naming it and the known ones."""
    try:
        return VideoCreateRequest.model_validate(body)
    except ValidationError as e:
        unknown = [str(err["loc"][0]) for err in e.errors() if err["type"] == "extra_forbidden" and err["loc"]]
        if unknown:
            known = ", ".join(list(VideoCreateRequest.model_fields) + ["steps"])
            raise ApiError(400, f"{unknown[0]}: unknown parameter (accepted: {known})", field=unknown[0],
                           error_type="unknown_parameter") from None
        raise _validation(e, FIELD_NAMES) from None


def field_names(ref: Reference | None) -> dict[str, str]:
    """FIELD_NAMES plus the input that `input_reference` became, so its errors name `input_reference`."""
    names = dict(FIELD_NAMES)
    if ref is not None:
        names["first_image" if ref.kind == "image" else "video"] = "input_reference"
    return names


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, f"{field}: {message}", field=field, error_type="invalid_value")


def to_spec(req: VideoCreateRequest, ref: Reference | None) -> tuple[JobSpec, list[str]]:
    """Map the request onto a JobSpec; returns the spec and log lines about the choices made."""
    notes: list[str] = []
    video, first_image = req.video, req.first_image
    if ref is not None and ref.kind == "image":
        if first_image:
            raise _bad("input_reference", "an image input_reference is the first frame; do not also send "
                       "first_image")
        first_image = ref.value
        notes.append("input_reference (image) → first frame")
    elif ref is not None:
        if video:
            raise _bad("input_reference", "a video input_reference is the control video; do not also send video")
        video = ref.value
        notes.append("input_reference (video) → control video")
    if (req.mask_video or req.mask_image) and not video:
        raise _bad("mask_video" if req.mask_video else "mask_image", "a mask needs a video (video or a video "
                   "input_reference) to apply to")
    task = req.task
    if task is None:
        task = "depth" if video else "none"
        if video:
            notes.append("task not given: 'depth' (the control video's structure, the prompt's look)")
    if task in VIDEO_TASKS and not video:
        raise _bad("task", f"'{task}' needs a video (video or a video input_reference)")
    if task == "inpainting" and not (req.mask_video or req.mask_image):
        raise _bad("task", "'inpainting' needs mask_video or mask_image")
    width, height = parse_size(req.size)
    num_frames = frames_for(req.seconds)
    if num_frames != round(float(req.seconds) * FPS) + 1:
        notes.append(f"seconds {req.seconds} → {num_frames} frames (the model needs 4k+1 frames)")
    opts: dict[str, Any] = {k: v for k, v in (
        ("num_inference_steps", req.num_inference_steps), ("guidance_scale", req.guidance_scale),
        ("flow_shift", req.flow_shift), ("context_scale", req.context_scale), ("sampler", req.sampler),
        ("acceleration", req.acceleration)) if v is not None}
    if req.preprocess is not None:
        opts["control"] = ControlOptions(preprocess=req.preprocess)
    try:
        spec = JobSpec(
            task=task, prompt=req.prompt, negative_prompt=req.negative_prompt, width=width, height=height,
            num_frames=num_frames, fps=FPS, seed=req.seed,
            inputs=JobInputs(video=video, mask_video=req.mask_video, mask_image=req.mask_image,
                             reference_images=list(req.reference_images), first_image=first_image,
                             last_image=req.last_image),
            **opts,
        )
    except ValidationError as e:
        raise _validation(e, field_names(ref)) from None
    return spec, notes
