"""AI/ML API request schemas and their JobSpec translation (pure functions, no server)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.dialects.aiml.schemas import AIML_MODELS
from server.dialects.aiml.serving import aiml_to_jobspec, parse_aiml_request
from server.dialects.common import FieldError, SourceInfo

VID = "https://example.com/v.mp4"
SRC = SourceInfo(num_frames=17, fps=16.0, width=640, height=360)


def tr(task: str, **body):
    body = {"model": f"alibaba/wan2.2-vace-fun-a14b-{task}", "video_url": VID, "prompt": "p", **body}
    return aiml_to_jobspec(parse_aiml_request(body), model="tiny", source=SRC)


def test_the_five_models():
    assert len(AIML_MODELS) == 5
    for model in AIML_MODELS:
        task = model.rsplit("-", 1)[1]
        assert tr(task).spec.task == task if task != "inpainting" else True


def test_unknown_model_is_rejected():
    with pytest.raises(KeyError):
        parse_aiml_request({"model": "alibaba/wan2.2-vace-fun-a14b-face", "video_url": VID, "prompt": "p"})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "p"}, "video_url"),
        ({"video_url": VID}, "prompt"),
        ({"num_frames": 17}, "num_frames"),  # AI/ML documents 81..241
        ({"image_list": ["a.png"]}, "image_list"),  # 2..4 images
        ({"image_list": ["a", "b", "c", "d", "e"]}, "image_list"),
        ({"resolution": "1080p"}, "resolution"),
        ({"frames_per_second": 4}, "frames_per_second"),
    ],
)
def test_bad_fields_are_named(body, field):
    full = {"model": "alibaba/wan2.2-vace-fun-a14b-pose", "video_url": VID, "prompt": "p", **body}
    for k in ("prompt", "video_url"):
        if k not in body and k == field:
            full.pop(k)
    with pytest.raises(ValidationError) as exc:
        parse_aiml_request(full)
    assert field in {str(e["loc"][0]) for e in exc.value.errors()}


def test_fields_map_like_fal():
    t = tr("pose", image_list=["a.png", "b.png"], image_url="f.png", last_image_url="l.png", shift=3,
           match_input_num_frames=True, resolution="240p", aspect_ratio="16:9", num_inference_steps=2,
           temporal_downsample_factor=1, sync_mode=True)
    s = t.spec
    assert s.inputs.reference_images == ["a.png", "b.png"]
    assert (s.inputs.first_image, s.inputs.last_image) == ("f.png", "l.png")
    assert (s.flow_shift, s.num_frames, s.width, s.height) == (3, 17, 416, 240)
    assert s.temporal.temporal_downsample_factor == 1
    assert t.sync_mode is False  # AI/ML's sync_mode is an audio setting, never a data-URI switch


def test_inpainting_mask_video_wins_and_a_mask_is_required():
    s = tr("inpainting", mask_video_url="m.mp4", mask_image_url="m.png").spec
    assert (s.task, s.inputs.mask_video, s.inputs.mask_image) == ("inpainting", "m.mp4", None)
    s = tr("inpainting", mask_image_url="m.png").spec
    assert s.inputs.mask_image == "m.png"
    with pytest.raises(FieldError):
        tr("inpainting")


def test_outpainting_and_reframe_fields():
    c = tr("outpainting", expand_top=True, expand_ratio=0.1).spec.control
    assert (c.expand_top, c.expand_ratio) == (True, 0.1)
    r = aiml_to_jobspec(parse_aiml_request({"model": "alibaba/wan2.2-vace-fun-a14b-reframe", "video_url": VID,
                                            "zoom_factor": 0.3, "trim_borders": False}), model="tiny", source=SRC)
    assert (r.spec.control.zoom_factor, r.spec.control.trim_borders, r.spec.prompt) == (0.3, False, "")


def test_empty_video_url_is_named():
    with pytest.raises(FieldError) as exc:
        tr("depth", video_url="")
    assert exc.value.field == "video_url"


def test_generation_id_must_match_its_model(tmp_path):
    """`<id>:<model>` finds the job only with its own model (or the bare id); another model's suffix is a 404."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, workers="0", api_keys=["k"], model="tiny"))
    with TestClient(app, headers={"Authorization": "Bearer k"}) as c:
        r = c.post("/v2/video/generations", json={"model": "alibaba/wan2.2-vace-fun-a14b-depth", "prompt": "p",
                                                  "video_url": VID, "resolution": "240p", "aspect_ratio": "16:9"})
        assert r.status_code == 201, r.text
        gid = r.json()["id"]
        assert c.get("/v2/video/generations", params={"generation_id": gid}).json()["status"] == "queued"
        assert c.get("/v2/video/generations", params={"generation_id": gid.split(":")[0]}).status_code == 200
        r = c.get("/v2/video/generations", params={"generation_id": gid.replace("-depth", "-pose")})
        assert r.status_code == 404 and set(r.json()) == {"message", "path", "requestId", "statusCode", "timestamp"}


def test_unknown_v2_paths_answer_in_the_aiml_shape(tmp_path):
    """/v2 paths without a route get a 404 (405 for other methods on /v2/video/generations) as
    {message, path, requestId, statusCode, timestamp}, not the fal catch-all's {detail}."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, workers="0", api_keys=["k"], model="tiny"))
    keys = {"message", "path", "requestId", "statusCode", "timestamp"}
    with TestClient(app, headers={"Authorization": "Bearer k"}) as c:
        for method, path, code in (("GET", "/v2/video/nothing", 404), ("POST", "/v2/video/nothing", 404),
                                   ("GET", "/v2/other", 404), ("DELETE", "/v2/video/generations", 405)):
            r = c.request(method, path)
            assert r.status_code == code and set(r.json()) == keys, (method, path, r.text)
            assert r.json()["path"] == path and r.json()["statusCode"] == code
