"""WaveSpeed responses: the `{code, message, data}` envelope, the prediction `data` object, the webhook body."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.auth import request_owner
from server.dialects.common import expansion_note, nsfw_flag, safety_note, windows_field
from server.dialects.wavespeed.schemas import STATUS, SYNC_TIMEOUT_CODE
from server.errors import ApiError
from server.files import Files
from server.jobs import TINY_NOTE, JobRecord, iso_time
from server.states import JobStatus


def envelope(data: Any, code: int = 200, message: str = "success") -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}


def render_data(job: JobRecord, files: Files, base: str, *, base64_output: bool | None = None) -> dict[str, Any]:
    """The `data` object for one job: id, model, outputs, urls.get, status, created_at, error, timings."""
    if base64_output is None:
        base64_output = bool(job.extra.get("enable_base64_output"))
    outs = files.output_urls(job, base)
    media = [o for o in outs if str(o.get("content_type", "")).startswith(("video/", "image/"))]
    videos = [o for o in media if o.get("kind") == "video"] + [o for o in media if o.get("kind") != "video"]
    if base64_output:
        try:
            outputs = [base64.b64encode(files.output_path(job, o).read_bytes()).decode() for o in videos]
        except OSError:
            raise ApiError(404, f"the outputs of prediction '{job.id}' are no longer available",
                           error_type="not_found") from None
    else:
        outputs = [o["url"] for o in videos]
    infer_ms = int(round(1000 * (job.timings.get("generate") or 0.0)))
    total_ms = int(round(1000 * (job.timings.get("total") or 0.0)))
    error = job.error or ""
    if job.status == JobStatus.CANCELLED and not error:
        error = "cancelled by request"
    data: dict[str, Any] = {
        "id": job.id,
        "model": job.model,
        "outputs": outputs,
        "urls": {"get": f"{base}/api/v3/predictions/{job.id}/result"},
        # Per output: the checker's verdict on the video; null where nothing was checked (see README).
        "has_nsfw_contents": [nsfw_flag(job) if o.get("kind") == "video" else None for o in videos],
        "status": STATUS[job.status],
        "created_at": iso_time(job.created_at),
        "error": error,
        "executionTime": total_ms,
        "timings": {"inference": infer_ms},
    }
    if job.spec.get("model") == "tiny":
        data["note"] = TINY_NOTE
    if note := safety_note(job):
        data["safety_checker"] = note
    if note := expansion_note(job):
        data["prompt_expansion"] = note
    data.update(windows_field(job))
    return data


def render_webhook(job: JobRecord, files: Files) -> dict[str, Any]:
    data = render_data(job, files, files.job_base_url(job), base64_output=False)
    data["input"] = job.extra.get("input", {})
    data.pop("executionTime", None)
    return data


def render_error(request: Request, err: ApiError) -> Response:
    status = 400 if err.status_code == 422 else err.status_code
    body = envelope(None, status, err.message)
    if err.error_type == "base64_webhook":
        body["error"] = err.message
    return JSONResponse(body, status_code=status)


def sync_data(job: JobRecord, files: Files, base: str, timeout_s: float) -> dict[str, Any]:
    """`data` for `enable_sync_mode`: a job still running when the wait ends (`timeout_s`) carries WaveSpeed's
    timeout code."""
    data = render_data(job, files, base)
    if not job.terminal:
        data["code"] = SYNC_TIMEOUT_CODE
        data["error"] = (f"Sync mode timed out after {timeout_s:g} s; the task is still "
                         f"running, query {data['urls']['get']}")
    return data


def upload_data(files: Files, request: Request, info: Any) -> dict[str, Any]:
    base = files.base_url(request)
    return {
        "type": info.media_kind or "file",
        "download_url": files.file_url(base, "uploads", info.id, info.filename, request_owner(request)),
        "filename": info.filename,
        "size": info.size,
    }
