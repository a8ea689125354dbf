"""AI/ML API dialect: `POST /v2/video/generations` + `GET /v2/video/generations?generation_id=`.

Models `alibaba/wan2.2-vace-fun-a14b-{pose,depth,inpainting,outpainting,reframe}`. Ids look like the real
service's `<job id>:<model>`. Statuses: queued | generating | completed | error. Errors are the documented
`{message, path, requestId, statusCode, timestamp}`. The published polling script runs unchanged apart from
its `base_url`. Requests are translated in `serving`, responses built in `render`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.auth import request_owner, require_auth
from server.body_guard import JSON_MEDIA, accepts
from server.dialects.aiml.render import render_error, render_generation
from server.dialects.aiml.schemas import NAME
from server.dialects.aiml.serving import create_generation
from server.dialects.common import Dialect
from server.errors import ApiError
from server.services import Api, get_api
from vace_local.core.errors import Problem

router = APIRouter(prefix="/v2", tags=[NAME])
authed = [Depends(require_auth)]


@router.post("/video/generations", dependencies=authed, status_code=201, summary="Create a video generation task")
@accepts(JSON_MEDIA)
async def create(request: Request, api: Api = Depends(get_api)) -> Response:
    job = await create_generation(request, api)
    return JSONResponse(render_generation(job, api.files, api.files.base_url(request)), status_code=201)


@router.get("/video/generations", dependencies=authed, summary="Fetch a video generation task")
async def fetch(request: Request, api: Api = Depends(get_api)) -> Response:
    gid = request.query_params.get("generation_id") or request.query_params.get("id")
    if not gid:
        raise ApiError.invalid(Problem("generation_id", "query parameter is required", "missing", "query"))
    job_id, sep, model = gid.partition(":")
    job = await api.jobs.get(job_id, owner=request_owner(request))
    if job is None or job.dialect != NAME or (sep and model != job.model):
        raise ApiError(404, f"generation '{gid}' not found", error_type="not_found")
    return JSONResponse(render_generation(job, api.files, api.files.base_url(request)))


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
