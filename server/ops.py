"""Operational routes: `/health`, `/ready`, `/metrics` and the API docs (with keys configured, all but `/health`
need one unless opened with `public_docs` / `public_metrics`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from server.auth import require_auth
from server.offload import Offload
from server.settings import Settings
from server.states import WORKER_LOADED
from server.store import Store


def ops_router(settings: Settings, store: Store, offload: Offload, registry: CollectorRegistry) -> APIRouter:
    """The ops and docs routes of one app (their auth follows `settings`)."""
    router = APIRouter()
    authed = [Depends(require_auth)]
    docs_deps = [] if settings.public_docs else authed
    instance = settings.instance

    @router.get("/openapi.json", include_in_schema=False, dependencies=docs_deps)
    async def openapi(request: Request) -> Response:
        return JSONResponse(request.app.openapi())

    @router.get("/docs", include_in_schema=False, dependencies=docs_deps)
    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")

    @router.get("/redoc", include_in_schema=False, dependencies=docs_deps)
    async def redoc(request: Request) -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")

    @router.get("/health", tags=["ops"], summary="Process is up")
    async def health() -> dict[str, Any]:
        """Answered on the event loop from memory only: no store, no thread pool, so it never queues."""
        return {"status": "ok", "model": settings.model, "tiny": settings.is_tiny}

    @router.get("/ready", tags=["ops"], summary="Every worker has its model loaded (503 until then)",
                dependencies=authed)
    async def ready(request: Request) -> Response:
        sup = request.app.state.supervisor
        workers = await offload.store(store.list_workers, instance)
        expected = sup.expected if sup is not None else 0
        loaded = [w for w in workers if w["status"] in WORKER_LOADED]
        ok = len(loaded) >= expected
        body = {
            "ready": ok, "model": settings.model, "tiny": settings.is_tiny, "expected_workers": expected,
            "workers": [{k: w[k] for k in ("slot", "device", "status", "model", "message", "pid")} for w in workers],
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics", tags=["ops"], summary="Prometheus metrics",
                dependencies=[] if settings.public_metrics else authed)
    async def metrics() -> Response:
        data = await offload.store(generate_latest, registry)
        return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)

    return router
