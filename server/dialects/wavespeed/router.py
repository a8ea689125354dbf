"""WaveSpeed dialect: `wavespeed-ai/wan-2.1-14b-vace` with the `{code, message, data}` envelope.

Routes (order matters: the `/api/v3/{model:path}` catch-all comes after predictions and media):
`POST /api/v3/media/upload/binary`, `POST /api/v3/media/uploads` + `PUT /api/v3/media/uploads/{id}`,
`GET /api/v3/predictions/{id}[/result]`, `POST /api/v3/predictions/{id}/cancel`, `POST /api/v3/{model}`.
Statuses: created | processing | completed | failed (every failure, cancellation included, is `failed`,
because older SDKs only treat `failed` as terminal). Requests are translated in `serving`, responses built in
`render`, the request model is `schemas.WanVaceInput`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from server.auth import request_owner, require_auth
from server.body_guard import JSON_MEDIA, JSON_SMALL, MISSING, MULTIPART_UPLOAD, RAW_UPLOAD, accepts, read_json
from server.dialects.common import Dialect
from server.dialects.wavespeed.render import envelope, render_data, render_error, render_webhook, sync_data, upload_data
from server.dialects.wavespeed.schemas import MODEL_ID, NAME, UploadTicketRequest, WanVaceInput
from server.dialects.wavespeed.serving import job_or_404, submit_prediction
from server.errors import ApiError
from server.services import Api, get_api
from vace_local.core.errors import Problem

router = APIRouter(prefix="/api/v3", tags=[NAME])
authed = [Depends(require_auth)]


@router.get("/predictions/{request_id}/result", dependencies=authed, summary="Get a prediction's result")
async def get_result(request_id: str, request: Request, api: Api = Depends(get_api)) -> dict[str, Any]:
    job = await job_or_404(api, request_id, request)
    return envelope(render_data(job, api.files, api.files.base_url(request)))


@router.get("/predictions/{request_id}", dependencies=authed, summary="Get a prediction")
async def get_prediction(request_id: str, request: Request, api: Api = Depends(get_api)) -> dict[str, Any]:
    return await get_result(request_id, request, api)


@router.post("/predictions/{request_id}/cancel", dependencies=authed, summary="Cancel a prediction")
async def cancel_prediction(request_id: str, request: Request, api: Api = Depends(get_api)) -> dict[str, Any]:
    await job_or_404(api, request_id, request)
    job = await api.jobs.cancel(request_id, request_owner(request))
    assert job is not None
    return envelope(render_data(job, api.files, api.files.base_url(request)))


#: One file part and a few small fields: a 400-part form is refused at its second file, not held in memory.
UPLOAD_FORM_LIMITS = {"max_files": 1, "max_fields": 8, "max_part_size": 64 * 1024}


@router.post("/media/upload/binary", dependencies=authed, summary="Upload a file (multipart field `file`)",
             form_limits=UPLOAD_FORM_LIMITS)
@accepts(MULTIPART_UPLOAD)
async def upload_binary(request: Request, file: UploadFile | str | None = File(None),
                        api: Api = Depends(get_api)) -> dict[str, Any]:
    if file is None:
        raise ApiError.invalid(Problem("file", "multipart form field 'file' is required"), error_type="invalid_request")
    if isinstance(file, str):  # a part without a filename arrives as a plain form value
        raise ApiError.invalid(Problem("file", "must be a file part with a filename (multipart/form-data), not a "
                                       "plain form value"), error_type="invalid_request")

    async def chunks():  # noqa: ANN202
        while chunk := await file.read(1 << 20):
            yield chunk

    info = await api.uploads.save(chunks(), file.filename or "upload", file.content_type,
                                  owner=request_owner(request))
    return envelope(upload_data(api.files, request, info))


@router.post("/media/uploads", dependencies=authed, summary="Create an upload URL (then PUT the bytes)")
@accepts(JSON_SMALL)
async def create_upload(body: UploadTicketRequest, request: Request, api: Api = Depends(get_api)) -> dict[str, Any]:
    info = await api.uploads.create_ticket(body.filename, body.size, body.content_type, request_owner(request))
    base = api.files.base_url(request)
    headers = {"Content-Type": body.content_type} if body.content_type else {}
    data = upload_data(api.files, request, info)
    data["id"] = info.id
    data["upload"] = {"method": "PUT", "url": f"{base}/api/v3/media/uploads/{info.id}?token={info.token}",
                      "headers": headers}
    return envelope(data)


@router.put("/media/uploads/{upload_id}", summary="Receive the bytes of a ticketed upload (token-authorised)")
@accepts(RAW_UPLOAD)
async def put_upload(upload_id: str, request: Request, token: str = Query(""),
                     api: Api = Depends(get_api)) -> dict[str, Any]:
    info = await api.uploads.receive(upload_id, token, request.stream())
    return envelope(upload_data(api.files, request, info))


async def submit_body(request: Request) -> WanVaceInput:
    """The submit body, parsed off the event loop (`body_guard.read_json`: big data URIs kept out of the parser)
    and validated as FastAPI would, so errors read the same."""
    try:
        raw = await read_json(request)
    except ValueError:
        raise ApiError(400, "request body is not valid JSON (or not UTF-8)", error_type="http_error") from None
    if raw is MISSING:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        return WanVaceInput.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


@router.post(f"/{MODEL_ID}", dependencies=authed, summary="Submit a Wan 2.1 VACE task", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": WanVaceInput.model_json_schema()}}}})
@accepts(JSON_MEDIA)
async def submit(request: Request, body: WanVaceInput = Depends(submit_body), webhook: str | None = Query(None),
                 api: Api = Depends(get_api)) -> Response:
    job = await submit_prediction(body, request, (webhook or "").strip() or None, api)
    base = api.files.base_url(request)
    if body.enable_sync_mode:
        job = await api.jobs.wait(job.id)
        # base64 output: read + encoded off the loop
        data = await api.offload.slow(sync_data, job, api.files, base, api.config.sync_timeout_s)
        return JSONResponse(envelope(data))
    return JSONResponse(envelope(render_data(job, api.files, base)))


@router.post("/{model:path}", dependencies=authed, include_in_schema=False)
async def unknown_model(model: str) -> None:
    raise ApiError(404, f"model '{model}' is not served here; available: {MODEL_ID}", error_type="not_found")


DIALECT = Dialect(name=NAME, router=router, render_error=render_error, render_webhook=render_webhook,
                  path_prefixes=("/api/v3/",))
