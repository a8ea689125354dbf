"""Hostile files, round 3 (issue 22): what this server serves is never active content, whichever box serves it
and from whichever storage; a capability token opens one file; HEAD answers wherever GET does; the playground
sends its own CSP; IPv6 spellings of refused IPv4 ranges are refused; a client hanging up mid-body is one INFO
line. Real processes on loopback: two API boxes on one SQLite store and one S3 bucket (moto's server).
"""

from __future__ import annotations

import ipaddress
import socket
import time

import httpx
import pytest

from server import media_refs
from tests.test_server_live import AUTH, KEY, MODEL, LiveServer
from tests.test_storage import BUCKET, S3_ENV, s3_endpoint  # noqa: F401 - the moto server fixture

HTML = (b"<!doctype html><html><body><script>document.title = localStorage.getItem('vace.playground.apiKey')"
        b"</script></body></html>")
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script></svg>'
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


def _upload(box: LiveServer, name: str, body: bytes, declared: str) -> str:
    r = httpx.post(f"{box.base}/api/v3/media/upload/binary", files={"file": (name, body, declared)}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]["download_url"]


def _assert_inert(r: httpx.Response, body: bytes) -> None:
    """The bytes came back, as a download the browser may not sniff: never a page or an image it would run."""
    assert r.status_code == 200 and r.content == body, (r.status_code, r.headers)
    assert r.headers["content-type"] == "application/octet-stream", r.headers
    assert r.headers["content-disposition"].startswith("attachment"), r.headers
    assert r.headers["x-content-type-options"] == "nosniff", r.headers


@pytest.fixture(scope="module")
def boxes(s3_endpoint, tmp_path_factory):  # noqa: F811
    """Box X (files by presigned redirect) and box Y (files streamed): separate data dirs, one store, one bucket."""
    tmp = tmp_path_factory.mktemp("boxes")
    common = {"VACE_DATABASE_URL": f"sqlite:///{tmp / 'jobs.db'}", "VACE_STORAGE": "s3", "VACE_S3_BUCKET": BUCKET,
              "VACE_S3_PREFIX": "hostile", "VACE_S3_ENDPOINT_URL": s3_endpoint, **S3_ENV}
    x = LiveServer(tmp / "box-x", tmp / "cache", workers="0",
                   extra_env={**common, "VACE_INSTANCE_ID": "box-x", "VACE_FILE_DELIVERY": "redirect"})
    y = LiveServer(tmp / "box-y", tmp / "cache", workers="0", extra_env={**common, "VACE_INSTANCE_ID": "box-y"})
    try:
        x.start(60)
        y.start(60)
        yield x, y
    finally:
        x.stop()
        y.stop()


@pytest.mark.parametrize(("name", "body", "declared"), [("x.html", HTML, "text/html"),
                                                         ("x.svg", SVG, "image/svg+xml"),
                                                         ("x.png", HTML, "image/png")])
def test_upload_is_never_served_as_a_page_by_any_box(boxes, s3_endpoint, name, body, declared):  # noqa: F811
    x, y = boxes
    url = _upload(x, name, body, declared)
    key = "/".join(url.split("/")[-4:-2] + url.split("/")[-1:])  # uploads/<id>/<name> (token dropped)
    _assert_inert(httpx.get(url, timeout=30), body)  # the box that has it
    _assert_inert(httpx.get(url.replace(x.base, y.base), timeout=30), body)  # streamed from the bucket
    head = httpx.head(url.replace(x.base, y.base), timeout=30)
    assert head.status_code == 200 and head.headers["content-type"] == "application/octet-stream", head.headers
    assert head.headers["content-length"] == str(len(body)) and head.content == b""
    # the other way round: uploaded to y, served by x as a redirect to a presigned URL that types it too
    url_y = _upload(y, name, body, declared)
    redirect = httpx.get(url_y.replace(y.base, x.base), timeout=30)
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_endpoint), redirect.headers
    presigned = httpx.get(redirect.headers["location"], timeout=30)
    assert presigned.status_code == 200 and presigned.content == body
    assert presigned.headers["content-type"] == "application/octet-stream", presigned.headers
    assert presigned.headers["content-disposition"].startswith("attachment"), presigned.headers
    # and the object itself carries the sniffed type, not the declared one (a public bucket URL is safe too)
    import boto3

    obj = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=BUCKET, Key=f"hostile/{key}")
    assert obj["ContentType"] == "application/octet-stream", obj
    assert obj["ContentDisposition"].startswith("attachment"), obj


def test_chromium_on_the_api_origin_never_runs_an_uploaded_page(boxes):
    """The attack as measured: the playground's key in `localStorage`, an uploaded page opened on the API origin
    (from the box that streams it from the bucket). It must arrive as a download, never run."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the `dev` extra)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium executable on PATH")
    x, y = boxes
    urls = [_upload(x, n, b, t).replace(x.base, y.base) for n, b, t in (("x.html", HTML, "text/html"),
                                                                          ("x.svg", SVG, "image/svg+xml"))]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.goto(f"{y.base}/playground")
            page.evaluate(f"() => localStorage.setItem('vace.playground.apiKey', {KEY!r})")
            for url in urls:
                with page.expect_download(timeout=15_000) as download:
                    with pytest.raises(sync_api.Error):  # "Download is starting": no document was loaded
                        page.goto(url)
                assert download.value.suggested_filename in ("x.html", "x.svg")
                assert KEY not in page.title() and page.url.endswith("/playground"), (page.url, page.title())
        finally:
            browser.close()


def test_a_real_image_keeps_its_type_inline_and_nosniff(boxes):
    x, y = boxes
    url = _upload(x, "pic.bin", PNG, "text/html")
    for r in (httpx.get(url, timeout=30), httpx.get(url.replace(x.base, y.base), timeout=30)):
        assert r.status_code == 200 and r.content == PNG
        assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-disposition"].startswith("inline")


def test_every_response_says_nosniff_and_refuses_framing(boxes):
    x, _ = boxes
    for path in ("/health", "/api/v3/predictions/0/result", "/playground/assets/playground.js", "/nope"):
        r = httpx.get(x.base + path, headers=AUTH, timeout=10)
        assert r.headers.get("x-content-type-options") == "nosniff", (path, r.headers)
        assert r.headers.get("x-frame-options") == "DENY", (path, r.headers)


def test_playground_sends_csp_and_head_works_where_get_does(boxes):
    x, _ = boxes
    r = httpx.get(f"{x.base}/playground", timeout=10)
    csp = r.headers.get("content-security-policy", "")
    assert r.status_code == 200 and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, r.headers
    assert "unsafe-inline" not in csp and r.headers.get("x-frame-options") == "DENY"
    # the presigned redirect's origin may serve the page's media and fetches (file_delivery = redirect)
    assert x.env["VACE_S3_ENDPOINT_URL"] in csp.split("connect-src")[1].split(";")[0]
    for path in ("/playground", "/health", "/playground/assets/playground.css", "/api/v3/predictions/0/result",
                 "/v1/videos", "/openapi.json"):
        get, head = (httpx.request(m, x.base + path, headers=AUTH, timeout=10) for m in ("GET", "HEAD"))
        assert head.status_code == get.status_code, (path, get.status_code, head.status_code)
        assert head.content == b"", path


def _wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if got := pred():
            return got
        time.sleep(0.2)
    raise AssertionError(f"timeout waiting for {what}")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One box with a worker (tiny model) and keys, logging at INFO."""
    tmp = tmp_path_factory.mktemp("live")
    srv = LiveServer(tmp / "data", tmp / "cache", log_level="info")
    srv.start()
    yield srv
    srv.stop()


def test_a_token_opens_one_file_and_head_works_on_the_content(live):
    jid = live.submit({"prompt": "one token per file", "num_inference_steps": 2})["id"]
    _wait_for(lambda: live.row(jid)["status"] == "succeeded", 120, "the job")
    outs = httpx.get(f"{live.base}/api/v3/predictions/{jid}/progress", headers=AUTH, timeout=10).json()["data"]
    video_url = outs["outputs"][0]
    assert httpx.get(video_url, timeout=10).status_code == 200  # the token opens its own file…
    base, token, name = video_url.rsplit("/", 2)
    assert name.endswith(".mp4")
    stolen = httpx.get(f"{base}/{token}/output.json", timeout=10)
    assert stolen.status_code == 404, stolen.text[:300]  # …and no other file of the job (spec, server paths)
    own = httpx.get(f"{base}/output.json", headers=AUTH, timeout=10)
    assert own.status_code == 200 and own.headers["content-type"] == "application/json"  # the key still does
    # OpenAI's content route answers HEAD like GET (the SDK and proxies probe with it)
    r = httpx.post(f"{live.base}/v1/videos", headers=AUTH, timeout=30,
                   json={"prompt": "HEAD like GET", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    jid = r.json()["id"]
    _wait_for(lambda: live.row(jid)["status"] == "succeeded", 120, "the OpenAI job")
    head = httpx.head(f"{live.base}/v1/videos/{jid}/content", headers=AUTH, timeout=10)
    get = httpx.get(f"{live.base}/v1/videos/{jid}/content", headers=AUTH, timeout=10)
    assert head.status_code == get.status_code == 200 and head.content == b"", head.status_code
    assert head.headers["content-length"] == str(len(get.content)) and get.content[4:8] == b"ftyp"
    assert get.headers["x-content-type-options"] == "nosniff" and get.headers["content-type"] == "video/mp4"


def test_client_hanging_up_mid_body_is_one_info_line(live):
    """Bodies read by the route itself (fal, AI/ML, OpenAI, upload PUT), hung up half-way after a slow start."""
    form = "multipart/form-data; boundary=b0"
    part = b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + PNG
    sends = [("/fal-ai/wan-vace-14b", "application/json"), ("/v2/video/generations", "application/json"),
             ("/v1/videos", "application/json"), (f"/api/v3/{MODEL}", "application/json"), ("/v1/videos", form),
             ("/api/v3/media/upload/binary", form)]
    before = len(live.log.read_bytes())
    for i, (path, ctype) in enumerate(sends * 2):
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n")
            s.sendall(head.encode() + (part if ctype == form else b'{"prompt": "' + b"x" * 2000))
            time.sleep(0.3 if i % 2 else 0.1)
            s.sendall(b"x" * 1000)
    time.sleep(1.0)
    assert httpx.get(f"{live.base}/health", timeout=5).status_code == 200
    log = live.log.read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log and "unhandled error" not in log, log[-3000:]
    lines = [x for x in log.splitlines() if "disconnected" in x]
    assert len(lines) >= 3 and all("INFO" in x for x in lines), log[-3000:]


REFUSED_IPV6 = [
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254 (cloud metadata)
    "fec0::1",  # site-local
    "64:ff9b::7f00:1",  # NAT64 (well-known prefix) of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::a00:1",  # NAT64 local-use prefix
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "::ffff:0:7f00:1",  # SIIT IPv4-translated
    "fc00::1", "fe80::1", "ff02::1", "::", "::1", "100::1", "2001:db8::1",
]


@pytest.mark.parametrize("addr", REFUSED_IPV6)
def test_ipv6_forms_of_refused_addresses_are_refused(addr):
    """Checked as literals and as what DNS returns; nothing connects (the checks run before any socket)."""
    assert media_refs.literal_host_problem(f"[{addr}]", []) is not None
    assert not media_refs._is_public(addr)
    assert media_refs.literal_host_problem(f"[{addr}]", [str(ipaddress.ip_address(addr))]) is None  # allow-list


def test_ipv6_forms_of_public_addresses_pass():
    for addr in ("2002:808:808::1", "64:ff9b::808:808", "::ffff:8.8.8.8", "2606:4700::1111"):
        assert media_refs._is_public(addr), addr


@pytest.mark.parametrize("addr", ["2002:7f00:1::", "fec0::1", "64:ff9b::7f00:1"])
def test_submit_refuses_a_url_at_an_ipv6_form_of_loopback(live, addr):
    r = httpx.post(f"{live.base}/api/v3/{MODEL}", headers=AUTH, timeout=30,
                   json={"prompt": "p", "video": f"http://[{addr}]:{live.port}/files/x.mp4"})
    assert r.status_code == 400 and "video" in r.text and "refused" in r.text, r.text


def test_resolved_ipv6_forms_are_refused_before_connecting(monkeypatch):
    """A name resolving to a 6to4 / NAT64 / site-local form of a refused address: refused by the resolver check."""
    for addr in ("2002:7f00:1::", "64:ff9b::7f00:1", "fec0::1"):
        answer = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, 80, 0, 0))]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *a, _answer=answer, **k: _answer)
        with pytest.raises(Exception, match="not allowed"):
            media_refs.resolve_checked("rebind.invalid", 80, "video", [])


def test_served_type_ignores_names_and_declared_types():
    assert media_refs.served_type(HTML, "uploads/a/x.html")[0] == "application/octet-stream"
    assert media_refs.served_type(b'{"spec": 1}', "uploads/a/x.json")[0] == "application/octet-stream"
    assert media_refs.served_type(b'{"spec": 1}', "outputs/a/output.json")[0] == "application/json"
    assert media_refs.served_type(HTML, "outputs/a/output.json")[0] == "application/octet-stream"
    assert media_refs.served_type(PNG, "uploads/a/x.html") == ("image/png", 'inline; filename="x.html"')
