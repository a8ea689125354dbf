"""Uploads: files a client sends before (or with) a job, streamed to disk under the size limit and recorded.

Three ways in: a streamed body (`save`, WaveSpeed's binary upload and OpenAI's file part), a ticket + PUT
(`create_ticket`, `receive`: the SDK's upload-URL flow), and a data URI in a submit (`store_data_uri`, decoded
straight into a new upload by the submit-time input checks). `discard` is the one place an upload is removed.
"""

from __future__ import annotations

import hmac
import secrets
import shutil
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import media_refs
from server.errors import ApiError
from server.offload import Offload
from server.settings import Settings
from server.storage import Storage
from server.store import Store, new_id
from vace_local.core.spec import MediaKind


@dataclass
class UploadInfo:
    id: str
    filename: str
    size: int
    content_type: str | None
    path: Path
    media_kind: str | None = None
    token: str = field(default="", repr=False)


class Uploads:
    """Upload storage and records (`app.state.services.uploads`). The async methods are what handlers call; the `_sync`
    ones and `store_data_uri` block and run on a thread."""

    def __init__(self, settings: Settings, store: Store, storage: Storage, offload: Offload) -> None:
        self.settings = settings
        self._store = store
        self._storage = storage
        self._offload = offload
        self.data_dir = settings.data_dir.resolve()

    def _upload_dir(self, upload_id: str) -> Path:
        d = self.data_dir / "uploads" / upload_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def store_data_uri(self, uri: str, field_name: str, expected: MediaKind, owner: str | None = None) -> Path:
        """Decode a data URI straight into a new upload (streamed: never the whole payload decoded in memory);
        its content is checked against the field's kind before it is recorded. Blocking."""
        uid = new_id()
        part = self._upload_dir(uid) / "data.part"
        try:
            size = media_refs.write_data_uri(uri, field_name, self.settings.max_upload_bytes, part)
            with open(part, "rb") as f:
                ext = media_refs.check_content(f.read(512), field_name, expected)
            name = media_refs.sanitize_filename(f"{field_name.split('[')[0]}.{ext}")
            path = part.replace(part.with_name(name))
        except BaseException:
            shutil.rmtree(part.parent, ignore_errors=True)
            raise
        self._storage.publish(f"uploads/{uid}/{name}")
        self._store.insert_upload(upload_id=uid, token="", filename=name, content_type=media_refs.mime_of(ext),
                                  size=size, path=f"uploads/{uid}/{name}", completed=True, owner=owner)
        return path

    def get_sync(self, upload_id: str) -> dict[str, Any] | None:
        """The upload's record (None when unknown). Blocking."""
        return self._store.get_upload(upload_id)

    async def save(self, chunks: AsyncIterator[bytes], filename: str, content_type: str | None, *,
                   owner: str | None = None, field_name: str = "file", max_bytes: int | None = None) -> UploadInfo:
        """Stream an upload to disk under the size limit (413 naming `field_name` beyond it; default: the upload
        limit); returns where it lives."""
        uid = new_id()
        name = media_refs.sanitize_filename(filename or "upload")
        path = self._upload_dir(uid) / name
        size = await self._write_stream(chunks, path, field_name, max_bytes)
        await self._offload.store(self._record_saved, uid, name, content_type, size, owner)
        return UploadInfo(uid, name, size, content_type, path, self._media_kind(path))

    def _record_saved(self, uid: str, name: str, content_type: str | None, size: int, owner: str | None) -> None:
        self._storage.publish(f"uploads/{uid}/{name}")
        self._store.insert_upload(upload_id=uid, token="", filename=name, content_type=content_type, size=size,
                                  path=f"uploads/{uid}/{name}", completed=True, owner=owner)

    async def _write_stream(self, chunks: AsyncIterator[bytes], path: Path, field_name: str = "file",
                            max_bytes: int | None = None) -> int:
        limit = max_bytes or self.settings.max_upload_bytes
        size = 0
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"{field_name}: upload exceeds the {limit} byte limit", field=field_name,
                                       error_type="too_large")
                    f.write(chunk)
            if size == 0:
                raise ApiError(400, "file: the upload is empty (0 bytes)", field="file", error_type="empty_upload")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(path.parent, ignore_errors=True)
            raise
        return size

    @staticmethod
    def _media_kind(path: Path) -> str | None:
        with open(path, "rb") as f:
            return media_refs.kind_of(media_refs.sniff(f.read(512)))

    async def create_ticket(self, filename: str, size: int | None, content_type: str | None,
                            owner: str | None = None) -> UploadInfo:
        """Reserve an upload id + secret token for a later `receive` (the SDK's PUT flow)."""
        if size is not None and size > self.settings.max_upload_bytes:
            raise ApiError(413, f"size: {size} bytes exceeds the {self.settings.max_upload_bytes} byte limit",
                           field="size", error_type="too_large")
        uid = new_id()
        token = secrets.token_urlsafe(24)
        name = media_refs.sanitize_filename(filename or "upload")
        await self._offload.store(self._store.insert_upload, upload_id=uid, token=token, filename=name,
                                  content_type=content_type, size=size, path=f"uploads/{uid}/{name}",
                                  completed=False, owner=owner)
        return UploadInfo(uid, name, size or 0, content_type, self.data_dir / "uploads" / uid / name, token=token)

    async def receive(self, upload_id: str, token: str, chunks: AsyncIterator[bytes]) -> UploadInfo:
        """The bytes of a ticketed upload (403 for a bad token, 409 when the ticket was used)."""
        up = await self._offload.store(self._store.get_upload, upload_id) if len(upload_id) <= 64 else None
        if up is None or not up["token"] or not hmac.compare_digest(up["token"].encode(), token.encode()):
            raise ApiError(403, "upload URL is invalid or expired", error_type="forbidden")
        if up["completed_at"] is not None:
            raise ApiError(409, "this upload URL was already used", error_type="conflict")
        path = self._upload_dir(upload_id) / up["filename"]
        size = await self._write_stream(chunks, path)
        await self._offload.store(self._record_received, upload_id, up["filename"], size)
        return UploadInfo(upload_id, up["filename"], size, up["content_type"], path, self._media_kind(path))

    def _record_received(self, upload_id: str, filename: str, size: int) -> None:
        self._storage.publish(f"uploads/{upload_id}/{filename}")
        self._store.complete_upload(upload_id, size)

    def discard_sync(self, upload_ids: Iterable[str]) -> None:
        """Remove uploads: their files (every box's and the shared storage's) and records. Blocking."""
        ids = [u for u in upload_ids if u]
        for uid in ids:
            self._storage.delete_prefix(f"uploads/{uid}")
        if ids:
            self._store.delete_uploads(ids)

    async def discard(self, upload_id: str) -> None:
        await self._offload.slow(self.discard_sync, [upload_id])

    def sweep_expired_sync(self, cutoff: float) -> int:
        """Remove uploads older than `cutoff`; returns how many. Blocking."""
        ups = self._store.expired_uploads(cutoff)
        self.discard_sync([u["id"] for u in ups])
        return len(ups)
