"""The web playground: its static page (public) and the one progress endpoint the page polls (authorised).

The page (`server/static/playground/`) submits through the WaveSpeed dialect and its upload endpoint. The
WaveSpeed result has no fields for live progress or for the control video / mask the model saw, so this
module adds one vace-local extension route in the WaveSpeed envelope:

`GET /api/v3/predictions/{id}/progress[?since=N]` → `data`: `status` (WaveSpeed's vocabulary),
`queue_position` (jobs ahead, while queued), `stage`, `step`, `total`, `progress` (0..1), `logs` (the job's
log lines from index `since` on, with `next` to pass back), `error`, `previews` (`{"control": url,
"mask": url}` once a job submitted with `save_previews` has finished), `outputs` (the result video URLs) and
`preview`: the live preview of the denoised estimate (`{"url", "step", "total", "frames", "width", "height"}`, an
animated WebP at latent resolution, a new URL each time; null until the first one; VACE_PREVIEW_EVERY).

Auth: the page and its assets (`PUBLIC_PREFIXES`) carry no secret and must stay reachable without a key;
every API call the page makes sends the key the user entered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from server.auth import require_auth
from server.dialects.wavespeed.render import envelope, render_data
from server.dialects.wavespeed.schemas import NAME as WAVESPEED
from server.dialects.wavespeed.serving import job_or_404
from server.files import Files
from server.jobs import JobRecord, iso_time
from server.services import Api, get_api
from server.states import JobStatus

STATIC_DIR = Path(__file__).resolve().parent / "static" / "playground"
#: Paths served without an API key: the page and its assets hold no data (the redirect `/` too).
PUBLIC_PREFIXES = ("/playground",)
PUBLIC_PATHS = ("/",)
PREVIEW_KINDS = ("control", "mask")

page_router = APIRouter(include_in_schema=False)
api_router = APIRouter(prefix="/api/v3", tags=[WAVESPEED])


@page_router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/playground", status_code=307)


@page_router.get("/playground")
async def page() -> FileResponse:
    # no-cache: a server upgrade must not leave a browser running an old script against a new API
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@api_router.get("/predictions/{request_id}/progress", dependencies=[Depends(require_auth)],
                summary="vace-local extension: live progress, log lines and previews of a prediction")
async def progress(request_id: str, request: Request, since: int = Query(0, ge=0),
                   api: Api = Depends(get_api)) -> dict[str, Any]:
    job = await job_or_404(api, request_id, request)
    full = await api.jobs.get(job.id, with_logs=True)
    job = full or job
    position = await api.jobs.queue_position(job.id)
    base = api.files.base_url(request)
    data = render_data(job, api.files, base, base64_output=False)
    outs = api.files.output_urls(job, base)
    lines = [{"time": iso_time(x.get("ts")), "level": x.get("level", "info"), "source": x.get("source", "server"),
              "message": x.get("message", "")} for x in job.logs[since:]]
    return envelope({
        "id": job.id,
        "status": data["status"],
        "queue_position": position,
        "stage": job.stage,
        "step": job.step,
        "total": job.total,
        "progress": round(job.progress, 4),
        "error": data["error"],
        "outputs": data["outputs"][:1],
        "previews": {o["kind"]: o["url"] for o in outs if o.get("kind") in PREVIEW_KINDS},
        "preview": live_preview(job, api.files, base),
        "logs": lines,
        "next": since + len(lines),
    })


def live_preview(job: JobRecord, files: Files, base: str) -> dict[str, Any] | None:
    """The worker's latest live preview: in `outputs` while the job runs, in `result` once it has succeeded."""
    if job.status == JobStatus.RUNNING:
        entry = next((o for o in job.outputs if o.get("kind") == "preview"), None)
    elif job.status == JobStatus.SUCCEEDED:
        entry = (job.result or {}).get("preview")
    else:
        entry = None
    if not entry:
        return None
    return {"url": files.file_url(base, "outputs", job.id, entry["file"], job.owner),
            **{k: entry.get(k) for k in ("step", "total", "frames", "width", "height")}}


def mount(app: FastAPI) -> None:
    """Add the page, its assets and the progress route (all GET: no clash with the dialects' POST catch-alls)."""
    app.include_router(page_router)
    app.include_router(api_router)
    app.mount("/playground/assets", StaticFiles(directory=STATIC_DIR), name="playground-assets")
