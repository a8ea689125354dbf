"""Live server tests: the real `python -m server` on a loopback port, tiny model on CPU, official clients.

Sizes are capped with the tiny-only settings (VACE_TINY_MAX_SIDE / _FRAMES) so each job takes seconds.
Each test waits with a deadline; the servers are killed (their whole process group) at teardown.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "vace"
MODEL = "wavespeed-ai/wan-2.1-14b-vace"
KEY = "live-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, data_dir: Path, cache_dir: Path, workers: str = "1", extra_env: dict | None = None,
                 model: str = "tiny", log_level: str = "warning") -> None:
        self.data_dir = data_dir
        self.log_level = log_level
        self.model = model
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "VACE_TINY_MAX_SIDE": "64", "VACE_TINY_MAX_FRAMES": "17",
                    "VACE_ALLOWED_HOSTS": "127.0.0.1", "VACE_API_KEYS": KEY, "VACE_CACHE_DIR": str(cache_dir),
                    "VACE_HEARTBEAT_TIMEOUT_S": "60", **(extra_env or {})}
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"server-{self.port}.log"

    def start(self, ready_timeout: float = 120.0, wait_ready: bool = True) -> LiveServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", self.model, "--port", str(self.port), "--data-dir",
             str(self.data_dir), "--workers", self.workers, "--log-level", self.log_level],
            cwd=ROOT, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + ready_timeout
        while wait_ready and time.time() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.base}/ready", headers=AUTH, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        if not wait_ready:
            return self
        raise AssertionError(f"server not ready in {ready_timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        """SIGKILL the API process only (its workers must notice and exit by themselves)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: the server and its workers
        except ProcessLookupError:
            pass
        self.proc = None

    # -- helpers --
    def submit(self, body: dict, **params) -> dict:
        r = httpx.post(f"{self.base}/api/v3/{MODEL}", json=body, headers=AUTH, params=params, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def get(self, jid: str) -> dict:
        r = httpx.get(f"{self.base}/api/v3/predictions/{jid}/result", headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def row(self, jid: str) -> dict:
        with sqlite3.connect(self.data_dir / "jobs.db", timeout=10) as c:
            c.row_factory = sqlite3.Row
            return dict(c.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone())

    def logs(self, jid: str) -> list[str]:
        with sqlite3.connect(self.data_dir / "jobs.db", timeout=10) as c:
            return [r[0] for r in c.execute("SELECT message FROM job_logs WHERE job_id = ? ORDER BY id", (jid,))]

    def wait(self, jid: str, pred, timeout: float = 90.0, what: str = "") -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            row = self.row(jid)
            if pred(row):
                return row
            time.sleep(0.2)
        raise AssertionError(f"timeout waiting for {what or 'condition'}: {self.row(jid)}\n{self.logs(jid)}")

    def worker_pids(self) -> list[int]:
        workers = httpx.get(f"{self.base}/ready", headers=AUTH, timeout=5).json()["workers"]
        return [w["pid"] for w in workers if w["pid"]]


def _terminal(row: dict) -> bool:
    return row["status"] in ("succeeded", "failed", "cancelled")


def _generating(row: dict) -> bool:
    return row["status"] == "running" and row["stage"] == "generate" and row["step"] >= 1


def _pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie child of a dead parent is reaped by init; treat "Z" as gone
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vace-cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_cache):
    data = tmp_path_factory.mktemp("live")
    env = {"VACE_TINY_HOLD_FILE": str(data / "hold"), "VACE_SAFETY_CHECK_INPUTS": "true"}
    srv = LiveServer(data, tiny_cache, extra_env=env).start()
    yield srv
    srv.stop()


@pytest.fixture
def hold(server):
    """While the yielded file exists, the server's jobs hold after denoising step 1 until cancelled
    (`VACE_TINY_HOLD_FILE`): a test acts mid-run for certain, whatever the machine's load."""
    path = server.data_dir / "hold"
    path.touch()
    yield path
    path.unlink(missing_ok=True)


def _held(row: dict) -> bool:
    return row["status"] == "running" and row["stage"] == "generate" and row["step"] == 1


class _Files(http.server.BaseHTTPRequestHandler):
    hooks: list = []

    def do_GET(self):  # noqa: N802
        body = b"this is plain text, not a video"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length", 0))
        _Files.hooks.append(json.loads(self.rfile.read(n)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def helper_http():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_official_sdk_upload_and_run(server):
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures absent")
    import wavespeed

    client = wavespeed.Client(api_key=KEY, base_url=server.base)
    url = client.upload(str(FIXTURES / "test.jpg"))
    assert url.startswith(f"{server.base}/files/uploads/")
    out = client.run(MODEL, {"prompt": "a kitten", "images": [url], "num_inference_steps": 2, "seed": 3},
                     timeout=120, poll_interval=0.2)
    video = httpx.get(out["outputs"][0], timeout=30)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp" and len(out["outputs"]) == 1
    # huggingface_hub's provider: poll the path of urls.get, accept only the four statuses, download outputs[0]
    jid = out["outputs"][0].split("/files/outputs/")[1].split("/")[0]  # …/<id>/<token>/output.mp4 with keys
    full = client.get_result(jid)
    data = full["data"]
    # the tiny model's own safety classifier checked the output (noise: not flagged) and says it is tiny
    assert data["status"] == "completed" and data["has_nsfw_contents"] == [False]
    assert "TINY smoke-test classifier" in data["safety_checker"]
    assert data["timings"]["inference"] > 0 and "tiny" in data["note"]
    path = httpx.URL(data["urls"]["get"]).path
    again = httpx.get(server.base + path, headers=AUTH).json()["data"]
    assert again["status"] in ("created", "processing", "completed", "failed") and again["outputs"] == data["outputs"]
    row = server.row(jid)
    assert json.loads(row["spec"])["inputs"]["reference_images"][0].startswith(str(server.data_dir))
    assert any("tiny" in m for m in server.logs(jid))
    metrics = httpx.get(f"{server.base}/metrics", headers=AUTH).text
    assert 'vace_stage_duration_seconds_count{stage="generate"}' in metrics
    assert 'vace_workers{state="ready"} 1.0' in metrics or 'vace_workers{state="busy"} 1.0' in metrics


def test_sync_mode_webhook_and_base64(server, helper_http):
    _Files.hooks.clear()
    data = server.submit({"prompt": "sync", "num_inference_steps": 2, "enable_sync_mode": True},
                         webhook=f"{helper_http}/hook")
    assert data["status"] == "completed" and data["outputs"][0].endswith(".mp4")
    deadline = time.time() + 15
    while not _Files.hooks and time.time() < deadline:
        time.sleep(0.1)
    assert _Files.hooks, "webhook not delivered"
    hook = _Files.hooks[0]
    assert hook["id"] == data["id"] and hook["status"] == "completed" and hook["outputs"] == data["outputs"]
    assert hook["input"]["prompt"] == "sync"
    # the server records the delivery once our endpoint has answered, a moment after the hook arrived here
    deadline = time.time() + 10
    while server.row(data["id"])["webhook_status"] == "pending" and time.time() < deadline:
        time.sleep(0.1)
    assert server.row(data["id"])["webhook_status"] == "delivered"

    b64 = server.submit({"prompt": "b64", "num_inference_steps": 2, "enable_sync_mode": True,
                         "enable_base64_output": True})
    assert b64["status"] == "completed"
    assert base64.b64decode(b64["outputs"][0])[4:8] == b"ftyp"  # bare base64, no data: prefix
    assert server.get(b64["id"])["outputs"] == b64["outputs"]


def test_broken_input_fails_job_naming_the_input(server, helper_http):
    data = server.submit({"prompt": "x", "task": "none", "video": f"{helper_http}/not-a-video.mp4"})
    row = server.wait(data["id"], _terminal, 60, "failure")
    got = server.get(data["id"])
    assert got["status"] == "failed" and got["error"].startswith("input 'video': must be a video"), got
    assert row["error_type"] == "input_error"
    data = server.submit({"prompt": "x", "images": [f"{helper_http}/x.png", "https://host.invalid/a.png"]})
    server.wait(data["id"], _terminal, 60)
    assert "input 'images[0]'" in server.get(data["id"])["error"]
    assert httpx.get(f"{server.base}/health").status_code == 200


def _png_uri(rgb: tuple[int, int, int]) -> str:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), rgb, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_tiny_expander_and_classifier_in_every_dialect(server, tmp_path):
    """`--model tiny` runs its tiny prompt expander and safety classifier (built locally, nothing downloaded)
    through WaveSpeed (which has no expansion field), fal and AI/ML, and each response says they are tiny; the
    classifier flags the one thing it knows, a magenta input image (the server checks inputs here)."""
    import numpy as np

    from vace_local.core.media import write_video
    from vace_local.engine.tiny import TINY_EXPANSION

    ws = server.submit({"prompt": "a fox runs", "num_inference_steps": 2, "seed": 1})  # safety check: on by default
    fal = httpx.post(f"{server.base}/fal-ai/wan-vace-14b", headers=AUTH, timeout=30, json={
        "prompt": "a fox runs", "num_inference_steps": 2, "seed": 1, "enable_safety_checker": True,
        "enable_prompt_expansion": True, "ref_image_urls": [_png_uri((255, 0, 255))]})
    assert fal.status_code == 200, fal.text
    fal_id = fal.json()["request_id"]
    vid = write_video(np.full((17, 48, 64, 3), 90, np.uint8), tmp_path / "in.mp4", fps=16)
    aiml = httpx.post(f"{server.base}/v2/video/generations", headers=AUTH, timeout=30, json={
        "model": "alibaba/wan2.2-vace-fun-a14b-outpainting", "prompt": "a fox runs", "seed": 1, "expand_left": True,
        "num_inference_steps": 2, "enable_safety_checker": True, "enable_prompt_expansion": True,
        "video_url": "data:video/mp4;base64," + base64.b64encode(vid.read_bytes()).decode()})
    assert aiml.status_code == 201, aiml.text
    aiml_id = aiml.json()["id"]
    for jid in (ws["id"], fal_id, aiml_id.split(":")[0]):  # AI/ML's id is `<job id>:<model>`
        assert server.wait(jid, _terminal, 120, "the job")["status"] == "succeeded", server.logs(jid)

    data = server.get(ws["id"])
    assert data["has_nsfw_contents"] == [False] and "TINY smoke-test classifier" in data["safety_checker"]
    res = httpx.get(f"{server.base}/fal-ai/wan-vace-14b/requests/{fal_id}", headers=AUTH, timeout=10).json()
    assert res["prompt"] == TINY_EXPANSION and res["has_nsfw_concepts"] == [True], res
    assert "TINY smoke-test classifier" in res["safety_checker"] and "TINY" in res["prompt_expansion"]
    meta = httpx.get(f"{server.base}/v2/video/generations", params={"generation_id": aiml_id}, headers=AUTH,
                     timeout=10).json()["meta"]
    assert meta["prompt"] == TINY_EXPANSION and meta["has_nsfw_concepts"] == [False], meta
    assert "TINY smoke-test classifier" in meta["safety_checker"]


def test_cancel_in_queue_and_mid_run(server, hold):
    long = server.submit({"prompt": "long", "num_inference_steps": 4})  # held after step 1 until the cancel
    queued = server.submit({"prompt": "queued", "num_inference_steps": 2})
    r = httpx.post(f"{server.base}/api/v3/predictions/{queued['id']}/cancel", headers=AUTH).json()["data"]
    assert r["status"] == "failed" and "cancelled" in r["error"]
    server.wait(long["id"], _held, 60, "denoising to hold after step 1")
    t = time.time()
    httpx.post(f"{server.base}/api/v3/predictions/{long['id']}/cancel", headers=AUTH)
    row = server.wait(long["id"], _terminal, 30, "cancel to take effect")
    assert row["status"] == "cancelled" and row["step"] == 1, row  # stopped at the step it was on
    assert time.time() - t < 30
    assert server.get(long["id"])["status"] == "failed"
    assert server.row(queued["id"])["started_at"] is None  # never ran
    assert not (server.data_dir / "outputs" / long["id"] / "output.mp4").exists()


def test_worker_crash_requeues_once_and_worker_restarts(server, hold):
    job = server.submit({"prompt": "crash", "num_inference_steps": 4})
    server.wait(job["id"], _held, 60, "denoising to hold after step 1")
    [pid] = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    hold.unlink()  # the re-queued attempt runs through
    row = server.wait(job["id"], _terminal, 120, "the re-queued job to finish")
    assert row["status"] == "succeeded" and row["attempts"] == 2, row
    assert any("worker process died (killed by signal SIGKILL)" in m for m in server.logs(job["id"]))
    deadline = time.time() + 60
    while time.time() < deadline and httpx.get(f"{server.base}/ready", headers=AUTH).status_code != 200:
        time.sleep(0.3)
    assert server.worker_pids() and server.worker_pids() != [pid]


def test_concurrent_submissions_none_lost(tmp_path, tiny_cache):
    srv = LiveServer(tmp_path / "conc", tiny_cache, workers="0").start(30)
    try:
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(lambda i: srv.submit({"prompt": f"p{i}", "seed": i})["id"], range(60)))
        assert len(set(ids)) == 60
        with sqlite3.connect(srv.data_dir / "jobs.db") as c:
            q = "SELECT id, created_at FROM jobs WHERE status = 'queued' ORDER BY created_at, id"
            rows = c.execute(q).fetchall()
        assert sorted(r[0] for r in rows) == sorted(ids)
        from server.store import Store

        store = Store(f"sqlite:///{srv.data_dir / 'jobs.db'}")
        assert [store.queue_position(r[0]) for r in rows] == list(range(60))
        store.dispose()
    finally:
        srv.stop()


def test_sigkill_server_mid_job_then_restart(tmp_path, tiny_cache):
    # The job holds after its first denoising step (VACE_TINY_HOLD_FILE), so the kill lands mid-run for certain.
    hold = tmp_path / "hold"
    hold.touch()
    srv = LiveServer(tmp_path / "restart", tiny_cache, extra_env={"VACE_TINY_HOLD_FILE": str(hold)}).start()
    try:
        running = srv.submit({"prompt": "interrupted", "num_inference_steps": 4})
        waiting = [srv.submit({"prompt": f"w{i}", "num_inference_steps": 2}) for i in range(2)]
        srv.wait(running["id"], _held, 60, "denoising to hold after step 1")
        [worker_pid] = srv.worker_pids()
        srv.kill9()
        assert _pid_gone(worker_pid, 10), "the worker outlived its SIGKILLed server"
        assert srv.row(running["id"])["status"] == "running"  # as left by the dead server
        hold.unlink()

        srv2 = LiveServer(srv.data_dir, tiny_cache)
        srv.port, srv.base = srv2.port, srv2.base
        srv.start()
        rows = [srv.wait(j["id"], _terminal, 120, "jobs after restart") for j in [running, *waiting]]
        assert [r["status"] for r in rows] == ["succeeded"] * 3, rows
        assert rows[0]["attempts"] == 2
        assert any("server restarted" in m for m in srv.logs(running["id"]))
        assert srv.get(running["id"])["outputs"][0].endswith("output.mp4")
    finally:
        srv.stop()


def test_ready_is_503_while_the_model_cannot_load(tmp_path, tiny_cache):
    srv = LiveServer(tmp_path / "noload", tiny_cache, model="no-such-model-anywhere").start(wait_ready=False)
    try:
        deadline = time.time() + 90
        seen = None
        while time.time() < deadline:
            try:
                r = httpx.get(f"{srv.base}/ready", headers=AUTH, timeout=2)
            except httpx.HTTPError:
                time.sleep(0.3)
                continue
            assert r.status_code == 503, r.text
            w = r.json()["workers"]
            if w and "failed to load" in (w[0]["message"] or ""):
                seen = w[0]
                break
            time.sleep(0.3)
        assert seen is not None, "the load failure never showed on /ready"
        assert httpx.get(f"{srv.base}/health").status_code == 200
        workers = httpx.get(f"{srv.base}/ready", headers=AUTH).json()["workers"]
        assert len(workers) == 1  # one row per slot, not per restart
    finally:
        srv.stop()
