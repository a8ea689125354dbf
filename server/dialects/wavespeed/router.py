"""WaveSpeed dialect: `wavespeed-ai/wan-2.1-14b-vace` with the `{code, message, data}` envelope.

Routes (order matters: the `/api/v3/{model:path}` catch-all comes after predictions and media):
`POST /api/v3/media/upload/binary`, `POST /api/v3/media/uploads` + `PUT /api/v3/media/uploads/{id}`,
`GET /api/v3/predictions/{id}[/result]`, `POST /api/v3/predictions/{id}/cancel`, `POST /api/v3/{model}`.
Statuses: created | processing | completed | failed (every failure, cancellation included, is `failed`,
because older SDKs only treat `failed` as terminal).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    request_owner,
    require_auth,
    validation_error,
)
from server.dialects import PROMPT_MAX_CHARS, Dialect
from server.dialects.common import expansion_note, nsfw_flag, safety_note
from vace_local.spec import JobInputs, JobSpec, OutputOptions

log = logging.getLogger("vace.server.wavespeed")

NAME = "wavespeed"
MODEL_ID = "wavespeed-ai/wan-2.1-14b-vace"
SIZES = {"832*480": (832, 480), "480*832": (480, 832), "1280*720": (1280, 720), "720*1280": (720, 1280)}
FPS = 16
SYNC_TIMEOUT_CODE = 5004
BASE64_WEBHOOK_ERROR = ("webhook callback does not support base64 output, please use the normal API to use "
                        "base64 output")
#: JobSpec / JobInputs names → WaveSpeed's, so errors name the user's field.
FIELD_NAMES = {"reference_images": "images", "num_frames": "duration", "width": "size", "height": "size"}
STATUS = {QUEUED: "created", RUNNING: "processing", SUCCEEDED: "completed", FAILED: "failed", CANCELLED: "failed"}


class WanVaceInput(BaseModel):
    """Request body of `POST /api/v3/wavespeed-ai/wan-2.1-14b-vace` (fields, defaults and ranges as documented).

    Strict JSON types: a string where a number or boolean belongs (`"30"`, `"true"`) or a float where an
    integer belongs (`2.0`) is a 400 naming the field, as the documented types say, never a silent coercion.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS, description="What should happen in the video.")
    images: list[str] = Field(default_factory=list, max_length=5, description="Up to 5 reference image URLs.")
    video: str | None = Field(None, description="Source video for video-to-video workflows.")
    task: Literal["depth", "pose", "face", "inpainting", "none"] = Field(
        "depth", description="Control extracted from `video`; ignored (→ none) when no video is given.")
    negative_prompt: str = Field("", max_length=PROMPT_MAX_CHARS,
                                 description="What to avoid (a list of strings, as huggingface_hub sends, is joined).")
    mask_video: str | None = None
    mask_image: str | None = None
    image: str | None = Field(None, description="A single reference image (appended to `images`).")
    first_image: str | None = None
    last_image: str | None = None
    duration: int = Field(5, ge=5, le=10, description="Seconds at 16 fps (duration*16+1 frames).")
    size: Literal["832*480", "480*832", "1280*720", "720*1280"] = "832*480"
    num_inference_steps: int = Field(30, ge=1, le=40)
    guidance_scale: float = Field(5.0, ge=0.0, le=20.0, allow_inf_nan=False)
    flow_shift: float = Field(16.0, ge=0.0, le=30.0, allow_inf_nan=False)
    context_scale: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    seed: int = Field(-1, ge=-1, le=2147483647)
    enable_fast_mode: bool = False
    enable_safety_checker: bool = True
    enable_sync_mode: bool = False
    enable_base64_output: bool = False
    save_previews: bool = Field(False, description="vace-local extension: also write the control video and mask "
                                "the model saw (listed under `previews` by `GET /api/v3/predictions/{id}/progress`)")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty or only whitespace")
        return v

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _join_list(cls, v: Any) -> Any:
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return ", ".join(x.strip() for x in v if x.strip())
        return v

    @field_validator("video", "mask_video", "mask_image", "image", "first_image", "last_image", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("images", mode="before")
    @classmethod
    def _drop_empty(cls, v: Any) -> Any:
        return [x for x in v if not (isinstance(x, str) and not x.strip())] if isinstance(v, list) else v


def field_names_for(inp: WanVaceInput) -> dict[str, str]:
    """FIELD_NAMES plus the slot `image` takes in reference_images, so its errors say `image`, not `images[N]`."""
    return {**FIELD_NAMES, f"reference_images[{len(inp.images)}]": "image"} if inp.image else FIELD_NAMES


def to_spec(inp: WanVaceInput) -> tuple[JobSpec, list[str]]:
    """Map WaveSpeed's fields onto the JobSpec; returns the spec and log lines about adjustments."""
    notes: list[str] = []
    refs = list(inp.images) + ([inp.image] if inp.image else [])
    if len(refs) > 5:
        raise ApiError(400, "images: at most 5 reference images are allowed (including `image`), got "
                       f"{len(refs)}", field="images")
    if (inp.mask_video or inp.mask_image) and not inp.video:
        raise ApiError(400, "mask_video/mask_image: a mask needs `video` to apply to", field="video")
    task = inp.task
    if not inp.video and task != "none":
        notes.append(f"task '{task}' needs a video; none given, so generating from the prompt/images only")
        task = "none"
    if task == "inpainting" and not (inp.mask_video or inp.mask_image):
        raise ApiError(400, "task: 'inpainting' needs mask_video or mask_image", field="task")
    flow_shift = inp.flow_shift
    if flow_shift <= 0:
        flow_shift = 1e-3
        notes.append("flow_shift 0 is degenerate for flow matching; using 0.001")
    extra = sorted(set(inp.model_extra or ()))
    if extra:
        notes.append(f"ignored unknown fields: {', '.join(extra)}")
    w, h = SIZES[inp.size]
    if inp.enable_fast_mode:
        notes.append("enable_fast_mode → acceleration 'regular' (step cache)")
    try:
        spec = JobSpec(
            acceleration="regular" if inp.enable_fast_mode else "none",
            task=task, prompt=inp.prompt, negative_prompt=inp.negative_prompt or None, width=w, height=h,
            num_frames=inp.duration * FPS + 1, fps=FPS, num_inference_steps=inp.num_inference_steps,
            guidance_scale=inp.guidance_scale, flow_shift=flow_shift, context_scale=inp.context_scale,
            seed=inp.seed, output=OutputOptions(save_control=inp.save_previews),
            enable_safety_checker=inp.enable_safety_checker,
            inputs=JobInputs(video=inp.video, mask_video=inp.mask_video, mask_image=inp.mask_image,
                             reference_images=refs, first_image=inp.first_image, last_image=inp.last_image),
        )
    except ValidationError as e:
        raise validation_error(e, field_names_for(inp)) from None
    return spec, notes


# ---- rendering ----------------------------------------------------------------------------------------


def envelope(data: Any, code: int = 200, message: str = "success") -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}


def render_data(job: JobRecord, core: Core, base: str, *, base64_output: bool | None = None) -> dict[str, Any]:
    """The `data` object for one job: id, model, outputs, urls.get, status, created_at, error, timings."""
    if base64_output is None:
        base64_output = bool(job.extra.get("enable_base64_output"))
    outs = core.output_urls(job, base)
    media = [o for o in outs if str(o.get("content_type", "")).startswith(("video/", "image/"))]
    videos = [o for o in media if o.get("kind") == "video"] + [o for o in media if o.get("kind") != "video"]
    if base64_output:
        try:
            outputs = [base64.b64encode(core.output_path(job, o).read_bytes()).decode() for o in videos]
        except OSError:
            raise ApiError(404, f"the outputs of prediction '{job.id}' are no longer available",
                           error_type="not_found") from None
    else:
        outputs = [o["url"] for o in videos]
    infer_ms = int(round(1000 * (job.timings.get("generate") or 0.0)))
    total_ms = int(round(1000 * (job.timings.get("total") or 0.0)))
    error = job.error or ""
    if job.status == CANCELLED and not error:
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
    return data


def render_webhook(job: JobRecord, core: Core) -> dict[str, Any]:
    base = core.settings.public_base_url or job.extra.get("base_url") or core.base_url()
    data = render_data(job, core, base, base64_output=False)
    data["input"] = job.extra.get("input", {})
    data.pop("executionTime", None)
    return data


def render_error(request: Request, err: ApiError) -> Response:
    status = 400 if err.status_code == 422 else err.status_code
    body = envelope(None, status, err.message)
    if err.error_type == "base64_webhook":
        body["error"] = err.message
    return JSONResponse(body, status_code=status)


# ---- routes -------------------------------------------------------------------------------------------

router = APIRouter(prefix="/api/v3", tags=[NAME])
authed = [Depends(require_auth)]


def _job_or_404(core: Core, request_id: str, request: Request) -> JobRecord:
    job = core.get_job(request_id, owner=request_owner(request))
    if job is None or job.dialect != NAME:
        raise ApiError(404, f"prediction '{request_id}' not found", error_type="not_found")
    return job


@router.get("/predictions/{request_id}/result", dependencies=authed, summary="Get a prediction's result")
def get_result(request_id: str, request: Request, core: Core = Depends(get_core)) -> dict[str, Any]:
    job = _job_or_404(core, request_id, request)
    return envelope(render_data(job, core, core.base_url(request)))


@router.get("/predictions/{request_id}", dependencies=authed, summary="Get a prediction")
def get_prediction(request_id: str, request: Request, core: Core = Depends(get_core)) -> dict[str, Any]:
    return get_result(request_id, request, core)


@router.post("/predictions/{request_id}/cancel", dependencies=authed, summary="Cancel a prediction")
def cancel_prediction(request_id: str, request: Request, core: Core = Depends(get_core)) -> dict[str, Any]:
    _job_or_404(core, request_id, request)
    job = core.cancel_job(request_id, request_owner(request))
    assert job is not None
    return envelope(render_data(job, core, core.base_url(request)))


def _upload_data(core: Core, request: Request, info: Any) -> dict[str, Any]:
    base = core.base_url(request)
    return {
        "type": info.media_kind or "file",
        "download_url": core.file_url(base, "uploads", info.id, info.filename, request_owner(request)),
        "filename": info.filename,
        "size": info.size,
    }


@router.post("/media/upload/binary", dependencies=authed, summary="Upload a file (multipart field `file`)")
async def upload_binary(request: Request, file: UploadFile | str | None = File(None),
                        core: Core = Depends(get_core)) -> dict[str, Any]:
    if file is None:
        raise ApiError(400, "file: multipart form field 'file' is required", field="file")
    if isinstance(file, str):  # a part without a filename arrives as a plain form value
        raise ApiError(400, "file: must be a file part with a filename (multipart/form-data), not a plain "
                       "form value", field="file")

    async def chunks():  # noqa: ANN202
        while chunk := await file.read(1 << 20):
            yield chunk

    info = await core.save_upload(chunks(), file.filename or "upload", file.content_type,
                                  owner=request_owner(request))
    return envelope(_upload_data(core, request, info))


class UploadTicketRequest(BaseModel):
    filename: str = Field(..., min_length=1, max_length=255)
    size: int | None = Field(None, ge=0)
    content_type: str | None = None


@router.post("/media/uploads", dependencies=authed, summary="Create an upload URL (then PUT the bytes)")
def create_upload(body: UploadTicketRequest, request: Request,
                  core: Core = Depends(get_core)) -> dict[str, Any]:
    info = core.create_upload_ticket(body.filename, body.size, body.content_type, request_owner(request))
    base = core.base_url(request)
    headers = {"Content-Type": body.content_type} if body.content_type else {}
    data = _upload_data(core, request, info)
    data["id"] = info.id
    data["upload"] = {"method": "PUT", "url": f"{base}/api/v3/media/uploads/{info.id}?token={info.token}",
                      "headers": headers}
    return envelope(data)


@router.put("/media/uploads/{upload_id}", summary="Receive the bytes of a ticketed upload (token-authorised)")
async def put_upload(upload_id: str, request: Request, token: str = Query(""),
                     core: Core = Depends(get_core)) -> dict[str, Any]:
    info = await core.receive_upload(upload_id, token, request.stream())
    return envelope(_upload_data(core, request, info))


@router.post(f"/{MODEL_ID}", dependencies=authed, summary="Submit a Wan 2.1 VACE task")
async def submit(body: WanVaceInput, request: Request, webhook: str | None = Query(None),
                 core: Core = Depends(get_core)) -> Response:
    webhook = (webhook or "").strip() or None  # `?webhook=` (empty) means no webhook
    if webhook and body.enable_base64_output:
        raise ApiError(400, BASE64_WEBHOOK_ERROR, error_type="base64_webhook")
    spec, notes = to_spec(body)
    # Unknown fields are only named in the job log (to_spec): their values are never stored or echoed.
    raw = body.model_dump(mode="json", exclude_none=True, exclude=set(body.model_extra or ()))
    for k in ("images", "video", "mask_video", "mask_image", "image", "first_image", "last_image"):
        v = raw.get(k)
        if isinstance(v, str) and v.startswith("data:"):
            raw[k] = v[:64] + "…"
        elif isinstance(v, list):
            raw[k] = [x[:64] + "…" if x.startswith("data:") else x for x in v]
    base = core.base_url(request)
    job = await core.create_job_async(
        spec, dialect=NAME, model_id=MODEL_ID, base_url=base, webhook_url=webhook, field_names=field_names_for(body),
        logs=notes, owner=request_owner(request),
        extra={"input": raw, "enable_base64_output": body.enable_base64_output},
    )
    if body.enable_sync_mode:
        job = await core.wait_for_job(job.id)
        data = await asyncio.to_thread(render_data, job, core, base)  # base64 output: read + encoded off the loop
        if not job.terminal:
            data["code"] = SYNC_TIMEOUT_CODE
            data["error"] = (f"Sync mode timed out after {core.settings.sync_timeout_s:g} s; the task is still "
                             f"running, query {data['urls']['get']}")
        return JSONResponse(envelope(data))
    return JSONResponse(envelope(render_data(job, core, base)))


@router.post("/{model:path}", dependencies=authed, include_in_schema=False)
async def unknown_model(model: str) -> None:
    raise ApiError(404, f"model '{model}' is not served here; available: {MODEL_ID}", error_type="not_found")


DIALECT = Dialect(name=NAME, router=router, render_error=render_error, render_webhook=render_webhook,
                  path_prefixes=("/api/v3/",))
