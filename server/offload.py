"""The one seam where blocking work leaves the event loop.

Handlers and background loops run on the event loop; the job store and slow work (downloads, probes, data-URI
decodes, cleanup) block. Every such call goes through an `Offload`: `store` for quick store statements (the
default executor), `slow` for work that can pile up under hostile input (its own bounded pool,
`Settings.slow_work_threads`, so `/ready` and the quick store calls never queue behind it). The store itself
refuses a call made on an event-loop thread (`server.store.StoreOnEventLoop`), so a handler that skips this seam
fails its tests instead of stalling every other request.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Offload:
    """Runs blocking calls off the event loop (`app.state.services.offload`); `close` with the app."""

    def __init__(self, slow_threads: int) -> None:
        self.slow_pool = ThreadPoolExecutor(max_workers=slow_threads, thread_name_prefix="vace-slow")

    async def store(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """A quick blocking call (a few store statements) on the default executor."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def slow(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Slow blocking work on the bounded slow pool."""
        return await asyncio.get_running_loop().run_in_executor(self.slow_pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.slow_pool.shutdown(wait=False, cancel_futures=True)
