"""API keys and job ownership: who a request is, as FastAPI dependencies.

`require_auth` accepts `Authorization: Bearer <key>` and `Authorization: Key <key>` (constant-time compare against
`Settings.api_keys`; no keys configured → open) and raises `ApiError(401)` otherwise. `request_owner(request)` is
then the caller's owner id (a hash of the key, None without keys): the services take it as `owner=`, so a job or
file is seen only by the key that created it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from fastapi import Request

from server.errors import ApiError


class Keys:
    """The configured API keys (`app.state.keys`); empty = the server is open."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def ok(self, key: str) -> bool:
        ok = False
        kb = key.encode()
        for k in self._keys:  # no early exit: timing does not reveal which key matched
            ok |= hmac.compare_digest(kb, k)
        return ok


def require_auth(request: Request) -> None:
    """Accept `Authorization: Bearer <key>` or `Key <key>` when keys are configured (constant-time)."""
    keys: Keys = request.app.state.keys
    if not keys.enabled:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() not in ("bearer", "key") or not key.strip():
        raise ApiError(401, "missing or malformed Authorization header (expected 'Bearer <key>' or 'Key <key>')",
                       error_type="unauthorized")
    if not keys.ok(key.strip()):
        raise ApiError(401, "invalid API key", error_type="unauthorized")
    request.state.owner = owner_of_key(key.strip())


def owner_of_key(key: str) -> str:
    """What a job records as its owner: a hash of the API key, never the key itself."""
    return hashlib.sha256(b"vace-local job owner\0" + key.encode()).hexdigest()


def request_owner(request: Request) -> str | None:
    """The owner id `require_auth` found for this request (None when no keys are configured)."""
    return getattr(request.state, "owner", None)
