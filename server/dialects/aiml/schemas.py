"""AI/ML API `alibaba/wan2.2-vace-fun-a14b-*` request schemas: the wire contract only.

The AI/ML API fronts the same Wan VACE Fun models with fal-like fields (its published model pages on
docs.aimlapi.com, `POST /v2/video/generations`): the fields both share are declared once in
`server.dialects.vace_fields`; here are AI/ML's own (`model`, `image_list`, `image_url`, `last_image_url`,
`preprocess`) and the ones whose contract differs from fal's (`video_url` required, `num_frames` from 81,
`sync_mode` without effect).
"""

from __future__ import annotations

from pydantic import Field

from server.dialects.vace_fields import VACE_FIELD_NAMES, OutpaintingFields, ReframeFields, VaceFields
from vace_local.core.spec import HARD_MAX_FRAMES

NAME = "aiml"
REQUESTED_FAMILY = "wan2.2-vace-fun-a14b"
AIML_MODEL_PREFIX = "alibaba/wan2.2-vace-fun-a14b-"
AIML_TASKS = ("pose", "depth", "inpainting", "outpainting", "reframe")
AIML_MODELS = tuple(AIML_MODEL_PREFIX + t for t in AIML_TASKS)
#: JobSpec / JobInputs names → AI/ML's, so every error names the user's field.
FIELD_NAMES = {
    **VACE_FIELD_NAMES, "reference_images": "image_list", "first_image": "image_url", "last_image": "last_image_url",
}


class AimlRequest(VaceFields):
    """Fields of every AI/ML VACE model."""

    model: str
    video_url: str
    num_frames: int = Field(81, ge=81, le=HARD_MAX_FRAMES)
    image_list: list[str] | None = Field(None, min_length=2, max_length=4)
    image_url: str | None = None
    last_image_url: str | None = None
    preprocess: bool = False
    #: Documented as an audio/video synchronisation mode; there is no audio here, so it has no effect.
    sync_mode: bool = False


class AimlPoseRequest(AimlRequest):
    pass


class AimlDepthRequest(AimlRequest):
    pass


class AimlInpaintingRequest(AimlRequest):
    mask_video_url: str | None = None
    mask_image_url: str | None = None


class AimlOutpaintingRequest(OutpaintingFields, AimlRequest):
    pass


class AimlReframeRequest(ReframeFields, AimlRequest):
    pass


AIML_SCHEMAS: dict[str, type[AimlRequest]] = {
    AIML_MODEL_PREFIX + "pose": AimlPoseRequest,
    AIML_MODEL_PREFIX + "depth": AimlDepthRequest,
    AIML_MODEL_PREFIX + "inpainting": AimlInpaintingRequest,
    AIML_MODEL_PREFIX + "outpainting": AimlOutpaintingRequest,
    AIML_MODEL_PREFIX + "reframe": AimlReframeRequest,
}
