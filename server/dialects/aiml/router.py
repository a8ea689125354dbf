"""AI/ML API dialect: `POST /v2/video/generations` + `GET /v2/video/generations?generation_id=`.

Models `alibaba/wan2.2-vace-fun-a14b-{pose,depth,inpainting,outpainting,reframe}`. Ids look like the real
service's `<job id>:<model>`. Statuses: queued | generating | completed | error. Errors are the documented
`{message, path, requestId, statusCode, timestamp}`. The published polling script runs unchanged apart from
its `base_url`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from server.core import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TINY_NOTE,
    ApiError,
    Core,
    JobRecord,
    get_core,
    read_body,
    request_owner,
    require_auth,
)
from server.dialects import Dialect
from server.dialects.aiml.schemas import AIML_MODELS, aiml_to_jobspec, parse_aiml_request
from server.dialects.common import prompt_used
from server.dialects.fal.router import (
    check_fields,
    check_served_model,
    needs_source,
    probe_source,
    served_note,
    validation_api_error,
)
from server.dialects.fal.serving import FieldError
from vace_local.errors import InputError

log = logging.getLogger("vace.server.aiml")

NAME = "aiml"
REQUESTED_FAMILY = "wan2.2-vace-fun-a14b"
STATUS = {QUEUED: "queued", RUNNING: "generating", SUCCEEDED: "completed", FAILED: "error", CANCELLED: "error"}
FIELD_NAMES = {
    "video": "video_url", "mask_video": "mask_video_url", "mask_image": "mask_image_url",
    "reference_images": "image_list", "first_image": "image_url", "last_image": "last_image_url",
    "flow_shift": "shift", "fps": "frames_per_second", "interpolator": "interpolator_model",
    "width": "resolution", "height": "resolution",
}
#: fal names the shared translation may report → AI/ML names.
_FROM_FAL = {"ref_image_urls": "image_list", "first_frame_url": "image_url", "last_frame_url": "last_image_url"}


def render_error(request: Request, err: ApiError) -> Response:
    status = 400 if err.status_code == 422 else err.status_code
    message = err.message
    if err.error_type == "validation_error":
        message = f"Body validation error! {err.message}"
    body = {
        "message": message,
        "path": request.url.path,
        "requestId": uuid.uuid4().hex,
        "statusCode": status,
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    return JSONResponse(body, status_code=status)


def generation_id(job: JobRecord) -> str:
    return f"{job.id}:{job.model}"


def render_generation(job: JobRecord, core: Core, base: str) -> dict[str, Any]:
    status = STATUS[job.status]
    body: dict[str, Any] = {"id": generation_id(job), "status": status, "video": None, "error": None, "meta": None}
    if job.status == SUCCEEDED:
        outs = core.output_urls(job, base)
        video = next((o for o in outs if o.get("kind") == "video"), outs[0] if outs else None)
        body["video"] = {"url": video["url"]} if video else None
        body["meta"] = {"usage": {"credits_used": 0}, **check_fields(job)}
        if ((job.result or {}).get("prompt_expansion") or {}).get("status") == "expanded":
            body["meta"]["prompt"] = prompt_used(job)  # AI/ML has no prompt field of its own
    elif status == "error":
        name = "CancelledError" if job.status == CANCELLED else (job.error_type or "GenerationError")
        body["error"] = {"name": name, "message": job.error or "generation failed"}
    if job.spec.get("model") == "tiny":
        body["note"] = TINY_NOTE
    return body


def _field(name: str) -> str:
    return _FROM_FAL.get(name, name)


router = APIRouter(prefix="/v2", tags=[NAME])
authed = [Depends(require_auth)]


@router.post("/video/generations", dependencies=authed, status_code=201, summary="Create a video generation task")
async def create(request: Request, core: Core = Depends(get_core)) -> Response:
    try:
        body = await asyncio.to_thread(json.loads, await read_body(request) or b"{}")  # up to ~400 MB of base64
    except RecursionError:
        raise ApiError(400, "body: request body is nested too deeply to parse", field="body",
                       error_type="validation_error") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON ({e})", error_type="validation_error") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", error_type="validation_error")
    try:
        req = parse_aiml_request(body)
    except KeyError:
        raise ApiError(400, f"model: must be one of {', '.join(AIML_MODELS)} (got {body.get('model')!r})",
                       field="model", error_type="validation_error") from None
    except ValidationError as e:
        raise validation_api_error(e, status_code=400) from None
    problem = check_served_model(core, req.model, REQUESTED_FAMILY)
    if problem:
        raise ApiError(404, problem, error_type="model_not_served")
    base = core.base_url(request)
    source, probe_note = None, None
    if needs_source(req):
        try:
            source, local_ref, probe_note = await probe_source(core, base, req.video_url, "video_url",
                                                               request_owner(request))
        except InputError as e:
            raise ApiError(400, f"{e.field}: {e.message}", field=e.field, error_type="invalid_input") from None
        req = req.model_copy(update={"video_url": local_ref})
    try:
        tr = aiml_to_jobspec(req, model=core.settings.model, source=source)
    except FieldError as e:
        raise ApiError(400, f"{_field(e.field)}: {e.message}", field=_field(e.field),
                       error_type="validation_error") from None
    except ValidationError as e:
        raise validation_api_error(e, FIELD_NAMES, status_code=400) from None
    # Only the normalised spec is stored (not the raw body): unknown fields and their values never reach the DB.
    logs = [served_note(core, req.model, REQUESTED_FAMILY), *([probe_note] if probe_note else []), *tr.notes]
    job = await core.create_job_async(tr.spec, dialect=NAME, model_id=req.model, base_url=base,
                                      field_names=FIELD_NAMES, logs=logs, extra={"ignored": tr.ignored},
                                      owner=request_owner(request))
    log.info("aiml job %s for %s (%s)", job.id, req.model, "; ".join(logs))
    return JSONResponse(render_generation(job, core, base), status_code=201)


@router.get("/video/generations", dependencies=authed, summary="Fetch a video generation task")
def fetch(request: Request, core: Core = Depends(get_core)) -> Response:
    gid = request.query_params.get("generation_id") or request.query_params.get("id")
    if not gid:
        raise ApiError(400, "generation_id: query parameter is required", field="generation_id",
                       error_type="validation_error")
    job_id, sep, model = gid.partition(":")
    job = core.get_job(job_id, owner=request_owner(request))
    if job is None or job.dialect != NAME or (sep and model != job.model):
        raise ApiError(404, f"generation '{gid}' not found", error_type="not_found")
    return JSONResponse(render_generation(job, core, core.base_url(request)))


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False,
                  dependencies=authed)
async def not_found(rest: str, request: Request) -> Response:
    """Anything else under /v2: the AI/ML error shape (not the fal catch-all's)."""
    if rest.strip("/") == "video/generations":
        raise ApiError(405, f"{request.method} is not allowed on {request.url.path} (use POST or GET)",
                       error_type="method_not_allowed")
    raise ApiError(404, f"{request.method} {request.url.path} not found: use POST or GET /v2/video/generations",
                   error_type="not_found")


DIALECT = Dialect(name=NAME, router=router, render_error=render_error, path_prefixes=("/v2/",))
