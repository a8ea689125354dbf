"""Jobs: submit, look up, queue position, wait, cancel, list, delete, and retention.

`Jobs.submit` checks a `JobSpec`'s inputs (`server.submit_inputs`), applies the served model and tiny-mode caps, and
stores it queued (429 with `Retry-After` when the queue or the key's share of it is full). `field_names` maps
JobInputs/JobSpec names to the dialect's (e.g. `{"reference_images": "ref_image_urls"}`) so every error names the
user's field; `extra` is free dialect JSON kept on the record. `owner` (`server.auth.request_owner`) scopes every
lookup: another key's job is "not found". `delete` (and retention) is the one place a job's record, files and
upload are removed.

The async methods are what handlers call: each reaches the store through the `Offload` seam. The `_sync`
methods block and are for threads (the worker side, tests).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from server import media_refs
from server.errors import ApiError
from server.offload import Offload
from server.settings import Settings
from server.storage import Storage
from server.store import JobRecord, OwnerQueueFull, Store
from server.submit_inputs import InputResolver
from server.uploads import Uploads
from vace_local.core.errors import InputError, Problem
from vace_local.core.inputs import input_refs
from vace_local.core.spec import JobSpec, round_frames_4k1, round_side

log = logging.getLogger("vace.server")

TINY_NOTE = "served by the tiny random-weight smoke model: the output is noise, not a real generation"

#: Job and upload ids as we issue them (`store.new_id`); anything else is unknown without a lookup.
_ID_RE = re.compile(r"[0-9a-f]{32}")


def iso_time(ts: float | None) -> str | None:
    """A job timestamp as the APIs write it (UTC, milliseconds, `Z`)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Jobs:
    """Job submission and lookup shared by all dialects (`app.state.services.jobs`)."""

    def __init__(self, settings: Settings, store: Store, storage: Storage, uploads: Uploads, inputs: InputResolver,
                 offload: Offload) -> None:
        self.settings = settings
        self._store = store
        self._storage = storage
        self._uploads = uploads
        self._inputs = inputs
        self._offload = offload
        self._depth: tuple[float, int] = (-1e9, 0)

    # -- submit --

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
                nw, nh = round_side(w * scale, "down"), round_side(h * scale, "down")
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

    def create_job_sync(
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
        """Validate inputs, store the job as queued and return its record (see the module docstring). Blocking."""
        if self._queue_depth() >= self.settings.max_queue:
            raise self._queue_full(f"the queue is full ({self.settings.max_queue} jobs, VACE_MAX_QUEUE)")
        cap = self.settings.max_queued_per_key if owner is not None and self.settings.max_queued_per_key else None
        if cap is not None and self._store.queued_of(owner) >= cap:  # before any input work; exact at the insert
            raise self._queue_full(f"this API key already has {cap} jobs queued (VACE_MAX_QUEUED_PER_KEY)")
        lines = list(logs)
        try:
            resolved = self._inputs.prepare_inputs(spec.inputs, base_url, field_names, owner)
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
            job = self._store.insert_job(dialect=dialect, model=model_id, spec=spec.model_dump(mode="json"),
                                         extra=ex, webhook_url=webhook_url, priority=priority, logs=lines,
                                         owner=owner, owner_cap=cap)
        except OwnerQueueFull as e:
            raise self._queue_full(f"this API key already has {e.cap} jobs queued (VACE_MAX_QUEUED_PER_KEY)") from None
        self._depth = (self._depth[0], self._depth[1] + 1)
        return job

    async def submit(self, spec: JobSpec, **kwargs: Any) -> JobRecord:
        """`create_job_sync` off the event loop: on the slow pool when an input is a data URI (decoded and written
        there), otherwise on the default executor (a few store statements)."""
        if any(ref.form == "data" for ref in input_refs(spec.inputs)):
            return await self._offload.slow(self.create_job_sync, spec, **kwargs)
        return await self._offload.store(self.create_job_sync, spec, **kwargs)

    def _queue_full(self, why: str) -> ApiError:
        """429 naming the limit, with `Retry-After` (every dialect sends the header with its own envelope)."""
        after = self.settings.queue_retry_after_s
        return ApiError(429, f"{why}; retry after {after} s", error_type="queue_full",
                        headers={"Retry-After": str(after)})

    def _queue_depth(self) -> int:
        """Queue depth for the queue-full check, re-counted at most once a second (submit is hot)."""
        now = time.monotonic()
        if now - self._depth[0] > 1.0:
            self._depth = (now, self._store.queue_depth())
        return self._depth[1]

    def check_webhook_url(self, url: str, field_name: str = "webhook") -> None:
        """A webhook target's scheme and literal host (DNS is checked again at delivery)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError.invalid(Problem(field_name, "must be an http(s) URL"), error_type="invalid_request")
        problem = media_refs.literal_host_problem(parts.hostname, self.settings.allowed_hosts)
        if problem:
            raise ApiError.invalid(Problem(field_name, f"URL host '{parts.hostname}' {problem}; refused "
                                           "(allow-list it with VACE_ALLOWED_HOSTS)"), error_type="invalid_request")

    # -- look up, cancel, list --

    def get_sync(self, job_id: str, *, with_logs: bool = False, owner: str | None = None) -> JobRecord | None:
        """The job, or None when the id is malformed, unknown, or (given `owner`) another key's job. Blocking."""
        if not _ID_RE.fullmatch(job_id or ""):
            return None
        job = self._store.get_job(job_id, with_logs=with_logs)
        if job is None or (owner is not None and job.owner not in (None, owner)):
            return None
        return job

    async def get(self, job_id: str, *, with_logs: bool = False, owner: str | None = None) -> JobRecord | None:
        if not _ID_RE.fullmatch(job_id or ""):
            return None
        return await self._offload.store(self.get_sync, job_id, with_logs=with_logs, owner=owner)

    def _cancel_sync(self, job_id: str, owner: str | None) -> JobRecord | None:
        if self.get_sync(job_id, owner=owner) is None or self._store.request_cancel(job_id) is None:
            return None
        return self._store.get_job(job_id)

    async def cancel(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """Queued: cancelled at once; running: flagged, the worker stops at the next denoising step (poll `get`).
        None when the job is not found (for this owner)."""
        return await self._offload.store(self._cancel_sync, job_id, owner)

    async def queue_position(self, job_id: str) -> int | None:
        """Jobs ahead in the fair order (keys take turns; 0 = next), None when not queued."""
        return await self._offload.store(self._store.queue_position, job_id)

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobRecord:
        """Poll until terminal or timeout (default `Settings.sync_timeout_s`); returns the latest record (check
        `.terminal`)."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.settings.sync_timeout_s)
        delay = 0.05
        while True:
            job = await self._offload.store(self._store.get_job, job_id)
            if job is None:
                raise ApiError(404, f"job '{job_id}' not found", error_type="not_found")
            if job.terminal or time.monotonic() >= deadline:
                return job
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    async def page(self, dialect: str, *, after: str | None, limit: int, ascending: bool,
                   owner: str | None = None) -> tuple[list[JobRecord], bool] | None:
        """One page of a dialect's jobs visible to `owner` by (created_at, id), after the job `after`;
        (page, has_more), or None when `after` is not such a job."""
        return await self._offload.store(self._store.page_jobs, dialect, after=after, limit=limit,
                                         ascending=ascending, owner=owner)

    # -- delete and retention: the one place a job's record, files and upload are removed --

    def _remove_sync(self, job_ids: list[str], upload_ids: Iterable[str] = ()) -> None:
        for jid in job_ids:
            self._storage.delete_prefix(f"outputs/{jid}")
            self._storage.delete_prefix(f"windows/{jid}")  # a long job's finished windows (kept for a resume)
        self._store.delete_jobs(job_ids)
        self._uploads.discard_sync(upload_ids)

    async def delete(self, job: JobRecord) -> None:
        """Remove a job: its record, its outputs and the upload its input became (`extra.upload_id`)."""
        await self._offload.slow(self._remove_sync, [job.id], [job.extra.get("upload_id") or ""])

    def cleanup_expired_sync(self) -> int:
        """Delete finished jobs (and their outputs) and uploads older than the retention period; with several
        instances on one store, one of them at a time (the others skip this round). Blocking."""
        if not self.settings.retention_hours:
            return 0
        cutoff = time.time() - self.settings.retention_hours * 3600
        swept = self._storage.sweep_local(cutoff)  # this box's cached copies of remote files: every box, its own
        with self._store.singleton("retention") as mine:
            return swept + (self._cleanup_expired(cutoff) if mine else 0)

    def _cleanup_expired(self, cutoff: float) -> int:
        ids = self._store.expired_jobs(cutoff)
        self._remove_sync(ids)
        return len(ids) + self._uploads.sweep_expired_sync(cutoff)

    async def retention_loop(self, stop: asyncio.Event) -> None:
        """Run `cleanup_expired_sync` every `cleanup_interval_s` until `stop`."""
        while not stop.is_set():
            try:
                n = await self._offload.slow(self.cleanup_expired_sync)
                if n:
                    log.info("retention: removed %d expired jobs/uploads", n)
            except Exception:  # noqa: BLE001
                log.exception("cleanup failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.settings.cleanup_interval_s)
            except TimeoutError:
                pass
