"""The async boundary: no route calls the job store on the event loop.

The store refuses a call made on a thread that runs an event loop (`StoreOnEventLoop`); here the real app runs
on this test's own loop (httpx's ASGI transport, real SQLite store, keys configured so file reads check owners)
and every dialect's routes, the uploads, the file routes, the playground's progress and the ops routes are
called. A handler that reaches the store without going through the services' async methods answers 500 here.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from server.store import Store, StoreOnEventLoop

KEY = "boundary-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
WAVESPEED = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vace"


def test_the_store_refuses_a_call_on_the_event_loop(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_all()

    async def main() -> None:
        with pytest.raises(StoreOnEventLoop):
            store.queue_depth()
        assert await asyncio.to_thread(store.queue_depth) == 0  # the same call off the loop is fine

    asyncio.run(main())
    assert store.queue_depth() == 0  # and so is a thread without a loop
    store.dispose()


def _app(tmp_path):  # noqa: ANN202
    settings = Settings(data_dir=tmp_path, workers="0", api_keys=[KEY], model="tiny", sync_timeout_s=0.2)
    return create_app(settings, start_workers=False)


async def _every_route(c: httpx.AsyncClient) -> list[tuple[str, int]]:
    """Call the routes of every dialect, uploads, files, playground and ops; returns (what, status) per call."""
    seen: list[tuple[str, int]] = []

    async def call(method: str, path: str, expect: int = 200, **kw) -> httpx.Response:  # noqa: ANN003
        r = await c.request(method, path, **{"headers": AUTH, **kw})
        seen.append((f"{method} {path.split('?')[0]}", r.status_code))
        assert r.status_code == expect, (method, path, r.status_code, r.text)  # 500: a store call on the loop
        return r

    # uploads: binary, ticket + PUT; then the files routes by capability URL, by key, and refused
    up = (await call("POST", "/api/v3/media/upload/binary", files={"file": ("a.png", PNG, "image/png")})).json()
    url = up["data"]["download_url"]
    path = url.removeprefix("http://testserver")
    seen.append(("GET file by token", (await c.get(path)).status_code))  # the capability URL, no key
    ident, name = path.split("/")[3], path.split("/")[-1]
    seen.append(("GET file by key", (await c.get(f"/files/uploads/{ident}/{name}", headers=AUTH)).status_code))
    bad = await c.get(f"/files/uploads/{ident}/{'0' * 40}/{name}")
    assert bad.status_code == 404, bad.text
    ticket = (await call("POST", "/api/v3/media/uploads", json={"filename": "b.png", "size": len(PNG)})).json()
    put = ticket["data"]["upload"]["url"].removeprefix("http://testserver")
    await call("PUT", put, content=PNG)
    # WaveSpeed: submit (with our own file URL as an input: the ownership check), get, progress, cancel, sync
    r = await call("POST", WAVESPEED, json={"prompt": "x", "images": [url]})
    jid = r.json()["data"]["id"]
    await call("GET", f"/api/v3/predictions/{jid}/result")
    await call("GET", f"/api/v3/predictions/{jid}")
    await call("GET", f"/api/v3/predictions/{jid}/progress")
    await call("POST", f"/api/v3/predictions/{jid}/cancel")
    await call("POST", WAVESPEED, json={"prompt": "x", "enable_sync_mode": True})
    # fal: submit, status, result, cancel
    r = await call("POST", "/fal-ai/wan-vace-14b", json={"prompt": "x"})
    rid = r.json()["request_id"]
    await call("GET", f"/fal-ai/wan-vace-14b/requests/{rid}/status?logs=1", expect=202)
    await call("GET", f"/fal-ai/wan-vace-14b/requests/{rid}", expect=400)  # still in progress
    await call("GET", f"/fal-ai/wan-vace-14b/depth/requests/{rid}/status", expect=202)
    await call("PUT", f"/fal-ai/wan-vace-14b/requests/{rid}/cancel", expect=202)
    # AI/ML: create (its input video probed at submit: stored as an upload), fetch
    video = (FIXTURES / "test2.mp4").read_bytes()
    up = (await call("POST", "/api/v3/media/upload/binary", files={"file": ("v.mp4", video, "video/mp4")})).json()
    r = await call("POST", "/v2/video/generations", expect=201, json={
        "model": "alibaba/wan2.2-vace-fun-a14b-depth", "prompt": "x", "video_url": up["data"]["download_url"],
        "resolution": "auto"})
    gid = r.json().get("id")
    await call("GET", f"/v2/video/generations?generation_id={gid}")
    # OpenAI: create with a file part, list, retrieve, content (not ready), delete (queued: cancelled first)
    r = await call("POST", "/v1/videos", data={"prompt": "x", "model": "sora-2", "size": "64x64", "seconds": "1"},
                   files={"input_reference": ("r.png", PNG, "image/png")})
    vid = r.json()["id"]
    await call("GET", "/v1/videos?limit=5")
    await call("GET", f"/v1/videos/{vid}")
    await call("GET", f"/v1/videos/{vid}/content", expect=400)  # not completed
    await call("DELETE", f"/v1/videos/{vid}")
    # ops
    for p in ("/health", "/ready", "/metrics", "/openapi.json"):
        await call("GET", p)
    return seen


def test_no_route_calls_the_store_on_the_event_loop(tmp_path, caplog):
    app = _app(tmp_path)

    async def main() -> list[tuple[str, int]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await _every_route(c)

    with caplog.at_level(logging.ERROR, logger="vace.server"):
        seen = asyncio.run(main())
    on_loop = [r.getMessage() for r in caplog.records if r.exc_info and r.exc_info[0] is StoreOnEventLoop]
    assert not on_loop, f"store calls on the event loop: {on_loop}"
    errors = [(what, code) for what, code in seen if code >= 500]
    assert not errors, f"routes that failed: {errors}"
    assert len(seen) >= 25, seen


def test_a_route_that_skips_the_seam_is_caught(tmp_path, caplog):
    """The check above can fail: a handler calling the store directly on the loop answers 500."""
    app = _app(tmp_path)
    store = app.state.services.store

    async def bad() -> dict[str, int]:
        return {"depth": store.queue_depth()}

    app.add_api_route("/bad", bad, methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of the unknown-path catch-all

    async def main() -> int:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return (await c.get("/bad", headers=AUTH)).status_code

    with caplog.at_level(logging.ERROR, logger="vace.server"):
        assert asyncio.run(main()) == 500
    assert any(r.exc_info and r.exc_info[0] is StoreOnEventLoop for r in caplog.records)
