"""The submit-time rule for a job's media references: what the API accepts and rewrites before a job is queued.

data URI → decoded, content-checked and stored as an upload (local path); our own `/files/…` URL → local path
(must exist, no traversal; with keys, its token or the owner's key); other http(s) URL → kept after a literal-host
check (the worker re-checks DNS and downloads with limits); anything else → InputError. Blocking (it may decode a
data URI and read the store): it runs on a thread. `server.media_refs` holds the download/sniff helpers the worker
uses.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from server import media_refs
from server.errors import user_field
from server.files import Files
from server.settings import Settings
from server.uploads import Uploads
from vace_local.core.errors import InputError
from vace_local.core.spec import JobInputs


class InputResolver:
    """Resolves a job's media references at submit (`resolve_input_reference` for one, `prepare_inputs` for all)."""

    def __init__(self, settings: Settings, files: Files, uploads: Uploads) -> None:
        self.settings = settings
        self.files = files
        self.uploads = uploads
        self.data_dir = files.data_dir

    def resolve_input_reference(self, value: str, field_name: str, base: str, expected: media_refs.Kind,
                                owner: str | None = None) -> str:
        """Submit-time rule for one media reference; returns what the worker will resolve.

        data URI → decoded, content-checked and stored as an upload (local path); our own `/files/…` URL →
        local path (must exist, no traversal); other http(s) URL → kept after a literal-host check (the
        worker re-checks DNS and downloads with limits); anything else → InputError. With keys configured, our
        own file URLs must carry their token or belong to `owner` (another key's file is "not found").
        """
        v = value.strip()
        if v.lower().startswith("data:"):
            return str(self.uploads.store_data_uri(v, field_name, expected, owner))
        parts = urlsplit(v)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InputError(field_name, "must be an http(s) URL, a data URI or a file uploaded to this server")
        if parts.netloc.lower() in self.files.own_netlocs(base):  # other hosts' /files/… (e.g. CDNs) are just URLs
            ref = media_refs.parse_file_url_path(parts.path, field_name)
            if ref is not None:
                kind, ident, name, token = ref
                path = media_refs.safe_data_path(self.data_dir, kind, ident, name)
                present = self.files.fetch(kind, ident, name) is not None  # another box's file too
                readable = self.files.may_read_sync(kind, ident, name, owner=owner, token=token)
                if kind == "uploads":
                    up = self.uploads.get_sync(ident)
                    if up is None or up["completed_at"] is None or not present or not readable:
                        raise InputError(field_name, "uploaded file not found (expired or never completed)")
                elif not present or not readable:
                    raise InputError(field_name, "file not found on this server")
                media_refs.check_file(path, field_name, expected)
                return str(path)
        problem = media_refs.literal_host_problem(parts.hostname, self.settings.allowed_hosts)
        if problem:
            raise InputError(field_name, f"URL host '{parts.hostname}' {problem}; refused "
                             "(allow-list it with VACE_ALLOWED_HOSTS)")
        return v

    def prepare_inputs(self, spec_inputs: JobInputs, base: str, field_names: dict[str, str] | None,
                       owner: str | None = None) -> JobInputs:
        out: dict[str, Any] = {}
        for name, expected in media_refs.FIELD_KINDS.items():
            val = getattr(spec_inputs, name)
            if name == "reference_images":
                out[name] = [
                    self.resolve_input_reference(v, user_field(f"{name}[{i}]", field_names), base, expected, owner)
                    for i, v in enumerate(val)
                ]
            elif val:
                out[name] = self.resolve_input_reference(val, user_field(name, field_names), base, expected, owner)
            else:
                out[name] = val
        return JobInputs.model_construct(**out)
