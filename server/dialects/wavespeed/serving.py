"""WaveSpeed requests → a `JobSpec` (`to_spec`), and the submit path that queues one (`submit_prediction`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from server.auth import request_owner
from server.dialects.common import unknown_fields_note
from server.dialects.wavespeed.schemas import (
    BASE64_WEBHOOK_ERROR,
    FIELD_NAMES,
    FPS,
    MODEL_ID,
    NAME,
    SIZES,
    WanVaceInput,
)
from server.errors import ApiError, validation_error
from server.jobs import JobRecord
from server.services import Api
from vace_local.core.errors import Problem
from vace_local.core.spec import MEDIA_FIELDS, JobInputs, JobSpec, OutputOptions, input_gaps, task_needs_video

log = logging.getLogger("vace.server.wavespeed")
#: Media fields whose data-URI values are shortened in the stored copy of the input (`data.input` of webhooks):
#: WaveSpeed's names of the JobInputs media fields, and `image` (one more reference image).
MEDIA_WIRE_FIELDS = (*(FIELD_NAMES.get(f.name, f.name) for f in MEDIA_FIELDS), "image")

def field_names_for(inp: WanVaceInput) -> dict[str, str]:
    """FIELD_NAMES plus the slot `image` takes in reference_images, so its errors say `image`, not `images[N]`."""
    return {**FIELD_NAMES, f"reference_images[{len(inp.images)}]": "image"} if inp.image else FIELD_NAMES


def to_spec(inp: WanVaceInput) -> tuple[JobSpec, list[str]]:
    """Map WaveSpeed's fields onto the JobSpec; returns the spec and log lines about adjustments."""
    notes: list[str] = []
    refs = list(inp.images) + ([inp.image] if inp.image else [])
    if len(refs) > 5:
        raise ApiError.invalid(Problem("images", "at most 5 reference images are allowed (including `image`), "
                                       f"got {len(refs)}"), error_type="invalid_request")
    given = {"video": inp.video, "mask_video": inp.mask_video, "mask_image": inp.mask_image}
    task = inp.task
    for gap in input_gaps(task, given):
        if gap.rule == "mask_needs_video":
            raise ApiError(400, f"{gap.field}: {gap.message({'video': '`video`'})}", field="video")
    if not inp.video and task_needs_video(task):
        notes.append(f"task '{task}' needs a video; none given, so generating from the prompt/images only")
        task = "none"
    for gap in input_gaps(task, given):  # what the task still lacks (a mask), or a mask it would not use
        field = gap.field if gap.rule == "task_ignores_mask" else "task"
        raise ApiError.invalid(Problem(field, gap.message({})), error_type="invalid_request")
    flow_shift = inp.flow_shift
    if flow_shift <= 0:
        flow_shift = 1e-3
        notes.append("flow_shift 0 is degenerate for flow matching; using 0.001")
    if note := unknown_fields_note(inp.model_extra or ()):
        notes.append(note)
    w, h = SIZES[inp.size]
    if inp.enable_fast_mode:
        notes.append("enable_fast_mode → acceleration 'regular' (step cache)")
    # `extend` (vace-local): `duration` is the continuation's length, after the clip
    length = {"extend_frames": inp.duration * FPS} if inp.extend else {"num_frames": inp.duration * FPS + 1}
    try:
        spec = JobSpec(
            acceleration="regular" if inp.enable_fast_mode else "none",
            task=task, prompt=inp.prompt, negative_prompt=inp.negative_prompt or None, width=w, height=h,
            **length, fps=FPS, num_inference_steps=inp.num_inference_steps,
            guidance_scale=inp.guidance_scale, flow_shift=flow_shift, context_scale=inp.context_scale,
            seed=inp.seed, output=OutputOptions(save_control=inp.save_previews),
            enable_safety_checker=inp.enable_safety_checker, loras=inp.loras,
            inputs=JobInputs(video=inp.video, mask_video=inp.mask_video, mask_image=inp.mask_image,
                             reference_images=refs, first_image=inp.first_image, last_image=inp.last_image,
                             extend=inp.extend),
        )
    except ValidationError as e:
        raise validation_error(e, field_names_for(inp)) from None
    return spec, notes


async def job_or_404(api: Api, request_id: str, request: Request) -> JobRecord:
    job = await api.jobs.get(request_id, owner=request_owner(request))
    if job is None or job.dialect != NAME:
        raise ApiError(404, f"prediction '{request_id}' not found", error_type="not_found")
    return job


def stored_input(body: WanVaceInput) -> dict[str, Any]:
    """The request as the job keeps it (echoed in webhooks): documented fields only, data URIs shortened.
    Unknown fields are only named in the job log (to_spec): their values are never stored or echoed."""
    raw = body.model_dump(mode="json", exclude_none=True, exclude=set(body.model_extra or ()))
    for k in MEDIA_WIRE_FIELDS:
        v = raw.get(k)
        if isinstance(v, str) and v.startswith("data:"):
            raw[k] = v[:64] + "…"
        elif isinstance(v, list):
            raw[k] = [x[:64] + "…" if x.startswith("data:") else x for x in v]
    return raw


async def submit_prediction(body: WanVaceInput, request: Request, webhook: str | None, api: Api) -> JobRecord:
    """Check and translate a submit, then queue it (`?webhook=` empty means no webhook)."""
    if webhook and body.enable_base64_output:
        raise ApiError(400, BASE64_WEBHOOK_ERROR, error_type="base64_webhook")
    spec, notes = to_spec(body)
    return await api.jobs.submit(
        spec, dialect=NAME, model_id=MODEL_ID, base_url=api.files.base_url(request), webhook_url=webhook,
        field_names=field_names_for(body), logs=notes, owner=request_owner(request),
        extra={"input": stored_input(body), "enable_base64_output": body.enable_base64_output},
    )
