"""Dialect registry: each hosted API we imitate is one package whose `router` module exposes
`DIALECT = Dialect(...)`.

Adding a dialect: write `server/dialects/<name>/router.py` with an `APIRouter` whose routes carry `tags=[<name>]`,
a `render_error(request, ApiError) -> Response`, optionally `render_webhook(job, core) -> dict`, and list
the module name in `DIALECT_MODULES`. Routers are included in list order, except that dialects marked
`catch_all=True` (fal's `POST /{app_id:path}`) always come last so specific routes win.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from server.core import ApiError, Core
    from server.store import JobRecord

#: Longest prompt / negative prompt any dialect accepts (the UMT5 text encoder reads only the first 512 tokens
#: anyway); a longer one is a 4xx naming the field, so it is never stored, logged or polled back.
PROMPT_MAX_CHARS = 20_000

#: Module names under server.dialects, in inclusion order (missing modules are skipped).
DIALECT_MODULES = ["wavespeed", "aiml", "openai", "fal"]


def default_render_error(request: Request, err: ApiError) -> Response:
    return JSONResponse({"detail": err.message, "error_type": err.error_type}, status_code=err.status_code)


@dataclass
class Dialect:
    name: str
    router: APIRouter
    render_error: Callable[[Request, ApiError], Response] = default_render_error
    #: Builds the JSON body POSTed to the job's webhook when it finishes; None = no webhooks.
    render_webhook: Callable[[JobRecord, Core], dict[str, Any]] | None = None
    #: Path prefixes owned by this dialect, used to render errors for requests that matched no route.
    path_prefixes: tuple[str, ...] = ()
    #: True for dialects with a path catch-all route; included after all others.
    catch_all: bool = False


def load_dialects(names: list[str] | None = None) -> list[Dialect]:
    """Import the dialect modules that exist, specific ones first and catch-alls last."""
    found: list[Dialect] = []
    for name in names or DIALECT_MODULES:
        modname = f"{__name__}.{name}.router"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        found.append(mod.DIALECT)
    return [d for d in found if not d.catch_all] + [d for d in found if d.catch_all]
