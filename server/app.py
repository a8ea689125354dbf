"""FastAPI application factory: the services, the dialect routers, ops and file routes, supervisor and loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route

import vace_local
from server import files, playground
from server.auth import Keys, require_auth
from server.body_guard import BodyRefused, RequestGuard
from server.dialects import load_dialects
from server.dialects.common import Dialect, default_render_error
from server.errors import ApiError, validation_error
from server.http_headers import SecurityHeaders, allow_head
from server.metrics import make_registry
from server.ops import ops_router
from server.services import Services
from server.settings import Settings
from server.store import Store

log = logging.getLogger("vace.server")

Render = Callable[[Request, ApiError], Response]


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
    services = Services.build(settings, store)
    dialects = load_dialects()
    app = FastAPI(
        title="vace-local",
        version=vace_local.__version__,
        description="Local Wan VACE video generation behind hosted-API-compatible endpoints"
        + (" — TINY random-weight model: outputs are noise" if settings.is_tiny else ""),
        lifespan=_lifespan(services, dialects, start_workers=start_workers),
        docs_url=None, redoc_url=None, openapi_url=None,  # served by the ops router, behind the key unless opened
    )
    app.state.services = services
    app.state.api = services.api
    app.state.keys = Keys(settings.api_keys)
    app.state.files = services.files
    app.state.supervisor = None

    def render(request: Request, err: ApiError) -> Response:
        """An error in the envelope of the dialect owning the route (the default one elsewhere)."""
        d = _dialect_for(request, dialects)
        response = (d.render_error if d else default_render_error)(request, err)
        response.headers.update(err.headers)
        return response

    _install_error_handlers(app, render)
    app.include_router(ops_router(settings, store, services.offload, make_registry(store, settings.instance)))
    app.include_router(files.router)
    for d in dialects:
        app.include_router(d.router)
    playground.mount(app)  # `/` → `/playground`; the page is public, its API calls carry the key
    app.include_router(_unknown_path_router(dialects))  # last: after every real route
    app.add_middleware(RequestGuard, settings=settings, render=render)  # Host/Origin, body policies
    allow_head(app)
    app.add_middleware(SecurityHeaders, settings=settings)
    return app


def _lifespan(services: Services, dialects: list[Dialect], *, start_workers: bool) -> Callable[..., object]:
    settings, store = services.settings, services.store
    renderers = {d.name: d.render_webhook for d in dialects if d.render_webhook is not None}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from server.supervisor import Supervisor
        from server.webhooks import webhook_loop

        sup = Supervisor(settings, store, settings.instance) if start_workers and settings.workers != "0" else None
        app.state.supervisor = sup
        if sup is not None:
            await asyncio.to_thread(sup.start)
        if settings.is_tiny:
            log.warning("model 'tiny': every output comes from a tiny random-weight model (noise)")
        stop = asyncio.Event()
        tasks = [asyncio.create_task(webhook_loop(services, renderers, stop)),
                 asyncio.create_task(services.jobs.retention_loop(stop))]
        try:
            yield
        finally:
            stop.set()
            for t in tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(t, timeout=5)
            if sup is not None:
                await asyncio.to_thread(sup.stop)
            services.close()
            store.dispose()

    return lifespan


def _install_error_handlers(app: FastAPI, render: Render) -> None:
    """One handler set for every error, each rendered by the dialect owning the route."""

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


def _unknown_path_router(dialects: list[Dialect]) -> APIRouter:
    """A path no route serves is a 404, one served for other methods a 405 (path catch-alls such as fal's
    `POST /{app_id:path}` do not count: they would make every path a 405)."""
    router = APIRouter()

    @router.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
                      include_in_schema=False, dependencies=[Depends(require_auth)])
    async def unknown_path(rest: str, request: Request) -> Response:  # noqa: ARG001
        routes = [*request.app.router.routes, *(r for d in dialects for r in d.router.routes)]
        for route in routes:
            if not isinstance(route, Route) or ":path}" in route.path:
                continue
            if route.matches(request.scope)[0] == Match.PARTIAL:
                raise ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                               error_type="method_not_allowed")
        raise ApiError(404, f"{request.method} {request.url.path} not found", error_type="not_found")

    return router
