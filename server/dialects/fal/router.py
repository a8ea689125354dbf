"""fal dialect: the `fal-ai/wan-vace-14b` and `fal-ai/wan-22-vace-fun-a14b` queue APIs (and the synchronous run
path) on the shared services.

Routes (fal-client's FAL_QUEUE_RUN_HOST = `<host>:<port>`, FAL_RUN_HOST = `<host>:<port>/run`), `<app>` being
`wan-vace-14b` (sub-paths optional) or `wan-22-vace-fun-a14b` (a sub-path required, as at fal):
- `POST /fal-ai/<app>[/depth|/pose|/inpainting|/outpainting|/reframe][?fal_webhook=<url>]` → submit
- `GET  /fal-ai/<app>/requests/{id}/status[?logs=1|true]` → 202 IN_QUEUE / IN_PROGRESS, 200 COMPLETED
- `GET  /fal-ai/<app>/requests/{id}` → the output (a failed job answers 4xx/5xx with `detail`)
- `PUT  /fal-ai/<app>/requests/{id}/cancel`
- `POST /run/fal-ai/<app>[/sub]` → synchronous: the output body directly
Status/result/cancel are routed by owner/alias (fal-client drops the sub-path); a request id is found only under
the app it was submitted to. Every response carries
`x-fal-request-id`; errors are `{"detail": ...}` (a list of `{loc, msg, type}` for 422). The catch-all
`POST /{app_id:path}` is registered last. Requests are translated in `serving`, responses built in `render`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.auth import request_owner, require_auth
from server.body_guard import JSON_MEDIA, accepts
from server.dialects.common import Dialect
from server.dialects.fal.render import (
    failure_error,
    header_id,
    json_response,
    render_error,
    render_output,
    render_status,
    render_webhook,
    urls,
)
from server.dialects.fal.schemas import FAL_APPS, NAME, OWNER
from server.dialects.fal.serving import create_fal_job, served_apps_text, split_app_path
from server.errors import ApiError
from server.jobs import JobRecord
from server.services import Api, get_api
from server.states import JobStatus

router = APIRouter(tags=[NAME])
authed = [Depends(require_auth)]
REQ = f"/{OWNER}/{{alias}}/requests/{{request_id}}"


def _app_or_404(alias: str) -> str:
    """The app id of a route's `{alias}`; 404 listing the served apps for any other."""
    if alias not in FAL_APPS:
        raise ApiError(404, f"Application '{OWNER}/{alias}' not found; served here: {served_apps_text()}",
                       error_type="not_found")
    return FAL_APPS[alias].app_id


def _of_app(job: JobRecord | None, alias: str) -> bool:
    app_id = _app_or_404(alias)
    return job is not None and job.dialect == NAME and (job.model == app_id or job.model.startswith(app_id + "/"))


async def _job_or_404(api: Api, alias: str, request_id: str, request: Request) -> JobRecord:
    job = await api.jobs.get(request_id, with_logs=True, owner=request_owner(request))
    if not _of_app(job, alias):
        raise ApiError(404, f"Request '{request_id}' not found", error_type="not_found")
    return job


#: The same routes with the sub-endpoint kept (`.../wan-vace-14b/pose/requests/{id}`): fal-client drops it,
#: hand-built URLs often keep it.
SUB_REQ = f"/{OWNER}/{{alias}}/{{endpoint}}/requests/{{request_id}}"


def _check_endpoint(alias: str, endpoint: str) -> None:
    if not endpoint:
        endpoint = "-"  # an empty segment is no sub-path
    split_app_path(f"{_app_or_404(alias)}/{endpoint}")  # raises the 404 that lists the served endpoints


@router.get(SUB_REQ + "/status", dependencies=authed, include_in_schema=False)
async def status_sub(alias: str, endpoint: str, request_id: str, request: Request,
                     api: Api = Depends(get_api)) -> Response:
    _check_endpoint(alias, endpoint)
    return await status(alias, request_id, request, api)


@router.get(SUB_REQ, dependencies=authed, include_in_schema=False)
async def result_sub(alias: str, endpoint: str, request_id: str, request: Request,
                     api: Api = Depends(get_api)) -> Response:
    _check_endpoint(alias, endpoint)
    return await result(alias, request_id, request, api)


@router.put(SUB_REQ + "/cancel", dependencies=authed, include_in_schema=False)
async def cancel_sub(alias: str, endpoint: str, request_id: str, request: Request,
                     api: Api = Depends(get_api)) -> Response:
    _check_endpoint(alias, endpoint)
    return await cancel(alias, request_id, request, api)


@router.get(REQ + "/status", dependencies=authed, summary="fal queue status")
async def status(alias: str, request_id: str, request: Request, api: Api = Depends(get_api)) -> Response:
    job = await _job_or_404(api, alias, request_id, request)
    with_logs = request.query_params.get("logs", "0").lower() in ("1", "true", "yes")
    position = await api.jobs.queue_position(job.id) if job.status == JobStatus.QUEUED else None
    code, body = render_status(job, api.files.base_url(request), with_logs, position)
    return json_response(body, job.id, code)


@router.get(REQ, dependencies=authed, summary="fal queue result")
async def result(alias: str, request_id: str, request: Request, api: Api = Depends(get_api)) -> Response:
    job = await _job_or_404(api, alias, request_id, request)
    if job.status == JobStatus.SUCCEEDED:
        # sync_mode jobs answer base64 media: read + encoded off the loop
        body = await api.offload.slow(render_output, job, api.files, api.files.base_url(request))
        return json_response(body, job.id)
    if job.terminal:
        raise failure_error(job)
    raise ApiError(400, "Request is still in progress", error_type="in_progress")


@router.put(REQ + "/cancel", dependencies=authed, summary="fal queue cancel")
async def cancel(alias: str, request_id: str, request: Request, api: Api = Depends(get_api)) -> Response:
    job = await api.jobs.get(request_id, owner=request_owner(request))
    if not _of_app(job, alias):
        return json_response({"status": "NOT_FOUND"}, header_id(request_id), 404)
    if job.terminal:
        return json_response({"status": "ALREADY_COMPLETED"}, request_id, 400)
    await api.jobs.cancel(request_id, request_owner(request))
    return json_response({"status": "CANCELLATION_REQUESTED"}, request_id, 202)


@router.api_route(f"/{OWNER}/{{rest:path}}", methods=["GET", "PUT", "DELETE", "PATCH"], include_in_schema=False,
                  dependencies=authed)
@router.api_route("/run/{rest:path}", methods=["GET", "PUT", "DELETE", "PATCH"], include_in_schema=False,
                  dependencies=authed)
async def not_found(rest: str, request: Request) -> Response:
    """Anything else under fal's prefixes: a 404 in fal's shape (not the catch-all's 405)."""
    raise ApiError(404, f"{request.method} {request.url.path} not found: fal routes are POST "
                   f"/{OWNER}/<app>[/sub], GET {REQ}[/status] and PUT {REQ}/cancel "
                   f"(served apps: {served_apps_text()})", error_type="not_found")


@router.post("/run/{app_path:path}", dependencies=authed, summary="fal synchronous run")
@accepts(JSON_MEDIA)
async def run_sync(app_path: str, request: Request, api: Api = Depends(get_api)) -> Response:
    job = await create_fal_job(request, api, app_path)
    request.state.fal_request_id = job.id
    job = await api.jobs.wait(job.id)
    if not job.terminal:
        raise ApiError(504, "Request timed out", error_type="request_timeout")
    if job.status != JobStatus.SUCCEEDED:
        raise failure_error(job)
    body = await api.offload.slow(render_output, job, api.files, api.files.base_url(request))  # sync_mode: base64
    return json_response(body, job.id)


@router.post("/{app_path:path}", dependencies=authed, summary="fal queue submit (fal-ai/<app>[/sub])")
@accepts(JSON_MEDIA)
async def submit(app_path: str, request: Request, api: Api = Depends(get_api)) -> Response:
    job = await create_fal_job(request, api, app_path)
    base = api.files.base_url(request)
    body = {"request_id": job.id, "gateway_request_id": job.id, "status": "IN_QUEUE",
            "queue_position": await api.jobs.queue_position(job.id) or 0, **urls(base, job)}
    return json_response(body, job.id)


DIALECT = Dialect(name=NAME, router=router, render_error=render_error, render_webhook=render_webhook,
                  path_prefixes=(f"/{OWNER}/", "/run/"), catch_all=True)
