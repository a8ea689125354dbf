"""WaveSpeed dialect over the real app and SQLite store, without workers (jobs stay queued; no torch)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

SUBMIT = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vace"


@pytest.fixture
def client(tmp_path):
    settings = Settings(data_dir=tmp_path, workers="0", api_keys=[KEY], max_upload_bytes=100_000, model="tiny")
    with TestClient(create_app(settings)) as c:
        yield c


def _submit(client, body, **kw):
    return client.post(SUBMIT, json=body, headers=AUTH, **kw)


def test_submit_and_get_envelope(client):
    r = _submit(client, {"prompt": "a cat boxing", "num_inference_steps": 2, "seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    d = body["data"]
    assert d["status"] == "created" and d["outputs"] == [] and d["error"] == ""
    assert d["model"] == "wavespeed-ai/wan-2.1-14b-vace"
    assert d["urls"]["get"] == f"http://testserver/api/v3/predictions/{d['id']}/result"
    assert d["created_at"].endswith("Z") and isinstance(d["timings"]["inference"], int)
    assert "tiny" in d["note"]
    for path in (f"/api/v3/predictions/{d['id']}/result", f"/api/v3/predictions/{d['id']}"):
        g = client.get(path, headers=AUTH)
        assert g.status_code == 200 and g.json()["data"]["id"] == d["id"]
    job = client.app.state.services.jobs.get_sync(d["id"], with_logs=True)
    assert job.spec["num_frames"] == 81 and (job.spec["width"], job.spec["height"]) == (832, 480)
    assert job.spec["task"] == "none" and job.spec["model"] == "tiny"  # depth without video → none, logged
    assert any("needs a video" in entry["message"] for entry in job.logs)


def test_auth(client):
    assert client.post(SUBMIT, json={"prompt": "x"}).status_code == 401
    r = client.post(SUBMIT, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json() == {"code": 401, "message": "invalid API key", "data": None}
    assert client.post(SUBMIT, json={"prompt": "x"}, headers={"Authorization": f"Key {KEY}"}).status_code == 200
    assert client.get("/api/v3/predictions/abc/result").status_code == 401
    assert client.get("/health").status_code == 200  # ops endpoints stay open


def test_unknown_ids_and_models(client):
    r = client.get("/api/v3/predictions/0123456789abcdef0123456789abcdef/result", headers=AUTH)
    assert r.status_code == 404 and r.json()["data"] is None and "not found" in r.json()["message"]
    r = client.post("/api/v3/wavespeed-ai/some-other-model", json={"prompt": "x"}, headers=AUTH)
    assert r.status_code == 404 and "not served" in r.json()["message"]


BAD = [
    ({"prompt": "x", "num_inference_steps": 41}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": 20.5}, "guidance_scale"),
    ({"prompt": "x", "flow_shift": -1}, "flow_shift"),
    ({"prompt": "x", "context_scale": 2.1}, "context_scale"),
    ({"prompt": "x", "seed": -2}, "seed"),
    ({"prompt": "x", "seed": 2147483648}, "seed"),
    ({"prompt": "x", "duration": 4}, "duration"),
    ({"prompt": "x", "duration": 11}, "duration"),
    ({"prompt": "x", "duration": "five"}, "duration"),
    ({"prompt": "x", "num_inference_steps": "many"}, "num_inference_steps"),
    ({"prompt": "x", "images": "not-a-list"}, "images"),
    ({"prompt": "x", "task": "outpainting"}, "task"),
    ({"prompt": "x", "size": "1920*1080"}, "size"),
    ({"prompt": "x", "images": ["https://example.com/a.png"] * 6}, "images"),
    ({"prompt": "x", "images": ["https://example.com/a.png"] * 5, "image": "https://example.com/b.png"}, "images"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "video": "data:video/mp4;base64,@@notbase64@@"}, "video"),
    ({"prompt": "x", "video": "data:image/png;base64," + base64.b64encode(PNG).decode()}, "video"),
    ({"prompt": "x", "images": ["data:image/png;base64," + base64.b64encode(MP4).decode()]}, "images[0]"),
    ({"prompt": "x", "video": "http://127.0.0.1:9/v.mp4"}, "video"),
    ({"prompt": "x", "images": ["http://192.168.1.10/a.png"]}, "images[0]"),
    ({"prompt": "x", "first_image": "http://169.254.169.254/latest/meta-data"}, "first_image"),
    ({"prompt": "x", "last_image": "http://localhost/a.png"}, "last_image"),
    ({"prompt": "x", "video": "/etc/passwd"}, "video"),
    ({"prompt": "x", "video": "file:///etc/passwd"}, "video"),
    ({"prompt": "x", "video": "http://testserver/files/uploads/../../jobs.db"}, "video"),
    ({"prompt": "x", "video": "http://testserver/files/uploads/%2e%2e/%2e%2e/jobs.db"}, "video"),
    ({"prompt": "x", "video": "http://testserver/files/uploads/0123456789abcdef0123456789abcdef/v.mp4"}, "video"),
    ({"prompt": "x", "mask_video": "https://example.com/m.mp4"}, "mask"),
    # wrong JSON types are refused, not coerced (strict): strings for numbers/booleans, floats/bools for ints
    ({"prompt": "x", "num_inference_steps": "2"}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2.0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps"),
    ({"prompt": "x", "seed": "42"}, "seed"),
    ({"prompt": "x", "duration": "5"}, "duration"),
    ({"prompt": "x", "guidance_scale": "5"}, "guidance_scale"),
    ({"prompt": "x", "enable_fast_mode": "true"}, "enable_fast_mode"),
    ({"prompt": "x", "enable_sync_mode": 1}, "enable_sync_mode"),
    ({"prompt": "x", "negative_prompt": 3}, "negative_prompt"),
    ({"prompt": "   "}, "prompt: Value error, must not be empty or only whitespace"),
    ({"prompt": "a" * 20_001}, "prompt: String should have at most 20000 characters"),
    # numeric spellings of loopback/private IPv4 that resolvers accept are refused at submit, too
    ({"prompt": "x", "video": "http://2130706433/v.mp4"}, "video: URL host '2130706433' points to a loopback"),
    ({"prompt": "x", "video": "http://0x7f000001/v.mp4"}, "video"),
    ({"prompt": "x", "images": ["http://127.1/a.png"]}, "images[0]"),
    ({"prompt": "x", "first_image": "http://0/a.png"}, "first_image"),
    ({"prompt": "x", "last_image": "http://localhost./a.png"}, "last_image: URL host 'localhost.' refers to"),
    ({"prompt": "x", "task": "inpainting", "video": "https://example.com/v.mp4"}, "inpainting"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_battery(client, body, field):
    r = _submit(client, body)
    assert r.status_code == 400, r.text
    j = r.json()
    assert j["code"] == 400 and j["data"] is None
    assert field in j["message"], j["message"]
    assert client.get("/health").status_code == 200


def test_malformed_json_and_non_object(client):
    r = client.post(SUBMIT, content=b'{"prompt": "x",', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    r = client.post(SUBMIT, json=["prompt"], headers=AUTH)
    assert r.status_code == 400 and r.json()["code"] == 400


def test_webhook_with_base64_is_refused(client):
    r = client.post(SUBMIT + "?webhook=https://example.com/hook", json={"prompt": "x", "enable_base64_output": True},
                    headers=AUTH)
    assert r.status_code == 400 and "webhook callback does not support base64 output" in r.json()["message"]
    r = client.post(SUBMIT + "?webhook=http://10.0.0.5/hook", json={"prompt": "x"}, headers=AUTH)
    assert r.status_code == 400 and "webhook" in r.json()["message"]


def test_upload_binary_then_use_as_input(client):
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures absent")
    data = (FIXTURES / "test2.mp4").read_bytes()
    client.app.state.services.settings.max_upload_bytes = 10_000_000
    r = client.post("/api/v3/media/upload/binary", files={"file": ("clip one.mp4", io.BytesIO(data), "video/mp4")},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    d = r.json()["data"]
    assert r.json()["code"] == 200 and d["type"] == "video" and d["size"] == len(data)
    assert d["filename"] == "clip_one.mp4"
    got = client.get(d["download_url"].removeprefix("http://testserver"))
    assert got.status_code == 200 and got.content == data and got.headers["content-type"] == "video/mp4"
    r = _submit(client, {"prompt": "x", "video": d["download_url"], "task": "pose"})
    assert r.status_code == 200, r.text
    job = client.app.state.services.jobs.get_sync(r.json()["data"]["id"])
    assert Path(job.spec["inputs"]["video"]).read_bytes() == data  # resolved locally, not over HTTP
    r = _submit(client, {"prompt": "x", "images": [d["download_url"]]})  # a video where an image belongs
    assert r.status_code == 400 and "images[0]: must be an image" in r.json()["message"]


def test_upload_ticket_put_flow(client):
    ticket = {"filename": "ref.png", "size": len(PNG), "content_type": "image/png"}
    r = client.post("/api/v3/media/uploads", json=ticket, headers=AUTH)
    assert r.status_code == 200 and r.json()["code"] == 200
    d = r.json()["data"]
    assert d["upload"]["method"] == "PUT" and d["download_url"].endswith("/ref.png")
    put_url = d["upload"]["url"].removeprefix("http://testserver")
    bad = put_url.split("token=")[0] + "token=forged"
    assert client.put(bad, content=PNG).status_code == 403
    assert client.put(put_url, content=PNG, headers=d["upload"]["headers"]).status_code == 200  # no Authorization
    assert client.put(put_url, content=PNG).status_code == 409  # single use
    assert client.get(d["download_url"].removeprefix("http://testserver")).content == PNG
    assert _submit(client, {"prompt": "x", "images": [d["download_url"]]}).status_code == 200


def test_oversized_uploads(client):
    big = b"\x00" * 100_001
    r = client.post("/api/v3/media/upload/binary", files={"file": ("big.bin", io.BytesIO(big))}, headers=AUTH)
    assert r.status_code == 413 and "limit" in r.json()["message"]
    r = client.post("/api/v3/media/uploads", json={"filename": "big.bin", "size": 100_001}, headers=AUTH)
    assert r.status_code == 413
    d = client.post("/api/v3/media/uploads", json={"filename": "b.bin", "size": 10}, headers=AUTH).json()["data"]
    r = client.put(d["upload"]["url"].removeprefix("http://testserver"), content=big)
    assert r.status_code == 413
    r = client.post("/api/v3/media/upload/binary", headers=AUTH)
    assert r.status_code == 400 and "file" in r.json()["message"]
    assert client.get("/health").status_code == 200


def test_file_route_refuses_traversal(client, tmp_path):
    (tmp_path / "secret.txt").write_text("no")
    for path in ["/files/outputs/../jobs.db", "/files/uploads/%2e%2e/secret.txt", "/files/work/abc/x",
                 "/files/outputs/0123456789abcdef0123456789abcdef/..%2f..%2fsecret.txt",
                 "/files/outputs/0123456789abcdef0123456789abcdef/missing.mp4"]:
        r = client.get(path, headers=AUTH)
        assert r.status_code in (404, 405) and b"no" != r.content, path


def test_cancel_in_queue_reports_failed(client):
    ids = [_submit(client, {"prompt": f"p{i}"}).json()["data"]["id"] for i in range(3)]
    core = client.app.state.services
    assert [core.store.queue_position(i) for i in ids] == [0, 1, 2]
    r = client.post(f"/api/v3/predictions/{ids[1]}/cancel", headers=AUTH)
    assert r.status_code == 200
    d = r.json()["data"]
    assert d["status"] == "failed" and "cancelled" in d["error"]
    assert [core.store.queue_position(i) for i in (ids[0], ids[2])] == [0, 1]


def test_sync_mode_timeout_shape(client):
    client.app.state.services.settings.sync_timeout_s = 0.3
    r = _submit(client, {"prompt": "x", "enable_sync_mode": True})
    assert r.status_code == 200
    d = r.json()["data"]
    assert d["status"] == "processing" or d["status"] == "created"
    assert d["code"] == 5004 and "Sync mode timed out" in d["error"]


def test_metrics_and_ready(client):
    _submit(client, {"prompt": "x"})
    text = client.get("/metrics", headers=AUTH).text
    assert "vace_queue_depth 1.0" in text and 'vace_jobs{status="queued"} 1.0' in text
    assert client.get("/ready", headers=AUTH).status_code == 200  # no workers configured
    assert client.get("/docs", headers=AUTH).status_code == 200
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert SUBMIT in schema["paths"]


def test_fast_mode_maps_to_acceleration(client):
    r = _submit(client, {"prompt": "x", "enable_fast_mode": True})
    job = client.app.state.services.jobs.get_sync(r.json()["data"]["id"], with_logs=True)
    assert job.spec["acceleration"] == "regular"
    assert any("enable_fast_mode" in entry["message"] for entry in job.logs)
    r = _submit(client, {"prompt": "x"})
    assert client.app.state.services.jobs.get_sync(r.json()["data"]["id"]).spec["acceleration"] == "none"


def test_retention_removes_old_jobs_outputs_and_uploads(client):
    import time as _time

    from server.store import jobs, uploads

    core = client.app.state.services
    jid = _submit(client, {"prompt": "x"}).json()["data"]["id"]
    up = client.post("/api/v3/media/upload/binary", files={"file": ("a.png", io.BytesIO(PNG))}, headers=AUTH)
    up_url = up.json()["data"]["download_url"].removeprefix("http://testserver")
    job = core.store.claim_next("w")
    out_dir = core.files.data_dir / "outputs" / jid
    out_dir.mkdir(parents=True)
    (out_dir / "output.mp4").write_bytes(MP4)
    core.store.finish_job(job.id, "w", status="succeeded", outputs=[
        {"kind": "video", "file": "output.mp4", "content_type": "video/mp4", "size": len(MP4)}])
    got = client.get(f"/api/v3/predictions/{jid}/result", headers=AUTH).json()["data"]
    assert got["status"] == "completed" and got["outputs"][0].endswith("/output.mp4")
    assert got["outputs"][0].startswith(f"http://testserver/files/outputs/{jid}/")  # …/<token>/output.mp4 with keys
    assert client.get(got["outputs"][0].removeprefix("http://testserver")).content == MP4
    assert core.jobs.cleanup_expired_sync() == 0  # nothing old yet
    old = _time.time() - 2 * 3600
    with core.store.engine.begin() as c:
        c.execute(jobs.update().where(jobs.c.id == jid).values(finished_at=old))
        c.execute(uploads.update().values(created_at=old))
    core.settings.retention_hours = 1
    assert core.jobs.cleanup_expired_sync() >= 2
    assert not out_dir.exists()
    assert client.get(f"/api/v3/predictions/{jid}/result", headers=AUTH).status_code == 404
    assert client.get(got["outputs"][0].removeprefix("http://testserver")).status_code == 404
    assert client.get(up_url).status_code == 404


def test_nan_and_infinity_literals_name_the_rule(client):
    for raw, field in [(b'{"prompt":"x","guidance_scale":NaN}', "guidance_scale"),
                       (b'{"prompt":"x","flow_shift":Infinity}', "flow_shift")]:
        r = client.post(SUBMIT, content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["message"].startswith(f"{field}: Input should be a finite number")


def test_hf_negative_prompt_list_is_joined_and_unknown_values_not_stored(client):
    # huggingface_hub's text_to_video sends negative_prompt as list[str] and num_frames as a float
    r = _submit(client, {"prompt": "x", "negative_prompt": ["blurry", "dark"], "num_frames": 81.0,
                         "junk": "y" * 10_000})
    assert r.status_code == 200, r.text
    job = client.app.state.services.jobs.get_sync(r.json()["data"]["id"], with_logs=True)
    assert job.spec["negative_prompt"] == "blurry, dark"
    assert "junk" not in job.extra["input"] and "num_frames" not in job.extra["input"]  # values never stored
    assert any("ignored unknown fields: junk, num_frames" in e["message"] for e in job.logs)


def test_body_envelope_errors(client):
    for ctype, body, want in [
        ("application/json", b"null", "got JSON null"),
        ("application/json", b"[1]", "got a JSON array"),
        ("application/json", b"", "request body is missing"),
        ("application/json", b'{"prompt": "\xff"}', "not valid JSON"),
    ]:
        r = client.post(SUBMIT, content=body, headers={**AUTH, "Content-Type": ctype})
        j = r.json()
        assert r.status_code == 400 and j["code"] == 400 and j["data"] is None and want in j["message"], (ctype, j)
    for ctype, body in [("text/plain", b'{"prompt": "x"}'), ("application/x-www-form-urlencoded", b"prompt=x")]:
        r = client.post(SUBMIT, content=body, headers={**AUTH, "Content-Type": ctype})  # a page's simple POST
        j = r.json()
        assert r.status_code == 415 and j["code"] == 415 and ctype in j["message"], (ctype, j)
        assert "send application/json" in j["message"]


def test_request_body_limit(client):
    from server.settings import max_request_bytes

    limit = max_request_bytes(client.app.state.services.settings)
    big = {"prompt": "x", "video": "data:video/mp4;base64," + "A" * limit}
    r = _submit(client, big)
    assert r.status_code == 413 and r.json()["data"] is None and "byte limit" in r.json()["message"]

    def chunks():  # no Content-Length: counted while streamed
        yield b'{"prompt": "x", "pad": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = client.post(SUBMIT, content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == 413
    assert client.get("/health").status_code == 200
    assert client.app.state.services.store.queue_depth() == 0


def test_empty_and_nameless_uploads_are_refused(client):
    r = client.post("/api/v3/media/upload/binary", files={"file": ("a.mp4", io.BytesIO(b""), "video/mp4")},
                    headers=AUTH)
    assert r.status_code == 400 and r.json()["message"] == "file: the upload is empty (0 bytes)"
    r = client.post("/api/v3/media/upload/binary", files={"file": ("", io.BytesIO(b"abc"))}, headers=AUTH)
    assert r.status_code == 400 and r.json()["message"].startswith("file: must be a file part with a filename")
    d = client.post("/api/v3/media/uploads", json={"filename": "e.png", "size": 0}, headers=AUTH).json()["data"]
    r = client.put(d["upload"]["url"].removeprefix("http://testserver"), content=b"")
    assert r.status_code == 400 and "empty" in r.json()["message"]
    r = client.post("/api/v3/media/upload/binary", files={"file": ("猫.png", io.BytesIO(PNG), "image/png")},
                    headers=AUTH)
    assert r.status_code == 200 and r.json()["data"]["filename"] == "upload.png"  # extension kept


def test_empty_webhook_param_means_none(client):
    r = client.post(SUBMIT + "?webhook=", json={"prompt": "x"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert client.app.state.services.jobs.get_sync(r.json()["data"]["id"]).webhook_url is None


def test_other_hosts_files_paths_are_plain_urls(client):
    # CDN URLs often live under /files/ (e.g. https://v3.fal.media/files/…): only our own host maps to disk
    url = "https://v3.fal.media/files/penguin/abc123_ref.png"
    r = _submit(client, {"prompt": "x", "images": [url]})
    assert r.status_code == 200, r.text
    assert client.app.state.services.jobs.get_sync(r.json()["data"]["id"]).spec["inputs"]["reference_images"] == [url]
    r = _submit(client, {"prompt": "x", "video": "http://testserver/files/uploads/../../jobs.db"})
    assert r.status_code == 400 and "path traversal refused" in r.json()["message"]


def test_unexpected_errors_keep_the_envelope(tmp_path):
    from server.store import jobs

    settings = Settings(data_dir=tmp_path, workers="0", api_keys=[KEY], model="tiny")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        jid = c.post(SUBMIT, json={"prompt": "x"}, headers=AUTH).json()["data"]["id"]
        core = c.app.state.services
        with core.store.engine.begin() as conn:  # a row this version cannot render (e.g. written by a newer one)
            conn.execute(jobs.update().where(jobs.c.id == jid).values(status="paused"))
        r = c.get(f"/api/v3/predictions/{jid}/result", headers=AUTH)
        assert r.status_code == 500 and r.json()["code"] == 500 and r.json()["data"] is None
        assert "internal server error (KeyError)" in r.json()["message"]
        # base64 output whose file is gone: a 404 naming the prediction, not a crash
        jid = c.post(SUBMIT, json={"prompt": "x", "enable_base64_output": True}, headers=AUTH).json()["data"]["id"]
        job = core.store.claim_next("w")
        core.store.finish_job(job.id, "w", status="succeeded", outputs=[
            {"kind": "video", "file": "output.mp4", "content_type": "video/mp4", "size": 10}])
        r = c.get(f"/api/v3/predictions/{jid}", headers=AUTH)
        assert r.status_code == 404 and "no longer available" in r.json()["message"]
        assert c.get("/health").status_code == 200
