"""Two real `python -m server` instances (tiny model, one CPU worker each) on one real PostgreSQL server and one
shared data dir: any instance answers any job in the WaveSpeed and fal dialects; starting a second instance
leaves the first one's running job alone; a SIGKILLed instance's job is recovered when its lease runs out and
completes on the other; every job completes exactly once; every webhook is delivered exactly once.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from server.store import Store
from tests.test_server_live import AUTH, LiveServer

LEASE_S = 5.0
LONG_STEPS = 40
#: Jobs besides the long one; kept small for CI (VACE_TEST_MULTI_SHORT_JOBS=19 runs the issue's 20 jobs).
SHORT_JOBS = int(os.environ.get("VACE_TEST_MULTI_SHORT_JOBS", "6"))
FAL = "/fal-ai/wan-vace-14b"
FAL_AUTH = {"Authorization": AUTH["Authorization"].replace("Bearer", "Key")}


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with _Hooks.lock:
            _Hooks.received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def hook_url():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Hooks.received.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}/hook"
    srv.shutdown()


def _instance(name: str, data_dir: Path, cache: Path, db_url: str, hold: Path | None = None) -> LiveServer:
    # Small jobs (64 px, 17 frames). With `hold` (VACE_TINY_HOLD_FILE) the instance's jobs hold after their
    # first step while that file exists: box-a's long job is mid-run when box-a is killed, whatever the load.
    env = {"VACE_DATABASE_URL": db_url, "VACE_INSTANCE_ID": name, "VACE_HEARTBEAT_TIMEOUT_S": str(LEASE_S),
           "VACE_TINY_MAX_SIDE": "64", "VACE_TINY_MAX_FRAMES": "17"}
    if hold is not None:
        env["VACE_TINY_HOLD_FILE"] = str(hold)
    return LiveServer(data_dir, cache, extra_env=env)


def _submit_wavespeed(srv: LiveServer, prompt: str, steps: int, hook: str) -> str:
    return srv.submit({"prompt": prompt, "num_inference_steps": steps}, webhook=hook)["id"]


def _submit_fal(srv: LiveServer, prompt: str, steps: int, hook: str) -> str:
    r = httpx.post(srv.base + FAL, json={"prompt": prompt, "num_inference_steps": steps},
                   params={"fal_webhook": hook}, headers=FAL_AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _answers(srv: LiveServer, jid: str, dialect: str) -> bool:
    if dialect == "wavespeed":
        r = httpx.get(f"{srv.base}/api/v3/predictions/{jid}/result", headers=AUTH, timeout=10)
        return r.status_code == 200 and r.json()["data"]["id"] == jid
    r = httpx.get(f"{srv.base}{FAL}/requests/{jid}/status", headers=FAL_AUTH, timeout=10)
    return r.status_code in (200, 202) and r.json()["request_id"] == jid


def _queue_position(srv: LiveServer, jid: str) -> int | None:
    return httpx.get(f"{srv.base}{FAL}/requests/{jid}/status", headers=FAL_AUTH, timeout=10).json().get(
        "queue_position")


def _queue_depth(srv: LiveServer) -> float:
    metrics = httpx.get(f"{srv.base}/metrics", headers=AUTH, timeout=10).text
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vace_queue_depth "))


def _same_view(a: LiveServer, b: LiveServer, view) -> bool:
    """Both instances report the same `view` of the shared queue (read a, b, a: retried if the queue moved)."""
    for _ in range(5):
        first, other, again = view(a), view(b), view(a)
        if first == again:
            return first == other
    raise AssertionError("the queue kept moving")


def _health(srv: LiveServer) -> bool:
    assert srv.proc is not None and srv.proc.poll() is None, srv.log.read_text()[-3000:]
    try:
        return httpx.get(f"{srv.base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timeout waiting for {what}")


def test_two_instances_share_one_queue(pg_cluster, tmp_path, hook_url):
    db_url = pg_cluster.create_database()
    data, cache = tmp_path / "shared-data", tmp_path / "cache"
    store = Store(db_url)
    hold = tmp_path / "hold-box-a"
    hold.touch()
    a = _instance("box-a", data, cache, db_url, hold=hold)
    b = _instance("box-b", data, cache, db_url)
    t0 = time.time()
    phases: dict[str, float] = {}
    try:
        a.start()
        phases["a_ready"] = time.time() - t0
        long_id = _submit_wavespeed(a, "runs on box-a, then box-a dies", LONG_STEPS, hook_url)
        running = _wait(lambda: (j := store.get_job(long_id)) and j.stage == "generate" and j.step >= 1 and j,
                        90, "the first job to denoise on box-a")  # and hold there: box-a's worker is busy
        phases["long_generating"] = time.time() - t0
        # A second instance on the same store: box-a's running job and worker rows stay as they are. Its API
        # answers once its supervisor has started (recovery included); its worker loads meanwhile.
        b.start(wait_ready=False)
        _wait(lambda: _health(b), 60, "box-b's API")
        after = store.get_job(long_id)
        assert (after.status, after.worker_id, after.attempts) == ("running", running.worker_id, 1), after
        assert {w["instance"] for w in store.list_workers()} == {"box-a", "box-b"}
        assert after.lease_expires_at > time.time()

        # more jobs, round-robin over both instances and both dialects
        jobs: dict[str, str] = {long_id: "wavespeed"}
        for i in range(SHORT_JOBS):
            srv, dialect = (a, b)[i % 2], ("wavespeed", "fal")[(i // 2) % 2]
            submit = _submit_wavespeed if dialect == "wavespeed" else _submit_fal
            jobs[submit(srv, f"job {i}", 2, hook_url)] = dialect
        for jid, dialect in jobs.items():
            assert _answers(a, jid, dialect) and _answers(b, jid, dialect), f"{dialect} {jid} not answered by both"
        last_fal = [j for j, d in jobs.items() if d == "fal"][-1]
        assert _same_view(a, b, lambda srv: (_queue_position(srv, last_fal), _queue_depth(srv))), \
            "the instances disagree on queue position / depth"

        phases["b_ready_and_submitted"] = time.time() - t0
        mid = store.get_job(long_id)
        assert mid.status == "running" and mid.step < LONG_STEPS, f"the long job is not mid-run: {mid}"
        a.kill9()  # mid-job: its worker notices its parent is gone and exits; the lease is left to run out
        killed_at = time.time()
        _wait(lambda: store.get_job(long_id).status != "running", LEASE_S + 20, "the lease to expire")
        recovered_after = time.time() - killed_at
        final = {jid: _wait(lambda j=jid: (r := store.get_job(j, with_logs=True)).terminal and r, 180,
                            f"job {jid}") for jid in jobs}
        phases["all_done"] = time.time() - t0
        _wait(lambda: len(_Hooks.received) >= len(jobs), 30, "every webhook")
        time.sleep(1.5)  # a duplicate delivery would arrive within a webhook-loop round or two
        workers = {w["id"]: w["instance"] for w in store.list_workers()}
        downloads = {jid: httpx.get(f"{b.base}/files/outputs/{jid}/{r.outputs[0]['file']}", headers=AUTH, timeout=30)
                     for jid, r in final.items() if r.outputs}
    finally:
        a.stop()
        b.stop()
        store.dispose()

    statuses = Counter(r.status for r in final.values())
    starts = {jid: sum(m["message"].startswith("started on worker") for m in r.logs) for jid, r in final.items()}
    completions = {jid: sum(m["message"].startswith("completed in") for m in r.logs) for jid, r in final.items()}
    hooks = Counter(h.get("id") or h.get("request_id") for h in _Hooks.received)
    print(f"\nmulti-instance: jobs={len(jobs)} kills=1 lease={LEASE_S:g}s recovered_after={recovered_after:.1f}s "
          f"statuses={dict(statuses)} starts={sorted(starts.values())} webhooks={sum(hooks.values())} "
          f"phases={ {k: round(v, 1) for k, v in phases.items()} }")
    assert statuses == {"succeeded": len(jobs)}, {j: (r.status, r.error) for j, r in final.items()}
    assert all(n == 1 for n in completions.values()), completions  # no duplicates
    assert starts[long_id] == 2 and all(n == 1 for j, n in starts.items() if j != long_id), starts
    long = final[long_id]
    assert long.attempts == 2 and workers.get(long.worker_id) == "box-b", (long.worker_id, workers)
    assert any("lease of worker" in m["message"] and "recovered by instance box-b" in m["message"]
               for m in long.logs), [m["message"] for m in long.logs]
    assert recovered_after < LEASE_S + 5, f"recovered {recovered_after:.1f} s after the kill"
    assert hooks == Counter(dict.fromkeys(jobs, 1)), hooks  # every webhook exactly once, none lost
    # every output (whichever box wrote it into the shared data dir) downloads from the surviving box
    assert sorted(downloads) == sorted(jobs)
    assert all(r.status_code == 200 and r.content[4:8] == b"ftyp" for r in downloads.values())
