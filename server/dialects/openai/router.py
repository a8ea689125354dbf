"""OpenAI videos API dialect: what the official `openai` SDK's `client.videos` calls, on the shared services.

Routes: `POST /v1/videos` (multipart — what the SDK always sends — or JSON), `GET /v1/videos` (cursor list:
`after`, `limit`, `order`), `GET /v1/videos/{id}`, `DELETE /v1/videos/{id}`, `GET /v1/videos/{id}/content`
(`variant=video`; thumbnails and spritesheets are not produced here → 404 naming `variant`).
Statuses: queued | in_progress | completed | failed (a cancelled job is `failed` with code `cancelled`).
Errors: `{"error": {"message", "type", "param", "code"}}`, `param` naming the field, as the SDK parses them.
Model names: `sora-2`, `sora-2-pro` and their dated snapshots are aliases of the served model, and so is the
served model's own name; any other name must be mapped with `VACE_MODEL_MAP` (the tiny model answers all).
Requests are parsed and translated in `serving`, responses built in `render`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from server import media_refs
from server.auth import request_owner, require_auth
from server.body_guard import JSON_OR_FORM_MEDIA, accepts
from server.dialects.common import Dialect
from server.dialects.openai.render import POLL_AFTER_MS, render_error, render_video
from server.dialects.openai.schemas import NAME
from server.dialects.openai.serving import (
    content_path,
    create_video_job,
    job_or_404,
    list_page,
    read_request,
    stop_and_delete,
)
from server.errors import ApiError
from server.services import Api, get_api

router = APIRouter(prefix="/v1", tags=[NAME])
authed = [Depends(require_auth)]


@router.post("/videos", dependencies=authed, summary="Create a video (OpenAI videos API)")
@accepts(JSON_OR_FORM_MEDIA)
async def create_video(request: Request, api: Api = Depends(get_api)) -> Response:
    body, upload = await read_request(request, api)
    try:
        job = await create_video_job(request, api, body, upload)
    finally:
        if upload is not None:
            await upload.close()  # the spooled copy of the file part
    return JSONResponse(render_video(job, api.config.retention_hours))


@router.get("/videos", dependencies=authed, summary="List videos (cursor pages)")
async def list_videos(request: Request, after: str | None = Query(None), limit: str = Query("20"),
                      order: str = Query("desc"), api: Api = Depends(get_api)) -> Response:
    page, has_more = await list_page(api, after=after, limit=limit, order=order, owner=request_owner(request))
    data = [render_video(j, api.config.retention_hours) for j in page]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": has_more})


@router.get("/videos/{video_id}", dependencies=authed, summary="Retrieve a video")
async def retrieve_video(video_id: str, request: Request, api: Api = Depends(get_api)) -> Response:
    job = await job_or_404(api, video_id, request_owner(request))
    headers = {} if job.terminal else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
    return JSONResponse(render_video(job, api.config.retention_hours), headers=headers)


@router.delete("/videos/{video_id}", dependencies=authed, summary="Delete a video and its files")
async def delete_video(video_id: str, request: Request, api: Api = Depends(get_api)) -> Response:
    owner = request_owner(request)
    await stop_and_delete(api, await job_or_404(api, video_id, owner), owner)
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})


@router.get("/videos/{video_id}/content", dependencies=authed, summary="Download the video (mp4)")
async def download_content(video_id: str, request: Request, variant: str = Query("video"),
                           api: Api = Depends(get_api)) -> Response:
    return FileResponse(await content_path(api, video_id, variant, request_owner(request)), media_type="video/mp4",
                        headers=media_refs.FILE_HEADERS)


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
