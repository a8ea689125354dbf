"""Long video through a live server (tiny model on CPU, 16×16): a 257-frame job whose worker is killed with
SIGKILL during window 3 of 4 resumes after the re-queue at window 3 (windows 1-2 are not denoised again); the
hosted limits stay the default. Each dialect's translation of a long job: tests/test_long_video.py."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.test_server_live import AUTH, LiveServer, _terminal
from vace_local.core.media import probe_video

ENV = {"VACE_TINY_MAX_SIDE": "16", "VACE_TINY_MAX_FRAMES": "0", "VACE_HEARTBEAT_TIMEOUT_S": "6"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("long")
    env = {**ENV, "VACE_TINY_HOLD_FILE": str(data / "hold")}
    srv = LiveServer(data, tmp_path_factory.mktemp("cache"), extra_env=env).start()
    yield srv
    srv.stop()


def _metadata(server: LiveServer, jid: str) -> dict:
    files = list((server.data_dir / "outputs" / jid).glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_257_frames_resume_after_kill9_in_window_3(server: LiveServer) -> None:
    body = {"prompt": "a cat walks", "duration": 16, "long_video": True, "num_inference_steps": 2, "seed": 5}
    # global steps: window k covers steps 2k+1..2k+2; the job holds after step 5, the first of window 3
    # (VACE_TINY_HOLD_FILE), so the kill lands inside window 3 whatever the machine's speed
    hold = server.data_dir / "hold"
    hold.write_text("5")
    try:
        jid = server.submit(body)["id"]
        deadline = time.time() + 400
        row: dict = {}
        while time.time() < deadline:
            row = server.row(jid)
            if row["status"] == "running" and row["stage"] == "generate" and row["total"] == 8 and row["step"] >= 5:
                break
            assert not _terminal(row), (row["status"], row["error"], server.logs(jid))
            time.sleep(0.05)
        assert row["step"] == 5, row  # held inside window 3
        pid = next(w["pid"] for w in httpx.get(f"{server.base}/ready", headers=AUTH, timeout=5).json()["workers"]
                   if w["pid"])
        os.kill(pid, signal.SIGKILL)
    finally:
        hold.unlink(missing_ok=True)  # the resumed attempt runs through
    stored = sorted(p.name for p in (server.data_dir / "windows" / jid).glob("window_*.npy"))
    assert stored == ["window_0000.npy", "window_0001.npy"]
    done = server.wait(jid, _terminal, timeout=500, what="the resumed job")
    assert done["status"] == "succeeded", (done, server.logs(jid))
    assert done["attempts"] == 2
    meta = _metadata(server, jid)
    assert [w["resumed"] for w in meta["windows"]] == [True, True, False, False]
    assert meta["sampling"]["windows_denoised"] == 2 and meta["sampling"]["forwards"] > 0
    assert [(w["start"], w["end"], w["overlap"]) for w in meta["windows"]] == [
        (0, 81, 0), (65, 146, 16), (130, 211, 16), (176, 257, 35)]
    logs = server.logs(jid)
    assert any("resumed: 2 of 4 windows" in line for line in logs), logs
    assert any("window 3/4" in line for line in logs), logs
    video = next((server.data_dir / "outputs" / jid).glob("*.mp4"))
    assert probe_video(video)[0] == 257
    assert not (server.data_dir / "windows" / jid).exists()  # finished: the stored windows are gone
    assert [w["start"] for w in server.get(jid)["windows"]] == [0, 65, 130, 176]  # in the response too


def test_hosted_limits_stay_the_default(server: LiveServer) -> None:
    r = httpx.post(f"{server.base}/api/v3/wavespeed-ai/wan-2.1-14b-vace", headers=AUTH, timeout=30,
                   json={"prompt": "x", "duration": 16})
    assert r.status_code == 400 and "duration" in r.text and "long_video" in r.text
