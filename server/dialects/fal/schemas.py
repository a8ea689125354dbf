"""fal `fal-ai/wan-vace-14b` request schemas (all six endpoints) and the apps that share them: the wire contract only.

`fal-ai/wan-22-vace-fun-a14b/{depth,pose,inpainting,outpainting,reframe}` (Wan 2.2 VACE Fun) has no base endpoint
and exactly the same fields, types, defaults and ranges as the matching `wan-vace-14b` sub-path (fal's generated
types alias them), so one schema per sub-path serves both apps.

Field names, defaults and ranges follow the published fal schema (fal.ai/models/fal-ai/wan-vace-14b and its
sub-paths' API pages), so that a fal client's request validates here exactly as it would at fal.
The fields fal shares with the AI/ML API are declared once in `server.dialects.vace_fields`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from server.dialects.vace_fields import (
    FAL_NEGATIVE_PROMPT,
    VACE_FIELD_NAMES,
    OutpaintingFields,
    ReframeFields,
    VaceFields,
)

__all__ = [  # fal's published negative-prompt default is part of its contract, declared with the shared fields
    "ALIAS", "FAL_APPS", "FAL_APP_ID", "FAL_ENDPOINTS", "FAL_NEGATIVE_PROMPT", "FAL_SCHEMAS", "FIELD_NAMES", "NAME",
    "OWNER", "REQUESTED_FAMILY", "FalApp", "FalBaseRequest", "FalDepthRequest", "FalInpaintingRequest",
    "FalOutpaintingRequest", "FalPoseRequest", "FalReframeRequest", "FalRequest",
]

NAME = "fal"
FAL_APP_ID = "fal-ai/wan-vace-14b"
OWNER, ALIAS = FAL_APP_ID.split("/")
#: Sub-paths of the app: "" is the base (task-selectable) endpoint.
FAL_ENDPOINTS = ("", "depth", "pose", "inpainting", "outpainting", "reframe")
#: Wan family each API model id asks for (model mapping: `Settings.model_map`).
REQUESTED_FAMILY = "wan2.1-vace-14b"


@dataclass(frozen=True)
class FalApp:
    """One fal app served here: its id (`owner/alias`), the Wan family it asks for, its sub-paths ("" = base)."""

    app_id: str
    family: str
    endpoints: tuple[str, ...]

    @property
    def alias(self) -> str:
        return self.app_id.split("/", 1)[1]


#: The fal apps, by alias (the path segment after `fal-ai/`, which is all fal-client keeps for status/result).
FAL_APPS: dict[str, FalApp] = {
    ALIAS: FalApp(FAL_APP_ID, REQUESTED_FAMILY, FAL_ENDPOINTS),
    "wan-22-vace-fun-a14b": FalApp("fal-ai/wan-22-vace-fun-a14b", "wan2.2-vace-fun-a14b", FAL_ENDPOINTS[1:]),
}
#: JobSpec / JobInputs names → fal's, so every error names the user's field.
FIELD_NAMES = {
    **VACE_FIELD_NAMES,
    "reference_images": "ref_image_urls", "first_image": "first_frame_url", "last_image": "last_frame_url",
}


class FalRequest(VaceFields):
    """Fields shared by all six endpoints: the VACE fields plus fal's own."""

    sampler: Literal["unipc", "dpm++", "euler"] = "unipc"
    first_frame_url: str | None = None
    last_frame_url: str | None = None
    transparency_mode: Literal["content_aware", "white", "black"] = "content_aware"
    return_frames_zip: bool = False


class _WithRefs(FalRequest):
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


class FalOutpaintingRequest(OutpaintingFields, _WithRefs):
    video_url: str


class FalReframeRequest(ReframeFields, FalRequest):
    video_url: str
    match_input_num_frames: bool = True
    match_input_frames_per_second: bool = True
    #: Older reframe schema name for num_interpolated_frames.
    temporal_upsample_factor: int | None = Field(None, ge=0, le=5)


FAL_SCHEMAS: dict[str, type[FalRequest]] = {
    "": FalBaseRequest,
    "depth": FalDepthRequest,
    "pose": FalPoseRequest,
    "inpainting": FalInpaintingRequest,
    "outpainting": FalOutpaintingRequest,
    "reframe": FalReframeRequest,
}
