"""Submit-latency benchmark: N concurrent clients POST WaveSpeed submits while a job runs on the worker.

    .venv/bin/python scripts/bench_api.py --clients 50 --requests 20             # closed loop (saturation)
    .venv/bin/python scripts/bench_api.py --clients 50 --requests 20 --rate 1    # 50 clients x 1 submit/s

Starts `python -m server --model tiny` on a free loopback port with a fresh data dir (or use --url for a
running server), starts one long job so a worker is busy denoising, then runs the clients (closed loop,
httpx async, keep-alive) and prints p50/p90/p99/max submit latency as JSON. Not a test: figures go in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vace_local.core.config import vace_settings  # noqa: E402 - after the repository is on the path

SUBMIT = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workers: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    data = tempfile.mkdtemp(prefix="vace-bench-")
    env = {"VACE_TINY_MAX_SIDE": "64", "VACE_TINY_MAX_FRAMES": "17", **os.environ}  # small tiny jobs unless set
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", "tiny", "--port", str(port), "--data-dir",
                             data, "--workers", workers, "--log-level", "warning"], cwd=ROOT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


async def run_clients(base: str, clients: int, requests: int, headers: dict[str, str],
                      rate: float = 0.0) -> list[float]:
    lat: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30, headers=headers) as http:

        async def one_client(c: int) -> None:
            start = time.perf_counter() + (c / clients / rate if rate else 0.0)  # spread the phases
            for i in range(requests):
                if rate:  # open loop: each client submits on its own schedule, whatever the latency
                    await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                t = time.perf_counter()
                r = await http.post(SUBMIT, json={"prompt": f"bench {c}-{i}", "num_inference_steps": 1})
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text}")

        # warm-up: open the connections
        await asyncio.gather(*(http.get("/health") for _ in range(clients)))
        await asyncio.gather(*(one_client(c) for c in range(clients)))
    return lat


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--api-key", default=vace_settings().bench_key, help="default: VACE_BENCH_KEY")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="submits per client")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="submits per second per client (open loop); 0 = closed loop, as fast as possible")
    ap.add_argument("--no-busy-job", action="store_true", help="do not keep a worker busy during the run")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    proc = None
    base = args.url
    if base is None:
        proc, base = start_server("1")
    try:
        busy = None
        if not args.no_busy_job:
            busy = httpx.post(base + SUBMIT, json={"prompt": "busy", "num_inference_steps": 40},
                              headers=headers).json()["data"]["id"]
            time.sleep(3)  # let the worker claim it and start denoising
        t0 = time.perf_counter()
        lat = asyncio.run(run_clients(base, args.clients, args.requests, headers, args.rate))
        wall = time.perf_counter() - t0
        busy_status = None
        if busy:
            busy_status = httpx.get(f"{base}/api/v3/predictions/{busy}", headers=headers).json()["data"]["status"]
        ms = [x * 1000 for x in lat]
        print(json.dumps({
            "clients": args.clients, "rate_per_client": args.rate or "closed-loop", "requests": len(ms),
            "wall_s": round(wall, 2),
            "throughput_rps": round(len(ms) / wall, 1),
            "p50_ms": round(pct(ms, 50), 2), "p90_ms": round(pct(ms, 90), 2), "p99_ms": round(pct(ms, 99), 2),
            "max_ms": round(max(ms), 2), "mean_ms": round(statistics.fmean(ms), 2),
            "busy_job_status_after": busy_status, "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        }, indent=2))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
