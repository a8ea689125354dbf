"""fal responses, built from the job record and `ApiError.problems`: the queue's status / result / webhook
bodies, and errors as `{"detail": …}` (a list of pydantic-shaped `{loc, msg, type}` for field errors)."""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.dialects.common import check_fields, prompt_used
from server.dialects.fal.schemas import ALIAS, FAL_APPS, OWNER
from server.errors import ApiError
from server.files import Files
from server.jobs import TINY_NOTE, JobRecord, iso_time
from server.states import JobStatus
from vace_local.core.errors import Problem

# ---- errors ---------------------------------------------------------------------------------------------


def loc_of(problem: Problem) -> list[str | int]:
    """pydantic's `loc` for a problem: rooted at "body" / "query", list indices as ints; a path that starts
    with its location (`body`, `query.x`) is not rooted twice."""
    path = problem.path
    return [problem.location, *(path[1:] if path[:1] == [problem.location] else path)]


def detail_item(problem: Problem) -> dict[str, Any]:
    return {"loc": loc_of(problem), "msg": problem.message, "type": problem.type}


def fal_invalid(problems: Problem | list[Problem], status_code: int = 422) -> ApiError:
    """A field error as fal answers it: 422, `detail` per field, the message `field: rule; …` (at most five)."""
    return ApiError.invalid(problems, status_code, show_got=False, more=False)


def field_error(field: str, message: str, etype: str = "value_error", where: str = "body") -> ApiError:
    """One named field's 422; `where` is fal's loc root ("body" or "query"); field "body" = the whole body."""
    return fal_invalid(Problem(field, message, etype, where))


#: What may be echoed in `x-fal-request-id`: the ids we issue; never a client's control characters.
_HEADER_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def header_id(rid: Any) -> str:
    return str(rid) if rid and _HEADER_ID.fullmatch(str(rid)) else uuid.uuid4().hex


def _request_id(request: Request) -> str:
    return header_id(request.path_params.get("request_id") or getattr(request.state, "fal_request_id", None))


def render_error(request: Request, err: ApiError) -> Response:
    detail: Any = [detail_item(p) for p in err.problems] if err.problems else err.message
    body: dict[str, Any] = {"detail": detail}
    headers = {"x-fal-request-id": _request_id(request)}
    if err.error_type and err.error_type not in ("validation_error",):
        headers["x-fal-error-type"] = err.error_type
    if err.status_code == 504:
        body["error_type"] = "request_timeout"
        headers["x-fal-request-timeout-type"] = "user"
    return JSONResponse(body, status_code=err.status_code, headers=headers)


def app_alias(job: JobRecord) -> str:
    """The fal app (alias) a job was submitted to, from its model id `fal-ai/<alias>[/sub]`."""
    parts = job.model.split("/")
    return parts[1] if len(parts) > 1 and parts[0] == OWNER and parts[1] in FAL_APPS else ALIAS


def urls(base: str, job: JobRecord) -> dict[str, str]:
    b = f"{base}/{OWNER}/{app_alias(job)}/requests/{job.id}"
    return {"response_url": b, "status_url": f"{b}/status", "cancel_url": f"{b}/cancel"}


def _file(job: JobRecord, files: Files, out: dict[str, Any], data_uri: bool) -> dict[str, Any]:
    url = out["url"]
    if data_uri:
        raw = files.output_path(job, out).read_bytes()
        url = f"data:{out.get('content_type') or 'application/octet-stream'};base64,{base64.b64encode(raw).decode()}"
    return {"url": url, "content_type": out.get("content_type"), "file_name": out.get("file"),
            "file_size": out.get("size")}


def render_output(job: JobRecord, files: Files, base: str) -> dict[str, Any]:
    """fal's output: {video: {url, content_type, file_name, file_size, width, height, fps, duration,
    num_frames}, seed, prompt, frames_zip?}; `sync_mode` returns the media as data URIs."""
    outs = files.output_urls(job, base)
    sync = bool(job.extra.get("sync_mode"))
    video = next((o for o in outs if o.get("kind") == "video"), outs[0] if outs else None)
    res = job.result or {}
    # `prompt` is the prompt used for generation: the expanded one when enable_prompt_expansion ran.
    body: dict[str, Any] = {"prompt": prompt_used(job), "seed": res.get("seed", job.spec.get("seed"))}
    if video is not None:
        v = _file(job, files, video, sync)
        w = video.get("width", res.get("width"))
        h = video.get("height", res.get("height"))
        fps = video.get("fps", res.get("fps"))
        n = video.get("num_frames", res.get("num_frames"))
        v.update(width=w, height=h, fps=fps, num_frames=n,
                 duration=round(n / fps, 3) if n and fps else None)
        body["video"] = v
    zips = [o for o in outs if o.get("kind") == "frames_zip" or str(o.get("file", "")).endswith(".zip")]
    if zips:
        body["frames_zip"] = _file(job, files, zips[0], sync)
    if job.spec.get("model") == "tiny":
        body["note"] = TINY_NOTE
    body.update(check_fields(job))
    return body


def failure_error(job: JobRecord) -> ApiError:
    """A finished-but-unsuccessful job as fal answers it on the result URL; an input failure keeps the field
    and rule the worker recorded (`job.error_detail`)."""
    msg = job.error or "the request failed"
    if job.status == JobStatus.CANCELLED:
        return ApiError(400, "Request was cancelled", error_type="cancelled")
    if job.error_type in ("input_error", "invalid_input"):
        problems = [Problem(d.get("field"), str(d.get("message", "")), str(d.get("type") or "value_error"))
                    for d in job.error_detail or ()]
        if problems and all(p.field for p in problems):
            return fal_invalid(problems)
        return ApiError(422, msg, error_type="validation_error", problems=[Problem(None, msg)])
    return ApiError(500, msg, error_type=job.error_type or "internal_error")


def _log_items(job: JobRecord) -> list[dict[str, Any]]:
    items = [{"message": x.get("message", ""), "level": str(x.get("level", "info")).upper(),
              "source": x.get("source", "server"), "timestamp": iso_time(x.get("ts"))} for x in job.logs]
    if job.status == JobStatus.RUNNING and job.stage:
        step = f" {job.step}/{job.total}" if job.total else ""
        items.append({"message": f"{job.stage}{step}", "level": "INFO", "source": "worker",
                      "timestamp": iso_time(job.updated_at)})
    return items


def render_status(job: JobRecord, base: str, with_logs: bool, queue_position: int | None) -> tuple[int, dict[str, Any]]:
    """The queue status body (`queue_position`: the job's while it is queued)."""
    body: dict[str, Any] = {"request_id": job.id, **urls(base, job)}
    logs = _log_items(job) if with_logs else None
    if job.status == JobStatus.QUEUED:
        body.update(status="IN_QUEUE", queue_position=queue_position or 0, logs=logs)
        return 202, body
    if job.status == JobStatus.RUNNING:
        body.update(status="IN_PROGRESS", logs=logs)
        return 202, body
    body.update(status="COMPLETED", logs=logs,
                metrics={"inference_time": job.timings.get("generate") or job.timings.get("total")})
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        cancelled = job.status == JobStatus.CANCELLED
        body.update(error=job.error or ("cancelled" if cancelled else "failed"),
                    error_type=job.error_type or ("cancelled" if cancelled else "internal_error"))
    return 200, body


def render_webhook(job: JobRecord, files: Files) -> dict[str, Any]:
    """fal's webhook payload: status OK + payload (the output) or ERROR + error and detail."""
    base = files.job_base_url(job)
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    if job.status == JobStatus.SUCCEEDED:
        body.update(status="OK", payload=render_output(job, files, base), error=None)
    else:
        err = failure_error(job)
        body.update(status="ERROR", error=err.message,
                    payload={"detail": [detail_item(p) for p in err.problems]
                                         or [{"loc": ["body"], "msg": err.message, "type": "error"}]})
    return body


def json_response(body: Any, request_id: str, status_code: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers={"x-fal-request-id": request_id})
