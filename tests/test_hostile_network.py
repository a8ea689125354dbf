"""Hostile network peers on loopback: slow-drip and silent servers, tarpit webhooks, lying resolvers, TLS by name.

Every server here is a real socket on 127.0.0.x run from a thread. A "resolver" is `socket.getaddrinfo` patched
in this test process (the OS resolver, not our code) to answer a made-up name with chosen addresses; with
`127.0.0.2/32` as the only allowed network, 127.0.0.1 plays the internal address the rule must protect.
Each test is bounded to a few seconds (the live-server one to the server's start plus a tiny job).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server import media_refs
from vace_local.core.errors import InputError, JobCancelled
from vace_local.core.spec import JobInputs

Handler = Callable[[socket.socket, "RawServer"], None]


def _read_request(conn: socket.socket) -> bytes:
    """One HTTP/1.1 request (head and Content-Length body)."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class RawServer:
    """A loopback TCP server; each connection runs `handler` in its own thread. Records requests and times."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.accepted = 0
        self.requests: list[tuple[float, bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn.settimeout(5)
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def record(self, conn: socket.socket) -> bytes:
        req = _read_request(conn)
        self.requests.append((time.monotonic(), req))
        return req

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def drip(conn: socket.socket, srv: RawServer, seconds: float = 12.0) -> None:
    """Headers at once, then one byte a second (for at most `seconds`): never idle long enough to time out."""
    srv.record(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: 100000\r\n\r\n")
    end = time.monotonic() + seconds
    while time.monotonic() < end and not srv.stop.is_set():
        conn.sendall(b"\x00")
        time.sleep(1.0)


def silent(conn: socket.socket, srv: RawServer) -> None:
    """Reads the request, never answers (a tarpit)."""
    srv.record(conn)
    srv.stop.wait(15)


def answer(body: bytes) -> Handler:
    def handler(conn: socket.socket, srv: RawServer) -> None:
        srv.record(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return handler


@pytest.fixture
def servers():
    made: list[RawServer] = []

    def make(handler: Handler, **kw) -> RawServer:
        made.append(RawServer(handler, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def fake_dns(monkeypatch):
    """Names in the returned dict resolve to their successive answers (the last one repeats); others as usual."""
    real = socket.getaddrinfo
    answers: dict[str, list[list[str]]] = {}
    calls: Counter[str] = Counter()

    def getaddrinfo(host, port, *args, **kwargs):  # noqa: ANN001, ANN202 - socket.getaddrinfo's signature
        if host not in answers:
            return real(host, port, *args, **kwargs)
        seq = answers[host]
        ips = seq[min(calls[host], len(seq) - 1)]
        calls[host] += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 0))) for ip in ips]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


ALLOW_LOOPBACK = ["127.0.0.1"]


# ---- deadlines and cancel ----------------------------------------------------------------------------


@pytest.mark.parametrize("handler,scheme", [(drip, "http"), (silent, "http"), (silent, "https")],
                         ids=["drip", "silent", "tls-handshake-tarpit"])
def test_download_deadline_holds_against_slow_senders(servers, tmp_path, handler, scheme):
    """3 s deadline: a 1 byte/s drip (never idle for a read timeout), a silent peer and a peer that never
    answers the TLS handshake all end by ~3 s."""
    srv = servers(handler)
    t = time.monotonic()
    with pytest.raises(InputError, match=r"^video: URL download took longer than 3 s"):
        media_refs.download(f"{scheme}://127.0.0.1:{srv.port}/clip.mp4", tmp_path / "v", "video",
                        allowed=ALLOW_LOOPBACK, max_bytes=10**6, timeout_s=3)
    held = time.monotonic() - t
    assert held < 4.0, f"a {handler.__name__} server held the download {held:.1f} s past a 3 s deadline"


def test_slow_dns_answer_is_inside_the_deadline(monkeypatch, tmp_path):
    real = socket.getaddrinfo

    def slow_getaddrinfo(host, *args, **kwargs):  # noqa: ANN001, ANN202
        if host == "slow.test":
            time.sleep(8)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    t = time.monotonic()
    with pytest.raises(InputError, match="took longer than 2 s"):
        media_refs.download("http://slow.test/clip.mp4", tmp_path / "v", "video", allowed=[], max_bytes=10**6,
                        timeout_s=2)
    assert time.monotonic() - t < 3.0


def test_cancel_lands_during_a_drip_download(servers, tmp_path):
    srv = servers(drip)
    cancel_at = time.monotonic() + 1.5
    t = time.monotonic()
    with pytest.raises(JobCancelled):
        media_refs.download(f"http://127.0.0.1:{srv.port}/clip.mp4", tmp_path / "v", "video", allowed=ALLOW_LOOPBACK,
                        max_bytes=10**6, timeout_s=60, should_cancel=lambda: time.monotonic() >= cancel_at)
    assert time.monotonic() - t < 2.5


def test_cli_fetcher_has_a_wall_clock_deadline(servers, tmp_path, monkeypatch):
    from vace_local.core import inputs

    monkeypatch.setattr(inputs, "FETCH_DEADLINE_S", 2.0)
    srv = servers(drip)
    t = time.monotonic()
    with pytest.raises(InputError, match="took longer than 2 s"):
        inputs.fetch_inputs(JobInputs(video=f"http://127.0.0.1:{srv.port}/clip.mp4"), tmp_path)
    assert time.monotonic() - t < 3.0


# ---- SSRF: every address must pass, and the checked address is the one connected to ----------------


def _pair(servers, port: int = 0) -> tuple[RawServer, RawServer]:
    """An allowed server on 127.0.0.2 and an 'internal' one on 127.0.0.1, on the same port."""
    internal = servers(answer(b"INTERNAL"), host="127.0.0.1", port=port)
    public = servers(answer(b"public-ok"), host="127.0.0.2", port=internal.port)
    return public, internal


def test_host_with_one_disallowed_address_is_refused(servers, fake_dns, tmp_path):
    public, internal = _pair(servers)
    fake_dns["mixed.test"] = [["127.0.0.2", "127.0.0.1"]]
    with pytest.raises(InputError) as e:
        media_refs.download(f"http://mixed.test:{public.port}/a.mp4", tmp_path / "v", "video_url",
                        allowed=["127.0.0.2/32"], max_bytes=1000, timeout_s=5)
    assert e.value.field == "video_url" and "host 'mixed.test' is not allowed" in e.value.message
    assert "127.0.0" not in str(e.value), "the error must not reveal internal addresses"
    assert public.accepted == internal.accepted == 0


def test_rebinding_resolver_cannot_reach_loopback(servers, fake_dns, tmp_path):
    """The first answer (checked) is allowed, every later one is 127.0.0.1: the download uses the first."""
    public, internal = _pair(servers)
    fake_dns["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    p = media_refs.download(f"http://rebind.test:{public.port}/a.mp4", tmp_path / "v", "video",
                        allowed=["127.0.0.2/32"], max_bytes=1000, timeout_s=5)
    assert p.read_bytes() == b"public-ok"
    assert internal.accepted == 0 and len(public.requests) == 1
    assert b"host: rebind.test:" in public.requests[0][1].lower()  # the Host header keeps the name


def test_redirect_hop_is_checked_and_pinned(servers, fake_dns, tmp_path):
    public, internal = _pair(servers)
    hop = servers(lambda c, s: (s.record(c), c.sendall(
        b"HTTP/1.1 302 Found\r\nLocation: http://rebind.test:%d/b.mp4\r\nContent-Length: 0\r\n\r\n" % public.port)),
        host="127.0.0.2")
    fake_dns["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    p = media_refs.download(f"http://127.0.0.2:{hop.port}/a.mp4", tmp_path / "v", "video", allowed=["127.0.0.2/32"],
                        max_bytes=1000, timeout_s=5)
    assert p.read_bytes() == b"public-ok" and internal.accepted == 0
    fake_dns["mixed.test"] = [["127.0.0.2", "127.0.0.1"]]
    bad = servers(lambda c, s: (s.record(c), c.sendall(
        b"HTTP/1.1 302 Found\r\nLocation: http://mixed.test:%d/b.mp4\r\nContent-Length: 0\r\n\r\n" % public.port)),
        host="127.0.0.2")
    with pytest.raises(InputError, match="video: URL host 'mixed.test' is not allowed"):
        media_refs.download(f"http://127.0.0.2:{bad.port}/a.mp4", tmp_path / "w", "video", allowed=["127.0.0.2/32"],
                        max_bytes=1000, timeout_s=5)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a certificate")
def test_pinned_tls_keeps_sni_and_verifies_the_name(servers, fake_dns, tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=media.test", "-addext", "subjectAltName=DNS:media.test"],
                   check=True, capture_output=True)
    names: list[str | None] = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)
    srv = servers(answer(b"over-tls"), host="127.0.0.2", tls=ctx)
    fake_dns["media.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    p = media_refs.download(f"https://media.test:{srv.port}/a.mp4", tmp_path / "v", "video", allowed=["127.0.0.2/32"],
                        max_bytes=1000, timeout_s=10)
    assert p.read_bytes() == b"over-tls" and names == ["media.test"]
    # the certificate is checked against the name: a name it does not cover fails, naming the field
    fake_dns["other.test"] = [["127.0.0.2"]]
    with pytest.raises(InputError, match="video: URL download failed: ConnectError"):
        media_refs.download(f"https://other.test:{srv.port}/a.mp4", tmp_path / "w", "video", allowed=["127.0.0.2/32"],
                        max_bytes=1000, timeout_s=10)


# ---- webhooks --------------------------------------------------------------------------------------------


def _finished_jobs_with_webhooks(store, urls: list[str], owner: str | None = None) -> list[str]:
    from server.states import JobStatus

    ids = []
    for url in urls:
        ids.append(store.insert_job(dialect="wavespeed", model="m", spec={"prompt": "x"}, webhook_url=url,
                                    owner=owner).id)
        store.claim_next("w")
        store.finish_job(ids[-1], "w", status=JobStatus.FAILED, error="x", error_type="input_error")
    return ids


def _run_webhooks(core, until: Callable[[], bool], limit_s: float) -> float:
    """Run the real webhook loop until `until()` or `limit_s`; returns the seconds it took."""
    from server.dialects.wavespeed.render import render_webhook
    from server.webhooks import webhook_loop

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(webhook_loop(core, {"wavespeed": render_webhook}, stop, interval=0.1))
        t = time.monotonic()
        while not await asyncio.to_thread(until) and time.monotonic() - t < limit_s:  # the store: off the loop
            await asyncio.sleep(0.05)
        took = time.monotonic() - t
        stop.set()
        task.cancel()
        try:
            await asyncio.wait_for(task, 10)
        except (asyncio.CancelledError, TimeoutError):
            pass
        return took

    return asyncio.run(main())


@pytest.fixture
def core(tmp_path):
    from server.services import Services
    from server.settings import Settings
    from server.store import Store

    settings = Settings(data_dir=tmp_path / "data", workers="0", allowed_hosts=["127.0.0.2/32"],
                        webhook_timeout_s=3.0)
    settings.prepare_dirs()
    store = Store(settings.db_url)
    store.create_all()
    services = Services.build(settings, store)
    yield services
    services.close()
    store.dispose()


def test_tarpit_webhooks_delay_only_their_own(servers, core):
    """Ten webhooks to a tarpit queued first, then one to a healthy receiver: it arrives within a second or so."""
    tarpit = servers(silent, host="127.0.0.2")
    good = servers(answer(b"ok"), host="127.0.0.2")
    _finished_jobs_with_webhooks(core.store, [f"http://127.0.0.2:{tarpit.port}/hook{i}" for i in range(10)])
    [good_id] = _finished_jobs_with_webhooks(core.store, [f"http://127.0.0.2:{good.port}/hook"])
    # Until the delivery is recorded (it lands just after the request arrives; stopping the loop in between
    # leaves it pending for a retry, which is at-least-once delivery, not a failure of this test's subject).
    took = _run_webhooks(core, lambda: core.store.get_job(good_id).webhook_status == "delivered", limit_s=15)
    assert good.requests, "the healthy webhook was never delivered"
    assert took < 2.0, f"a tarpit delayed another client's webhook by {took:.1f} s"
    assert tarpit.accepted <= 2, "more than the per-destination cap of deliveries hit the tarpit at once"
    assert core.store.get_job(good_id).webhook_status == "delivered"


def test_one_tenants_tarpit_webhooks_on_many_destinations_do_not_delay_another(servers, fake_dns, core):
    """Key A's 60 webhooks go to 20 tarpit ports and 20 wildcard-DNS names (each its own destination), queued
    first; key B's one webhook to a healthy receiver still arrives at once: A's deliveries share A's own cap."""
    per_owner = core.settings.webhook_per_owner

    tarpits = [servers(silent, host="127.0.0.2") for _ in range(20)]
    for i in range(20):
        fake_dns[f"t{i}.tarpit.invalid"] = [["127.0.0.2"]]
    urls = [f"http://127.0.0.2:{t.port}/hook{i}" for t in tarpits for i in range(2)]
    urls += [f"http://t{i}.tarpit.invalid:{tarpits[0].port}/hook" for i in range(20)]
    _finished_jobs_with_webhooks(core.store, urls, owner="tenant-a")
    good = servers(answer(b"ok"), host="127.0.0.2")
    [good_id] = _finished_jobs_with_webhooks(core.store, [f"http://127.0.0.2:{good.port}/hook"], owner="tenant-b")
    took = _run_webhooks(core, lambda: core.store.get_job(good_id).webhook_status == "delivered", limit_s=10)
    in_flight = sum(t.accepted for t in tarpits)
    print(f"\ntenant B's webhook delivered after {took:.2f} s; tenant A's tarpits held {in_flight} connections")
    assert core.store.get_job(good_id).webhook_status == "delivered", "the healthy webhook was never delivered"
    # never held behind a tarpit: one delivery timeout (3 s) is what waiting for a slot would cost at least
    assert took < core.settings.webhook_timeout_s, f"another tenant's tarpits delayed this webhook by {took:.1f} s"
    assert in_flight <= per_owner, f"{in_flight} deliveries of one tenant in flight at once (cap {per_owner})"


def test_tarpit_webhook_times_out_and_is_retried(servers, core):
    tarpit = servers(silent, host="127.0.0.2")
    [jid] = _finished_jobs_with_webhooks(core.store, [f"http://127.0.0.2:{tarpit.port}/hook"])
    _run_webhooks(core, lambda: core.store.get_job(jid).webhook_attempts >= 1, limit_s=8)
    job = core.store.get_job(jid)
    assert job.webhook_attempts == 1 and job.webhook_status == "pending" and job.webhook_next_at > time.time()
    logs = [e["message"] for e in core.store.get_job(jid, with_logs=True).logs]
    assert any("webhook attempt 1 failed (no answer within 3 s); retrying in 1 s" in m for m in logs), logs


def test_webhook_connects_to_the_checked_address(servers, fake_dns, core):
    public, internal = _pair(servers)
    fake_dns["hook.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    fake_dns["mixed.test"] = [["127.0.0.2", "127.0.0.1"]]
    ok, refused = _finished_jobs_with_webhooks(
        core.store, [f"http://hook.test:{public.port}/h", f"http://mixed.test:{public.port}/h"])
    _run_webhooks(core, lambda: all(core.store.get_job(j).webhook_status != "pending" for j in (ok, refused)),
                  limit_s=8)
    assert core.store.get_job(ok).webhook_status == "delivered" and len(public.requests) == 1
    assert core.store.get_job(refused).webhook_status == "failed"
    assert internal.accepted == 0


# ---- live server: a drip URL holds neither the worker nor the cancel ---------------------------------------


def test_live_cancel_during_a_drip_fetch_and_next_job_runs(servers, tmp_path):
    from test_server_live import AUTH, LiveServer

    drip_srv = servers(lambda c, s: drip(c, s, seconds=40))
    srv = LiveServer(tmp_path / "data", Path(tmp_path / "cache"),
                     extra_env={"VACE_DOWNLOAD_TIMEOUT_S": "60"}).start()
    try:
        job = srv.submit({"prompt": "drip", "task": "none", "video": f"http://127.0.0.1:{drip_srv.port}/v.mp4"})
        deadline = time.monotonic() + 60
        while not drip_srv.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        assert drip_srv.requests, "the worker never started fetching"
        time.sleep(1.0)
        t = time.monotonic()
        httpx.post(f"{srv.base}/api/v3/predictions/{job['id']}/cancel", headers=AUTH, timeout=10)
        row = srv.wait(job["id"], lambda r: r["status"] in ("succeeded", "failed", "cancelled"), 30, "cancel")
        took = time.monotonic() - t
        assert row["status"] == "cancelled", row
        assert took < 2.0, f"cancel took {took:.1f} s during a drip fetch"
        nxt = srv.submit({"prompt": "next", "num_inference_steps": 2})
        row = srv.wait(nxt["id"], lambda r: r["status"] in ("succeeded", "failed", "cancelled"), 90, "next job")
        assert row["status"] == "succeeded", row
    finally:
        srv.stop()
