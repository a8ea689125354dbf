"""OpenAI videos API (`client.videos`) request schema: the wire contract only.

Field names and defaults follow the `openai` SDK's `VideoCreateParams` (`prompt`, `model` = sora-2,
`seconds` = "4", `size` = "720x1280", `input_reference`); the VACE controls are extra body fields (the SDK's
`extra_body`), validated like the other dialects. The SDK always sends `multipart/form-data`, so every value
may arrive as a string: numbers and booleans are parsed from their text (`"30"`, `"true"`), which is why this
model is not strict.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from server.dialects.common import PROMPT_MAX_CHARS, loras_field, loras_from_text, not_blank
from server.states import JobStatus
from vace_local.core.spec import (
    MAX_REFERENCE_IMAGES,
    MAX_SEED,
    MIN_FRAMES,
    Acceleration,
    LoraRef,
    Sampler,
    Task,
    max_job_frames,
    side_problem,
)

NAME = "openai"
#: Our statuses → the SDK's (a cancelled job is `failed` with code `cancelled`).
STATUS = {JobStatus.QUEUED: "queued", JobStatus.RUNNING: "in_progress", JobStatus.SUCCEEDED: "completed",
          JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed"}
#: Largest page `GET /v1/videos` returns.
LIST_LIMIT_MAX = 100
#: `GET /v1/videos/{id}/content?variant=`: only `video` is produced here.
VARIANTS = ("video", "thumbnail", "spritesheet")
FPS = 16
DEFAULT_MODEL = "sora-2"
DEFAULT_SECONDS = "4"
DEFAULT_SIZE = "720x1280"
#: OpenAI's model names (and their dated snapshots): all answered by the served VACE model.
OPENAI_MODEL_RE = re.compile(r"^sora-2(-pro)?(-\d{4}-\d{2}-\d{2})?$")
MIN_SECONDS = (MIN_FRAMES - 1) / FPS
SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
#: JobSpec / JobInputs names → this dialect's (errors name the user's field).
FIELD_NAMES = {"width": "size", "height": "size", "num_frames": "seconds"}


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
    #: In a multipart body: one JSON text.
    loras: list[LoraRef] = loras_field()

    _not_blank = field_validator("prompt")(not_blank)
    _loras_text = field_validator("loras", mode="before")(classmethod(lambda cls, v: loras_from_text(v)))

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        """A number of seconds (text or number) up to this server's VACE_MAX_FRAMES at 16 fps (60 s by default;
        past 5 s the clip is made of overlapping windows)."""
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
        max_frames = max_job_frames()
        if not MIN_SECONDS <= s <= (max_frames - 1) / FPS:
            raise ValueError(f"must be within {MIN_SECONDS:g}..{(max_frames - 1) / FPS:g} seconds at {FPS} fps "
                             f"({MIN_FRAMES}..{max_frames} frames, VACE_MAX_FRAMES)")
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
    """`"WxH"` → (width, height); both legal frame sides (`vace_local.core.spec.side_problem`)."""
    m = SIZE_RE.match(v.strip())
    if not m:
        raise ValueError("must be WIDTHxHEIGHT in pixels, e.g. \"1280x720\"")
    w, h = int(m.group(1)), int(m.group(2))
    for name, x in (("width", w), ("height", h)):
        if problem := side_problem(x):
            raise ValueError(f"{name} {x} {problem}")
    return w, h
