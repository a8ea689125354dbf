"""Response headers that keep a browser from running what we serve: `nosniff` on every response, framing
refused everywhere, and a Content-Security-Policy for the playground page (its key lives in `localStorage`, so
no other script may ever run on this origin). Stored files get their own headers (`media_refs.FILE_HEADERS`).

Also: HEAD is answered wherever GET is (FastAPI registers GET routes for GET only).
"""

from __future__ import annotations

import warnings
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.routing import APIRoute

from server.playground import PUBLIC_PREFIXES
from server.settings import Settings

#: On every response: types are taken as sent (no sniffing into HTML) and no page of ours is framed.
COMMON = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))


def playground_csp(settings: Settings) -> str:
    """The playground's policy: its own scripts and styles only (no inline code), API calls to this origin, and
    media from this origin or blobs; with S3 presigned redirects, the bucket's origin serves the files too."""
    files = ""
    if settings.storage == "s3" and settings.file_delivery == "redirect":
        endpoint = urlsplit(settings.s3_endpoint_url or "")
        files = f" {endpoint.scheme}://{endpoint.netloc}" if endpoint.netloc else " https://*.amazonaws.com"
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            f"media-src 'self' blob:{files}; connect-src 'self'{files}; font-src 'self'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'; object-src 'none'")


class SecurityHeaders:
    """ASGI middleware adding `COMMON` to every HTTP response, and the CSP to the playground's."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.page_headers = ((b"content-security-policy", playground_csp(settings).encode()),)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        extra = COMMON + (self.page_headers if path.startswith(PUBLIC_PREFIXES) else ())

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def allow_head(app: FastAPI) -> None:
    """Every GET route answers HEAD too (Starlette sends the headers only). The OpenAPI schema keeps listing GET
    alone: a HEAD twin of every operation would only repeat it (and its operation id)."""
    _add_head(app.router.routes)
    default_openapi = app.openapi

    def openapi_without_head() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                schema = default_openapi()
            for operations in schema.get("paths", {}).values():
                operations.pop("head", None)
        return app.openapi_schema

    app.openapi = openapi_without_head  # type: ignore[method-assign]


def _add_head(routes: list[Any]) -> None:
    for route in routes:
        if isinstance(route, APIRoute) and "GET" in route.methods:
            route.methods.add("HEAD")
        included = getattr(route, "original_router", None)  # FastAPI keeps an included router as one route
        if included is not None:
            _add_head(included.routes)
