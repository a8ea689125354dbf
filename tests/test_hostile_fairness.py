"""Fairness between API keys on a live API process (`python -m server --workers 0`, loopback only).

Key A fills its per-key queue cap; every dialect then answers A with 429, a `Retry-After` header and a message
naming the limit, while key B still submits and is told it is next but one (the workers take keys in turn),
not behind all of A's jobs. Claiming itself is covered on SQLite and PostgreSQL in tests/test_store.py.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.test_server_live import KEY, LiveServer

KEY_B = "fair-key-b"
CAP = 30
RETRY_AFTER = "7"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    env = {"VACE_API_KEYS": f"{KEY},{KEY_B}", "VACE_MAX_QUEUED_PER_KEY": str(CAP),
           "VACE_QUEUE_RETRY_AFTER_S": RETRY_AFTER}
    srv = LiveServer(tmp_path_factory.mktemp("fair"), tmp_path_factory.mktemp("fair-cache"), workers="0",
                     extra_env=env).start(60)
    yield srv
    srv.stop()


def _tiny_video_uri(tmp_path) -> str:
    from vace_local.core.media import write_video

    path = write_video(np.full((5, 32, 32, 3), 90, np.uint8), tmp_path / "v.mp4", fps=16)
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def test_a_key_past_its_cap_gets_429_and_another_key_goes_next(api, tmp_path):
    auth_a = {"Authorization": f"Bearer {KEY}"}
    a_ids = [api.submit({"prompt": f"a{i}", "seed": i})["id"] for i in range(CAP - 1)]
    r = httpx.post(f"{api.base}/fal-ai/wan-vace-14b", json={"prompt": "a last"}, headers=auth_a, timeout=30)
    a_ids.append(r.json()["request_id"])
    submits = {
        "wavespeed": ("/api/v3/wavespeed-ai/wan-2.1-14b-vace", {"prompt": "one more"}),
        "fal": ("/fal-ai/wan-vace-14b", {"prompt": "one more"}),
        "openai": ("/v1/videos", {"prompt": "one more", "seconds": 1, "size": "64x64"}),
        "aiml": ("/v2/video/generations", {"model": "alibaba/wan2.2-vace-fun-a14b-depth", "prompt": "one more",
                                           "video_url": _tiny_video_uri(tmp_path)}),
    }
    for dialect, (path, body) in submits.items():
        r = httpx.post(api.base + path, json=body, headers=auth_a, timeout=30)
        assert r.status_code == 429, (dialect, r.status_code, r.text)
        assert r.headers.get("retry-after") == RETRY_AFTER, (dialect, r.headers)
        assert "VACE_MAX_QUEUED_PER_KEY" in r.text and f"{CAP} jobs queued" in r.text, (dialect, r.text)
    # key B is not refused, and its first job runs second: A was first in line, then the keys take turns
    h_b = {"Authorization": f"Key {KEY_B}"}
    r = httpx.post(f"{api.base}/fal-ai/wan-vace-14b", json={"prompt": "b"}, headers=h_b, timeout=30)
    assert r.status_code == 200, r.text
    b_id = r.json()["request_id"]
    status = httpx.get(f"{api.base}/fal-ai/wan-vace-14b/requests/{b_id}/status", headers=h_b, timeout=10).json()
    assert status["status"] == "IN_QUEUE" and status["queue_position"] == 1, status
    last_a = httpx.get(f"{api.base}/fal-ai/wan-vace-14b/requests/{a_ids[-1]}/status", headers=auth_a,
                       timeout=10).json()
    assert last_a["queue_position"] == CAP, last_a  # A's 29 earlier jobs and B's one
    # a cancelled job frees a slot for A at once
    httpx.post(f"{api.base}/api/v3/predictions/{a_ids[0]}/cancel", headers=auth_a, timeout=10)
    assert api.submit({"prompt": "a again"})["status"] == "created"
