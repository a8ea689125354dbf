"""Webhook delivery: POST each finished job's dialect-rendered payload, retried with exponential backoff.

Delivery state lives in the job store, so pending webhooks survive a restart. Target hosts follow the same
private-address rule as input URLs (allow-list with `VACE_ALLOWED_HOSTS`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from server import inputs as safety
from server.core import Core
from server.store import JobRecord
from vace_local.errors import InputError

log = logging.getLogger("vace.server.webhooks")


def backoff(attempt: int) -> float:
    return min(2.0 ** (attempt - 1), 300.0)


async def deliver_once(core: Core, job: JobRecord, render: Callable[[JobRecord, Core], dict[str, Any]],
                       client: httpx.AsyncClient) -> None:
    attempts = job.webhook_attempts + 1
    url = job.webhook_url or ""
    ok = False
    reason = ""
    try:
        parts = urlsplit(url)
        await asyncio.to_thread(safety.check_host, parts.hostname or "", parts.port or 443, "webhook",
                                core.settings.allowed_hosts)
        r = await client.post(url, json=render(job, core), headers={"User-Agent": "vace-local-webhook"})
        ok = 200 <= r.status_code < 300
        reason = f"HTTP {r.status_code}"
    except InputError as e:
        reason = e.message
        attempts = core.settings.webhook_max_attempts  # a refused host will not become acceptable
    except httpx.HTTPError as e:
        reason = f"{type(e).__name__}: {e}"
    if ok:
        core.store.webhook_attempted(job.id, delivered=True, attempts=attempts, next_at=None)
        core.store.add_log(job.id, f"webhook delivered ({reason})")
        return
    next_at = time.time() + backoff(attempts) if attempts < core.settings.webhook_max_attempts else None
    core.store.webhook_attempted(job.id, delivered=False, attempts=attempts, next_at=next_at)
    tail = f"retrying in {backoff(attempts):g} s" if next_at else "giving up"
    core.store.add_log(job.id, f"webhook attempt {attempts} failed ({reason}); {tail}", level="warning")


async def webhook_loop(core: Core, renderers: dict[str, Callable[[JobRecord, Core], dict[str, Any]]],
                       stop: asyncio.Event, interval: float = 0.5) -> None:
    async with httpx.AsyncClient(timeout=core.settings.webhook_timeout_s, trust_env=False,
                                 follow_redirects=False) as client:
        while not stop.is_set():
            try:
                due = await asyncio.to_thread(core.store.due_webhooks, time.time())
                for job in due:
                    render = renderers.get(job.dialect)
                    if render is None:
                        core.store.webhook_attempted(job.id, delivered=False, attempts=job.webhook_attempts,
                                                     next_at=None)
                        continue
                    await deliver_once(core, job, render, client)
            except Exception:  # noqa: BLE001 - the loop must survive any one bad delivery
                log.exception("webhook loop error")
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                pass
