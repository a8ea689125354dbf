"""Where uploads and outputs live, behind one small interface: the data dir (default) or S3-compatible storage.

Every file has a key relative to the data dir (`uploads/<id>/<name>`, `outputs/<job>/<name>`), and every
process also keeps its working copy at `<data_dir>/<key>`, so the rest of the server keeps handling local
files. `LocalStorage` is the data dir itself (one box, or a directory every box mounts, e.g. NFS): publishing is
a no-op. `S3Storage` publishes each finished file once to a bucket (boto3; endpoint URL, bucket and prefix are
settings, credentials come from the usual AWS variables / config files), and any process that lacks a file
fetches it into its own data dir on first use — so a job submitted on one box runs on another, and its
outputs are served by any box (streamed through the API, or a redirect to a presigned URL).

Objects are stored, streamed and presigned with the type our own sniffing gives (`media_refs.served_type`),
never the type a client declared, so a bucket or a box never serves an upload as a web page.

Job specs name a stored input by its path in the submitting box's data dir; `key_of_path` turns that back
into the key, so boxes need not share the data dir's path.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.media_refs import served_type
from server.settings import Settings

#: Bytes read from a file's start to tell its type (`media_refs.sniff` needs at most this many).
HEAD_BYTES = 512


class Storage(ABC):
    """Publish, fetch and delete files by key; `root` is this process's data dir (its local copies)."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def local(self, key: str) -> Path:
        return self.root / key

    @abstractmethod
    def publish(self, key: str) -> None:
        """Make the finished local file `<root>/<key>` readable by every process, once."""

    @abstractmethod
    def fetch(self, key: str) -> Path | None:
        """A local copy of `key` (fetched if this process lacks it), or None when it does not exist."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every file under `prefix` (`outputs/<job>`), the local copies included."""

    def sweep_local(self, cutoff: float) -> int:  # noqa: ARG002 - remote backends only
        """Drop this box's cached copies (`uploads/<id>`, `outputs/<job>`) last changed before `cutoff`."""
        return 0

    def stat(self, key: str) -> tuple[int, str | None] | None:  # noqa: ARG002 - remote backends only
        """(size, content type) of a stored object that has no local copy here; None: no such object."""
        return None

    def stream(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:  # noqa: ARG002
        raise FileNotFoundError(key)

    def head_bytes(self, key: str) -> bytes:  # noqa: ARG002 - remote backends only
        """The first `HEAD_BYTES` of a stored object (to sniff its type without fetching it)."""
        raise FileNotFoundError(key)

    def presigned_url(self, key: str, ttl_s: int, head: bytes = b"") -> str | None:  # noqa: ARG002
        """A time-limited URL of the object, served with the type and disposition `head` sniffs to."""
        return None


class LocalStorage(Storage):
    """The data dir is the storage (a local disk, or one directory mounted by every box)."""

    def publish(self, key: str) -> None:
        pass

    def fetch(self, key: str) -> Path | None:
        p = self.local(key)
        return p if p.is_file() else None

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.local(prefix), ignore_errors=True)


class S3Storage(Storage):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, …) holds the files; local copies are a cache."""

    remote = True

    def __init__(self, root: Path, *, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, client: Any = None) -> None:
        super().__init__(root)
        import boto3  # only where S3 storage is configured

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def sweep_local(self, cutoff: float) -> int:
        n = 0
        for kind in ("uploads", "outputs"):
            base = self.root / kind
            for d in base.iterdir() if base.is_dir() else ():
                if d.is_dir() and d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
        return n

    def publish(self, key: str) -> None:
        """Upload with the sniffed type and disposition, so even a direct bucket URL never serves a page."""
        with open(self.local(key), "rb") as f:
            ctype, disposition = served_type(f.read(HEAD_BYTES), key)
        self.client.upload_file(str(self.local(key)), self.bucket, self._key(key),
                                ExtraArgs={"ContentType": ctype, "ContentDisposition": disposition})

    def fetch(self, key: str) -> Path | None:
        p = self.local(key)
        if p.is_file():
            return p
        if self.stat(key) is None:
            return None
        p.parent.mkdir(parents=True, exist_ok=True)
        part = p.with_name(p.name + ".fetch")
        self.client.download_file(self.bucket, self._key(key), str(part))
        part.replace(p)
        return p

    def stat(self, key: str) -> tuple[int, str | None] | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"]), head.get("ContentType")

    def stream(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def head_bytes(self, key: str) -> bytes:
        obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes=0-{HEAD_BYTES - 1}")
        body = obj["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def presigned_url(self, key: str, ttl_s: int, head: bytes = b"") -> str | None:
        """The response type and disposition are part of the signed URL (objects published by older versions
        may carry a client's type)."""
        ctype, disposition = served_type(head, key)
        params = {"Bucket": self.bucket, "Key": self._key(key), "ResponseContentType": ctype,
                  "ResponseContentDisposition": disposition}
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.local(prefix), ignore_errors=True)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=self._key(prefix.rstrip("/") + "/"))
        for page in pages:
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objs, "Quiet": True})


def key_of_path(path: Path) -> str | None:
    """The key of a data-dir file path made on any box (`…/<uploads|outputs>/<id>/<name>`), else None."""
    parts = path.parts
    if len(parts) >= 3 and parts[-3] in ("uploads", "outputs") and all(x not in ("", ".", "..") for x in parts[-2:]):
        return "/".join(parts[-3:])
    return None


def make_storage(settings: Settings) -> Storage:
    root = settings.data_dir.resolve()
    if settings.storage == "s3":
        return S3Storage(root, bucket=settings.s3_bucket or "", prefix=settings.s3_prefix,
                         endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    return LocalStorage(root)
