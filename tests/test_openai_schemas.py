"""Fast unit tests of the OpenAI videos dialect: request schema → JobSpec, form decoding, references, model
names, the error envelope and list pagination on a real SQLite store."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.datastructures import Headers, UploadFile

from server.dialects.openai.render import render_error, render_video
from server.dialects.openai.schemas import NAME, InputReferenceObject
from server.dialects.openai.serving import (
    Reference,
    form_to_dict,
    frames_for,
    list_jobs,
    model_problem,
    parse_request,
    reference_of,
    seconds_text,
    to_spec,
)
from server.errors import ApiError
from server.services import Services
from server.settings import Settings
from server.store import Store

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vace"


def _spec(body: dict, ref: Reference | None = None):  # noqa: ANN202
    return to_spec(parse_request(body), ref)


def _field_error(body: dict, ref: Reference | None = None) -> ApiError:
    with pytest.raises(ApiError) as e:
        _spec(body, ref)
    assert e.value.status_code == 400
    return e.value


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Services]:
    settings = Settings(model="wan2.1-vace-14b", data_dir=tmp_path, model_map={"veo-3": "wan2.1-vace-14b"})
    settings.prepare_dirs()
    store = Store(settings.db_url)
    store.create_all()
    services = Services.build(settings, store)
    yield services
    services.close()
    store.dispose()


def test_seconds_become_4k_plus_1_frames_at_16_fps():
    assert [frames_for(s) for s in ("1", "4", "8", "12", "15", "2.5", "1.1")] == [17, 65, 129, 193, 241, 41, 21]
    assert seconds_text(65, 16) == "4" and seconds_text(41, 16) == "2.5"
    spec, _ = _spec({"prompt": "a cat", "seconds": 8})  # a JSON number is accepted too
    assert (spec.num_frames, spec.fps) == (129, 16)
    spec, _ = _spec({"prompt": "a cat", "seconds": "60"})  # up to VACE_MAX_FRAMES (961), in windows
    assert spec.num_frames == 961


@pytest.mark.parametrize("seconds", ["0.5", "61", "abc", True, ""])
def test_bad_seconds_name_the_field(seconds):
    assert _field_error({"prompt": "x", "seconds": seconds}).field == "seconds"


def test_defaults_follow_the_sdk():
    spec, notes = _spec({"prompt": "a cat"})
    assert (spec.width, spec.height, spec.num_frames, spec.task) == (720, 1280, 65, "none")
    assert spec.inputs.first_image is None and not notes


@pytest.mark.parametrize("size", ["1000x7", "64*64", "64", "4096x64", "0x0", "64x64x64", " x "])
def test_bad_sizes_name_the_field(size):
    err = _field_error({"prompt": "x", "size": size})
    assert err.field == "size" and size.strip() in err.message


def test_vace_extras_reach_the_spec():
    spec, _ = _spec({"prompt": "p", "size": "832x480", "negative_prompt": "blur", "steps": "4",
                     "guidance_scale": "3.5", "flow_shift": 5, "context_scale": "0.5", "seed": "9",
                     "sampler": "euler", "acceleration": "regular", "reference_images": "https://e.com/r.png",
                     "last_image": "https://e.com/l.png"})
    assert (spec.width, spec.height, spec.negative_prompt, spec.num_inference_steps) == (832, 480, "blur", 4)
    assert (spec.guidance_scale, spec.flow_shift, spec.context_scale, spec.seed) == (3.5, 5.0, 0.5, 9)
    assert (spec.sampler, spec.acceleration) == ("euler", "regular")
    assert spec.inputs.reference_images == ["https://e.com/r.png"] and spec.inputs.last_image == "https://e.com/l.png"


@pytest.mark.parametrize(("body", "field"), [
    ({"guidance_scale": 99}, "guidance_scale"), ({"steps": 0}, "steps"), ({"flow_shift": 0}, "flow_shift"),
    ({"context_scale": "nan"}, "context_scale"), ({"seed": -2}, "seed"), ({"task": "dance"}, "task"),
    ({"reference_images": ["u"] * 6}, "reference_images"), ({"prompt": "  "}, "prompt"),
    ({"task": "pose"}, "task"), ({"mask_image": "https://e.com/m.png"}, "mask_image"),
    ({"video": "https://e.com/v.mp4", "task": "inpainting"}, "task"), ({"colour": "red"}, "colour"),
])
def test_bad_extras_name_the_field(body, field):
    err = _field_error({"prompt": "x", **body})
    assert err.field == field, err.message
    assert err.message.startswith(f"{field}: ")


def test_unknown_parameter_is_openais_code():
    err = _field_error({"prompt": "x", "colour": "red"})
    assert err.error_type == "unknown_parameter" and "prompt" in err.message


def test_image_reference_is_the_first_frame_and_a_video_the_control_video():
    spec, notes = _spec({"prompt": "x"}, Reference("image", "https://e.com/a.png"))
    assert spec.inputs.first_image == "https://e.com/a.png" and spec.task == "none" and notes
    spec, _ = _spec({"prompt": "x"}, Reference("video", "https://e.com/a.mp4"))
    assert spec.inputs.video == "https://e.com/a.mp4" and spec.task == "depth"
    spec, _ = _spec({"prompt": "x", "task": "none"}, Reference("video", "https://e.com/a.mp4"))
    assert spec.task == "none"
    assert _field_error({"prompt": "x", "first_image": "https://e.com/b.png"},
                        Reference("image", "https://e.com/a.png")).field == "input_reference"
    assert _field_error({"prompt": "x", "video": "https://e.com/b.mp4"},
                        Reference("video", "https://e.com/a.mp4")).field == "input_reference"


def test_form_fields_decode_as_the_sdk_encodes_them():
    up = UploadFile(io.BytesIO(b"x"), filename="a.png", headers=Headers({"content-type": "image/png"}))
    body, upload = form_to_dict([("prompt", "p"), ("reference_images[]", "a"), ("reference_images[]", "b"),
                                 ("input_reference", up), ("steps", "2")])
    assert body == {"prompt": "p", "reference_images": ["a", "b"], "steps": "2"} and upload is up
    body, upload = form_to_dict([("prompt", "p"), ("input_reference[image_url]", "https://e.com/a.png")])
    assert body["input_reference"] == {"image_url": "https://e.com/a.png"} and upload is None
    assert parse_request(body).input_reference == InputReferenceObject(image_url="https://e.com/a.png")
    with pytest.raises(ApiError) as e:
        form_to_dict([("video", up)])
    assert e.value.field == "video"


def test_reference_kind_from_data_uri_bytes():
    png = base64.b64encode((FIXTURES / "girl.png").read_bytes()).decode()
    mp4 = base64.b64encode((FIXTURES / "test.mp4").read_bytes()[:4096]).decode()
    assert reference_of(f"data:image/png;base64,{png}").kind == "image"
    assert reference_of(InputReferenceObject(image_url=f"data:video/mp4;base64,{mp4}")).kind == "video"
    assert reference_of("https://e.com/clip").kind == "image"
    with pytest.raises(ApiError) as e:
        reference_of(InputReferenceObject(file_id="file-123"))
    assert e.value.field == "input_reference.file_id"


def test_model_names(core):
    for ok in ("sora-2", "sora-2-pro", "sora-2-2025-10-06", "sora-2-pro-2025-10-06", "wan2.1-vace-14b", "veo-3"):
        assert model_problem(core.settings, ok) is None, ok
    problem = model_problem(core.settings, "gpt-video")
    assert problem and "VACE_MODEL_MAP" in problem


def test_error_envelope():
    resp = render_error(None, ApiError(422, "size: bad", field="size", error_type="validation_error"))  # type: ignore[arg-type]
    assert resp.status_code == 400
    assert json.loads(resp.body) == {"error": {"message": "size: bad", "type": "invalid_request_error",
                                               "param": "size", "code": "invalid_value"}}
    resp = render_error(None, ApiError(500, "boom", error_type="internal_error"))  # type: ignore[arg-type]
    assert json.loads(resp.body)["error"]["type"] == "server_error"


def test_list_pages_by_cursor_and_only_this_dialect(core):
    spec, _ = _spec({"prompt": "x", "size": "64x64", "seconds": "1"})
    ids = [core.jobs.create_job_sync(spec, dialect=NAME, model_id="sora-2", base_url="http://h").id for _ in range(5)]
    core.jobs.create_job_sync(spec, dialect="wavespeed", model_id="w", base_url="http://h")

    def pages(**kw):  # noqa: ANN003, ANN202 - the dialect's async list, run as a handler would
        return asyncio.run(list_jobs(core.api, **kw))

    page, more = pages(after=None, limit=2, order="desc")
    assert [j.id for j in page] == ids[::-1][:2] and more
    page, more = pages(after=page[-1].id, limit=10, order="desc")
    assert [j.id for j in page] == ids[::-1][2:] and not more
    page, more = pages(after=ids[1], limit=10, order="asc")
    assert [j.id for j in page] == ids[2:] and not more
    with pytest.raises(ApiError) as e:
        pages(after="nope", limit=1, order="asc")
    assert e.value.field == "after"
    video = render_video(page[0], core.settings.retention_hours)
    assert (video["object"], video["status"], video["seconds"], video["size"], video["progress"]) == (
        "video", "queued", "1", "64x64", 0)


def test_other_v1_paths_answer_in_openais_envelope(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app

    app = create_app(Settings(model="tiny", data_dir=tmp_path, workers="0"), start_workers=False)
    with TestClient(app) as c:
        assert c.put("/v1/videos").status_code == 405
        r = c.post("/v1/videos/abc/remix")
        assert r.status_code == 404 and "remix" in r.json()["error"]["message"]
        r = c.get("/v1/videos", params={"limit": "0"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
        r = c.get("/v1/videos/abc/content", params={"variant": "gif"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "variant"
        assert c.get("/v1/videos").json() == {"object": "list", "data": [], "first_id": None, "last_id": None,
                                              "has_more": False}
