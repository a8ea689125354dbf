"""Served files: public URLs, capability tokens, who may read a file, and the `/files/…` routes.

With keys configured a file URL is a capability URL (`…/files/<kind>/<id>/<token>/<name>`, one token per file),
because the hosted APIs' clients download results without an Authorization header. A file this box has no copy
of (another instance wrote it) is streamed from the shared storage or redirected to a presigned URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from server import media_refs
from server.auth import request_owner, require_auth
from server.errors import ApiError
from server.offload import Offload
from server.settings import Settings
from server.states import JobStatus
from server.storage import HEAD_BYTES, Storage
from server.store import JobRecord, Store


class Files:
    """URLs and paths of served files (`app.state.files`). The URL and path methods touch no job store; the
    ownership check does, so handlers call `may_read` (off the event loop) and threads `may_read_sync`."""

    def __init__(self, settings: Settings, store: Store, storage: Storage, offload: Offload) -> None:
        self.settings = settings
        self._store = store
        self._offload = offload
        self._storage = storage
        self.data_dir = settings.data_dir.resolve()
        self._file_secret: bytes | None = self._load_file_secret() if settings.auth_enabled else None

    def base_url(self, request: Request | None = None) -> str:
        """Public base URL (setting, else derived from the request), no trailing slash."""
        if self.settings.public_base_url:
            return self.settings.public_base_url
        if request is not None:
            return str(request.base_url).rstrip("/")
        scheme = "https" if self.settings.ssl_certfile else "http"
        return f"{scheme}://{self.settings.host}:{self.settings.port}"

    def job_base_url(self, job: JobRecord) -> str:
        """The base URL a job's webhook payload links to: the public one, else the one it was submitted to."""
        return self.settings.public_base_url or job.extra.get("base_url") or self.base_url()

    def file_url(self, base: str, kind: str, ident: str, name: str, owner: str | None = None) -> str:
        """A served file's URL; with keys configured a capability URL (`/files/<kind>/<id>/<token>/<name>`) that a
        plain GET may fetch, because the hosted APIs' clients download results without an Authorization header.
        The token is a path segment, so the URL still ends with the file name (clients take the extension)."""
        if self.settings.auth_enabled:
            return f"{base}/files/{kind}/{ident}/{self.file_token(kind, ident, name, owner)}/{name}"
        return f"{base}/files/{kind}/{ident}/{name}"

    def file_token(self, kind: str, ident: str, name: str, owner: str | None) -> str:
        """Unguessable token for ONE file (a job's video does not open its `output.json`, which holds the spec
        and server paths), bound to its owner (HMAC with a secret kept in the job store, so URLs survive
        restarts and work on every instance; delete its `server_secrets` row `file-url` and restart to revoke
        every file URL)."""
        if self._file_secret is None:
            self._file_secret = self._load_file_secret()
        msg = f"{kind}/{ident}/{name}/{owner or '-'}".encode()
        return hmac.new(self._file_secret, msg, hashlib.sha256).hexdigest()[:40]

    def _load_file_secret(self) -> bytes:
        """The file-URL key, kept in the job store so every instance sharing it (several boxes behind one load
        balancer) issues and accepts the same URLs, and restarts keep them valid."""
        return self._store.shared_secret("file-url")

    def _file_owner(self, kind: str, ident: str) -> tuple[bool, str | None]:
        """(exists, owner) of the job (outputs) or upload a served file belongs to."""
        if kind == "uploads":
            up = self._store.get_upload(ident)
            return up is not None, (up or {}).get("owner")
        job = self._store.get_job(ident)
        return job is not None, job.owner if job else None

    def may_read_sync(self, kind: str, ident: str, name: str, *, owner: str | None, token: str | None) -> bool:
        """Whether a request may read a served file: always without keys; else with that file's capability
        token, or as the key that owns it (files made without keys: any key). Reads the store: call it from a
        thread, or `may_read` from a handler."""
        if not self.settings.auth_enabled:
            return True
        exists, file_owner = self._file_owner(kind, ident)
        if not exists:
            return False
        if token and hmac.compare_digest(token.encode(), self.file_token(kind, ident, name, file_owner).encode()):
            return True
        return owner is not None and file_owner in (None, owner)

    async def may_read(self, kind: str, ident: str, name: str, *, owner: str | None, token: str | None) -> bool:
        if not self.settings.auth_enabled:
            return True
        return await self._offload.store(self.may_read_sync, kind, ident, name, owner=owner, token=token)

    def fetch(self, kind: str, ident: str, name: str) -> Path | None:
        """This box's copy of a served file (fetched from the shared storage when another box wrote it), None when
        it does not exist. Blocking."""
        return self._storage.fetch(f"{kind}/{ident}/{name}")

    def output_path(self, job: JobRecord, output: dict[str, Any]) -> Path:
        """This box's copy of a job output, fetched from the shared storage when another box wrote it (so
        base64 results and downloads work on every instance); the path may not exist if the file is gone."""
        path = media_refs.safe_data_path(self.data_dir, "outputs", job.id, output["file"])
        if not path.is_file():
            self._storage.fetch(f"outputs/{job.id}/{output['file']}")
        return path

    def output_urls(self, job: JobRecord, base: str) -> list[dict[str, Any]]:
        """`{kind, url, file, content_type, size, …}` per output of a succeeded job, video first."""
        if job.status != JobStatus.SUCCEEDED:
            return []
        return [dict(o, url=self.file_url(base, "outputs", job.id, o["file"], job.owner)) for o in job.outputs]

    def own_netlocs(self, base: str) -> set[str]:
        """The host:port forms under which a URL points at this server."""
        locs = {urlsplit(base).netloc.lower()}
        if self.settings.public_base_url:
            locs.add(urlsplit(self.settings.public_base_url).netloc.lower())
        port = self.settings.port
        locs |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        return locs

    def local_url(self, base: str, path: str) -> str:
        """Our own file URL for a path under data_dir/uploads or /outputs (what a submit accepts)."""
        p = Path(path).resolve()
        for kind in ("uploads", "outputs"):
            root = (self.data_dir / kind).resolve()
            if p.is_relative_to(root):
                rel = p.relative_to(root)
                return self.file_url(base, kind, rel.parts[0], rel.parts[1])
        raise ValueError(f"{p} is not a file of this server")


# ---- the /files routes ------------------------------------------------------------------------------------

router = APIRouter(tags=["files"])


@router.get("/files/{kind}/{ident}/{name}", summary="Outputs and uploads (with keys: the owner's key)")
async def files(kind: str, ident: str, name: str, request: Request) -> Response:
    return await tokened_file(kind, ident, None, name, request)


@router.get("/files/{kind}/{ident}/{token}/{name}",
            summary="Outputs and uploads by capability URL (the token stands in for the key)")
async def tokened_file(kind: str, ident: str, token: str | None, name: str, request: Request) -> Response:
    served: Files = request.app.state.files
    try:
        path = media_refs.safe_data_path(served.data_dir, kind, ident, name)
    except ValueError:
        raise ApiError(404, "file not found", error_type="not_found") from None
    if not await served.may_read(kind, ident, name, owner=None, token=token):
        if token is None or "authorization" in request.headers:
            require_auth(request)  # no token: the key decides (401 without a valid one)
        if not await served.may_read(kind, ident, name, owner=request_owner(request), token=None):
            raise ApiError(404, "file not found", error_type="not_found")  # a bad token, another key's file
    key = f"{kind}/{ident}/{name}"
    if not path.is_file():
        return await _from_storage(served, key, head_only=request.method == "HEAD")
    with open(path, "rb") as f:
        media_type, headers = media_refs.served_headers(f.read(HEAD_BYTES), key)
    return FileResponse(path, media_type=media_type, headers=headers)


async def _from_storage(served: Files, key: str, *, head_only: bool) -> Response:
    """A file this box has no copy of (another box wrote it): streamed from the object store, or a redirect
    to a presigned URL (`file_delivery`); typed by sniffing its first bytes, whatever the object says."""
    storage, settings = served._storage, served.settings  # noqa: SLF001 - the routes of this module
    meta = await asyncio.to_thread(storage.stat, key) if storage.remote else None
    if meta is None:
        raise ApiError(404, "file not found", error_type="not_found")
    size = meta[0]
    if settings.file_delivery == "redirect" or head_only:
        head = await asyncio.to_thread(storage.head_bytes, key)
        media_type, headers = media_refs.served_headers(head, key)
        if head_only:
            return Response(status_code=200, media_type=media_type, headers={**headers, "Content-Length": str(size)})
        url = await asyncio.to_thread(storage.presigned_url, key, settings.presign_ttl_s, head)
        return RedirectResponse(url or "", status_code=307)
    chunks = storage.stream(key)
    first = await asyncio.to_thread(_first_bytes, chunks)
    media_type, headers = media_refs.served_headers(first, key)
    return StreamingResponse(itertools.chain((first,), chunks), media_type=media_type,
                             headers={**headers, "Content-Length": str(size)})


def _first_bytes(chunks: Iterator[bytes]) -> bytes:
    """At least `HEAD_BYTES` from the start of a stream (fewer only at its end), to sniff its type."""
    first = b""
    while len(first) < HEAD_BYTES:
        chunk = next(chunks, None)
        if chunk is None:
            break
        first += chunk
    return first
