"""Live: the official `openai` SDK submits jobs with different `loras` back to back to one `--model tiny` server;
the worker switches adapters without reloading (same pid, same engine load), each job's metadata names its
adapters, a bad LoRA fails only its own job (naming `loras[0].path`), and a job without LoRA after them gives the
frames of the first job without LoRA."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_lora import diffusers_lora, kijai_lora
from tests.test_server_live import KEY, LiveServer

openai = pytest.importorskip("openai")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    loras = tmp_path_factory.mktemp("lora-dir")
    save_file(kijai_lora(), str(loras / "style_a.safetensors"))
    save_file(diffusers_lora(), str(loras / "style_b.safetensors"))
    save_file({"lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.ones(4, 320),
               "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.ones(320, 4),
               "lora_unet_down_blocks_0_proj_in.alpha": torch.tensor(4.0)}, str(loras / "sdxl.safetensors"))
    cache = Path(os.environ.get("VACE_CACHE_DIR") or tmp_path_factory.mktemp("vace-cache"))
    srv = LiveServer(tmp_path_factory.mktemp("lora-live"), cache,
                     extra_env={"VACE_TINY_MAX_STEPS": "2", "VACE_LORA_DIR": str(loras)}).start()
    yield srv
    srv.stop()


def _worker(server: LiveServer) -> tuple[int, float]:
    with sqlite3.connect(server.data_dir / "jobs.db", timeout=10) as c:
        return c.execute("SELECT pid, started_at FROM workers").fetchone()


def _frames(path: Path) -> np.ndarray:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen])


def test_openai_sdk_jobs_with_different_loras_on_one_loaded_worker(server, tmp_path):
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=60)
    # the SDK sends multipart: a list of objects travels as one JSON text (a JSON body takes the list itself)
    runs = [None, [{"path": "style_a", "scale": 0.7}], [{"path": "style_b.safetensors"}], None,
            [{"path": "sdxl"}], [{"path": "style_a", "scale": 0.7}], None]
    videos = []
    for loras in runs:
        extra = {"steps": 2, "seed": 5, "task": "none", **({"loras": json.dumps(loras)} if loras else {})}
        videos.append(client.videos.create(prompt="a red car", seconds="1", size="48x32", extra_body=extra))
    before = _worker(server)
    deadline = time.time() + 600
    done = []
    for v in videos:
        while v.status in ("queued", "in_progress") and time.time() < deadline:
            time.sleep(0.3)
            v = client.videos.retrieve(v.id)
        done.append(v)
    bad = done[4]
    assert bad.status == "failed" and "loras[0].path" in bad.error.message and "sdxl" in bad.error.message, bad
    ok = [v for i, v in enumerate(done) if i != 4]
    assert all(v.status == "completed" for v in ok), [(v.status, v.error) for v in ok]
    assert _worker(server) == before  # same worker process, never restarted or reloaded
    metas = {i: json.loads(next((server.data_dir / "outputs" / v.id).glob("*.json")).read_text())
             for i, v in enumerate(done) if i != 4}
    assert len({m["model"]["loaded_at"] for m in metas.values()}) == 1  # one engine load served every job
    files = {i: [x["file"] for x in m["sampling"]["loras"]] for i, m in metas.items()}
    assert files == {0: [], 1: ["style_a.safetensors"], 2: ["style_b.safetensors"], 3: [],
                     5: ["style_a.safetensors"], 6: []}
    assert metas[6]["model"]["lora_adapters"]["loads"] == 2  # style_a reused from memory the second time
    frames = {}
    for i in (0, 1, 2, 3, 5, 6):
        out = tmp_path / f"{i}.mp4"
        client.videos.download_content(done[i].id).write_to_file(out)
        frames[i] = _frames(out)
    assert np.array_equal(frames[0], frames[3]) and np.array_equal(frames[0], frames[6])
    assert np.array_equal(frames[1], frames[5])
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])
