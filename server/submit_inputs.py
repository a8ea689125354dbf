"""The submit-time rule for a job's media references: what the API accepts and rewrites before a job is queued.

data URI → decoded, content-checked and stored as an upload (local path); our own `/files/…` URL → local path
(must exist, no traversal; with keys, its token or the owner's key); other http(s) URL → kept after a literal-host
check (the worker re-checks DNS and downloads with limits); anything else → InputError. Blocking (it may decode a
data URI and read the store): it runs on a thread. `server.media_refs` holds the download/sniff helpers the worker
uses.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from server import media_refs
from server.errors import user_field
from server.files import Files
from server.settings import Settings
from server.uploads import Uploads
from vace_local.core.errors import InputError
from vace_local.core.inputs import Fetcher, MediaRef, walk_inputs
from vace_local.core.spec import JobInputs, MediaKind


class InputResolver:
    """Resolves a job's media references at submit (`resolve_input_reference` for one, `prepare_inputs` for all,
    both through `fetcher`: the API's `Fetcher` for the one input walk, `vace_local.core.inputs.walk_inputs`)."""

    def __init__(self, settings: Settings, files: Files, uploads: Uploads) -> None:
        self.settings = settings
        self.files = files
        self.uploads = uploads
        self.data_dir = files.data_dir

    def fetcher(self, base: str, owner: str | None = None,
                field_names: dict[str, str] | None = None) -> Fetcher[str]:
        """The submit-time rule for each form of media reference (module docstring); errors name the user's field
        (`field_names`). With keys configured, our own file URLs must carry their token or belong to `owner`
        (another key's file is "not found")."""

        def data_uri(ref: MediaRef) -> str:
            field_name = user_field(ref.label, field_names)
            return str(self.uploads.store_data_uri(ref.value.strip(), field_name, ref.kind, owner))

        def path(ref: MediaRef) -> str:
            raise InputError(user_field(ref.label, field_names),
                             "must be an http(s) URL, a data URI or a file uploaded to this server")

        def url(ref: MediaRef) -> str:
            field_name, v = user_field(ref.label, field_names), ref.value.strip()
            parts = urlsplit(v)
            if not parts.hostname:
                return path(ref)
            if parts.netloc.lower() in self.files.own_netlocs(base):  # other hosts' /files/… (e.g. CDNs): URLs
                own = media_refs.parse_file_url_path(parts.path, field_name)
                if own is not None:
                    return self._own_file(own, field_name, ref.kind, owner)
            problem = media_refs.literal_host_problem(parts.hostname, self.settings.allowed_hosts)
            if problem:
                raise InputError(field_name, f"URL host '{parts.hostname}' {problem}; refused "
                                 "(allow-list it with VACE_ALLOWED_HOSTS)")
            return v

        return Fetcher(data_uri=data_uri, url=url, path=path)

    def _own_file(self, ref: tuple[str, str, str, str | None], field_name: str, expected: MediaKind,
                  owner: str | None) -> str:
        """One of our own `/files/…` URLs as the local path of an existing, readable, content-checked file."""
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

    def resolve_input_reference(self, value: str, field_name: str, base: str, expected: MediaKind,
                                owner: str | None = None) -> str:
        """The submit-time rule for one media reference (already named by the user's `field_name`); returns
        what the worker will resolve."""
        return self.fetcher(base, owner)(MediaRef(field_name, expected, value, field_name))

    def prepare_inputs(self, spec_inputs: JobInputs, base: str, field_names: dict[str, str] | None,
                       owner: str | None = None) -> JobInputs:
        """Every media reference of a job through the submit-time rule."""
        return walk_inputs(spec_inputs, self.fetcher(base, owner, field_names), JobInputs)
