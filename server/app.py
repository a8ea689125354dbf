"""FastAPI application factory: dialect routers, health/ready/metrics, file serving, supervisor and loops."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route

import vace_local
from server import media_refs, playground
from server.body_guard import BodyRefused, RequestGuard
from server.core import ApiError, JobService, request_owner, require_auth, validation_error
from server.dialects import load_dialects
from server.dialects.common import Dialect, default_render_error
from server.http_headers import SecurityHeaders, allow_head
from server.metrics import make_registry
from server.settings import Settings
from server.states import WORKER_LOADED
from server.storage import HEAD_BYTES
from server.store import Store

log = logging.getLogger("vace.server")


def _dialect_for(request: Request, dialects: list[Dialect]) -> Dialect | None:
    route = request.scope.get("route")
    tags = getattr(route, "tags", None) or []
    for d in dialects:
        if d.name in tags:
            return d
    path = request.url.path
    for d in dialects:
        if any(path.startswith(p) for p in d.path_prefixes):
            return d
    return None


def create_app(settings: Settings | None = None, *, start_workers: bool = True) -> FastAPI:
    """Build the API app. Workers and background loops start in the lifespan (i.e. when served)."""
    settings = settings or Settings()
    settings.export_limits()
    settings.prepare_dirs()
    store = Store(settings.db_url)
    store.create_all()
    core = JobService(settings, store)
    instance = settings.instance
    dialects = load_dialects()
    renderers = {d.name: d.render_webhook for d in dialects if d.render_webhook is not None}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from server.supervisor import Supervisor
        from server.webhooks import webhook_loop

        sup = Supervisor(settings, store, instance) if start_workers and settings.workers != "0" else None
        app.state.supervisor = sup
        if sup is not None:
            await asyncio.to_thread(sup.start)
        if settings.is_tiny:
            log.warning("model 'tiny': every output comes from a tiny random-weight model (noise)")
        stop = asyncio.Event()
        tasks = [asyncio.create_task(webhook_loop(core, renderers, stop)),
                 asyncio.create_task(_cleanup_loop(core, stop))]
        try:
            yield
        finally:
            stop.set()
            for t in tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(t, timeout=5)
            if sup is not None:
                await asyncio.to_thread(sup.stop)
            core.slow_pool.shutdown(wait=False, cancel_futures=True)
            store.dispose()

    app = FastAPI(
        title="vace-local",
        version=vace_local.__version__,
        description="Local Wan VACE video generation behind hosted-API-compatible endpoints"
        + (" — TINY random-weight model: outputs are noise" if settings.is_tiny else ""),
        lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,  # served below, behind the key unless opened
    )
    app.state.core = core
    app.state.settings = settings
    app.state.instance = instance
    app.state.supervisor = None
    registry = make_registry(store, instance)

    # ---- errors: one handler set, rendered by the dialect owning the route ----

    def render(request: Request, err: ApiError) -> Response:
        d = _dialect_for(request, dialects)
        response = (d.render_error if d else default_render_error)(request, err)
        response.headers.update(err.headers)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return render(request, exc)

    @app.exception_handler(BodyRefused)
    async def _body_refused(request: Request, exc: BodyRefused) -> Response:
        return render(request, exc.error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return render(request, validation_error(list(exc.errors()), status_code=422))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and msg == "There was an error parsing the body":  # FastAPI's JSON decode
            msg = "request body is not valid JSON (or not UTF-8, or nested too deeply)"
        etype = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return render(request, ApiError(exc.status_code, msg, error_type=etype))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:  # noqa: ARG001
        """A client that hangs up mid-body is not a server error: one INFO line, and nobody reads the answer."""
        log.info("client disconnected before sending its whole request body: %s %s", request.method,
                 request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        """Last resort: still the dialect's envelope (SDKs parse it, and retry 5xx on polls), never a bare 500."""
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, OperationalError):  # e.g. the SQLite file is locked or the database is unreachable
            log.error("job store unavailable: %s", exc)
            return render(request, ApiError(503, "the job store is temporarily unavailable; retry shortly",
                                            error_type="unavailable"))
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return render(request, ApiError(500, f"internal server error ({type(exc).__name__}); the server "
                                             "logged the details", error_type="internal_error"))

    # ---- operational endpoints (with keys configured, all but /health need one) ----

    authed = [Depends(require_auth)]
    docs_deps = [] if settings.public_docs else authed

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs_deps)
    async def openapi() -> Response:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs_deps)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=docs_deps)
    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    @app.get("/health", tags=["ops"], summary="Process is up")
    async def health() -> dict[str, Any]:
        """Answered on the event loop from memory only: no store, no thread pool, so it never queues."""
        return {"status": "ok", "model": settings.model, "tiny": settings.is_tiny}

    @app.get("/ready", tags=["ops"], summary="Every worker has its model loaded (503 until then)",
             dependencies=authed)
    async def ready(request: Request) -> Response:
        sup = request.app.state.supervisor
        workers = await asyncio.to_thread(store.list_workers, instance)
        expected = sup.expected if sup is not None else 0
        loaded = [w for w in workers if w["status"] in WORKER_LOADED]
        ok = len(loaded) >= expected
        body = {
            "ready": ok, "model": settings.model, "tiny": settings.is_tiny, "expected_workers": expected,
            "workers": [{k: w[k] for k in ("slot", "device", "status", "model", "message", "pid")} for w in workers],
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics",
             dependencies=[] if settings.public_metrics else authed)
    async def metrics() -> Response:
        data = await asyncio.to_thread(generate_latest, registry)
        return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/files/{kind}/{ident}/{name}", tags=["files"], summary="Outputs and uploads (with keys: the owner's key)")
    async def files(kind: str, ident: str, name: str, request: Request) -> Response:
        return await tokened_file(kind, ident, None, name, request)

    @app.get("/files/{kind}/{ident}/{token}/{name}", tags=["files"],
             summary="Outputs and uploads by capability URL (the token stands in for the key)")
    async def tokened_file(kind: str, ident: str, token: str | None, name: str, request: Request) -> Response:
        try:
            path = media_refs.safe_data_path(core.data_dir, kind, ident, name)
        except ValueError:
            raise ApiError(404, "file not found", error_type="not_found") from None
        if not core.may_read_file(kind, ident, name, owner=None, token=token):
            if token is None or "authorization" in request.headers:
                require_auth(request)  # no token: the key decides (401 without a valid one)
            if not core.may_read_file(kind, ident, name, owner=request_owner(request), token=None):
                raise ApiError(404, "file not found", error_type="not_found")  # a bad token, another key's file
        key = f"{kind}/{ident}/{name}"
        if not path.is_file():
            return await _from_storage(key, head_only=request.method == "HEAD")
        with open(path, "rb") as f:
            media_type, headers = media_refs.served_headers(f.read(HEAD_BYTES), key)
        return FileResponse(path, media_type=media_type, headers=headers)

    async def _from_storage(key: str, *, head_only: bool) -> Response:
        """A file this box has no copy of (another box wrote it): streamed from the object store, or a redirect
        to a presigned URL (`file_delivery`); typed by sniffing its first bytes, whatever the object says."""
        storage = core.storage
        meta = await asyncio.to_thread(storage.stat, key) if storage.remote else None
        if meta is None:
            raise ApiError(404, "file not found", error_type="not_found")
        size = meta[0]
        if settings.file_delivery == "redirect" or head_only:
            head = await asyncio.to_thread(storage.head_bytes, key)
            media_type, headers = media_refs.served_headers(head, key)
            if head_only:
                return Response(status_code=200, media_type=media_type, headers={**headers,
                                                                                  "Content-Length": str(size)})
            url = await asyncio.to_thread(storage.presigned_url, key, settings.presign_ttl_s, head)
            return RedirectResponse(url or "", status_code=307)
        chunks = storage.stream(key)
        first = await asyncio.to_thread(_first_bytes, chunks)
        media_type, headers = media_refs.served_headers(first, key)
        return StreamingResponse(itertools.chain((first,), chunks), media_type=media_type,
                                 headers={**headers, "Content-Length": str(size)})

    for d in dialects:
        app.include_router(d.router)
    playground.mount(app)  # `/` → `/playground`; the page is public, its API calls carry the key

    @app.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
                   include_in_schema=False, dependencies=authed)
    async def unknown_path(rest: str, request: Request) -> Response:
        """Registered last: a path no route serves is a 404, one served for other methods a 405 (path
        catch-alls such as fal's `POST /{app_id:path}` do not count: they would make every path a 405)."""
        routes = [*request.app.router.routes, *(r for d in dialects for r in d.router.routes)]
        for route in routes:
            if not isinstance(route, Route) or ":path}" in route.path:
                continue
            if route.matches(request.scope)[0] == Match.PARTIAL:
                raise ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                               error_type="method_not_allowed")
        raise ApiError(404, f"{request.method} {request.url.path} not found", error_type="not_found")
    app.add_middleware(RequestGuard, settings=settings, render=render)  # Host/Origin, body policies
    allow_head(app)
    app.add_middleware(SecurityHeaders, settings=settings)
    return app


def _first_bytes(chunks: Iterator[bytes]) -> bytes:
    """At least `HEAD_BYTES` from the start of a stream (fewer only at its end), to sniff its type."""
    first = b""
    while len(first) < HEAD_BYTES:
        chunk = next(chunks, None)
        if chunk is None:
            break
        first += chunk
    return first


async def _cleanup_loop(core: JobService, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            n = await core.run_slow(core.cleanup_expired)
            if n:
                log.info("retention: removed %d expired jobs/uploads", n)
        except Exception:  # noqa: BLE001
            log.exception("cleanup failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=core.settings.cleanup_interval_s)
        except TimeoutError:
            pass
