"""WaveSpeed `wavespeed-ai/wan-2.1-14b-vace` request schema and the constants of its wire contract
(fields, defaults and ranges as documented at wavespeed.ai/models/wavespeed-ai/wan-2.1-14b-vace)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from server.dialects.common import LONG_VIDEO_DESCRIPTION, PROMPT_MAX_CHARS, long_video_limit, loras_field, not_blank
from server.states import JobStatus
from vace_local.core.spec import HARD_MAX_FRAMES, LoraRef

NAME = "wavespeed"
MODEL_ID = "wavespeed-ai/wan-2.1-14b-vace"
SIZES = {"832*480": (832, 480), "480*832": (480, 832), "1280*720": (1280, 720), "720*1280": (720, 1280)}
FPS = 16
SYNC_TIMEOUT_CODE = 5004
BASE64_WEBHOOK_ERROR = ("webhook callback does not support base64 output, please use the normal API to use "
                        "base64 output")
#: JobSpec / JobInputs names → WaveSpeed's, so errors name the user's field.
FIELD_NAMES = {"reference_images": "images", "num_frames": "duration", "width": "size", "height": "size"}
STATUS = {JobStatus.QUEUED: "created", JobStatus.RUNNING: "processing", JobStatus.SUCCEEDED: "completed",
          JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed"}


class WanVaceInput(BaseModel):
    """Request body of `POST /api/v3/wavespeed-ai/wan-2.1-14b-vace` (fields, defaults and ranges as documented).

    Strict JSON types: a string where a number or boolean belongs (`"30"`, `"true"`) or a float where an
    integer belongs (`2.0`) is a 400 naming the field, as the documented types say, never a silent coercion.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS, description="What should happen in the video.")
    images: list[str] = Field(default_factory=list, max_length=5, description="Up to 5 reference image URLs.")
    video: str | None = Field(None, description="Source video for video-to-video workflows.")
    task: Literal["depth", "pose", "face", "inpainting", "none"] = Field(
        "depth", description="Control extracted from `video`; ignored (→ none) when no video is given.")
    negative_prompt: str = Field("", max_length=PROMPT_MAX_CHARS,
                                 description="What to avoid (a list of strings, as huggingface_hub sends, is joined).")
    mask_video: str | None = None
    mask_image: str | None = None
    image: str | None = Field(None, description="A single reference image (appended to `images`).")
    first_image: str | None = None
    last_image: str | None = None
    long_video: bool = Field(False, description=LONG_VIDEO_DESCRIPTION + " (`duration` beyond 10 s)")
    extend: str | None = Field(None, description="vace-local extension: a clip to continue; `duration` seconds are "
                               "generated after it (its last 16 frames are kept as the first window's start) and "
                               "the output is the clip followed by the continuation")
    duration: int = Field(5, ge=5, le=(HARD_MAX_FRAMES - 1) // FPS,
                          description="Seconds at 16 fps (duration*16+1 frames); 5..10, more with `long_video`.")
    size: Literal["832*480", "480*832", "1280*720", "720*1280"] = "832*480"
    num_inference_steps: int = Field(30, ge=1, le=40)
    guidance_scale: float = Field(5.0, ge=0.0, le=20.0, allow_inf_nan=False)
    flow_shift: float = Field(16.0, ge=0.0, le=30.0, allow_inf_nan=False)
    context_scale: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    seed: int = Field(-1, ge=-1, le=2147483647)
    enable_fast_mode: bool = False
    enable_safety_checker: bool = True
    enable_sync_mode: bool = False
    enable_base64_output: bool = False
    save_previews: bool = Field(False, description="vace-local extension: also write the control video and mask "
                                "the model saw (listed under `previews` by `GET /api/v3/predictions/{id}/progress`)")
    loras: list[LoraRef] = loras_field()

    _not_blank = field_validator("prompt")(not_blank)

    @field_validator("duration")
    @classmethod
    def _hosted_length(cls, v: int, info: ValidationInfo) -> int:
        long_video_limit(v * FPS + 1, bool(info.data.get("long_video")), 10 * FPS + 1,
                         lambda f: f"{(f - 1) // FPS} s")
        return v

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _join_list(cls, v: Any) -> Any:
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return ", ".join(x.strip() for x in v if x.strip())
        return v

    @field_validator("video", "mask_video", "mask_image", "image", "first_image", "last_image", "extend",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("images", mode="before")
    @classmethod
    def _drop_empty(cls, v: Any) -> Any:
        return [x for x in v if not (isinstance(x, str) and not x.strip())] if isinstance(v, list) else v


class UploadTicketRequest(BaseModel):
    filename: str = Field(..., min_length=1, max_length=255)
    size: int | None = Field(None, ge=0)
    content_type: str | None = None
