"""The shared core every dialect router calls: jobs, auth, input resolution, URLs, uploads, errors.

Dialect routers stay thin: parse their request model, build a `JobSpec`, call `JobService.create_job`, and
render the returned `JobRecord` in their own shape. Get the service in a route with
`core: JobService = Depends(get_job_service)`.

JobService API (stable; the fal and AI/ML dialects build on it):

* `require_auth` — FastAPI dependency; accepts `Authorization: Bearer <key>` and `Authorization: Key <key>`
  (constant-time compare against `Settings.api_keys`; no keys configured → open). Raises `ApiError(401)`.
  `request_owner(request)` is then the caller's owner id (a hash of the key, None without keys): pass it as
  `owner=` to `create_job`, `get_job` and `cancel_job`, so a job is seen only by the key that created it.
* `JobService.base_url(request)` — public base URL (setting, else derived from the request), no trailing slash.
* `JobService.create_job(spec, dialect=, model_id=, base_url=, webhook_url=None, extra=None, field_names=None,
  logs=None, owner=None) -> JobRecord` — validates/rewrites inputs (data URIs stored as uploads, our own file
  URLs mapped to local files, URL hosts checked), applies tiny-mode caps, stores the job queued. `field_names` maps
  JobInputs/JobSpec names to the dialect's (e.g. `{"reference_images": "ref_image_urls"}`) so every error
  names the user's field. `extra` is free dialect JSON kept on the record (e.g. sub-endpoint, raw input).
  Raises `ApiError` (4xx) for bad input, 429 with `Retry-After` when the queue is full (`max_queue`) or the key
  has `max_queued_per_key` jobs queued.
* `await JobService.create_job_async(spec, **same)` — `create_job` off the event loop (what async routes call).
* `await JobService.run_slow(fn, *args)` — blocking slow work (downloads, probes, data-URI decodes, cleanup) on the
  core's own bounded pool (`Settings.slow_work_threads`), so `/ready` and quick store calls never queue
  behind it.
* `JobService.get_job(job_id, with_logs=False, owner=None) -> JobRecord | None` (None too for another key's job).
* `JobService.cancel_job(job_id, owner=None) -> JobRecord | None` — queued: cancelled at once; running: flagged, the
  worker stops at the next denoising step (poll `get_job`).
* `JobService.queue_position(job_id) -> int | None` — jobs ahead in the fair order (keys take turns; 0 = next),
  None when not queued.
* `await JobService.wait_for_job(job_id, timeout_s) -> JobRecord` — for sync modes; returns the record as it is
  when the timeout hits (check `.terminal`).
* `JobService.output_urls(job, base_url) -> list[dict]` — `{kind, url, file, content_type, size, …}` per output,
  video first. `JobService.output_path(job, output) -> Path`, `JobService.file_url(base, kind, ident, name, owner)`:
  with keys configured, file URLs are capability URLs (`…/<id>/<token>/<name>`, one token per file, see
  `JobService.file_token`).
* `JobService.resolve_input_reference(value, field, base_url, expected)` — the submit-time rule for one media
  reference (used by create_job); `server.media_refs` holds the download/sniff helpers the worker uses.
* `JobService.save_upload(stream, filename, content_type)`, `create_upload_ticket`, `receive_upload` — uploads.
* `map_exception(exc) -> Failure` — the one exception-to-status mapper (worker side).
* `validation_error(exc, field_names) -> ApiError` — pydantic errors → problems (`vace_local.core.errors`) and one
  message naming each field and rule; `ApiError.invalid(problems)` for a dialect's own field errors.

Internal statuses: queued | running | succeeded | failed | cancelled (`server.store`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fastapi import Request
from pydantic import ValidationError

from server import media_refs
from server.settings import Settings
from server.storage import make_storage
from server.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    OwnerQueueFull,
    Store,
    new_id,
)
from vace_local.core.errors import InputError, Problem, problems_from_pydantic, problems_text
from vace_local.core.spec import JobInputs, JobSpec, round_frames_4k1

log = logging.getLogger("vace.server")

T = TypeVar("T")

TINY_NOTE = "served by the tiny random-weight smoke model: the output is noise, not a real generation"

__all__ = [
    "CANCELLED", "FAILED", "QUEUED", "RUNNING", "SUCCEEDED", "ApiError", "JobService", "Failure", "JobRecord",
    "get_job_service", "iso_time", "map_exception", "owner_of_key", "request_owner", "require_auth",
    "user_field", "validation_error",
]

#: Job and upload ids as we issue them (`store.new_id`); anything else is unknown without a lookup.
_ID_RE = re.compile(r"[0-9a-f]{32}")


# ---- errors -------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP-level error; each dialect renders it in its own envelope.

    `problems` are the broken rules as data (field path in the dialect's names, message, rule type), for the
    dialects that answer per field (fal's `detail`) and for what a failed job stores; `message` is the one-line
    text the other envelopes show. `field` names the user's field when known (OpenAI's `param`). Build a
    field error with `ApiError.invalid`.
    """

    def __init__(self, status_code: int, message: str, *, field: str | None = None,
                 error_type: str = "invalid_request", problems: list[Problem] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        #: Sent with the error whatever the dialect's envelope (e.g. `Retry-After` on 429).
        self.headers = headers or {}
        self.message = message
        self.problems = problems or []
        self.field = field if field is not None else next((p.field for p in self.problems if p.field), None)
        self.error_type = error_type

    @classmethod
    def invalid(cls, problems: Problem | list[Problem], status_code: int = 400, *,
                error_type: str = "validation_error", show_got: bool = True, more: bool = True) -> ApiError:
        """An error about named fields: the message is `field: rule; …` rendered from the problems
        (`show_got`, `more`: see `problems_text`)."""
        items = [problems] if isinstance(problems, Problem) else list(problems)
        return cls(status_code, problems_text(items, show_got=show_got, more=more), error_type=error_type,
                   problems=items)

    def detail(self) -> list[dict[str, Any]]:
        """The broken rules as data (what a failed job stores): field path in user names, message, type."""
        if self.problems:
            return [p.as_dict() for p in self.problems]
        return [{"field": self.field, "message": self.message, "type": self.error_type}]


@dataclass
class Failure:
    """What the worker records for an exception: final status, a short type, a user-facing message."""

    status: str
    error_type: str
    message: str
    restart_worker: bool = False
    #: The broken rules as data (`JobRecord.error_detail`): `[{"field", "message", "type"}]`; empty when the
    #: failure is not about a user field.
    detail: list[dict[str, Any]] = field(default_factory=list)


def user_field(name: str, field_names: dict[str, str] | None) -> str:
    """Translate a JobSpec/JobInputs field path (`inputs.reference_images[2]`) to the dialect's name."""
    if not field_names:
        return name
    n = name.removeprefix("inputs.")
    if n in field_names:  # an exact entry wins (WaveSpeed's `image` is appended to reference_images)
        return field_names[n]
    head, sep, rest = n.partition("[")
    head_dot, dot, tail = head.partition(".")
    mapped = field_names.get(head_dot, head_dot)
    return mapped + dot + tail + sep + rest


def map_exception(exc: BaseException, field_names: dict[str, str] | None = None) -> Failure:
    """The one exception-to-status mapper. Matches torch errors by name so the API never imports torch."""
    from vace_local.core.errors import JobCancelled, ModelNotFoundError, OutOfMemory, VaceError

    name = type(exc).__name__
    if isinstance(exc, JobCancelled):
        return Failure(CANCELLED, "cancelled", "cancelled by request")
    if isinstance(exc, InputError):
        name = user_field(exc.field, field_names)
        return Failure(FAILED, "input_error", f"input '{name}': {exc.message}",
                       detail=[Problem(name, exc.message).as_dict()])
    if isinstance(exc, OutOfMemory) or name == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return Failure(FAILED, "out_of_memory",
                       "the GPU ran out of memory for this job (try a smaller size or fewer frames); "
                       "the worker was restarted", restart_worker=True)
    if isinstance(exc, ModelNotFoundError):
        return Failure(FAILED, "model_not_found", str(exc))
    if isinstance(exc, ValidationError):
        err = validation_error(exc, field_names, value_error_prefix=False)
        return Failure(FAILED, "invalid_input", err.message, detail=err.detail())
    if isinstance(exc, VaceError):
        return Failure(FAILED, "error", str(exc))
    return Failure(FAILED, "internal_error", f"internal error: {name}: {str(exc)[:500]}")


def validation_error(exc: ValidationError | list[dict[str, Any]], field_names: dict[str, str] | None = None,
                     status_code: int = 400, *, value_error_prefix: bool = True) -> ApiError:
    """Pydantic errors → ApiError whose message names each field and the rule broken (the shared formatter,
    with the wording the WaveSpeed and default envelopes have always sent)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    problems = problems_from_pydantic(errors, lambda path: user_field(path, field_names),
                                      value_error_prefix=value_error_prefix, lower_required=True)
    return ApiError.invalid(problems, status_code)


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- FastAPI dependencies -----------------------------------------------------------------------------


def get_job_service(request: Request) -> JobService:
    return request.app.state.core


def require_auth(request: Request) -> None:
    """Accept `Authorization: Bearer <key>` or `Key <key>` when keys are configured (constant-time)."""
    core: JobService = request.app.state.core
    if not core.settings.auth_enabled:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() not in ("bearer", "key") or not key.strip():
        raise ApiError(401, "missing or malformed Authorization header (expected 'Bearer <key>' or 'Key <key>')",
                       error_type="unauthorized")
    if not core.key_ok(key.strip()):
        raise ApiError(401, "invalid API key", error_type="unauthorized")
    request.state.owner = owner_of_key(key.strip())


def owner_of_key(key: str) -> str:
    """What a job records as its owner: a hash of the API key, never the key itself."""
    return hashlib.sha256(b"vace-local job owner\0" + key.encode()).hexdigest()


def request_owner(request: Request) -> str | None:
    """The owner id `require_auth` found for this request (None when no keys are configured)."""
    return getattr(request.state, "owner", None)


# ---- the job service --------------------------------------------------------------------------------------


@dataclass
class UploadInfo:
    id: str
    filename: str
    size: int
    content_type: str | None
    path: Path
    media_kind: str | None = None
    token: str = field(default="", repr=False)


class JobService:
    """Job submission and lookup shared by all dialects; one per API process (`app.state.core`)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.data_dir = settings.data_dir.resolve()
        self.storage = make_storage(settings)
        self._keys = [k.encode() for k in settings.api_keys]
        self._depth: tuple[float, int] = (-1e9, 0)
        self._file_secret: bytes | None = self._load_file_secret() if settings.auth_enabled else None
        #: Slow blocking work gets its own few threads (see `run_slow`); shut down with the app.
        self.slow_pool = ThreadPoolExecutor(max_workers=settings.slow_work_threads, thread_name_prefix="vace-slow")

    async def run_slow(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run blocking slow work (a download, probe, data-URI decode, cleanup) on the bounded slow pool: it
        can pile up under hostile input, and must not take the default executor's threads from `/ready` and
        the quick store calls."""
        return await asyncio.get_running_loop().run_in_executor(self.slow_pool, functools.partial(fn, *args, **kwargs))

    # -- auth & URLs --

    def key_ok(self, key: str) -> bool:
        ok = False
        kb = key.encode()
        for k in self._keys:  # no early exit: timing does not reveal which key matched
            ok |= hmac.compare_digest(kb, k)
        return ok

    def base_url(self, request: Request | None = None) -> str:
        if self.settings.public_base_url:
            return self.settings.public_base_url
        if request is not None:
            return str(request.base_url).rstrip("/")
        scheme = "https" if self.settings.ssl_certfile else "http"
        return f"{scheme}://{self.settings.host}:{self.settings.port}"

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
        return self.store.shared_secret("file-url")

    def _file_owner(self, kind: str, ident: str) -> tuple[bool, str | None]:
        """(exists, owner) of the job (outputs) or upload a served file belongs to."""
        if kind == "uploads":
            up = self.store.get_upload(ident)
            return up is not None, (up or {}).get("owner")
        job = self.store.get_job(ident)
        return job is not None, job.owner if job else None

    def may_read_file(self, kind: str, ident: str, name: str, *, owner: str | None, token: str | None) -> bool:
        """Whether a request may read a served file: always without keys; else with that file's capability
        token, or as the key that owns it (files made without keys: any key)."""
        if not self.settings.auth_enabled:
            return True
        exists, file_owner = self._file_owner(kind, ident)
        if not exists:
            return False
        if token and hmac.compare_digest(token.encode(), self.file_token(kind, ident, name, file_owner).encode()):
            return True
        return owner is not None and file_owner in (None, owner)

    def output_path(self, job: JobRecord, output: dict[str, Any]) -> Path:
        """This box's copy of a job output, fetched from the shared storage when another box wrote it (so
        base64 results and downloads work on every instance); the path may not exist if the file is gone."""
        path = media_refs.safe_data_path(self.data_dir, "outputs", job.id, output["file"])
        if not path.is_file():
            self.storage.fetch(f"outputs/{job.id}/{output['file']}")
        return path

    def output_urls(self, job: JobRecord, base: str) -> list[dict[str, Any]]:
        if job.status != SUCCEEDED:
            return []
        return [dict(o, url=self.file_url(base, "outputs", job.id, o["file"], job.owner)) for o in job.outputs]

    def own_netlocs(self, base: str) -> set[str]:
        locs = {urlsplit(base).netloc.lower()}
        if self.settings.public_base_url:
            locs.add(urlsplit(self.settings.public_base_url).netloc.lower())
        port = self.settings.port
        locs |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        return locs

    # -- inputs --

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
            return str(self._store_data_uri(v, field_name, expected, owner))
        parts = urlsplit(v)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InputError(field_name, "must be an http(s) URL, a data URI or a file uploaded to this server")
        if parts.netloc.lower() in self.own_netlocs(base):  # other hosts' /files/… (e.g. CDNs) are just URLs
            ref = media_refs.parse_file_url_path(parts.path, field_name)
            if ref is not None:
                kind, ident, name, token = ref
                path = media_refs.safe_data_path(self.data_dir, kind, ident, name)
                present = self.storage.fetch(f"{kind}/{ident}/{name}") is not None  # another box's file too
                readable = self.may_read_file(kind, ident, name, owner=owner, token=token)
                if kind == "uploads":
                    up = self.store.get_upload(ident)
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

    def _prepare_inputs(self, spec_inputs: JobInputs, base: str, field_names: dict[str, str] | None,
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

    # -- jobs --

    def _apply_server_model(self, spec: JobSpec, logs: list[str]) -> JobSpec:
        s = self.settings
        upd: dict[str, Any] = {}
        if spec.model != s.model:
            upd["model"] = s.model
        if s.is_tiny:
            logs.append(f"model: {TINY_NOTE}")
            w, h = spec.width, spec.height
            if s.tiny_max_side and max(w, h) > s.tiny_max_side:
                scale = s.tiny_max_side / max(w, h)
                nw, nh = max(16, int(w * scale) // 16 * 16), max(16, int(h * scale) // 16 * 16)
                upd.update(width=nw, height=nh)
                logs.append(f"tiny mode cap (VACE_TINY_MAX_SIDE): size {w}x{h} → {nw}x{nh}")
            if s.tiny_max_frames and spec.num_frames > s.tiny_max_frames and not spec.inputs.extend:
                nf = round_frames_4k1(s.tiny_max_frames, "down")
                upd["num_frames"] = nf
                logs.append(f"tiny mode cap (VACE_TINY_MAX_FRAMES): {spec.num_frames} → {nf} frames")
            if s.tiny_max_steps and spec.num_inference_steps > s.tiny_max_steps:
                upd["num_inference_steps"] = s.tiny_max_steps
                logs.append(f"tiny mode cap (VACE_TINY_MAX_STEPS): {spec.num_inference_steps} → "
                            f"{s.tiny_max_steps} steps")
        if s.save_previews and not spec.output.save_control:
            upd["output"] = spec.output.model_copy(update={"save_control": True})
        return spec.model_copy(update=upd) if upd else spec

    def create_job(
        self,
        spec: JobSpec,
        *,
        dialect: str,
        model_id: str,
        base_url: str,
        webhook_url: str | None = None,
        extra: dict[str, Any] | None = None,
        field_names: dict[str, str] | None = None,
        logs: Iterable[str] = (),
        priority: int = 0,
        owner: str | None = None,
    ) -> JobRecord:
        """Validate inputs, store the job as queued and return its record (see module docstring)."""
        if self._queue_depth() >= self.settings.max_queue:
            raise self._queue_full(f"the queue is full ({self.settings.max_queue} jobs, VACE_MAX_QUEUE)")
        cap = self.settings.max_queued_per_key if owner is not None and self.settings.max_queued_per_key else None
        if cap is not None and self.store.queued_of(owner) >= cap:  # before any input work; exact at the insert
            raise self._queue_full(f"this API key already has {cap} jobs queued (VACE_MAX_QUEUED_PER_KEY)")
        lines = list(logs)
        try:
            resolved = self._prepare_inputs(spec.inputs, base_url, field_names, owner)
        except InputError as e:
            raise ApiError.invalid(Problem(e.field, e.message), error_type="invalid_input") from None
        spec = spec.model_copy(update={"inputs": resolved})
        spec = self._apply_server_model(spec, lines)
        if webhook_url is not None:
            self.check_webhook_url(webhook_url)
        ex = dict(extra or {})
        ex["fields"] = field_names or {}
        ex["base_url"] = base_url
        lines.insert(0, f"queued via {dialect} as '{model_id}' (served by {self.settings.model})")
        try:
            job = self.store.insert_job(dialect=dialect, model=model_id, spec=spec.model_dump(mode="json"),
                                        extra=ex, webhook_url=webhook_url, priority=priority, logs=lines,
                                        owner=owner, owner_cap=cap)
        except OwnerQueueFull as e:
            raise self._queue_full(f"this API key already has {e.cap} jobs queued (VACE_MAX_QUEUED_PER_KEY)") from None
        self._depth = (self._depth[0], self._depth[1] + 1)
        return job

    async def create_job_async(self, spec: JobSpec, **kwargs: Any) -> JobRecord:
        """`create_job` off the event loop: on the slow pool when an input is a data URI (decoded and written
        there), otherwise on the default executor (a few store statements)."""
        refs = [getattr(spec.inputs, name) for name in media_refs.FIELD_KINDS if name != "reference_images"]
        refs += spec.inputs.reference_images
        if any(isinstance(r, str) and r.lstrip()[:5].lower() == "data:" for r in refs):
            return await self.run_slow(self.create_job, spec, **kwargs)
        return await asyncio.to_thread(self.create_job, spec, **kwargs)

    def _queue_full(self, why: str) -> ApiError:
        """429 naming the limit, with `Retry-After` (every dialect sends the header with its own envelope)."""
        after = self.settings.queue_retry_after_s
        return ApiError(429, f"{why}; retry after {after} s", error_type="queue_full",
                        headers={"Retry-After": str(after)})

    def _queue_depth(self) -> int:
        """Queue depth for the queue-full check, re-counted at most once a second (submit is hot)."""
        now = time.monotonic()
        if now - self._depth[0] > 1.0:
            self._depth = (now, self.store.queue_depth())
        return self._depth[1]

    def check_webhook_url(self, url: str, field_name: str = "webhook") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError.invalid(Problem(field_name, "must be an http(s) URL"), error_type="invalid_request")
        problem = media_refs.literal_host_problem(parts.hostname, self.settings.allowed_hosts)
        if problem:
            raise ApiError.invalid(Problem(field_name, f"URL host '{parts.hostname}' {problem}; refused "
                                           "(allow-list it with VACE_ALLOWED_HOSTS)"), error_type="invalid_request")

    def get_job(self, job_id: str, *, with_logs: bool = False, owner: str | None = None) -> JobRecord | None:
        """The job, or None when the id is malformed, unknown, or (given `owner`) another key's job."""
        if not _ID_RE.fullmatch(job_id or ""):
            return None
        job = self.store.get_job(job_id, with_logs=with_logs)
        if job is None or (owner is not None and job.owner not in (None, owner)):
            return None
        return job

    def cancel_job(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        if self.get_job(job_id, owner=owner) is None or self.store.request_cancel(job_id) is None:
            return None
        return self.store.get_job(job_id)

    def queue_position(self, job_id: str) -> int | None:
        return self.store.queue_position(job_id)

    async def wait_for_job(self, job_id: str, timeout_s: float | None = None) -> JobRecord:
        """Poll until terminal or timeout (default `Settings.sync_timeout_s`); returns the latest record."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.settings.sync_timeout_s)
        delay = 0.05
        while True:
            job = await asyncio.to_thread(self.store.get_job, job_id)
            if job is None:
                raise ApiError(404, f"job '{job_id}' not found", error_type="not_found")
            if job.terminal or time.monotonic() >= deadline:
                return job
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    # -- uploads --

    def _upload_dir(self, upload_id: str) -> Path:
        d = self.data_dir / "uploads" / upload_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _store_data_uri(self, uri: str, field_name: str, expected: media_refs.Kind, owner: str | None = None) -> Path:
        """Decode a data URI straight into a new upload (streamed: never the whole payload decoded in memory);
        its content is checked against the field's kind before it is recorded."""
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
        self.storage.publish(f"uploads/{uid}/{name}")
        self.store.insert_upload(upload_id=uid, token="", filename=name, content_type=media_refs.mime_of(ext),
                                 size=size, path=f"uploads/{uid}/{name}", completed=True, owner=owner)
        return path

    async def save_upload(self, chunks: AsyncIterator[bytes], filename: str, content_type: str | None, *,
                          owner: str | None = None, field_name: str = "file",
                          max_bytes: int | None = None) -> UploadInfo:
        """Stream an upload to disk under the size limit (413 naming `field_name` beyond it; default: the upload
        limit); returns where it lives."""
        uid = new_id()
        name = media_refs.sanitize_filename(filename or "upload")
        path = self._upload_dir(uid) / name
        size = await self._write_stream(chunks, path, field_name, max_bytes)
        await asyncio.to_thread(self.storage.publish, f"uploads/{uid}/{name}")
        self.store.insert_upload(upload_id=uid, token="", filename=name, content_type=content_type, size=size,
                                 path=f"uploads/{uid}/{name}", completed=True, owner=owner)
        return UploadInfo(uid, name, size, content_type, path, self._media_kind(path))

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

    def create_upload_ticket(self, filename: str, size: int | None, content_type: str | None,
                             owner: str | None = None) -> UploadInfo:
        """Reserve an upload id + secret token for a later `receive_upload` (the SDK's PUT flow)."""
        if size is not None and size > self.settings.max_upload_bytes:
            raise ApiError(413, f"size: {size} bytes exceeds the {self.settings.max_upload_bytes} byte limit",
                           field="size", error_type="too_large")
        uid = new_id()
        token = secrets.token_urlsafe(24)
        name = media_refs.sanitize_filename(filename or "upload")
        self.store.insert_upload(upload_id=uid, token=token, filename=name, content_type=content_type,
                                 size=size, path=f"uploads/{uid}/{name}", completed=False, owner=owner)
        return UploadInfo(uid, name, size or 0, content_type, self.data_dir / "uploads" / uid / name, token=token)

    async def receive_upload(self, upload_id: str, token: str, chunks: AsyncIterator[bytes]) -> UploadInfo:
        up = self.store.get_upload(upload_id) if len(upload_id) <= 64 else None
        if up is None or not up["token"] or not hmac.compare_digest(up["token"].encode(), token.encode()):
            raise ApiError(403, "upload URL is invalid or expired", error_type="forbidden")
        if up["completed_at"] is not None:
            raise ApiError(409, "this upload URL was already used", error_type="conflict")
        path = self._upload_dir(upload_id) / up["filename"]
        size = await self._write_stream(chunks, path)
        await asyncio.to_thread(self.storage.publish, f"uploads/{upload_id}/{up['filename']}")
        self.store.complete_upload(upload_id, size)
        return UploadInfo(upload_id, up["filename"], size, up["content_type"], path, self._media_kind(path))

    # -- retention --

    def cleanup_expired(self) -> int:
        """Delete finished jobs (and their outputs) and uploads older than the retention period; with several
        instances on one store, one of them at a time (the others skip this round)."""
        if not self.settings.retention_hours:
            return 0
        cutoff = time.time() - self.settings.retention_hours * 3600
        swept = self.storage.sweep_local(cutoff)  # this box's cached copies of remote files: every box, its own
        with self.store.singleton("retention") as mine:
            return swept + (self._cleanup_expired() if mine else 0)

    def _cleanup_expired(self) -> int:
        cutoff = time.time() - self.settings.retention_hours * 3600
        n = 0
        ids = self.store.expired_jobs(cutoff)
        for jid in ids:
            self.storage.delete_prefix(f"outputs/{jid}")
            self.storage.delete_prefix(f"windows/{jid}")  # a long job's finished windows (kept for a resume)
        self.store.delete_jobs(ids)
        n += len(ids)
        ups = self.store.expired_uploads(cutoff)
        for u in ups:
            self.storage.delete_prefix(f"uploads/{u['id']}")
        self.store.delete_uploads([u["id"] for u in ups])
        return n + len(ups)
