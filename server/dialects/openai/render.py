"""OpenAI videos API responses: the SDK's `Video` object and the error body
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.dialects.common import windows_field
from server.dialects.openai.schemas import STATUS
from server.dialects.openai.serving import seconds_text
from server.errors import ApiError
from server.jobs import TINY_NOTE, JobRecord
from server.states import JobStatus

#: Sent with every non-terminal retrieve: the SDK's `poll()` waits this long between polls.
POLL_AFTER_MS = 500


#: Our error types → OpenAI's error codes (others pass through unchanged).
CODES = {"unauthorized": "invalid_api_key", "validation_error": "invalid_value", "invalid_input": "invalid_value",
         "queue_full": "rate_limit_exceeded", "not_found": "not_found"}


def render_error(request: Request, err: ApiError) -> Response:
    status = 400 if err.status_code == 422 else err.status_code
    etype = ("server_error" if status >= 500 else "rate_limit_error" if status == 429
             else "invalid_request_error")
    body = {"message": err.message, "type": etype, "param": err.field,
            "code": CODES.get(err.error_type, err.error_type)}
    return JSONResponse({"error": body}, status_code=status)


def render_video(job: JobRecord, retention_hours: float) -> dict[str, Any]:
    """The `Video` object of the SDK (openai/types/video.py) for one job (`expires_at` from the retention)."""
    spec = job.spec
    status = STATUS[job.status]
    if job.status == JobStatus.SUCCEEDED:
        progress = 100
    elif job.status == JobStatus.RUNNING:
        progress = max(0, min(99, int(job.progress * 100)))
    else:
        progress = 0 if job.status == JobStatus.QUEUED else int(job.progress * 100)
    error = None
    if status == "failed":
        code = "cancelled" if job.status == JobStatus.CANCELLED else (job.error_type or "generation_failed")
        error = {"code": code, "message": job.error or "generation failed"}
    retention = retention_hours
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
        **windows_field(job),
    }
    if spec.get("model") == "tiny":
        body["note"] = TINY_NOTE
    return body
