"""Live: the official `openai` SDK's `client.videos`, unchanged but for base_url and api_key, against a real
`python -m server --model tiny` (one CPU worker, 64 px / 17 frames / 2 steps caps), read back with ffmpeg."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.test_server_live import AUTH, FIXTURES, KEY, LiveServer

openai = pytest.importorskip("openai")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
#: The SDK marks client.videos deprecated (OpenAI's own Sora service shuts down); the methods work unchanged.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = Path(os.environ.get("VACE_CACHE_DIR") or tmp_path_factory.mktemp("vace-cache"))
    srv = LiveServer(tmp_path_factory.mktemp("openai"), cache, extra_env={"VACE_TINY_MAX_STEPS": "2"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=60)


def _read_back(path: Path) -> tuple[str, tuple[int, int], int]:
    """(codec, (width, height), decoded frame count), every frame decoded by ffmpeg."""
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    return meta["codec"], tuple(meta["size"]), sum(1 for _ in frames)


def _spec(server: LiveServer, video_id: str) -> dict:
    return json.loads(server.row(video_id)["spec"])


def test_create_with_image_reference_poll_and_download(server, client, tmp_path):
    with open(FIXTURES / "girl.png", "rb") as f:
        video = client.videos.create(prompt="a girl turns her head", model="sora-2", seconds="1", size="64x48",
                                     input_reference=f, extra_body={"num_inference_steps": 2, "seed": 7})
    assert video.object == "video" and video.status in ("queued", "in_progress")
    assert (video.model, video.seconds, video.size, video.remixed_from_video_id) == ("sora-2", "1", "64x48", None)
    spec = _spec(server, video.id)
    assert spec["inputs"]["first_image"] and not spec["inputs"]["video"]  # the image became the first frame
    assert (spec["num_frames"], spec["width"], spec["height"], spec["seed"]) == (17, 64, 48, 7)

    deadline = time.time() + 120
    seen = set()
    while video.status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.3)
        video = client.videos.retrieve(video.id)
        seen.add((video.status, video.progress))
    assert video.status == "completed", (video, server.logs(video.id))
    assert video.progress == 100 and video.completed_at >= video.created_at and video.error is None
    assert all(0 <= p <= 100 for _, p in seen)

    out = tmp_path / "out.mp4"
    client.videos.download_content(video.id).write_to_file(out)
    assert _read_back(out) == ("h264", (64, 48), 17)

    with pytest.raises(openai.NotFoundError) as e:
        client.videos.download_content(video.id, variant="thumbnail")
    assert e.value.param == "variant"


def test_create_and_poll_with_extras_as_form_fields(server, client):
    png = base64.b64encode((FIXTURES / "snake.png").read_bytes()).decode()
    video = client.videos.create_and_poll(
        prompt="a snake", seconds="1", size="48x64", poll_interval_ms=300,
        extra_body={"reference_images": [f"data:image/png;base64,{png}"], "negative_prompt": "blur",
                    "steps": 1, "guidance_scale": 3.5, "flow_shift": 5, "context_scale": 0.5})
    assert video.status == "completed", (video, server.logs(video.id))
    spec = _spec(server, video.id)
    assert len(spec["inputs"]["reference_images"]) == 1 and spec["negative_prompt"] == "blur"
    assert (spec["num_inference_steps"], spec["guidance_scale"], spec["flow_shift"], spec["context_scale"]) == (
        1, 3.5, 5.0, 0.5)


def test_list_pages_and_delete(server, client):
    with open(FIXTURES / "test.mp4", "rb") as f:
        video = client.videos.create(prompt="a control video", seconds="1", size="64x64", input_reference=f,
                                     extra_body={"task": "none", "steps": 2})
    spec = _spec(server, video.id)
    assert spec["task"] == "none" and spec["inputs"]["video"] and not spec["inputs"]["first_image"]
    with open(FIXTURES / "test.mp4", "rb") as f:  # no task: the control video gives its depth
        default = client.videos.create(prompt="a control video", seconds="1", size="64x64", input_reference=f)
    assert _spec(server, default.id)["task"] == "depth"
    assert client.videos.delete(default.id).deleted  # still queued behind `video`: cancelled at once

    page = client.videos.list(limit=1)
    assert len(page.data) == 1 and page.data[0].id == video.id and page.has_more  # newest first
    ids = [v.id for v in client.videos.list(limit=1)]  # the SDK follows last_id → after
    assert len(ids) == len(set(ids)) >= 3 and ids[0] == video.id
    assert [v.id for v in client.videos.list(order="asc", limit=100)] == ids[::-1]

    deleted = client.videos.delete(video.id)  # queued or running: cancelled, then deleted
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert video.id not in [v.id for v in client.videos.list(limit=100)]
    assert not (server.data_dir / "outputs" / video.id).exists()


def test_json_body_with_image_url_data_uri(server, client):
    """Raw JSON clients (OpenAI's REST docs) send `input_reference: {"image_url": …}`; a data URI is stored here."""
    png = base64.b64encode((FIXTURES / "girl.png").read_bytes()).decode()
    r = httpx.post(f"{server.base}/v1/videos", headers=AUTH, timeout=30, json={
        "prompt": "x", "seconds": 1, "size": "64x64", "steps": 1,
        "input_reference": {"image_url": f"data:image/png;base64,{png}"}})
    assert r.status_code == 200, r.text
    video = r.json()
    first = _spec(server, video["id"])["inputs"]["first_image"]
    assert Path(first).is_file() and Path(first).is_relative_to(server.data_dir.resolve() / "uploads")
    assert client.videos.delete(video["id"]).deleted


def test_bad_requests_name_the_field(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", size="1000x7")
    assert e.value.param == "size" and "multiple of 16" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", extra_body={"guidance_scale": 99})
    assert e.value.param == "guidance_scale" and e.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", extra_body={"mask_image": "https://example.com/m.png"})
    assert e.value.param == "mask_image"
    with open(FIXTURES / "LICENSE.txt", "rb") as f, pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="x", input_reference=f)
    assert e.value.param == "input_reference"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("0" * 32)
    bad_key = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.videos.list()
