"""Hostile media: crafted files are refused with an error naming the field, and take nothing down.

Every file is made here, in code: a valid tiny H.264 mp4 (ffmpeg via imageio-ffmpeg) whose `stts` declares
2^31-1 samples (decord asks for ~51 GB and aborts), byte-flipped copies from a fixed seed, GIFs declaring a
16000x16000 canvas or 3000 frames of 4096x4096, and a PNG declaring 50000x50000. They go through the
sandbox directly, through fal's submit-time probe (the API process) and through WaveSpeed (decoded by the
worker), on a live `python -m server --model tiny` on loopback.
"""

from __future__ import annotations

import base64
import random
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_server_live import AUTH, LiveServer
from vace_local.core.errors import InputError
from vace_local.core.media import load_image, write_video
from vace_local.core.sandbox import vet_file

FAL = "/fal-ai/wan-vace-14b"


# ---- crafted files -------------------------------------------------------------------------------------

def valid_mp4(d: Path) -> bytes:
    """16 frames of 64x64 at 16 fps, H.264, about 3 KB."""
    x = np.linspace(0, 255, 64, dtype=np.float32)
    frames = np.stack([np.broadcast_to(((x + 16 * i) % 256).astype(np.uint8)[None, :, None], (64, 64, 3))
                       for i in range(16)])
    return write_video(frames, d / "valid.mp4", fps=16).read_bytes()


def stts_bomb(mp4: bytes, samples: int = 2**31 - 1) -> bytes:
    """The first `stts` entry's sample count patched: the file still plays, its index claims `samples`."""
    b = bytearray(mp4)
    i = b.find(b"stts")
    assert i > 0 and struct.unpack(">I", b[i + 8:i + 12])[0] >= 1
    b[i + 12:i + 16] = struct.pack(">I", samples)
    return bytes(b)


def flipped(mp4: bytes, count: int, seed: int = 9) -> list[bytes]:
    """`count` copies with 3 bytes damaged each, mostly in the `moov` index (where decoders trust sizes)."""
    rng = random.Random(seed)
    moov = mp4.find(b"moov") - 4
    out = []
    for _ in range(count):
        b = bytearray(mp4)
        for _ in range(3):
            j = rng.randrange(moov, len(b)) if rng.random() < 0.7 else rng.randrange(len(b))
            b[j] ^= (1 << rng.randrange(8)) if rng.random() < 0.5 else 0xFF
        out.append(bytes(b))
    return out


def gif_bomb(width: int, height: int, frames: int) -> bytes:
    """A GIF whose canvas is `width` x `height` and whose frames are each one pixel (23 bytes a frame)."""
    out = bytearray(b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff")
    out += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for _ in range(frames):
        out += b"!\xf9\x04\x00\x01\x00\x00\x00" + b"," + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00"
        out += b"\x02\x02\x44\x01\x00"
    return bytes(out + b";")


def png_bomb(width: int = 50000, height: int = 50000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def data_uri(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> bytes:
    return valid_mp4(tmp_path_factory.mktemp("media"))


# ---- the sandbox itself --------------------------------------------------------------------------------

def test_sandbox_reads_a_valid_clip_and_refuses_each_bomb_quickly(mp4, tmp_path):
    good = tmp_path / "good.mp4"
    good.write_bytes(mp4)
    facts = vet_file(good, "video", "video", decode=True)
    assert (facts.num_frames, facts.width, facts.height, facts.decoded) == (16, 64, 64, True)
    assert facts.fps == pytest.approx(16.0)

    cases = {
        "stts.mp4": (stts_bomb(mp4), "video", "memory limit"),
        "canvas.gif": (gif_bomb(16000, 16000, 3), "video", "16000x16000"),
        "frames.gif": (gif_bomb(4096, 4096, 3000), "video", "3000 frames"),
        "bomb.png": (png_bomb(), "image", "50000x50000"),
    }
    assert len(cases["canvas.gif"][0]) == 108 and len(cases["bomb.png"][0]) < 100
    for name, (raw, kind, why) in cases.items():
        p = tmp_path / name
        p.write_bytes(raw)
        t = time.monotonic()
        with pytest.raises(InputError) as err:
            vet_file(p, "video" if kind == "video" else "image", kind, decode=True)
        took = time.monotonic() - t
        assert why in err.value.message and err.value.field in ("video", "image"), err.value
        assert took < 10, f"{name} took {took:.1f} s to refuse"  # about 0.5 s on an idle machine


def test_load_image_checks_declared_pixels_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_bomb())
    with pytest.raises(InputError, match=r"first_image: declares 50000x50000"):
        load_image(p, "first_image")


# ---- live: fal's submit probe runs in the sandbox, the worker decodes only vetted files ----------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vace-cache")
    srv = LiveServer(tmp_path_factory.mktemp("hostile"), cache, workers="1").start(180)
    yield srv
    srv.stop()


class HealthWatch:
    """Polls /health from a thread while a battery runs: every answer, and the slowest one."""

    def __init__(self, base: str) -> None:
        self.base, self.failures, self.slowest = base, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.wait(0.1):
                t = time.monotonic()
                try:
                    ok = c.get(f"{self.base}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.slowest = max(self.slowest, time.monotonic() - t)
                self.failures += not ok

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fal_submit(live: LiveServer, body: dict) -> tuple[int, dict, float]:
    t = time.monotonic()
    r = httpx.post(live.base + FAL, json={"prompt": "x", **body}, headers=AUTH, timeout=60)
    return r.status_code, r.json(), time.monotonic() - t


def _restarts(live: LiveServer) -> int:
    """Worker processes started after the first (each restart gets a new worker row; /ready shows the last)."""
    with sqlite3.connect(live.data_dir / "jobs.db", timeout=10) as c:
        return c.execute("SELECT count(*) FROM workers").fetchone()[0] - 1


def test_fal_probe_refuses_crafted_videos_with_4xx_and_the_api_stays_up(live, mp4):
    pids = live.worker_pids()
    rss0 = _rss_kb(live.proc.pid)
    bombs = {"stts": stts_bomb(mp4), "canvas_gif": gif_bomb(16000, 16000, 3), "frames_gif": gif_bomb(4096, 4096, 3000)}
    with HealthWatch(live.base) as health:
        for name, raw in bombs.items():
            mime = "image/gif" if name.endswith("gif") else "video/mp4"
            code, body, took = _fal_submit(live, {"video_url": data_uri(raw, mime)})
            assert code == 422, (name, body)
            assert body["detail"][0]["loc"] == ["body", "video_url"], (name, body)
            assert took < 15, f"{name}: {took:.1f} s"  # about 0.6 s on an idle machine
            assert live.proc.poll() is None, f"the API process died on {name}"
        for raw in flipped(mp4, 30):
            code, body, _ = _fal_submit(live, {"video_url": data_uri(raw, "video/mp4"), "num_inference_steps": 2})
            assert code in (200, 422), body
            if code == 422:
                assert body["detail"][0]["loc"] == ["body", "video_url"], body
            else:  # a harmless flip: accepted; cancelled so the worker stays free for the next test
                httpx.put(f"{live.base}{FAL}/requests/{body['request_id']}/cancel", headers=AUTH, timeout=10)
            assert live.proc.poll() is None
    assert health.failures == 0 and health.slowest < 5, (health.failures, health.slowest)
    assert _rss_kb(live.proc.pid) - rss0 < 100_000  # the GIF bombs used to add ~760 MB
    assert live.worker_pids() == pids


def test_worker_fails_crafted_inputs_once_and_keeps_its_model(live, mp4):
    pids, restarts = live.worker_pids(), _restarts(live)
    videos = [stts_bomb(mp4), stts_bomb(mp4, 2**30), stts_bomb(mp4, 2**28), gif_bomb(16000, 16000, 3),
              gif_bomb(4096, 4096, 3000)]
    jobs = []
    with HealthWatch(live.base) as health:
        for raw in videos:
            mime = "image/gif" if raw[:3] == b"GIF" else "video/mp4"
            jobs.append((live.submit({"prompt": "x", "task": "none", "video": data_uri(raw, mime)})["id"], "video"))
        for field in ("images", "first_image"):  # WaveSpeed's still-image inputs
            value = [data_uri(png_bomb(), "image/png")] if field == "images" else data_uri(png_bomb(), "image/png")
            jobs.append((live.submit({"prompt": "x", field: value})["id"], "images[0]" if field == "images" else field))
        broken = [raw for raw in flipped(mp4, 40, seed=3) if raw[4:8] == b"ftyp"][:3]
        for raw in broken:
            jobs.append((live.submit({"prompt": "x", "task": "none", "video": data_uri(raw, "video/mp4"),
                                      "num_inference_steps": 2})["id"], "video"))
        assert len(jobs) == 10
        for jid, field in jobs:
            row = live.wait(jid, lambda r: r["status"] in ("succeeded", "failed", "cancelled"), 120, "job end")
            if row["status"] == "succeeded":  # a harmless flip: it decoded, it ran
                continue
            assert row["error_type"] == "input_error" and row["error"].startswith(f"input '{field}'"), row
            assert row["attempts"] == 1, row
        assert live.worker_pids() == pids and _restarts(live) == restarts
        ok = live.submit({"prompt": "after the storm", "num_inference_steps": 2, "enable_sync_mode": True})
        assert ok["status"] == "completed", ok
    assert health.failures == 0
    fails = [live.row(j)["error"] for j, _ in jobs[:5]]
    assert all("memory limit" in e for e in fails[:3]) and "16000x16000" in fails[3] and "3000 frames" in fails[4]
    assert "50000x50000" in live.row(jobs[5][0])["error"]
