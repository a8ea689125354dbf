"""Hostile clients against a live API process (`python -m server --workers 0`, loopback only).

Each test plays one attack from issue 9 and asserts the server stays responsive: a 50 MB prompt, a 150 MB
data-URI submit, submits whose video URL drips one byte a second, idle sockets by the hundred and a slowloris
client. The server runs with a low open-file limit (512) and small guard settings so every attack is bounded
in size and time; figures are printed (`-s`) for the record.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from imageio_ffmpeg import get_ffmpeg_exe

from tests.test_server_live import ROOT, _free_port

KEY = "hostile-key"
AUTH = {"Authorization": f"Key {KEY}"}
FD_LIMIT = 512
MAX_CONNECTIONS = 100
HEADER_TIMEOUT_S = 2.0


class ApiProcess:
    """The API process alone (no workers: nothing here needs a model), with a capped descriptor table."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VACE_API_KEYS": KEY, "VACE_ALLOWED_HOSTS": "127.0.0.1",
               "VACE_MAX_CONNECTIONS": str(MAX_CONNECTIONS), "VACE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
               **(extra_env or {})}
        self.log = data_dir.with_suffix(".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", "tiny", "--port", str(self.port), "--data-dir",
             str(data_dir), "--workers", "0", "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT)),
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"API not up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def db_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data_dir.glob("jobs.db*"))

    def peak_rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    def extra_of(self, job_id: str) -> dict:
        with sqlite3.connect(self.data_dir / "jobs.db", timeout=10) as c:
            return json.loads(c.execute("SELECT extra FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[ApiProcess]:
    p = ApiProcess(tmp_path_factory.mktemp("hostile") / "data")
    yield p
    p.stop()


class HealthProbe:
    """Times `GET /health` on fresh connections in a background thread while an attack runs."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                httpx.get(f"{self.base}/health", timeout=30)
            except httpx.HTTPError:
                pass
            self.latencies.append(time.perf_counter() - t)
            time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(35)

    def summary(self) -> str:
        lat = sorted(self.latencies)
        return (f"/health n={len(lat)} median {1000 * statistics.median(lat):.0f} ms, "
                f"p90 {1000 * lat[int(0.9 * len(lat))]:.0f} ms, max {1000 * lat[-1]:.0f} ms")


def _tiny_mp4(tmp: Path) -> bytes:
    out = tmp / "tiny.mp4"
    subprocess.run([get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=16:duration=1",
                    "-pix_fmt", "yuv420p", str(out)], check=True, timeout=60)
    return out.read_bytes()


FAL_DEPTH = "/fal-ai/wan-vace-14b/depth"
AIML = "/v2/video/generations"
AIML_MODEL = "alibaba/wan2.2-vace-fun-a14b-depth"


def test_huge_prompt_is_refused_naming_the_field_and_not_stored(api, tmp_path):
    """Finding 6: a 50 MB prompt is a quick 4xx naming `prompt` and the JSON text limit; the DB does not grow; raw
    bodies are not kept."""
    uri = "data:video/mp4;base64," + base64.b64encode(_tiny_mp4(tmp_path)).decode()
    prompt = "a" * 50_000_000
    cases = [(FAL_DEPTH, {"prompt": prompt, "video_url": uri, "resolution": "480p", "aspect_ratio": "16:9"}),
             (AIML, {"model": AIML_MODEL, "prompt": "x", "negative_prompt": prompt, "video_url": uri,
                     "resolution": "480p", "aspect_ratio": "16:9"})]
    before = api.db_bytes()
    for path, body in cases:
        t = time.perf_counter()
        r = httpx.post(api.base + path, json=body, headers=AUTH, timeout=120)
        took = time.perf_counter() - t
        print(f"{path}: 50 MB prompt → {r.status_code} in {took:.2f} s")
        assert 400 <= r.status_code < 500, r.text[:300]
        field = "negative_prompt" if path == AIML else "prompt"
        assert field in r.text and "VACE_MAX_JSON_TEXT_BYTES" in r.text, r.text[:300]  # refused while streaming
        assert took < 15
    grown = api.db_bytes() - before
    print(f"database grew by {grown} bytes")
    assert grown < 1_000_000
    # A normal submit keeps the normalised spec only: an unknown field's value never reaches the store.
    r = httpx.post(api.base + FAL_DEPTH, headers=AUTH, timeout=60,
                   json={"prompt": "ok", "video_url": uri, "resolution": "480p", "aspect_ratio": "16:9",
                         "junk_field": "secret-value"})
    assert r.status_code == 200, r.text
    assert "secret-value" not in json.dumps(api.extra_of(r.json()["request_id"]))


def test_health_stays_fast_during_a_150mb_data_uri_submit(api, tmp_path):
    """Finding 10: the data URI is decoded off the event loop (streamed to disk); peak RSS stays bounded."""
    video = _tiny_mp4(tmp_path)
    raw = video + b"\0" * (112_000_000 - len(video))  # base64: ~150 MB
    body = json.dumps({"prompt": "x", "video_url": "data:video/mp4;base64," + base64.b64encode(raw).decode(),
                       "resolution": "480p", "aspect_ratio": "16:9"}).encode()
    del raw
    rss0 = api.peak_rss_kb()
    with HealthProbe(api.base) as probe:
        time.sleep(0.3)
        r = httpx.post(api.base + FAL_DEPTH, content=body, timeout=180,
                       headers={**AUTH, "Content-Type": "application/json"})
    grown_mb = (api.peak_rss_kb() - rss0) / 1000
    print(f"150 MB submit → {r.status_code}; {probe.summary()}; peak RSS +{grown_mb:.0f} MB "
          f"({grown_mb * 1e6 / len(body):.1f}x the body)")
    assert r.status_code == 200, r.text[:300]
    assert max(probe.latencies) < 2.0, probe.summary()
    assert grown_mb * 1e6 < 4.0 * len(body)


class _Drip(http.server.BaseHTTPRequestHandler):
    """A video URL that answers 200 and then sends one byte a second until the test ends."""

    stop = threading.Event()

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        while not self.stop.wait(1.0):
            try:
                self.wfile.write(b"\0")
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, *args: object) -> None:
        pass


def test_health_and_ready_answer_while_slow_url_submits_pend(api):
    """Finding 8: submit-time downloads run on their own bounded pool, so /ready and /health never wait."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/slow.mp4"
    submits = [threading.Thread(target=lambda: httpx.post(api.base + FAL_DEPTH, headers=AUTH, timeout=90,
                                                          json={"prompt": "x", "video_url": url}), daemon=True)
               for _ in range(8)]
    try:
        for t in submits:
            t.start()
        time.sleep(1.0)  # every submit is now fetching from the drip server
        ready: list[float] = []
        with HealthProbe(api.base) as probe:
            for _ in range(5):
                t = time.perf_counter()
                code = httpx.get(api.base + "/ready", timeout=60, headers={"Authorization": f"Key {KEY}"}).status_code
                ready.append(time.perf_counter() - t)
                assert code == 200
                time.sleep(0.3)
        print(f"8 slow-URL submits pending: /ready max {1000 * max(ready):.0f} ms; {probe.summary()}")
        assert max(ready) < 1.0 and max(probe.latencies) < 1.0
    finally:
        _Drip.stop.set()
        srv.shutdown()
        srv.server_close()
        for t in submits:
            t.join(60)


def _drip_head(sock: socket.socket, head: bytes, seconds: float) -> bytes:
    """Send `head` one byte every 0.25 s for up to `seconds`; returns what the server answered (b"" = closed)."""
    sock.settimeout(0.25)
    deadline = time.time() + seconds
    for b in head:
        if time.time() > deadline:
            break
        try:
            sock.sendall(bytes([b]))
            return sock.recv(4096)  # anything (or b"": closed) means the server acted
        except TimeoutError:
            continue
        except OSError:
            return b""
    return b"<still open>"


def test_slowloris_client_is_cut_off(api):
    """Finding 9: a request head dripped a byte at a time is answered 408 and closed after the head deadline."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Padding: " + b"a" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", api.port)) as s:
        t = time.perf_counter()
        got = _drip_head(s, head, seconds=HEADER_TIMEOUT_S + 8)
        took = time.perf_counter() - t
    print(f"slowloris: server answered {got[:40]!r} after {took:.1f} s")
    assert got.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT_S + 3


def test_idle_connections_cannot_exhaust_descriptors(api):
    """Finding 9: 600 idle sockets against a 512-descriptor server: the excess is refused with 503 at once, the
    rest are closed at the head deadline, and /health answers throughout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2048), hard))
    socks: list[socket.socket] = []
    try:
        for _ in range(600):
            try:
                socks.append(socket.create_connection(("127.0.0.1", api.port), timeout=2))
            except OSError:
                break
        t0 = time.perf_counter()
        answered: tuple[int, float] | None = None
        while time.perf_counter() - t0 < HEADER_TIMEOUT_S + 6:
            try:
                r = httpx.get(api.base + "/health", timeout=2)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                answered = (r.status_code, time.perf_counter() - t0)
                break
            time.sleep(0.2)
        refused = 0
        for s in socks[-50:]:
            s.settimeout(1)
            try:
                refused += s.recv(64).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
        when = f"{answered[1]:.1f} s" if answered else "never"
        print(f"{len(socks)} idle sockets: /health 200 after {when}; {refused}/50 of the last sockets got 503")
        assert answered is not None, "/health never answered 200 while idle sockets were open"
        assert refused >= 40
    finally:
        for s in socks:
            s.close()
        shutil.rmtree(api.data_dir / "cache", ignore_errors=True)


def test_streamed_data_uri_decode_matches_whole_decode(tmp_path):
    """`write_data_uri` decodes in 4 MiB steps: same bytes across step boundaries, same errors as decode_data_uri."""
    from server import media_refs
    from vace_local.core.errors import InputError

    payload = os.urandom(7_000_001)  # ~9.3 MB of base64: three steps, padded tail
    uri = "data:video/mp4;base64," + base64.b64encode(payload).decode()
    dest = tmp_path / "out"
    assert media_refs.write_data_uri(uri, "video_url", 10_000_000, dest) == len(payload)
    assert dest.read_bytes() == payload == media_refs.decode_data_uri(uri, "video_url", 10_000_000)
    bad_late = uri[:-100] + "@" + uri[-99:]  # an invalid character in the last step
    for bad, rule in [(bad_late, "not valid base64"), (uri, "larger than the 1000000 byte limit"),
                      ("data:video/mp4;base64,", "empty"), ("data:video/mp4;base64,QUJD=", "not valid base64")]:
        with pytest.raises(InputError, match=rule) as e:
            media_refs.write_data_uri(bad, "video_url", 1_000_000 if bad is uri else 10_000_000, dest)
        assert e.value.field == "video_url"
