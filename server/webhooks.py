"""Webhook delivery: POST each finished job's dialect-rendered payload, retried with exponential backoff.

Delivery state lives in the job store, so pending webhooks survive a restart. Target hosts follow the same
private-address rule as input URLs (allow-list with `VACE_ALLOWED_HOSTS`), and the connection goes to the
address that was checked. Deliveries run concurrently, each bounded by `webhook_timeout_s` in all, with at
most `webhook_per_destination` in flight per destination (scheme, host, port) and `webhook_per_owner` per owner
(API key), `webhook_max_in_flight` in all. The owner cap is what isolates tenants: a key whose endpoints are
tarpits, on as many ports or wildcard-DNS names as it likes, holds at most its own few slots, so it delays only
its own webhooks, never another key's (as long as `webhook_per_owner` × busy keys stays under the overall cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from server import media_refs
from server.files import Files
from server.services import Services
from server.store import JobRecord
from vace_local.core.errors import InputError
from vace_local.core.http_guard import PinnedAsyncBackend, PinnedAsyncTransport

log = logging.getLogger("vace.server.webhooks")

Renderer = Callable[[JobRecord, Files], dict[str, Any]]

def backoff(attempt: int) -> float:
    return min(2.0 ** (attempt - 1), 300.0)


def destination(url: str) -> str:
    """The key deliveries are capped by: one per scheme + host + port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or ''}"


def pinned_client(services: Services) -> httpx.AsyncClient:
    """A client that connects only to addresses `resolve_checked` approved for the "webhook" field."""
    allowed = services.settings.allowed_hosts

    def resolve(host: str, port: int) -> list[str]:
        return media_refs.resolve_checked(host, port, "webhook", allowed)

    return httpx.AsyncClient(transport=PinnedAsyncTransport(PinnedAsyncBackend(resolve)),
                             timeout=services.settings.webhook_timeout_s, trust_env=False, follow_redirects=False)


async def deliver_once(services: Services, job: JobRecord, render: Renderer, client: httpx.AsyncClient) -> None:
    attempts = job.webhook_attempts + 1
    url = job.webhook_url or ""
    limit = services.settings.webhook_timeout_s
    ok = False
    reason = ""
    try:
        async with asyncio.timeout(limit):  # DNS, connect, send and answer together
            r = await client.post(url, json=render(job, services.files), headers={"User-Agent": "vace-local-webhook"})
        ok = 200 <= r.status_code < 300
        reason = f"HTTP {r.status_code}"
    except InputError as e:
        reason = e.message
        attempts = services.settings.webhook_max_attempts  # a refused host will not become acceptable
    except TimeoutError:
        reason = f"no answer within {limit:g} s"
    except httpx.HTTPError as e:
        reason = f"{type(e).__name__}: {e}"
    if ok:
        await services.offload.store(services.store.webhook_attempted, job.id, delivered=True, attempts=attempts,
                                     next_at=None, log_line=f"webhook delivered ({reason})")
        return
    next_at = time.time() + backoff(attempts) if attempts < services.settings.webhook_max_attempts else None
    tail = f"retrying in {backoff(attempts):g} s" if next_at else "giving up"
    await services.offload.store(services.store.webhook_attempted, job.id, delivered=False, attempts=attempts,
                                 next_at=next_at, log_line=f"webhook attempt {attempts} failed ({reason}); {tail}",
                                 level="warning")


class _Limits:
    """One semaphore per key (a destination, an owner), made on first use and dropped when its last user ends."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sems: dict[str, asyncio.Semaphore] = {}
        self.users: Counter[str] = Counter()

    def enter(self, key: str) -> asyncio.Semaphore:
        self.users[key] += 1
        return self.sems.setdefault(key, asyncio.Semaphore(self.size))

    def leave(self, key: str) -> None:
        self.users[key] -= 1
        if self.users[key] <= 0:
            del self.users[key]
            self.sems.pop(key, None)

    def rounds_ahead(self, key: str) -> int:
        """How many delivery timeouts a new user of `key` may wait behind the ones already there."""
        return self.users[key] // self.size


class _Dispatcher:
    """Starts one task per due webhook, capped per destination, per owner and overall; tracks what is in flight."""

    def __init__(self, services: Services, client: httpx.AsyncClient) -> None:
        s = services.settings
        self.services = services
        self.client = client
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.overall = asyncio.Semaphore(s.webhook_max_in_flight)
        self.per_dest = _Limits(s.webhook_per_destination)
        self.per_owner = _Limits(s.webhook_per_owner)

    def lease(self, job: JobRecord) -> bool:
        """Push the job's next attempt past the end of this delivery (its wait behind the destination's and the
        owner's queues included), so the due query does not keep returning it while it waits or runs; written
        before the task starts, so it can never overwrite the delivery's own result. If the process dies
        meanwhile, the webhook is retried once the lease ends. The write is a claim: conditional on the state read,
        so with several instances on one store exactly one of them delivers; False when another one won."""
        waits = (self.per_dest.rounds_ahead(destination(job.webhook_url or ""))
                 + self.per_owner.rounds_ahead(job.owner or ""))
        lease = time.time() + self.services.settings.webhook_timeout_s * (waits + 1) + 5.0
        return self.services.store.claim_webhook(job, lease)

    def start(self, job: JobRecord, render: Renderer) -> None:
        dest, owner = destination(job.webhook_url or ""), job.owner or ""
        sems = (self.per_dest.enter(dest), self.per_owner.enter(owner))
        task = asyncio.create_task(self._run(job, render, sems))
        self.tasks[job.id] = task
        task.add_done_callback(lambda _t, jid=job.id, d=dest, o=owner: self._done(jid, d, o))

    async def _run(self, job: JobRecord, render: Renderer,
                   sems: tuple[asyncio.Semaphore, asyncio.Semaphore]) -> None:
        dest_sem, owner_sem = sems
        try:
            # the destination's slot, then the owner's, then a global one: a tarpit's queue holds no owner or
            # global slot, and one owner's queue holds no global slot
            async with dest_sem, owner_sem, self.overall:
                await deliver_once(self.services, job, render, self.client)
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the others
            log.exception("webhook delivery for job %s failed", job.id)

    def _done(self, job_id: str, dest: str, owner: str) -> None:
        self.tasks.pop(job_id, None)
        self.per_dest.leave(dest)
        self.per_owner.leave(owner)

    async def close(self) -> None:
        for t in list(self.tasks.values()):
            t.cancel()
        for t in list(self.tasks.values()):
            with contextlib.suppress(BaseException):
                await t


async def webhook_loop(
    services: Services, renderers: dict[str, Renderer], stop: asyncio.Event, interval: float = 0.5
) -> None:
    async with pinned_client(services) as client:
        dispatcher = _Dispatcher(services, client)
        try:
            while not stop.is_set():
                try:
                    # past the ones still in flight (a lease can run out while its delivery waits for a slot),
                    # so those can never fill the window and hide other owners' due webhooks
                    due = await services.offload.store(services.store.due_webhooks, time.time(),
                                                       20 + len(dispatcher.tasks))
                    for job in due:
                        if job.id in dispatcher.tasks:
                            continue
                        render = renderers.get(job.dialect)
                        if render is None:
                            await services.offload.store(services.store.webhook_attempted, job.id, delivered=False,
                                                         attempts=job.webhook_attempts, next_at=None)
                            continue
                        if await services.offload.store(dispatcher.lease, job):
                            dispatcher.start(job, render)
                except Exception:  # noqa: BLE001 - the loop must survive any one bad delivery
                    log.exception("webhook loop error")
                try:
                    await asyncio.wait_for(stop.wait(), timeout=interval)
                except TimeoutError:
                    pass
        finally:
            await dispatcher.close()
