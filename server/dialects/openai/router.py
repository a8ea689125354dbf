"""OpenAI videos API dialect: what the official `openai` SDK's `client.videos` calls, on the shared core.

Routes: `POST /v1/videos` (multipart — what the SDK always sends — or JSON), `GET /v1/videos` (cursor list:
`after`, `limit`, `order`), `GET /v1/videos/{id}`, `DELETE /v1/videos/{id}`, `GET /v1/videos/{id}/content`
(`variant=video`; thumbnails and spritesheets are not produced here → 404 naming `variant`).
Statuses: queued | in_progress | completed | failed (a cancelled job is `failed` with code `cancelled`).
Errors: `{"error": {"message", "type", "param", "code"}}`, `param` naming the field, as the SDK parses them.
Model names: `sora-2`, `sora-2-pro` and their dated snapshots are aliases of the served model, and so is the
served model's own name; any other name must be mapped with `VACE_MODEL_MAP` (the tiny model answers all).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from server import inputs as safety
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
    request_owner,
    require_auth,
)
from server.dialects import Dialect
from server.dialects.fal.router import check_served_model
from server.dialects.openai.serving import (
    OPENAI_MODEL_RE,
    InputReferenceObject,
    Reference,
    VideoCreateRequest,
    field_names,
    parse_request,
    seconds_text,
    to_spec,
)
from server.store import jobs

log = logging.getLogger("vace.server.openai")

NAME = "openai"
STATUS = {QUEUED: "queued", RUNNING: "in_progress", SUCCEEDED: "completed", FAILED: "failed",
          CANCELLED: "failed"}
#: Sent with every non-terminal retrieve: the SDK's `poll()` waits this long between polls.
POLL_AFTER_MS = 500
LIST_LIMIT_MAX = 100
#: How long a DELETE of a running video waits for its worker to stop at the next step.
DELETE_WAIT_S = 10.0
VARIANTS = ("video", "thumbnail", "spritesheet")
#: Our error types → OpenAI's error codes (others pass through unchanged).
CODES = {"unauthorized": "invalid_api_key", "validation_error": "invalid_value", "invalid_input": "invalid_value",
         "queue_full": "rate_limit_exceeded", "not_found": "not_found"}


# ---- errors and rendering -----------------------------------------------------------------------------


def render_error(request: Request, err: ApiError) -> Response:
    status = 400 if err.status_code == 422 else err.status_code
    etype = ("server_error" if status >= 500 else "rate_limit_error" if status == 429
             else "invalid_request_error")
    body = {"message": err.message, "type": etype, "param": err.field,
            "code": CODES.get(err.error_type, err.error_type)}
    return JSONResponse({"error": body}, status_code=status)


def _bad(field: str, message: str, status: int = 400, code: str = "invalid_value") -> ApiError:
    return ApiError(status, f"{field}: {message}", field=field, error_type=code)


def render_video(job: JobRecord, core: Core) -> dict[str, Any]:
    """The `Video` object of the SDK (openai/types/video.py) for one job."""
    spec = job.spec
    status = STATUS[job.status]
    if job.status == SUCCEEDED:
        progress = 100
    elif job.status == RUNNING:
        progress = max(0, min(99, int(job.progress * 100)))
    else:
        progress = 0 if job.status == QUEUED else int(job.progress * 100)
    error = None
    if status == "failed":
        code = "cancelled" if job.status == CANCELLED else (job.error_type or "generation_failed")
        error = {"code": code, "message": job.error or "generation failed"}
    retention = core.settings.retention_hours
    finished = int(job.finished_at) if job.finished_at is not None else None
    body: dict[str, Any] = {
        "id": job.id,
        "object": "video",
        "created_at": int(job.created_at),
        "completed_at": finished,
        "expires_at": int(job.finished_at + retention * 3600) if job.finished_at and retention else None,
        "error": error,
        "model": job.model,
        "progress": progress,
        "prompt": spec.get("prompt"),
        "remixed_from_video_id": None,
        "seconds": seconds_text(spec["num_frames"], spec["fps"]),
        "size": f"{spec['width']}x{spec['height']}",
        "status": status,
    }
    if spec.get("model") == "tiny":
        body["note"] = TINY_NOTE
    return body


# ---- request parsing ----------------------------------------------------------------------------------


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


async def _read_body(request: Request, core: Core) -> tuple[dict[str, Any], UploadFile | None]:
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        from server.app import max_request_bytes

        form = await request.form(max_files=2, max_fields=200, max_part_size=max_request_bytes(core.settings))
        return form_to_dict(form.multi_items())
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
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
        return safety.kind_of(safety.sniff(base64.b64decode(head[: len(head) // 4 * 4])))
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


def model_problem(core: Core, model: str) -> str | None:
    """None when the served model answers `model` (see the module docstring), else the reason."""
    if OPENAI_MODEL_RE.match(model) or model == core.settings.model:
        return None
    return check_served_model(core, model, model)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


def _discard_upload(core: Core, upload_id: str) -> None:
    core.storage.delete_prefix(f"uploads/{upload_id}")
    core.store.delete_uploads([upload_id])


# ---- job lookup, list and delete (store calls: run in worker threads, never on the event loop) -------------


def _job_or_404(core: Core, video_id: str, owner: str | None) -> JobRecord:
    job = core.get_job(video_id, owner=owner)
    if job is None or job.dialect != NAME:
        raise ApiError(404, f"video '{video_id}' not found", field="video_id", error_type="not_found")
    return job


def list_jobs(core: Core, *, after: str | None, limit: int, order: str,
              owner: str | None = None) -> tuple[list[JobRecord], bool]:
    """One page of this dialect's jobs visible to `owner` (its own and those made without keys) by
    (created_at, id), after the job `after`; returns (page, has_more)."""
    t = jobs
    mine = t.c.dialect == NAME
    if owner is not None:
        mine = sa.and_(mine, sa.or_(t.c.owner == owner, t.c.owner.is_(None)))
    q = t.select().where(mine)
    with core.store.engine.connect() as c:
        if after:
            row = c.execute(sa.select(t.c.created_at, t.c.id).where(t.c.id == after, mine)).first()
            if row is None:
                raise _bad("after", f"no video with id '{after}'")
            ts, jid = row
            if order == "asc":
                q = q.where(sa.or_(t.c.created_at > ts, sa.and_(t.c.created_at == ts, t.c.id > jid)))
            else:
                q = q.where(sa.or_(t.c.created_at < ts, sa.and_(t.c.created_at == ts, t.c.id < jid)))
        keys = (t.c.created_at, t.c.id) if order == "asc" else (t.c.created_at.desc(), t.c.id.desc())
        rows = c.execute(q.order_by(*keys).limit(limit + 1)).all()
    return [JobRecord.from_row(r) for r in rows[:limit]], len(rows) > limit


def delete_job(core: Core, job: JobRecord) -> None:
    """Remove the job, its outputs and the upload its input_reference became."""
    core.storage.delete_prefix(f"outputs/{job.id}")
    core.store.delete_jobs([job.id])
    upload_id = job.extra.get("upload_id")
    if upload_id:
        _discard_upload(core, upload_id)


# ---- routes -------------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=[NAME])
authed = [Depends(require_auth)]


@router.post("/videos", dependencies=authed, summary="Create a video (OpenAI videos API)")
async def create_video(request: Request, core: Core = Depends(get_core)) -> Response:
    body, upload = await _read_body(request, core)
    try:
        return await _create(request, core, body, upload)
    finally:
        if upload is not None:
            await upload.close()  # the spooled copy of the file part


async def _create(request: Request, core: Core, body: dict[str, Any], upload: UploadFile | None) -> Response:
    if upload is not None and "input_reference" in body:
        raise _bad("input_reference", "send either a file part or image_url, not both")
    req: VideoCreateRequest = parse_request(body)
    problem = model_problem(core, req.model)
    if problem:
        raise ApiError(400, f"model: {problem}", field="model", error_type="model_not_found")
    ref: Reference | None = None
    if upload is not None:
        head = await upload.read(512)
        await upload.seek(0)
        kind = safety.kind_of(safety.sniff(head))
        if kind is None:
            raise _bad("input_reference", "must be an image (PNG, JPEG, WEBP, …) or a video (MP4, WEBM, MOV, …); "
                       "the content is not a recognised format")
        ref = Reference(kind, "input_reference")  # placeholder until the file is stored (after validation)
    elif req.input_reference is not None:
        ref = reference_of(req.input_reference)
    spec, notes = to_spec(req, ref)  # every field is checked before anything is stored
    base = core.base_url(request)
    upload_id = None
    if upload is not None and ref is not None:
        info = await core.save_upload(_chunks(upload), upload.filename or f"input_reference.{ref.kind}",
                                      upload.content_type, owner=request_owner(request),
                                      field_name="input_reference")
        upload_id = info.id
        target = "first_image" if ref.kind == "image" else "video"
        url = core.file_url(base, "uploads", info.id, info.filename, request_owner(request))
        spec = spec.model_copy(update={"inputs": spec.inputs.model_copy(update={target: url})})
    served = core.settings.model
    logs = [f"model: '{req.model}' answered by the served model '{served}'", *notes]
    try:
        job = await core.create_job_async(
            spec, dialect=NAME, model_id=req.model, base_url=base, field_names=field_names(ref), logs=logs,
            extra={"upload_id": upload_id}, owner=request_owner(request))
    except BaseException:
        if upload_id:
            await asyncio.to_thread(_discard_upload, core, upload_id)
        raise
    log.info("openai video %s (%s)", job.id, "; ".join(logs))
    return JSONResponse(render_video(job, core))


@router.get("/videos", dependencies=authed, summary="List videos (cursor pages)")
def list_videos(request: Request, after: str | None = Query(None), limit: str = Query("20"),
                order: str = Query("desc"), core: Core = Depends(get_core)) -> Response:
    if not limit.strip().isdigit() or not 1 <= int(limit) <= LIST_LIMIT_MAX:
        raise _bad("limit", f"must be an integer within 1..{LIST_LIMIT_MAX} (got {limit!r})")
    if order not in ("asc", "desc"):
        raise _bad("order", f"must be 'asc' or 'desc' (got {order!r})")
    page, has_more = list_jobs(core, after=after or None, limit=int(limit), order=order,
                               owner=request_owner(request))
    data = [render_video(j, core) for j in page]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": has_more})


@router.get("/videos/{video_id}", dependencies=authed, summary="Retrieve a video")
def retrieve_video(video_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    job = _job_or_404(core, video_id, request_owner(request))
    headers = {} if job.terminal else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
    return JSONResponse(render_video(job, core), headers=headers)


@router.delete("/videos/{video_id}", dependencies=authed, summary="Delete a video and its files")
def delete_video(video_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    owner = request_owner(request)
    job = _job_or_404(core, video_id, owner)
    if not job.terminal:
        core.cancel_job(video_id, owner)
        deadline = time.monotonic() + DELETE_WAIT_S
        while not job.terminal and time.monotonic() < deadline:
            time.sleep(0.1)
            job = _job_or_404(core, video_id, owner)
        if not job.terminal:
            raise ApiError(409, f"video '{video_id}' is still stopping after cancellation; retry the delete",
                           error_type="video_in_progress")
    delete_job(core, job)
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})


@router.get("/videos/{video_id}/content", dependencies=authed, summary="Download the video (mp4)")
def download_content(video_id: str, request: Request, variant: str = Query("video"),
                     core: Core = Depends(get_core)) -> Response:
    if variant not in VARIANTS:
        raise _bad("variant", f"must be one of {', '.join(VARIANTS)} (got {variant!r})")
    job = _job_or_404(core, video_id, request_owner(request))
    if variant != "video":
        raise _bad("variant", f"'{variant}' is not produced by this server; only 'video' (the mp4) is",
                   status=404, code="variant_not_available")
    if job.status != SUCCEEDED:
        raise ApiError(400, f"video '{video_id}' is {STATUS[job.status]}; its content is available once it is "
                       "completed", field="video_id", error_type="video_not_ready")
    video = next((o for o in job.outputs if o.get("kind") == "video"), None)
    path = core.output_path(job, video) if video else None
    if path is None or not path.is_file():
        raise ApiError(404, f"the content of video '{video_id}' is no longer available", field="video_id",
                       error_type="not_found")
    return FileResponse(path, media_type="video/mp4")


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False,
                  dependencies=authed)
async def not_found(rest: str, request: Request) -> Response:
    """Anything else under /v1 (remix, edits, extensions, characters, other APIs): OpenAI's error shape."""
    parts = rest.strip("/").split("/")
    if parts[0] == "videos" and len(parts) <= 2 and parts[-1] not in ("edits", "extensions", "characters"):
        raise ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                       error_type="method_not_allowed")
    raise ApiError(404, f"{request.method} {request.url.path} is not served here; this server offers the videos "
                   "API's create, retrieve, list, delete and content (no remix, edits, extensions or characters)",
                   error_type="not_found")


DIALECT = Dialect(name=NAME, router=router, render_error=render_error, path_prefixes=("/v1/",))
