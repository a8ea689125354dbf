"""Hostile requests against a live `python -m server --model tiny` on loopback (issue 9, findings 11 and 12).

Every error is a 4xx in the dialect's own envelope naming the field the client sent; control characters in ids
never reach a header; unknown paths are 404; with two keys configured, neither sees the other's jobs or files;
every route but /health needs a key; the API process survives every case.
"""

from __future__ import annotations

import http.server
import os
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import numpy as np
import pytest

from tests.test_server_live import AUTH, KEY, MODEL, LiveServer

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vace"
OTHER_KEY = "other-tenant-key"
AUTH_B = {"Authorization": f"Key {OTHER_KEY}"}
UPLOAD_LIMIT = 60_000  # bytes; test2.mp4 (79,640 bytes) is over it and far under the download limit
FAL = "/fal-ai/wan-vace-14b"
AIML = "/v2/video/generations"
WS = f"/api/v3/{MODEL}"
AIML_MODEL = "alibaba/wan2.2-vace-fun-a14b-pose"


class _Media(http.server.BaseHTTPRequestHandler):
    """Serves fixture files by name, and text where media is expected."""

    def do_GET(self):  # noqa: N802
        path = FIXTURES / self.path.strip("/")
        body = path.read_bytes() if path.is_file() else b"plain text, not an image"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def media_http():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures absent")
    cache = Path(os.environ.get("VACE_CACHE_DIR") or tmp_path_factory.mktemp("vace-cache"))
    srv = LiveServer(tmp_path_factory.mktemp("hostile"), cache, extra_env={
        "VACE_API_KEYS": f"{KEY},{OTHER_KEY}", "VACE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "VACE_TINY_MAX_STEPS": "2"}).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def api_stays_alive(server):
    yield
    assert server.proc is not None and server.proc.poll() is None, "the API process died"
    assert httpx.get(f"{server.base}/health", timeout=5).json()["status"] == "ok"


@pytest.fixture(scope="module")
def small_video_uri(tmp_path_factory) -> str:
    import base64

    from vace_local.core.media import write_video

    x = np.linspace(0, 255, 64, dtype=np.float32)
    frames = np.stack([np.broadcast_to(((x + 8 * i) % 256).astype(np.uint8)[None, :, None], (48, 64, 3))
                       for i in range(17)])
    path = write_video(frames, tmp_path_factory.mktemp("vid") / "in.mp4", fps=16)
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _cancel_all(server: LiveServer, *job_ids: str) -> None:
    """Jobs a test only needed accepted are cancelled, so the one worker stays free."""
    for jid in job_ids:
        httpx.post(f"{server.base}/api/v3/predictions/{jid}/cancel", headers=AUTH, timeout=10)


def _without_token(url: str) -> str:
    """`…/files/<kind>/<id>/<token>/<name>` → `…/files/<kind>/<id>/<name>` (the URL that needs a key)."""
    head, token, name = url.rsplit("/", 2)
    assert len(token) == 40, url
    return f"{head}/{name}"


def _ws_error(r: httpx.Response, status: int) -> str:
    body = r.json()
    assert r.status_code == status and body["code"] == status and body["data"] is None, r.text
    return body["message"]


def _aiml_error(r: httpx.Response, status: int) -> str:
    body = r.json()
    assert r.status_code == status and body["statusCode"] == status and {"path", "requestId", "timestamp"} <= set(body)
    return body["message"]


def _fal_error(r: httpx.Response, status: int) -> object:
    assert r.status_code == status, r.text
    assert "\r" not in r.headers["x-fal-request-id"] and "\n" not in r.headers["x-fal-request-id"]
    return r.json()["detail"]


# ---- finding 11: error shapes ------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_4xx_in_each_dialect(server):
    nested = "[" * 100_000 + "]" * 100_000
    post = lambda path, body: httpx.post(f"{server.base}{path}", content=body, timeout=30,  # noqa: E731
                                         headers={**AUTH, "content-type": "application/json"})
    # refused while streaming, at the depth limit (server/body_guard.py), naming the limit and where it tripped
    detail = _fal_error(post(FAL, '{"prompt": "p", "x": ' + nested + "}"), 400)
    assert detail[0]["loc"][:3] == ["body", "x", 0] and "VACE_MAX_JSON_DEPTH" in detail[0]["msg"]
    msg = _aiml_error(post(AIML, f'{{"model": "{AIML_MODEL}", "x": {nested}}}'), 400)
    assert msg.startswith("x[0]") and "nested more than 10 levels" in msg
    assert "nested more than 10 levels" in _ws_error(post(WS, '{"prompt": "p", "x": ' + nested + "}"), 400)


def test_control_characters_in_ids_never_reach_a_header(server):
    b = server.base
    for r in (httpx.get(f"{b}{FAL}/requests/abc%0d%0a/status", headers=AUTH),
              httpx.get(f"{b}{FAL}/requests/abc%0d%0aSet-Cookie:%20x=1", headers=AUTH),
              httpx.put(f"{b}{FAL}/requests/abc%0d%0a/cancel", headers=AUTH),
              httpx.get(f"{b}{FAL}/pose/requests/abc%0d%0a/status", headers=AUTH)):
        assert r.status_code == 404 and "set-cookie" not in r.headers
        assert len(r.headers["x-fal-request-id"]) == 32  # a fresh id, not the client's text
    assert "not found" in str(_fal_error(httpx.get(f"{b}{FAL}/requests/abc%0d%0a", headers=AUTH), 404))
    assert "not found" in _ws_error(httpx.get(f"{b}/api/v3/predictions/abc%0d%0a/result", headers=AUTH), 404)
    r = httpx.get(f"{b}{AIML}", params={"generation_id": "abc\r\n:x"}, headers=AUTH)
    assert "not found" in _aiml_error(r, 404)


def test_unknown_paths_are_404_and_real_routes_keep_their_answers(server):
    b = server.base
    for method, path in (("GET", "/nope"), ("DELETE", "/nope"), ("PUT", "/files")):
        r = httpx.request(method, f"{b}{path}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error_type"] == "not_found", (method, path, r.text)
    r = httpx.get(f"{b}/", headers=AUTH)  # the playground's public entry point
    assert r.status_code == 307 and r.headers["location"].endswith("/playground")
    assert "not found" in _ws_error(httpx.get(f"{b}/api/v3/nope", headers=AUTH), 404)
    assert "not found" in str(_fal_error(httpx.post(f"{b}/nope", json={}, headers=AUTH), 404))
    assert "not found" in str(_fal_error(httpx.get(f"{b}{FAL}", headers=AUTH), 404))  # fal's own 404
    assert "not found" in _aiml_error(httpx.get(f"{b}/v2/other", headers=AUTH), 404)
    assert "not allowed" in _ws_error(httpx.get(f"{b}{WS}", headers=AUTH), 405)  # a real route, other method


def test_wavespeed_errors_about_image_name_image(server, media_http):
    b = server.base
    msg = _ws_error(httpx.post(f"{b}{WS}", json={"prompt": "x", "image": "http://192.168.1.10/a.png"},
                               headers=AUTH), 400)
    assert msg.startswith("image: ") and "images[" not in msg
    msg = _ws_error(httpx.post(f"{b}{WS}", headers=AUTH, json={
        "prompt": "x", "images": [f"{media_http}/test.jpg"], "image": "ftp://x/a.png"}), 400)
    assert msg.startswith("image: ")
    # the worker fetches it and finds text: the failed job names `image` as well
    data = server.submit({"prompt": "x", "image": f"{media_http}/not-an-image.png", "num_inference_steps": 1})
    server.wait(data["id"], lambda row: row["status"] in ("succeeded", "failed", "cancelled"), 90, "failure")
    got = server.get(data["id"])
    assert got["status"] == "failed" and got["error"].startswith("input 'image': "), got


def test_fal_video_url_over_the_upload_limit_names_video_url(server, media_http):
    """A URL video is bounded by the download limit, not the upload limit, and never reported as `file`."""
    assert (FIXTURES / "test2.mp4").stat().st_size > UPLOAD_LIMIT
    r = httpx.post(f"{server.base}{FAL}", headers=AUTH, timeout=60,
                   json={"prompt": "p", "video_url": f"{media_http}/test2.mp4", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    assert "file" not in r.text
    _cancel_all(server, r.json()["request_id"])


def test_data_uris_without_base64_are_bytes_and_size_limited(server):
    png = (FIXTURES / "mask_test2.png").read_bytes()
    uri = "data:image/png," + quote_from_bytes(png)  # RFC 2397 percent-encoding, no ;base64
    data = server.submit({"prompt": "x", "images": [uri], "num_inference_steps": 1})
    _cancel_all(server, data["id"])
    stored = Path(__import__("json").loads(server.row(data["id"])["spec"])["inputs"]["reference_images"][0])
    assert stored.read_bytes() == png  # not UTF-8-mangled
    # decoded size over the limit while the encoded length * 3/4 is under it
    big = "data:image/png," + quote_from_bytes(png[:64]) + "A" * int(UPLOAD_LIMIT * 1.2)
    msg = _ws_error(httpx.post(f"{server.base}{WS}", json={"prompt": "x", "images": [big]}, headers=AUTH), 400)
    assert msg.startswith("images[0]: data URI is larger than the 60000 byte limit"), msg
    detail = _fal_error(httpx.post(f"{server.base}{FAL}", headers=AUTH,
                                   json={"prompt": "x", "ref_image_urls": [big]}), 422)
    assert detail[0]["loc"] == ["body", "ref_image_urls", 0] and "60000 byte limit" in detail[0]["msg"]


# ---- finding 12: keys ----------------------------------------------------------------------------------------


def test_every_route_but_health_needs_a_key(server):
    b = server.base
    jid = "0" * 32
    probes = [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/ready"), ("GET", "/metrics"),
              ("GET", f"/files/outputs/{jid}/output.mp4"), ("HEAD", f"/files/uploads/{jid}/a.png"),
              ("GET", "/nope"),
              ("POST", WS), ("GET", f"/api/v3/predictions/{jid}"), ("GET", f"/api/v3/predictions/{jid}/result"),
              ("POST", f"/api/v3/predictions/{jid}/cancel"), ("POST", "/api/v3/media/upload/binary"),
              ("POST", "/api/v3/media/uploads"),
              ("POST", FAL), ("POST", f"{FAL}/pose"), ("GET", f"{FAL}/requests/{jid}/status"),
              ("GET", f"{FAL}/requests/{jid}"), ("PUT", f"{FAL}/requests/{jid}/cancel"), ("POST", f"/run{FAL}"),
              ("GET", f"{FAL}/other"), ("POST", AIML), ("GET", f"{AIML}?generation_id={jid}"), ("GET", "/v2/x")]
    for method, path in probes:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            r = httpx.request(method, f"{b}{path}", headers=headers, json={} if method in ("POST", "PUT") else None)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
    assert httpx.get(f"{b}/health").status_code == 200
    # the playground page is public by design (server.playground.PUBLIC_*): its API calls carry the key
    assert httpx.get(f"{b}/playground").status_code == 200
    assert httpx.get(f"{b}/openapi.json", headers=AUTH_B).json()["info"]["title"] == "vace-local"


def test_jobs_and_files_belong_to_the_key_that_created_them(server, small_video_uri):
    b = server.base
    ws = server.submit({"prompt": "mine", "num_inference_steps": 1, "seed": 1})
    fal = httpx.post(f"{b}{FAL}", json={"prompt": "mine", "num_inference_steps": 2}, headers=AUTH).json()
    aiml = httpx.post(f"{b}{AIML}", headers=AUTH, json={"model": AIML_MODEL, "prompt": "mine", "resolution": "480p",
                                                        "aspect_ratio": "16:9", "video_url": small_video_uri}).json()
    up = httpx.post(f"{b}/api/v3/media/upload/binary", headers=AUTH,
                    files={"file": ("a.png", (FIXTURES / "mask_test2.png").read_bytes())}).json()["data"]
    # key B: every dialect's status, result and cancel answer 404 in their envelope
    for path in (f"/api/v3/predictions/{ws['id']}", f"/api/v3/predictions/{ws['id']}/result"):
        assert "not found" in _ws_error(httpx.get(f"{b}{path}", headers=AUTH_B), 404)
    assert "not found" in _ws_error(httpx.post(f"{b}/api/v3/predictions/{ws['id']}/cancel", headers=AUTH_B), 404)
    rid = fal["request_id"]
    for r in (httpx.get(f"{b}{FAL}/requests/{rid}/status", headers=AUTH_B),
              httpx.get(f"{b}{FAL}/requests/{rid}", headers=AUTH_B),
              httpx.get(f"{b}{FAL}/depth/requests/{rid}/status", headers=AUTH_B),
              httpx.put(f"{b}{FAL}/requests/{rid}/cancel", headers=AUTH_B)):
        assert r.status_code == 404, r.text
    assert "not found" in _aiml_error(httpx.get(f"{b}{AIML}", params={"generation_id": aiml["id"]},
                                                headers=AUTH_B), 404)
    # key B's cancels changed nothing; key A sees its jobs
    assert server.row(rid)["cancel_requested"] == 0 and server.row(ws["id"])["cancel_requested"] == 0
    assert httpx.get(f"{b}{FAL}/requests/{rid}/status", headers=AUTH).status_code in (200, 202)
    assert httpx.get(f"{b}{AIML}", params={"generation_id": aiml["id"]}, headers=AUTH).json()["id"] == aiml["id"]
    httpx.put(f"{b}{FAL}/requests/{rid}/cancel", headers=AUTH)
    _cancel_all(server, aiml["id"].split(":")[0])

    # files: the capability URL works with a plain GET; without its token only the owner's key reads it
    upload_url, plain_upload = up["download_url"], _without_token(up["download_url"])
    assert upload_url.endswith("/a.png") and httpx.get(upload_url).status_code == 200
    assert httpx.get(plain_upload, headers=AUTH).status_code == 200
    assert httpx.get(plain_upload, headers=AUTH_B).status_code == 404
    assert httpx.get(plain_upload).status_code == 401
    forged = plain_upload.rsplit("/", 1)[0] + "/" + "0" * 40 + "/a.png"
    assert httpx.get(forged).status_code == 404 and httpx.get(forged, headers=AUTH_B).status_code == 404
    msg = _ws_error(httpx.post(f"{b}{WS}", json={"prompt": "x", "images": [plain_upload]}, headers=AUTH_B), 400)
    assert msg.startswith("images[0]: uploaded file not found")

    server.wait(ws["id"], lambda row: row["status"] in ("succeeded", "failed", "cancelled"), 120, "job")
    out = server.get(ws["id"])
    assert out["status"] == "completed", out
    video, plain_video = out["outputs"][0], _without_token(out["outputs"][0])
    assert video.endswith("/output.mp4")
    r = httpx.get(video)  # the way the hosted APIs' clients download results: no Authorization header
    assert r.status_code == 200 and r.content[4:8] == b"ftyp"
    assert httpx.get(plain_video, headers=AUTH).status_code == 200
    assert httpx.get(plain_video, headers=AUTH_B).status_code == 404
    assert httpx.get(plain_video).status_code == 401
    with sqlite3.connect(server.data_dir / "jobs.db") as c:
        owners = {r[0] for r in c.execute("SELECT owner FROM jobs WHERE id IN (?, ?)", (ws["id"], rid))}
        stored = b"".join(str(v).encode() for row in c.execute("SELECT * FROM jobs") for v in row)
    assert len(owners) == 1 and len(next(iter(owners))) == 64  # one owner, a hash
    assert KEY.encode() not in stored and OTHER_KEY.encode() not in stored  # never the key itself


def test_databases_without_the_owner_column_are_migrated(tmp_path):
    from server.store import Store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    old = Store(url)
    old.create_all()
    job = old.insert_job(dialect="wavespeed", model=MODEL, spec={"prompt": "old"})
    with sqlite3.connect(tmp_path / "jobs.db") as c:  # the schema as it was before owners existed (version 2)
        c.execute("DROP INDEX ix_jobs_owner_status")
        c.execute("DROP TABLE queue_turns")
        c.execute("ALTER TABLE jobs DROP COLUMN owner")
        c.execute("ALTER TABLE uploads DROP COLUMN owner")
        c.execute("DELETE FROM schema_version WHERE version >= 3")
    old.dispose()
    new = Store(url)
    new.create_all()
    assert new.get_job(job.id).owner is None  # old rows: no owner (every key sees them)
    assert new.insert_job(dialect="fal", model="m", spec={}, owner="ab" * 32).owner == "ab" * 32
    new.create_all()  # idempotent
    new.dispose()


def test_both_data_uri_decoders_read_percent_encoding_as_bytes(tmp_path):
    """The CLI's decoder (vace_local.core.inputs) and the server's (server.media_refs) share one set of rules."""
    from server.media_refs import decode_data_uri as server_decode
    from vace_local.core.errors import InputError
    from vace_local.core.inputs import decode_data_uri as cli_decode

    raw = bytes(range(256))
    uri = "data:application/octet-stream," + quote_from_bytes(raw)
    assert server_decode(uri, "video", 256) == raw
    assert cli_decode(uri, tmp_path / "x", "video", 256).read_bytes() == raw
    plain = "data:text/plain," + "A" * 300  # 300 decoded bytes; 300 * 3/4 = 225 passed the old check
    for decode in (lambda: server_decode(plain, "video", 256), lambda: cli_decode(plain, tmp_path / "y", "video", 256)):
        with pytest.raises(InputError, match="larger than the 256 byte limit"):
            decode()
