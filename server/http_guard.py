"""HTTP connection guards uvicorn lacks: a deadline for the request head (slowloris) and a hard connection cap.

uvicorn bounds the size of a request head (h11's incomplete-event limit) and idle keep-alive time, but not
how long a client may take to send its headers, and it accepts every connection it is offered, so idle or
dripping sockets can hold every file descriptor. This h11 protocol adds both:

* a new connection, and each keep-alive connection after a response, must deliver a complete request head
  within `header_timeout_s`, else it is answered 408 (if it sent anything) and closed;
* a connection beyond `max_connections` is answered 503 at once and closed, freeing its descriptor, so the
  server keeps answering (uvicorn's `limit_concurrency`, set to the same number, 503s excess requests).

Request bodies are not timed here (a large upload on a slow link is legitimate); `max_connections` bounds
how many slow bodies can be in flight, and a reverse proxy (README, "Exposed deployments") times them.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _plain_response(status: str, text: str) -> bytes:
    """A complete `connection: close` response, written straight to the transport (no ASGI app involved)."""
    body = text.encode() + b"\n"
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


_REFUSED = _plain_response("503 Service Unavailable", "too many connections; retry in a moment")
_HEAD_TIMEOUT = _plain_response("408 Request Timeout", "request headers not received in time")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a request-head deadline and a connection cap (see the module docstring)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        if len(self.connections) > self.max_connections:
            self.logger.warning("connection cap (%d) reached: refusing a connection", self.max_connections)
            transport.write(_REFUSED)
            transport.close()
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # the head arrived (a request is being read or answered)
        if self._head_bytes:
            self.transport.write(_HEAD_TIMEOUT)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request on this keep-alive connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A protocol class bound to these limits (uvicorn instantiates the class it is given per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (connections are descriptors); returns the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target
