"""AI/ML API `alibaba/wan2.2-vace-fun-a14b-*` request schemas and their translation into a `JobSpec`.

The AI/ML API fronts the same Wan VACE Fun models with fal-like fields (shared/seeds/003, 004;
reference/client-protocols.md §6). Each request is validated against its model's schema, renamed into the
equivalent fal request and translated by the fal code, so both dialects produce identical jobs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.dialects import PROMPT_MAX_CHARS
from server.dialects.fal.serving import (
    FAL_NEGATIVE_PROMPT,
    AspectRatio,
    Resolution,
    SourceInfo,
    Translation,
    fal_to_jobspec,
    parse_fal_request,
)
from vace_local.spec import MAX_SEED

AIML_MODEL_PREFIX = "alibaba/wan2.2-vace-fun-a14b-"
AIML_TASKS = ("pose", "depth", "inpainting", "outpainting", "reframe")
AIML_MODELS = tuple(AIML_MODEL_PREFIX + t for t in AIML_TASKS)


class _AimlCommon(BaseModel):
    #: Unknown fields are ignored as at fal; NaN / Infinity are refused as "not a finite number".
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    video_url: str
    prompt: str = Field(..., max_length=PROMPT_MAX_CHARS)
    negative_prompt: str = Field(FAL_NEGATIVE_PROMPT, max_length=PROMPT_MAX_CHARS)
    match_input_num_frames: bool = False
    num_frames: int = Field(81, ge=81, le=241)
    match_input_frames_per_second: bool = False
    frames_per_second: int = Field(16, ge=5, le=30)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    resolution: Resolution = "auto"
    aspect_ratio: AspectRatio = "auto"
    num_inference_steps: int = Field(30, ge=2, le=50)
    guidance_scale: float = Field(5.0, ge=1.0, le=10.0)
    shift: float = Field(5.0, ge=1.0, le=15.0)
    image_list: list[str] | None = Field(None, min_length=2, max_length=4)
    image_url: str | None = None
    last_image_url: str | None = None
    enable_safety_checker: bool = False
    enable_prompt_expansion: bool = False
    preprocess: bool = False
    acceleration: Literal["none", "low", "regular"] = "regular"
    video_quality: Literal["low", "medium", "high", "maximum"] = "high"
    video_write_mode: Literal["fast", "balanced", "small"] = "balanced"
    num_interpolated_frames: int = Field(0, ge=0, le=5)
    temporal_downsample_factor: int = Field(0, ge=0, le=5)
    enable_auto_downsample: bool = False
    auto_downsample_min_fps: float = Field(15.0, ge=1.0, le=60.0)
    interpolator_model: Literal["rife", "film"] = "film"
    #: Documented as an audio/video synchronisation mode; there is no audio here, so it has no effect.
    sync_mode: bool = False


class AimlPoseRequest(_AimlCommon):
    pass


class AimlDepthRequest(_AimlCommon):
    pass


class AimlInpaintingRequest(_AimlCommon):
    mask_video_url: str | None = None
    mask_image_url: str | None = None


class AimlOutpaintingRequest(_AimlCommon):
    expand_left: bool = False
    expand_right: bool = False
    expand_top: bool = False
    expand_bottom: bool = False
    expand_ratio: float = Field(0.25, ge=0.0, le=1.0)


class AimlReframeRequest(_AimlCommon):
    prompt: str = Field("", max_length=PROMPT_MAX_CHARS)
    zoom_factor: float = Field(0.0, ge=0.0, le=0.9)
    trim_borders: bool = True


AIML_SCHEMAS: dict[str, type[_AimlCommon]] = {
    AIML_MODEL_PREFIX + "pose": AimlPoseRequest,
    AIML_MODEL_PREFIX + "depth": AimlDepthRequest,
    AIML_MODEL_PREFIX + "inpainting": AimlInpaintingRequest,
    AIML_MODEL_PREFIX + "outpainting": AimlOutpaintingRequest,
    AIML_MODEL_PREFIX + "reframe": AimlReframeRequest,
}

#: AI/ML name → fal name, for the fields whose names differ.
_RENAMES = {"image_list": "ref_image_urls", "image_url": "first_frame_url", "last_image_url": "last_frame_url"}
#: AI/ML fields with no fal counterpart (or a different meaning) that must not reach the fal schema.
_DROP = {"model", "sync_mode"}


def aiml_task(model: str) -> str:
    return model.removeprefix(AIML_MODEL_PREFIX)


def parse_aiml_request(body: Any) -> _AimlCommon:
    """Validate against the schema of the body's `model` (KeyError for an unknown model id)."""
    model = body.get("model") if isinstance(body, dict) else None
    if model not in AIML_SCHEMAS:
        raise KeyError(model)
    return AIML_SCHEMAS[model].model_validate(body)


def aiml_to_jobspec(req: _AimlCommon, *, model: str, source: SourceInfo | None = None) -> Translation:
    """Rename into the equivalent fal request of the same task, then translate with the fal code."""
    task = aiml_task(req.model)
    data = req.model_dump(exclude=_DROP, exclude_none=True)
    fal_body = {_RENAMES.get(k, k): v for k, v in data.items()}
    fal_req = parse_fal_request(task, fal_body)
    tr = fal_to_jobspec(task, fal_req, model=model, source=source)
    tr.sync_mode = False
    return tr
