"""AI/ML API responses: the generation object (`{id, status, video, error, meta}`) and the documented error body
`{message, path, requestId, statusCode, timestamp}`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.dialects.common import check_fields, prompt_used
from server.errors import ApiError
from server.files import Files
from server.jobs import TINY_NOTE, JobRecord
from server.states import JobStatus

STATUS = {JobStatus.QUEUED: "queued", JobStatus.RUNNING: "generating", JobStatus.SUCCEEDED: "completed",
          JobStatus.FAILED: "error", JobStatus.CANCELLED: "error"}


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


def render_generation(job: JobRecord, files: Files, base: str) -> dict[str, Any]:
    status = STATUS[job.status]
    body: dict[str, Any] = {"id": generation_id(job), "status": status, "video": None, "error": None, "meta": None}
    if job.status == JobStatus.SUCCEEDED:
        outs = files.output_urls(job, base)
        video = next((o for o in outs if o.get("kind") == "video"), outs[0] if outs else None)
        body["video"] = {"url": video["url"]} if video else None
        body["meta"] = {"usage": {"credits_used": 0}, **check_fields(job)}
        if ((job.result or {}).get("prompt_expansion") or {}).get("status") == "expanded":
            body["meta"]["prompt"] = prompt_used(job)  # AI/ML has no prompt field of its own
    elif status == "error":
        name = "CancelledError" if job.status == JobStatus.CANCELLED else (job.error_type or "GenerationError")
        body["error"] = {"name": name, "message": job.error or "generation failed"}
    if job.spec.get("model") == "tiny":
        body["note"] = TINY_NOTE
    return body
