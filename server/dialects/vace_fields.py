"""The Wan VACE request fields fal and the AI/ML API share: the same name, type, range and default in both
published schemas (fal.ai/models/fal-ai/wan-vace-14b, docs.aimlapi.com), declared once here and subclassed by
each dialect's schema, which adds its own fields and overrides the ones that differ (AI/ML: `num_frames` from
81, `video_url` required).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from server.dialects.common import (
    HOSTED_MAX_FRAMES,
    LONG_VIDEO_DESCRIPTION,
    PROMPT_MAX_CHARS,
    long_video_limit,
    loras_field,
)
from vace_local.core.spec import HARD_MAX_FRAMES, MAX_SEED, LoraRef

FAL_NEGATIVE_PROMPT = (
    "letterboxing, borders, black bars, bright colors, overexposed, static, blurred details, subtitles, "
    "style, artwork, painting, picture, still, overall gray, worst quality, low quality, JPEG compression "
    "residue, ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "malformed limbs, fused fingers, still picture, cluttered background, three legs, many people in the "
    "background, walking backwards"
)

#: JobSpec / JobInputs names → the names both dialects give the shared fields (each adds its reference and
#: first/last frame names), so every error names the user's field.
VACE_FIELD_NAMES = {
    "video": "video_url", "mask_video": "mask_video_url", "mask_image": "mask_image_url",
    "flow_shift": "shift", "fps": "frames_per_second", "interpolator": "interpolator_model",
    "width": "resolution", "height": "resolution",
}

Resolution = Literal["auto", "240p", "360p", "480p", "580p", "720p"]
AspectRatio = Literal["auto", "16:9", "1:1", "9:16"]


class VaceFields(BaseModel):
    """Fields of every fal endpoint and every AI/ML model, with their published defaults and ranges."""

    #: Unknown fields are ignored as at fal; NaN / Infinity are refused as "not a finite number".
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(..., max_length=PROMPT_MAX_CHARS)
    negative_prompt: str = Field(FAL_NEGATIVE_PROMPT, max_length=PROMPT_MAX_CHARS)
    long_video: bool = Field(False, description=LONG_VIDEO_DESCRIPTION + " (`num_frames` beyond 241)")
    match_input_num_frames: bool = False
    num_frames: int = Field(81, ge=17, le=HARD_MAX_FRAMES)
    match_input_frames_per_second: bool = False
    frames_per_second: int = Field(16, ge=5, le=30)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    resolution: Resolution = "auto"
    aspect_ratio: AspectRatio = "auto"
    num_inference_steps: int = Field(30, ge=2, le=50)
    guidance_scale: float = Field(5.0, ge=1.0, le=10.0)
    shift: float = Field(5.0, ge=1.0, le=15.0)
    video_url: str | None = None
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
    loras: list[LoraRef] = loras_field()

    @field_validator("num_frames")
    @classmethod
    def _hosted_length(cls, v: int, info: ValidationInfo) -> int:
        long_video_limit(v, bool(info.data.get("long_video")), HOSTED_MAX_FRAMES, lambda f: f"{f} frames")
        return v


class OutpaintingFields(BaseModel):
    """The outpainting endpoint's / model's canvas expansion (the same in both schemas)."""

    model_config = VaceFields.model_config

    expand_left: bool = False
    expand_right: bool = False
    expand_top: bool = False
    expand_bottom: bool = False
    expand_ratio: float = Field(0.25, ge=0.0, le=1.0)


class ReframeFields(BaseModel):
    """The reframe endpoint's / model's fields (the same in both schemas; the prompt is optional there)."""

    model_config = VaceFields.model_config

    prompt: str = Field("", max_length=PROMPT_MAX_CHARS)
    zoom_factor: float = Field(0.0, ge=0.0, le=0.9)
    trim_borders: bool = True
