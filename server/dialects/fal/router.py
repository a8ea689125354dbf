"""fal dialect: the `fal-ai/wan-vace-14b` queue API (and the synchronous run path) on the shared core.

Routes (fal-client's FAL_QUEUE_RUN_HOST = `<host>:<port>`, FAL_RUN_HOST = `<host>:<port>/run`):
- `POST /fal-ai/wan-vace-14b[/depth|/pose|/inpainting|/outpainting|/reframe][?fal_webhook=<url>]` → submit
- `GET  /fal-ai/wan-vace-14b/requests/{id}/status[?logs=1|true]` → 202 IN_QUEUE / IN_PROGRESS, 200 COMPLETED
- `GET  /fal-ai/wan-vace-14b/requests/{id}` → the output (a failed job answers 4xx/5xx with `detail`)
- `PUT  /fal-ai/wan-vace-14b/requests/{id}/cancel`
- `POST /run/fal-ai/wan-vace-14b[/sub]` → synchronous: the output body directly
Status/result/cancel are routed by owner/alias (fal-client drops the sub-path). Every response carries
`x-fal-request-id`; errors are `{"detail": ...}` (a list of `{loc, msg, type}` for 422). The catch-all
`POST /{app_id:path}` is registered last.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

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
    iso_time,
    read_body,
    request_owner,
    require_auth,
    user_field,
)
from server.dialects import Dialect
from server.dialects.common import expansion_note, nsfw_flag, prompt_used, safety_note, safety_requested
from server.dialects.fal.serving import (
    FAL_APP_ID,
    FAL_ENDPOINTS,
    FieldError,
    SourceInfo,
    Translation,
    fal_to_jobspec,
    parse_fal_request,
)
from vace_local.errors import InputError
from vace_local.media_vet import MediaLimits
from vace_local.sandbox import vet_file_async

log = logging.getLogger("vace.server.fal")

NAME = "fal"
OWNER, ALIAS = FAL_APP_ID.split("/")
#: JobSpec / JobInputs names → fal's, so every error names the user's field.
FIELD_NAMES = {
    "video": "video_url", "mask_video": "mask_video_url", "mask_image": "mask_image_url",
    "reference_images": "ref_image_urls", "first_image": "first_frame_url", "last_image": "last_frame_url",
    "flow_shift": "shift", "fps": "frames_per_second", "interpolator": "interpolator_model",
    "width": "resolution", "height": "resolution",
}
#: Wan family each API model id asks for (model mapping: `Settings.model_map`).
REQUESTED_FAMILY = "wan2.1-vace-14b"


# ---- model mapping (shared with the AI/ML dialect) -------------------------------------------------------

def check_served_model(core: Core, model_id: str, family: str) -> str | None:
    """None when the served model answers `model_id`, else the reason it does not. Returns a log note
    via `served_note`. `tiny` serves every id; `Settings.model_map` maps an id or family to the served model."""
    served = core.settings.model
    if core.settings.is_tiny or served == family:
        return None
    mapping = getattr(core.settings, "model_map", {}) or {}
    if mapping.get(model_id) == served or mapping.get(family) == served:
        return None
    return (f"model '{model_id}' ({family}) is not served here: this server runs '{served}'. Map it with "
            f"VACE_MODEL_MAP='{{\"{family}\": \"{served}\"}}' to answer it with the served model")


def served_note(core: Core, model_id: str, family: str) -> str:
    served = core.settings.model
    if served == family:
        return f"model: {model_id} served by {served}"
    return f"model: {model_id} ({family}) answered with the served model '{served}' (model mapping)"


# ---- input video probing (auto resolution / aspect, match_input_*) ---------------------------------------

def _local_path_url(core: Core, base: str, path: str) -> str:
    """Our own file URL for a path under data_dir/uploads (what create_job accepts)."""
    p = Path(path).resolve()
    for kind in ("uploads", "outputs"):
        root = (core.data_dir / kind).resolve()
        if p.is_relative_to(root):
            rel = p.relative_to(root)
            return core.file_url(base, kind, rel.parts[0], rel.parts[1])
    raise ValueError(f"{p} is not a file of this server")


async def _file_chunks(path: Path):  # noqa: ANN202 - async generator
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


#: Longest a submit waits to fetch a remote input video for probing; beyond it the worker fetches it.
SUBMIT_PROBE_TIMEOUT_S = 30.0


async def probe_source(core: Core, base: str, value: str, field: str,
                       owner: str | None = None) -> tuple[SourceInfo | None, str, str | None]:
    """Make the input video local (stored as an upload), probe it; returns its facts, the reference to submit
    instead (our own file URL, so the worker does not download it again) and None.

    A refused reference (scheme, literal private/loopback host, bad data URI) or content that is not a readable
    video raises InputError. A remote video that cannot be fetched now (network error, HTTP error, slow host)
    does not: like fal and the AI/ML API, the request is accepted and the job fails (or succeeds) when the
    worker fetches it; then this returns (None, value, note) and the size/timing use the defaults.

    The video is probed in a sandboxed child process (`vace_local.sandbox`), never here: a crafted header can
    make a decoder abort or allocate tens of GB, which must cost one 4xx, not the API process."""
    # may decode a data URI: on the slow pool
    ref = await core.run_slow(core.resolve_input_reference, value, field, base, "video", owner)
    if ref.lower().startswith(("http://", "https://")):
        with tempfile.TemporaryDirectory(dir=core.data_dir / "cache") as tmp:
            dest = Path(tmp) / "video"
            s = core.settings
            try:
                await core.run_slow(safety.download, ref, dest, field, allowed=s.allowed_hosts,
                                    max_bytes=s.max_download_bytes,
                                    timeout_s=min(s.download_timeout_s, SUBMIT_PROBE_TIMEOUT_S))
            except InputError as e:
                return None, value, (f"{field} could not be fetched at submit ({e.message}); the worker fetches "
                                     "it, and resolution/aspect_ratio 'auto' use the defaults")
            ext = safety.check_file(dest, field, "video")
            # already bounded by the download limit: a video the client sent as a URL is not an upload
            info = await core.save_upload(_file_chunks(dest), f"{field}.{ext}", safety.mime_of(ext), owner=owner,
                                          field_name=field, max_bytes=s.max_download_bytes)
        local = str(info.path)
    else:
        local = ref
    limits = MediaLimits.from_env()
    limits = replace(limits, timeout_s=min(limits.timeout_s, SUBMIT_PROBE_TIMEOUT_S))
    facts = await vet_file_async(local, field, "video", decode=False, limits=limits)
    return (SourceInfo(num_frames=facts.num_frames, fps=facts.fps, width=facts.width, height=facts.height),
            _local_path_url(core, base, local), None)


def needs_source(body: Any) -> bool:
    return bool(getattr(body, "video_url", None)) and (
        body.resolution == "auto" or body.aspect_ratio == "auto" or body.match_input_num_frames
        or body.match_input_frames_per_second
    )


# ---- errors ---------------------------------------------------------------------------------------------

def _loc(name: str, where: str = "body") -> list[str | int]:
    """`ref_image_urls[1]` / `ref_image_urls.1` → [where, "ref_image_urls", 1] (pydantic's loc, indices as ints)."""
    parts = [p for p in re.split(r"[.\[\]]+", name) if p] if name and name != where else []
    return [where, *(int(p) if p.isdigit() else p for p in parts)]


def _loc_text(loc: list[str | int]) -> str:
    out = ""
    for p in loc[1:]:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or str(loc[0])


def validation_api_error(exc: ValidationError, field_names: dict[str, str] | None = None,
                         status_code: int = 422) -> ApiError:
    """pydantic errors → ApiError whose `errors` is fal's per-field list (loc starts with "body")."""
    errs: list[dict[str, Any]] = []
    for e in exc.errors():
        path = ".".join(str(x) for x in e.get("loc", ()))
        name = user_field(path, field_names) if path else ""
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        errs.append({"loc": _loc(name), "msg": msg, "type": e.get("type", "value_error")})
    msg = "; ".join(f"{_loc_text(x['loc'])}: {x['msg']}" for x in errs[:5])
    first = next((p for p in errs[0]["loc"][1:] if isinstance(p, str)), None) if errs else None
    return ApiError(status_code, msg, field=first, error_type="validation_error", errors=errs)


def field_api_error(field: str, message: str, status_code: int = 422, etype: str = "value_error",
                    where: str = "body") -> ApiError:
    """One named field's error; `where` is fal's loc root ("body" or "query"); field "body" = the whole body."""
    return ApiError(status_code, f"{field}: {message}", field=field.split("[")[0], error_type="validation_error",
                    errors=[{"loc": _loc(field, where), "msg": message, "type": etype}])


#: What may be echoed in `x-fal-request-id`: the ids we issue; never a client's control characters.
_HEADER_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _header_id(rid: Any) -> str:
    return str(rid) if rid and _HEADER_ID.fullmatch(str(rid)) else uuid.uuid4().hex


def _request_id(request: Request) -> str:
    return _header_id(request.path_params.get("request_id") or getattr(request.state, "fal_request_id", None))


def render_error(request: Request, err: ApiError) -> Response:
    detail: Any = err.errors if err.errors else err.message
    body: dict[str, Any] = {"detail": detail}
    headers = {"x-fal-request-id": _request_id(request)}
    if err.error_type and err.error_type not in ("validation_error",):
        headers["x-fal-error-type"] = err.error_type
    if err.status_code == 504:
        body["error_type"] = "request_timeout"
        headers["x-fal-request-timeout-type"] = "user"
    return JSONResponse(body, status_code=err.status_code, headers=headers)


# ---- rendering ------------------------------------------------------------------------------------------

def urls(base: str, job_id: str) -> dict[str, str]:
    b = f"{base}/{OWNER}/{ALIAS}/requests/{job_id}"
    return {"response_url": b, "status_url": f"{b}/status", "cancel_url": f"{b}/cancel"}


def _file(job: JobRecord, core: Core, out: dict[str, Any], data_uri: bool) -> dict[str, Any]:
    url = out["url"]
    if data_uri:
        raw = core.output_path(job, out).read_bytes()
        url = f"data:{out.get('content_type') or 'application/octet-stream'};base64,{base64.b64encode(raw).decode()}"
    return {"url": url, "content_type": out.get("content_type"), "file_name": out.get("file"),
            "file_size": out.get("size")}


def render_output(job: JobRecord, core: Core, base: str) -> dict[str, Any]:
    """fal's output: {video: {url, content_type, file_name, file_size, width, height, fps, duration,
    num_frames}, seed, prompt, frames_zip?}; `sync_mode` returns the media as data URIs."""
    outs = core.output_urls(job, base)
    sync = bool(job.extra.get("sync_mode"))
    video = next((o for o in outs if o.get("kind") == "video"), outs[0] if outs else None)
    res = job.result or {}
    # `prompt` is the prompt used for generation: the expanded one when enable_prompt_expansion ran.
    body: dict[str, Any] = {"prompt": prompt_used(job), "seed": res.get("seed", job.spec.get("seed"))}
    if video is not None:
        v = _file(job, core, video, sync)
        w = video.get("width", res.get("width"))
        h = video.get("height", res.get("height"))
        fps = video.get("fps", res.get("fps"))
        n = video.get("num_frames", res.get("num_frames"))
        v.update(width=w, height=h, fps=fps, num_frames=n,
                 duration=round(n / fps, 3) if n and fps else None)
        body["video"] = v
    zips = [o for o in outs if o.get("kind") == "frames_zip" or str(o.get("file", "")).endswith(".zip")]
    if zips:
        body["frames_zip"] = _file(job, core, zips[0], sync)
    if job.spec.get("model") == "tiny":
        body["note"] = TINY_NOTE
    body.update(check_fields(job))
    return body


def check_fields(job: JobRecord) -> dict[str, Any]:
    """Extra output fields for the safety check / prompt expansion (fal's name `has_nsfw_concepts`, null where
    nothing was checked), present only when the request asked; shared with the AI/ML dialect's `meta`."""
    fields: dict[str, Any] = {}
    if safety_requested(job):
        fields["has_nsfw_concepts"] = [nsfw_flag(job)]
    if note := safety_note(job):
        fields["safety_checker"] = note
    if note := expansion_note(job):
        fields["prompt_expansion"] = note
    return fields


_INPUT_ERR = re.compile(r"^input '([^']+)': (.*)$", re.S)


def failure_error(job: JobRecord) -> ApiError:
    """A finished-but-unsuccessful job as fal answers it on the result URL."""
    msg = job.error or "the request failed"
    if job.status == CANCELLED:
        return ApiError(400, "Request was cancelled", error_type="cancelled")
    m = _INPUT_ERR.match(msg)
    if job.error_type in ("input_error", "invalid_input") and m:
        return field_api_error(m.group(1), m.group(2))
    if job.error_type in ("input_error", "invalid_input"):
        return ApiError(422, msg, error_type="validation_error",
                        errors=[{"loc": ["body"], "msg": msg, "type": "value_error"}])
    return ApiError(500, msg, error_type=job.error_type or "internal_error")


def _log_items(job: JobRecord) -> list[dict[str, Any]]:
    items = [{"message": x.get("message", ""), "level": str(x.get("level", "info")).upper(),
              "source": x.get("source", "server"), "timestamp": iso_time(x.get("ts"))} for x in job.logs]
    if job.status == RUNNING and job.stage:
        step = f" {job.step}/{job.total}" if job.total else ""
        items.append({"message": f"{job.stage}{step}", "level": "INFO", "source": "worker",
                      "timestamp": iso_time(job.updated_at)})
    return items


def render_status(job: JobRecord, core: Core, base: str, with_logs: bool) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"request_id": job.id, **urls(base, job.id)}
    logs = _log_items(job) if with_logs else None
    if job.status == QUEUED:
        body.update(status="IN_QUEUE", queue_position=core.queue_position(job.id) or 0, logs=logs)
        return 202, body
    if job.status == RUNNING:
        body.update(status="IN_PROGRESS", logs=logs)
        return 202, body
    body.update(status="COMPLETED", logs=logs,
                metrics={"inference_time": job.timings.get("generate") or job.timings.get("total")})
    if job.status in (FAILED, CANCELLED):
        body.update(error=job.error or ("cancelled" if job.status == CANCELLED else "failed"),
                    error_type=job.error_type or ("cancelled" if job.status == CANCELLED else "internal_error"))
    return 200, body


def render_webhook(job: JobRecord, core: Core) -> dict[str, Any]:
    """fal's webhook payload: status OK + payload (the output) or ERROR + error and detail."""
    base = core.settings.public_base_url or job.extra.get("base_url") or core.base_url()
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    if job.status == SUCCEEDED:
        body.update(status="OK", payload=render_output(job, core, base), error=None)
    else:
        err = failure_error(job)
        body.update(status="ERROR", error=err.message,
                    payload={"detail": err.errors or [{"loc": ["body"], "msg": err.message, "type": "error"}]})
    return body


def _json(body: Any, request_id: str, status_code: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers={"x-fal-request-id": request_id})


# ---- submit ---------------------------------------------------------------------------------------------

def split_app_path(app_path: str) -> str:
    """`fal-ai/wan-vace-14b[/sub]` → the sub-endpoint ("" = base); ApiError 404 for anything else."""
    p = app_path.strip("/")
    if p == FAL_APP_ID:
        return ""
    if p.startswith(FAL_APP_ID + "/"):
        sub = p[len(FAL_APP_ID) + 1:]
        if sub in FAL_ENDPOINTS:
            return sub
    raise ApiError(404, f"Application '{p}' not found; served here: {FAL_APP_ID} and "
                   + ", ".join(f"{FAL_APP_ID}/{e}" for e in FAL_ENDPOINTS if e), error_type="not_found")


async def _read_json(request: Request) -> Any:
    raw = await read_body(request)
    try:
        import json

        return await asyncio.to_thread(json.loads, raw or b"{}")  # a body may be ~400 MB of base64
    except RecursionError:
        raise field_api_error("body", "request body is nested too deeply to parse", etype="json_invalid") from None
    except ValueError as e:
        raise ApiError(422, f"body: request body is not valid JSON ({e})", error_type="validation_error",
                       errors=[{"loc": ["body"], "msg": f"invalid JSON: {e}", "type": "json_invalid"}]) from None


async def create_fal_job(request: Request, core: Core, app_path: str) -> JobRecord:
    endpoint = split_app_path(app_path)
    app_id = FAL_APP_ID + (f"/{endpoint}" if endpoint else "")
    problem = check_served_model(core, app_id, REQUESTED_FAMILY)
    if problem:
        raise ApiError(404, problem, error_type="model_not_served")
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise field_api_error("body", "must be a JSON object", etype="dict_type")
    try:
        req = parse_fal_request(endpoint, body)
    except ValidationError as e:
        raise validation_api_error(e) from None
    base = core.base_url(request)
    source, probe_note = None, None
    if needs_source(req):
        try:
            source, local_ref, probe_note = await probe_source(core, base, req.video_url, "video_url",
                                                               request_owner(request))
        except InputError as e:
            raise field_api_error(e.field, e.message) from None
        req = req.model_copy(update={"video_url": local_ref})
    try:
        tr: Translation = fal_to_jobspec(endpoint, req, model=core.settings.model, source=source)
    except FieldError as e:
        raise field_api_error(e.field, e.message) from None
    except ValidationError as e:
        raise validation_api_error(e, FIELD_NAMES) from None
    webhook = request.query_params.get("fal_webhook") or None
    if webhook is not None:
        try:
            core.check_webhook_url(webhook, "fal_webhook")
        except ApiError as e:
            raise field_api_error("fal_webhook", e.message.split(": ", 1)[-1], where="query") from None
    # Only the normalised spec is stored (not the raw body): unknown fields and their values never reach the DB.
    logs = [served_note(core, app_id, REQUESTED_FAMILY), *([probe_note] if probe_note else []), *tr.notes]
    try:
        job = await core.create_job_async(
            tr.spec, dialect=NAME, model_id=app_id, base_url=base, webhook_url=webhook, field_names=FIELD_NAMES,
            logs=logs, extra={"endpoint": endpoint, "sync_mode": tr.sync_mode, "ignored": tr.ignored},
            owner=request_owner(request),
        )
    except ApiError as e:
        if e.status_code == 400 and e.field:
            raise field_api_error(e.field, e.message.split(": ", 1)[-1]) from None
        raise
    log.info("fal job %s for %s (%s)", job.id, app_id, "; ".join(logs))
    return job


router = APIRouter(tags=[NAME])
authed = [Depends(require_auth)]
REQ = f"/{OWNER}/{ALIAS}/requests/{{request_id}}"


def _job_or_404(core: Core, request_id: str, request: Request) -> JobRecord:
    job = core.get_job(request_id, with_logs=True, owner=request_owner(request))
    if job is None or job.dialect != NAME:
        raise ApiError(404, f"Request '{request_id}' not found", error_type="not_found")
    return job


#: The same routes with the sub-endpoint kept (`.../wan-vace-14b/pose/requests/{id}`): fal-client drops it,
#: hand-built URLs often keep it.
SUB_REQ = f"/{OWNER}/{ALIAS}/{{endpoint}}/requests/{{request_id}}"


def _check_endpoint(endpoint: str) -> None:
    if endpoint not in FAL_ENDPOINTS or not endpoint:
        split_app_path(f"{FAL_APP_ID}/{endpoint}")  # raises the 404 that lists the served endpoints


@router.get(SUB_REQ + "/status", dependencies=authed, include_in_schema=False)
def status_sub(endpoint: str, request_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    _check_endpoint(endpoint)
    return status(request_id, request, core)


@router.get(SUB_REQ, dependencies=authed, include_in_schema=False)
def result_sub(endpoint: str, request_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    _check_endpoint(endpoint)
    return result(request_id, request, core)


@router.put(SUB_REQ + "/cancel", dependencies=authed, include_in_schema=False)
def cancel_sub(endpoint: str, request_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    _check_endpoint(endpoint)
    return cancel(request_id, request, core)


@router.get(REQ + "/status", dependencies=authed, summary="fal queue status")
def status(request_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    job = _job_or_404(core, request_id, request)
    with_logs = request.query_params.get("logs", "0").lower() in ("1", "true", "yes")
    code, body = render_status(job, core, core.base_url(request), with_logs)
    return _json(body, job.id, code)


@router.get(REQ, dependencies=authed, summary="fal queue result")
def result(request_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    job = _job_or_404(core, request_id, request)
    if job.status == SUCCEEDED:
        return _json(render_output(job, core, core.base_url(request)), job.id)
    if job.terminal:
        raise failure_error(job)
    raise ApiError(400, "Request is still in progress", error_type="in_progress")


@router.put(REQ + "/cancel", dependencies=authed, summary="fal queue cancel")
def cancel(request_id: str, request: Request, core: Core = Depends(get_core)) -> Response:
    job = core.get_job(request_id, owner=request_owner(request))
    if job is None or job.dialect != NAME:
        return _json({"status": "NOT_FOUND"}, _header_id(request_id), 404)
    if job.terminal:
        return _json({"status": "ALREADY_COMPLETED"}, request_id, 400)
    core.cancel_job(request_id, request_owner(request))
    return _json({"status": "CANCELLATION_REQUESTED"}, request_id, 202)


@router.api_route(f"/{OWNER}/{{rest:path}}", methods=["GET", "PUT", "DELETE", "PATCH"], include_in_schema=False,
                  dependencies=authed)
@router.api_route("/run/{rest:path}", methods=["GET", "PUT", "DELETE", "PATCH"], include_in_schema=False,
                  dependencies=authed)
async def not_found(rest: str, request: Request) -> Response:
    """Anything else under fal's prefixes: a 404 in fal's shape (not the catch-all's 405)."""
    raise ApiError(404, f"{request.method} {request.url.path} not found: fal routes are POST "
                   f"/{FAL_APP_ID}[/sub], GET {REQ}[/status] and PUT {REQ}/cancel", error_type="not_found")


@router.post("/run/{app_path:path}", dependencies=authed, summary="fal synchronous run")
async def run_sync(app_path: str, request: Request, core: Core = Depends(get_core)) -> Response:
    job = await create_fal_job(request, core, app_path)
    request.state.fal_request_id = job.id
    job = await core.wait_for_job(job.id)
    if not job.terminal:
        raise ApiError(504, "Request timed out", error_type="request_timeout")
    if job.status != SUCCEEDED:
        raise failure_error(job)
    body = await asyncio.to_thread(render_output, job, core, core.base_url(request))  # sync_mode: base64 media
    return _json(body, job.id)


@router.post("/{app_path:path}", dependencies=authed, summary="fal queue submit (fal-ai/wan-vace-14b[/sub])")
async def submit(app_path: str, request: Request, core: Core = Depends(get_core)) -> Response:
    job = await create_fal_job(request, core, app_path)
    base = core.base_url(request)
    body = {"request_id": job.id, "gateway_request_id": job.id, "status": "IN_QUEUE",
            "queue_position": await asyncio.to_thread(core.queue_position, job.id) or 0, **urls(base, job.id)}
    return _json(body, job.id)


DIALECT = Dialect(name=NAME, router=router, render_error=render_error, render_webhook=render_webhook,
                  path_prefixes=(f"/{OWNER}/", "/run/"), catch_all=True)
