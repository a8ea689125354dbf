"""HTTP downloads that a hostile server can neither stall past their deadline nor steer to an unchecked address.

httpx alone gives per-operation timeouts, so a server that drips one byte a second never trips them, and it
resolves the host itself, after (and independently of) any check we made. This module plugs an httpcore
network backend into httpx that fixes both:

* **Deadline and cancel between socket operations.** Every connect, TLS handshake step, read and write waits
  in slices of at most `SLICE_S`; between slices the one wall-clock deadline of the download and the caller's
  cancel check are consulted. A drip, a silent peer or a stuck handshake ends at the deadline, and a cancel
  lands within a fraction of a second.
* **Connect to the address that was checked.** The host is resolved once per connection by the caller's
  `resolve` policy (which may refuse it); the socket connects to one of the addresses it returned, while the
  Host header, TLS SNI and certificate verification keep using the host name, so there is no second lookup
  for a rebinding resolver to answer differently. Redirect hops open new connections and pass the same policy.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from vace_local.core.errors import InputError, JobCancelled

#: Longest single wait on a socket before the deadline and the cancel check are looked at again.
SLICE_S = 0.2

CancelFn = Callable[[], bool]
#: (host, port) → the addresses a connection may use; raises (e.g. InputError) to refuse the host.
Resolver = Callable[[str, int], list[str]]


class DeadlineExceeded(Exception):
    """The download's wall-clock deadline passed (raised from inside the transport, mapped by `fetch_url`)."""


def resolve_any(host: str, port: int) -> list[str]:
    """Every address of `host`, unfiltered (for URLs the user supplied to the CLI themselves)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise httpcore.ConnectError(f"cannot resolve host '{host}' ({e.strerror})") from None
    return list(dict.fromkeys(str(i[4][0]) for i in infos))


class Guard:
    """One download's deadline (monotonic seconds) and cancel check, consulted between socket waits."""

    def __init__(self, timeout_s: float, should_cancel: CancelFn | None = None) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.should_cancel = should_cancel

    def check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled("cancelled while downloading an input")
        if time.monotonic() >= self.deadline:
            raise DeadlineExceeded()

    def slice(self, until: float) -> float:
        """How long the next wait may block: a slice, cut short by the operation's own end or the deadline."""
        now = time.monotonic()
        return max(0.001, min(SLICE_S, until - now, self.deadline - now))


def _end(timeout: float | None) -> float:
    return math.inf if timeout is None else time.monotonic() + timeout


class GuardedStream(httpcore.NetworkStream):
    """A blocking socket whose every wait is sliced so the guard is checked at least every `SLICE_S`."""

    def __init__(self, sock: socket.socket, guard: Guard) -> None:
        self._sock = sock
        self._guard = guard

    def _sliced(self, sock: socket.socket, op: Callable[[], Any], timeout: float | None,
                timeout_exc: type[Exception], error_exc: type[Exception]) -> Any:
        end = _end(timeout)
        while True:
            self._guard.check()
            sock.settimeout(self._guard.slice(end))
            try:
                return op()
            except (TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                if time.monotonic() >= end:
                    raise timeout_exc(f"no progress for {timeout:g} s") from None
            except OSError as e:
                raise error_exc(str(e)) from e

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._sliced(self._sock, lambda: self._sock.recv(max_bytes), timeout, httpcore.ReadTimeout,
                            httpcore.ReadError)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            sent = self._sliced(self._sock, lambda v=view: self._sock.send(v), timeout, httpcore.WriteTimeout,
                                httpcore.WriteError)
            view = view[sent:]

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        # server_hostname is the URL's host name (httpcore passes the origin's host), never the pinned address,
        # so SNI and certificate verification are against the name the client asked for.
        tls = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname, do_handshake_on_connect=False)
        try:
            self._sliced(tls, tls.do_handshake, timeout, httpcore.ConnectTimeout, httpcore.ConnectError)
        except BaseException:
            tls.close()
            raise
        return GuardedStream(tls, self._guard)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":  # httpcore reads the negotiated ALPN protocol from it
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":  # an idle pooled connection that turned readable was closed by the peer
            if self._sock.fileno() < 0:
                return True
            readable, _, _ = select.select([self._sock], [], [], 0)
            return bool(readable)
        return None


class GuardedBackend(httpcore.NetworkBackend):
    """Resolves through `resolve` once per connection and connects only to an address it returned."""

    def __init__(self, guard: Guard, resolve: Resolver = resolve_any) -> None:
        self._guard = guard
        self._resolve = resolve

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        last: Exception | None = None
        for addr in self._resolve_in_time(host, port):
            try:
                return GuardedStream(self._connect(addr, port, timeout, local_address, socket_options), self._guard)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
        raise last or httpcore.ConnectError(f"host '{host}' has no address")

    def _resolve_in_time(self, host: str, port: int) -> list[str]:
        """`resolve` in a helper thread, waited for in slices: a slow DNS answer is bounded by the deadline and
        the cancel check too (an abandoned lookup finishes on its own in the daemon thread)."""
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, self._resolve(host, port)))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                box.append((False, e))

        thread = threading.Thread(target=run, daemon=True, name="resolve")
        thread.start()
        while thread.is_alive():
            self._guard.check()
            thread.join(self._guard.slice(math.inf))
        self._guard.check()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _connect(self, addr: str, port: int, timeout: float | None, local_address: str | None,
                 socket_options: Iterable[Any] | None) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            if local_address:
                sock.bind((local_address, 0))
            sock.setblocking(False)
            err = sock.connect_ex((addr, port))
            end = _end(timeout)
            while err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
                self._guard.check()
                _, writable, _ = select.select([], [sock], [], self._guard.slice(end))
                if writable:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                elif time.monotonic() >= end:
                    raise httpcore.ConnectTimeout(f"connect timed out after {timeout:g} s")
            if err:
                raise httpcore.ConnectError(os.strerror(err))
            sock.setblocking(True)
            return sock
        except BaseException:
            sock.close()
            raise

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with its connection pool built on a `GuardedBackend` (HTTP/1.1, no retries).

    SSL_CERT_FILE / SSL_CERT_DIR name extra trusted CAs, as for httpx itself."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        super().__init__()
        # httpx has no public hook for the network backend; the pool is the documented httpcore object it wraps.
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), network_backend=backend,
                                             http1=True, http2=False)


def fetch_url(url: str, dest: Path, field: str, *, max_bytes: int, timeout_s: float, read_timeout_s: float = 30.0,
              resolve: Resolver = resolve_any, should_cancel: CancelFn | None = None,
              max_redirects: int = 5) -> Path:
    """Stream `url` to `dest`: at most `max_bytes`, within `timeout_s` of wall-clock time in all (connect, TLS,
    headers, body, every redirect hop), no single wait longer than `read_timeout_s`, following up to
    `max_redirects` redirects by hand (each hop's host goes through `resolve` on connect). Errors are
    InputError naming `field`; a cancel (`should_cancel` true) raises JobCancelled within about `SLICE_S`."""
    guard = Guard(timeout_s, should_cancel)
    per_wait = min(read_timeout_s, timeout_s)
    current = url
    try:
        with httpx.Client(transport=GuardedTransport(GuardedBackend(guard, resolve)), follow_redirects=False,
                          timeout=httpx.Timeout(per_wait), trust_env=False) as client:
            for _ in range(max_redirects + 1):
                parts = urlsplit(current)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise InputError(field, f"URL must be http(s), got '{current[:100]}'")
                with client.stream("GET", current, headers={"User-Agent": "vace-local"}) as r:
                    if r.is_redirect:
                        loc = r.headers.get("location")
                        if not loc:
                            raise InputError(field, f"URL redirect without a location (HTTP {r.status_code})")
                        current = urljoin(current, loc)
                        continue
                    _save_body(r, dest, field, max_bytes, guard)
                    return dest
    except DeadlineExceeded:
        raise InputError(field, f"URL download took longer than {timeout_s:g} s") from None
    except httpx.TimeoutException:
        raise InputError(field, f"URL download stalled (no data for {per_wait:g} s)") from None
    except httpx.HTTPError as e:
        raise InputError(field, f"URL download failed: {type(e).__name__}: {e}") from None
    except httpx.InvalidURL as e:  # e.g. a redirect to a host spelling httpx rejects
        raise InputError(field, f"URL is not valid ({e})") from None
    raise InputError(field, f"URL redirected more than {max_redirects} times")


def _save_body(r: httpx.Response, dest: Path, field: str, max_bytes: int, guard: Guard) -> None:
    if r.status_code != 200:
        raise InputError(field, f"URL download failed with HTTP {r.status_code}")
    declared = r.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(field, f"URL content is {declared} bytes, over the {max_bytes} byte limit")
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        for chunk in r.iter_bytes():  # no chunk size: each socket read arrives here as it comes
            size += len(chunk)
            if size > max_bytes:
                raise InputError(field, f"URL content exceeds the {max_bytes} byte limit")
            guard.check()
            f.write(chunk)


class PinnedAsyncBackend(httpcore.AsyncNetworkBackend):
    """The asyncio counterpart for connecting to checked addresses only (webhooks); deadlines there come from
    `asyncio.timeout` around the whole request, which cancels any wait cleanly."""

    def __init__(self, resolve: Resolver = resolve_any) -> None:
        self._resolve = resolve
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        import asyncio

        last: Exception | None = None
        for addr in await asyncio.to_thread(self._resolve, host, port):
            try:  # a literal address: anyio connects without a second lookup; TLS still gets the host name
                return await self._inner.connect_tcp(addr, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
        raise last or httpcore.ConnectError(f"host '{host}' has no address")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedAsyncTransport(httpx.AsyncHTTPTransport):
    """httpx's async transport with its pool on a `PinnedAsyncBackend` (HTTP/1.1, no retries)."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        super().__init__()
        self._pool = httpcore.AsyncConnectionPool(ssl_context=httpx.create_ssl_context(), network_backend=backend,
                                                  http1=True, http2=False)
