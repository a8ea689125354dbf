"""Dialect registry: each hosted API we imitate is one package whose `router` module exposes
`DIALECT = Dialect(...)`.

Adding a dialect: write `server/dialects/<name>/router.py` with an `APIRouter` whose routes carry `tags=[<name>]`,
a `render_error(request, ApiError) -> Response`, optionally `render_webhook(job, files) -> dict`, and list
the module name in `DIALECT_MODULES`. Routers are included in list order, except that dialects marked
`catch_all=True` (fal's `POST /{app_id:path}`) always come last so specific routes win.
"""

from __future__ import annotations

import importlib

from server.dialects.common import Dialect

#: Module names under server.dialects, in inclusion order (missing modules are skipped).
DIALECT_MODULES = ["wavespeed", "aiml", "openai", "fal"]


def load_dialects(names: list[str] | None = None) -> list[Dialect]:
    """Import the dialect modules that exist, specific ones first and catch-alls last."""
    found: list[Dialect] = []
    for name in names or DIALECT_MODULES:
        package = f"{__name__}.{name}"
        try:
            mod = importlib.import_module(f"{package}.router")
        except ModuleNotFoundError as e:
            if e.name in (package, f"{package}.router"):
                continue
            raise
        found.append(mod.DIALECT)
    return [d for d in found if not d.catch_all] + [d for d in found if d.catch_all]
