"""OpenAI videos API requests: the body as the SDK sends it (multipart or JSON) → a validated request → a
`JobSpec` (`to_spec`), queued by `create_video_job`; and the store queries behind list and delete.

The translation is pure code (no HTTP, no job store, no media decoding).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server import media_refs
from server.auth import request_owner
from server.body_guard import read_json
from server.dialects.common import check_served_model
from server.dialects.openai.schemas import (
    FIELD_NAMES,
    FPS,
    LIST_LIMIT_MAX,
    NAME,
    OPENAI_MODEL_RE,
    STATUS,
    VARIANTS,
    InputReferenceObject,
    VideoCreateRequest,
    parse_size,
)
from server.errors import ApiError, validation_error
from server.jobs import JobRecord
from server.services import Api, DialectConfig
from server.settings import max_request_bytes
from server.states import JobStatus
from vace_local.core.errors import Problem
from vace_local.core.spec import (
    ControlOptions,
    JobInputs,
    JobSpec,
    input_gaps,
    max_job_frames,
    round_frames_4k1,
)

log = logging.getLogger("vace.server.openai")

#: Form fields of one create request: every field once, `reference_images[]` five times, and room to spare.
FORM_MAX_FIELDS = 64
#: How the task-input rules name the media inputs here (a video may come as `input_reference`).
_INPUT_WORDS = {"video": "a video (video or a video input_reference)"}
#: How long a DELETE of a running video waits for its worker to stop at the next step.
DELETE_WAIT_S = 10.0


def _bad(field: str, message: str, status: int = 400, code: str = "invalid_value") -> ApiError:
    """One named field's error (OpenAI's `param`), coded as the SDK expects."""
    return ApiError.invalid(Problem(field, message), status, error_type=code)


def _validation(exc: ValidationError, names: dict[str, str]) -> ApiError:
    """Pydantic errors → one 400 naming the field, without pydantic's "Value error, " prefix."""
    return validation_error(exc, names, value_error_prefix=False)


def frames_for(seconds: str) -> int:
    """Frames for a duration at 16 fps (seconds·16 + 1), rounded up to the 4k+1 the model needs."""
    return round_frames_4k1(round(float(seconds) * FPS) + 1, hi=max_job_frames())


def seconds_text(num_frames: int, fps: int) -> str:
    """The clip's duration as the SDK types it (a string); the inverse of `frames_for` for whole seconds."""
    return f"{(num_frames - 1) / fps:g}"


@dataclass(frozen=True)
class Reference:
    """`input_reference` once its kind is known: `value` is a URL, a data URI or our own upload URL."""

    kind: Literal["image", "video"]
    value: str


def parse_request(body: dict[str, Any]) -> VideoCreateRequest:
    """Validate a request body; an unknown field is OpenAI's `unknown_parameter`, naming it and the known ones."""
    try:
        return VideoCreateRequest.model_validate(body)
    except ValidationError as e:
        unknown = [str(err["loc"][0]) for err in e.errors() if err["type"] == "extra_forbidden" and err["loc"]]
        if unknown:
            known = ", ".join(list(VideoCreateRequest.model_fields) + ["steps"])
            name = unknown[0] if len(unknown[0]) <= 64 else unknown[0][:64] + "…"  # a form field's name is unbounded
            raise ApiError(400, f"{name}: unknown parameter (accepted: {known})", field=name,
                           error_type="unknown_parameter") from None
        raise _validation(e, FIELD_NAMES) from None


def field_names(ref: Reference | None) -> dict[str, str]:
    """FIELD_NAMES plus the input that `input_reference` became, so its errors name `input_reference`."""
    names = dict(FIELD_NAMES)
    if ref is not None:
        names["first_image" if ref.kind == "image" else "video"] = "input_reference"
    return names


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
    task = req.task
    if task is None:
        task = "depth" if video else "none"
        if video:
            notes.append("task not given: 'depth' (the control video's structure, the prompt's look)")
    for gap in input_gaps(task, {"video": video, "mask_video": req.mask_video, "mask_image": req.mask_image}):
        raise _bad(gap.field if gap.rule in ("mask_needs_video", "task_ignores_mask") else "task",
                   gap.message(_INPUT_WORDS))
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
            num_frames=num_frames, fps=FPS, seed=req.seed, loras=req.loras,
            inputs=JobInputs(video=video, mask_video=req.mask_video, mask_image=req.mask_image,
                             reference_images=list(req.reference_images), first_image=first_image,
                             last_image=req.last_image),
            **opts,
        )
    except ValidationError as e:
        raise _validation(e, field_names(ref)) from None
    return spec, notes


def form_to_dict(items: list[tuple[str, Any]]) -> tuple[dict[str, Any], UploadFile | None]:
    """Multipart / url-encoded fields → the JSON body they encode, as the SDK writes it: `key[]` repeated is
    a list, `key[sub]` an object member, a repeated plain key a list. Only `input_reference` may be a file."""
    body: dict[str, Any] = {}
    upload: UploadFile | None = None
    for key, value in items:
        name, _, sub = key.partition("[")
        sub = sub.removesuffix("]")
        if isinstance(value, UploadFile):
            if key != "input_reference":
                raise _bad(key, "only input_reference may be a file part; send other media as URLs, data URIs "
                           "or files uploaded to this server")
            if upload is not None:
                raise _bad("input_reference", "send one input_reference file")
            upload = value
            continue
        if key.endswith("[]"):
            body.setdefault(name, []).append(value)
        elif sub:
            obj = body.setdefault(name, {})
            if not isinstance(obj, dict):
                raise _bad(name, "sent both as a value and as an object")
            obj[sub] = value
        elif key in body:
            prev = body[key]
            body[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            body[key] = value
    return body, upload


async def read_request(request: Request, api: Api) -> tuple[dict[str, Any], UploadFile | None]:
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=2, max_fields=FORM_MAX_FIELDS,
                                  max_part_size=max_request_bytes(api.config))
        return form_to_dict(form.multi_items())
    try:
        body = await read_json(request, empty={})  # off the event loop, shape-checked as it arrived (body_guard)
    except (ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON (send JSON or multipart/form-data)",
                       error_type="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", error_type="invalid_json")
    return body, None


def _data_uri_kind(value: str) -> str | None:
    """Kind of a base64 data URI from its first bytes (no media decoding), None when not recognisable."""
    header, _, payload = value.partition(",")
    if ";base64" not in header.lower():
        return None
    head = "".join(payload[:1200].split())[:684]
    try:
        return media_refs.kind_of(media_refs.sniff(base64.b64decode(head[: len(head) // 4 * 4])))
    except (binascii.Error, ValueError):
        return None


def reference_of(value: InputReferenceObject | str) -> Reference:
    """A JSON `input_reference` (a URL / data URI, or `{"image_url": …}`) → its kind and value.
    A data URI's kind comes from its bytes; an http(s) URL is an image, as the field's name says."""
    if isinstance(value, InputReferenceObject):
        if value.file_id:
            raise _bad("input_reference.file_id", "OpenAI Files API ids are not served here; send the file "
                       "itself (multipart input_reference) or image_url")
        if not value.image_url:
            raise _bad("input_reference", "needs image_url (a URL or data URI) or a file part")
        value = value.image_url
    kind = _data_uri_kind(value) if value.strip().lower().startswith("data:") else None
    return Reference("video" if kind == "video" else "image", value.strip())


def model_problem(config: DialectConfig, model: str) -> str | None:
    """None when the served model answers `model` (see the module docstring), else the reason."""
    if OPENAI_MODEL_RE.match(model) or model == config.model:
        return None
    return check_served_model(config, model, model)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


async def list_jobs(api: Api, *, after: str | None, limit: int, order: str,
                    owner: str | None = None) -> tuple[list[JobRecord], bool]:
    """One page of this dialect's jobs visible to `owner` (its own and those made without keys) by
    (created_at, id), after the job `after`; returns (page, has_more)."""
    page = await api.jobs.page(NAME, after=after, limit=limit, ascending=order == "asc", owner=owner)
    if page is None:
        raise _bad("after", f"no video with id '{after}'")
    return page


async def create_video_job(
    request: Request, api: Api, body: dict[str, Any], upload: UploadFile | None
) -> JobRecord:
    """Validate a create request (every field checked before anything is stored), store its file part as an
    upload and queue the job; the upload is removed again when queueing fails."""
    if upload is not None and "input_reference" in body:
        raise _bad("input_reference", "send either a file part or image_url, not both")
    req: VideoCreateRequest = parse_request(body)
    problem = model_problem(api.config, req.model)
    if problem:
        raise _bad("model", problem, code="model_not_found")
    ref: Reference | None = None
    if upload is not None:
        head = await upload.read(512)
        await upload.seek(0)
        kind = media_refs.kind_of(media_refs.sniff(head))
        if kind is None:
            raise _bad("input_reference", "must be an image (PNG, JPEG, WEBP, …) or a video (MP4, WEBM, MOV, …); "
                       "the content is not a recognised format")
        ref = Reference(kind, "input_reference")  # placeholder until the file is stored (after validation)
    elif req.input_reference is not None:
        ref = reference_of(req.input_reference)
    spec, notes = to_spec(req, ref)  # every field is checked before anything is stored
    base = api.files.base_url(request)
    upload_id = None
    if upload is not None and ref is not None:
        info = await api.uploads.save(_chunks(upload), upload.filename or f"input_reference.{ref.kind}",
                                      upload.content_type, owner=request_owner(request),
                                      field_name="input_reference")
        upload_id = info.id
        target = "first_image" if ref.kind == "image" else "video"
        url = api.files.file_url(base, "uploads", info.id, info.filename, request_owner(request))
        spec = spec.model_copy(update={"inputs": spec.inputs.model_copy(update={target: url})})
    served = api.config.model
    logs = [f"model: '{req.model}' answered by the served model '{served}'", *notes]
    try:
        job = await api.jobs.submit(
            spec, dialect=NAME, model_id=req.model, base_url=base, field_names=field_names(ref), logs=logs,
            extra={"upload_id": upload_id}, owner=request_owner(request))
    except BaseException:
        if upload_id:
            await api.uploads.discard(upload_id)
        raise
    log.info("openai video %s (%s)", job.id, "; ".join(logs))
    return job


async def list_page(api: Api, *, after: str | None, limit: str, order: str,
              owner: str | None) -> tuple[list[JobRecord], bool]:
    """`GET /v1/videos`'s query checked (400 naming `limit` / `order`), then one page of `list_jobs`."""
    if not limit.strip().isdigit() or not 1 <= int(limit) <= LIST_LIMIT_MAX:
        raise _bad("limit", f"must be an integer within 1..{LIST_LIMIT_MAX} (got {limit!r})")
    if order not in ("asc", "desc"):
        raise _bad("order", f"must be 'asc' or 'desc' (got {order!r})")
    return await list_jobs(api, after=after or None, limit=int(limit), order=order, owner=owner)


async def stop_and_delete(api: Api, job: JobRecord, owner: str | None) -> None:
    """Delete a video; a running one is cancelled first and waited for (up to DELETE_WAIT_S) to stop."""
    video_id = job.id
    if not job.terminal:
        await api.jobs.cancel(video_id, owner)
        job = await api.jobs.wait(video_id, DELETE_WAIT_S)
        if not job.terminal:
            raise ApiError(409, f"video '{video_id}' is still stopping after cancellation; retry the delete",
                           error_type="video_in_progress")
    await api.jobs.delete(job)


async def job_or_404(api: Api, video_id: str, owner: str | None) -> JobRecord:
    job = await api.jobs.get(video_id, owner=owner)
    if job is None or job.dialect != NAME:
        raise ApiError(404, f"video '{video_id}' not found", field="video_id", error_type="not_found")
    return job


async def content_path(api: Api, video_id: str, variant: str, owner: str | None) -> Path:
    """The mp4 of a completed video; 400/404 naming `variant` or `video_id` otherwise."""
    if variant not in VARIANTS:
        raise _bad("variant", f"must be one of {', '.join(VARIANTS)} (got {variant!r})")
    job = await job_or_404(api, video_id, owner)
    if variant != "video":
        raise _bad("variant", f"'{variant}' is not produced by this server; only 'video' (the mp4) is",
                   status=404, code="variant_not_available")
    if job.status != JobStatus.SUCCEEDED:
        raise ApiError(400, f"video '{video_id}' is {STATUS[job.status]}; its content is available once it is "
                       "completed", field="video_id", error_type="video_not_ready")
    video = next((o for o in job.outputs if o.get("kind") == "video"), None)
    path = await api.offload.slow(api.files.output_path, job, video) if video else None
    if path is None or not path.is_file():
        raise ApiError(404, f"the content of video '{video_id}' is no longer available", field="video_id",
                       error_type="not_found")
    return path
