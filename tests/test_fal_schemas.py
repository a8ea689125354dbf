"""fal request schemas and their JobSpec translation (pure functions, no server)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.dialects.common import FieldError, SourceInfo
from server.dialects.fal.schemas import FAL_NEGATIVE_PROMPT
from server.dialects.fal.serving import (
    fal_to_jobspec,
    output_size,
    parse_fal_request,
)
from vace_local.core.spec import round_frames_4k1 as frames_4k1

VID = "https://example.com/v.mp4"
HD = SourceInfo(num_frames=81, fps=16.0, width=1280, height=720)


def tr(endpoint: str, source: SourceInfo | None = HD, **body):
    body.setdefault("prompt", "a cat")
    return fal_to_jobspec(endpoint, parse_fal_request(endpoint, body), model="tiny", source=source)


def test_defaults_follow_the_published_schema():
    req = parse_fal_request("pose", {"prompt": "p", "video_url": VID})
    assert (req.num_frames, req.frames_per_second, req.shift, req.sampler) == (81, 16, 5.0, "unipc")
    assert (req.resolution, req.aspect_ratio, req.num_inference_steps, req.guidance_scale) == ("auto", "auto", 30, 5)
    assert req.negative_prompt == FAL_NEGATIVE_PROMPT and req.acceleration == "regular"
    assert req.interpolator_model == "film" and req.transparency_mode == "content_aware"
    reframe = parse_fal_request("reframe", {"video_url": VID})
    assert reframe.prompt == "" and reframe.match_input_num_frames and reframe.match_input_frames_per_second


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("pose", {"prompt": "p"}, "video_url"),
        ("depth", {"video_url": VID}, "prompt"),
        ("", {"prompt": "p", "num_frames": 16}, "num_frames"),
        ("", {"prompt": "p", "num_frames": 242}, "num_frames"),
        ("", {"prompt": "p", "frames_per_second": 31}, "frames_per_second"),
        ("", {"prompt": "p", "shift": 0.5}, "shift"),
        ("", {"prompt": "p", "sampler": "ddim"}, "sampler"),
        ("", {"prompt": "p", "resolution": "1080p"}, "resolution"),
        ("", {"prompt": "p", "aspect_ratio": "4:3"}, "aspect_ratio"),
        ("", {"prompt": "p", "num_inference_steps": 1}, "num_inference_steps"),
        ("", {"prompt": "p", "guidance_scale": 11}, "guidance_scale"),
        ("", {"prompt": "p", "task": "face"}, "task"),
        ("", {"prompt": "p", "temporal_downsample_factor": 6}, "temporal_downsample_factor"),
        ("", {"prompt": "p", "interpolator_model": "dain"}, "interpolator_model"),
        ("outpainting", {"prompt": "p", "video_url": VID, "expand_ratio": 1.5}, "expand_ratio"),
        ("reframe", {"video_url": VID, "zoom_factor": 0.95}, "zoom_factor"),
    ],
)
def test_bad_fields_are_named(endpoint, body, field):
    with pytest.raises(ValidationError) as exc:
        parse_fal_request(endpoint, body)
    assert field in {str(e["loc"][0]) for e in exc.value.errors()}


def test_geometry_tiers_and_aspects():
    assert output_size("480p", "16:9", None) == (832, 480)
    assert output_size("720p", "9:16", None) == (720, 1280)
    assert output_size("580p", "1:1", None) == (576, 576)
    assert output_size("auto", "auto", None) == (832, 480)
    assert output_size("auto", "auto", HD) == (1280, 720)
    portrait = SourceInfo(num_frames=25, fps=25, width=512, height=768)
    assert output_size("auto", "auto", portrait) == (480, 720)
    assert output_size("240p", "auto", portrait) == (240, 368)
    for res in ("240p", "360p", "480p", "580p", "720p"):
        for ar in ("auto", "16:9", "1:1", "9:16"):
            w, h = output_size(res, ar, portrait)
            assert w % 16 == 0 and h % 16 == 0


def test_frames_round_to_4k_plus_1():
    assert [frames_4k1(n) for n in (17, 18, 50, 81, 240, 241, 500)] == [17, 21, 53, 81, 241, 241, 241]


def test_pose_translation_maps_every_knob():
    t = tr("pose", video_url=VID, resolution="240p", aspect_ratio="16:9", num_frames=17, frames_per_second=8,
           shift=7, sampler="euler", seed=3, preprocess=True, num_inference_steps=2, guidance_scale=3,
           video_quality="low", video_write_mode="fast", return_frames_zip=True, transparency_mode="white",
           ref_image_urls=["a.png", "b.png"], first_frame_url="f.png", last_frame_url="l.png")
    s = t.spec
    assert (s.task, s.width, s.height, s.num_frames, s.fps) == ("pose", 416, 240, 17, 8)
    assert (s.flow_shift, s.sampler, s.seed, s.num_inference_steps, s.guidance_scale) == (7, "euler", 3, 2, 3)
    assert s.control.preprocess is True and s.control.transparency_mode == "white"
    assert (s.output.video_quality, s.output.video_write_mode, s.output.frames_zip) == ("low", "fast", True)
    assert s.inputs.reference_images == ["a.png", "b.png"]
    assert (s.inputs.first_image, s.inputs.last_image, s.inputs.video) == ("f.png", "l.png", VID)
    assert s.negative_prompt == FAL_NEGATIVE_PROMPT
    assert tr("pose", video_url=VID).spec.control.preprocess is False  # fal default: already a pose video
    assert tr("pose", video_url=VID).spec.seed == -1


def test_match_input_frames_and_fps():
    src = SourceInfo(num_frames=50, fps=25.0, width=640, height=360)
    s = tr("depth", source=src, video_url=VID, match_input_num_frames=True, match_input_frames_per_second=True).spec
    assert (s.num_frames, s.fps) == (53, 25)  # 50 frames → next 4k+1
    s = tr("depth", source=src, video_url=VID, match_input_num_frames=True, frames_per_second=10).spec
    assert (s.num_frames, s.fps) == (21, 10)  # 2 s of input at 10 fps = 20 frames → 21
    long = SourceInfo(num_frames=350, fps=50.0, width=960, height=540)
    s = tr("reframe", source=long, video_url=VID).spec  # reframe matches both by default
    assert (s.num_frames, s.fps) == (241, 50)  # the hosted limit by default
    s = tr("reframe", source=long, video_url=VID, long_video=True).spec  # vace-local extension: all of it
    assert (s.num_frames, s.fps, s.control.output_num_frames) == (353, 50, 350)


def test_outpainting_expands_and_follows_canvas_aspect():
    t = tr("outpainting", video_url=VID, resolution="240p", expand_left=True, expand_right=True,
           expand_ratio=0.5)
    c = t.spec.control
    assert (c.expand_left, c.expand_right, c.expand_top, c.expand_bottom, c.expand_ratio) == (True, True, False,
                                                                                              False, 0.5)
    assert (t.spec.width, t.spec.height) == (848, 240)  # 2560x720 canvas → 32:9
    assert t.spec.task == "outpainting"


def test_reframe_zoom_and_borders():
    t = tr("reframe", video_url=VID, zoom_factor=0.4, trim_borders=False, aspect_ratio="9:16", resolution="240p")
    assert (t.spec.control.zoom_factor, t.spec.control.trim_borders) == (0.4, False)
    assert (t.spec.width, t.spec.height) == (240, 416)
    bare = fal_to_jobspec("reframe", parse_fal_request("reframe", {"video_url": VID}), model="tiny", source=HD)
    assert bare.spec.prompt == ""


def test_mask_precedence_per_endpoint():
    both = {"video_url": VID, "mask_video_url": "m.mp4", "mask_image_url": "m.png"}
    inp = tr("inpainting", **both).spec.inputs
    assert (inp.mask_video, inp.mask_image) == ("m.mp4", None)
    base = tr("", **both)
    assert (base.spec.inputs.mask_video, base.spec.inputs.mask_image) == (None, "m.png")
    assert base.spec.task == "inpainting"  # masks and no explicit task → inpainting
    assert tr("", task="pose", **both).spec.task == "pose"
    with pytest.raises(FieldError) as exc:
        tr("inpainting", video_url=VID)
    assert exc.value.field == "mask_video_url"


def test_base_endpoint_tasks():
    assert tr("", source=None).spec.task == "none"  # no video: text/reference-to-video
    assert tr("", video_url=VID).spec.task == "depth"  # documented default task
    assert tr("", video_url=VID, task="outpainting").spec.task == "outpainting"


def test_too_many_reference_images_rejected():
    with pytest.raises(ValidationError, match="at most 5 reference images"):
        tr("pose", video_url=VID, ref_image_urls=[f"{i}.png" for i in range(6)])


def test_temporal_extras_and_interpolator():
    t = tr("pose", video_url=VID, temporal_downsample_factor=2, num_interpolated_frames=1,
           enable_auto_downsample=True, auto_downsample_min_fps=8)
    tm = t.spec.temporal
    assert (tm.temporal_downsample_factor, tm.num_interpolated_frames, tm.enable_auto_downsample) == (2, 1, True)
    assert tm.auto_downsample_min_fps == 8 and tm.interpolator == "flow"
    assert any("film" in n for n in t.notes)
    assert tr("reframe", video_url=VID, temporal_upsample_factor=2).spec.temporal.num_interpolated_frames == 2


def test_rife_is_used_when_its_weights_exist_else_served_by_flow(tmp_path, monkeypatch):
    """'rife' is a valid fal value: without weights it falls back to the flow interpolator (noted), never fails."""
    monkeypatch.setenv("VACE_RIFE_ONNX", str(tmp_path / "absent.onnx"))
    t = tr("pose", video_url=VID, interpolator_model="rife", num_interpolated_frames=1)
    assert t.spec.temporal.interpolator == "flow" and any("no RIFE weights" in n for n in t.notes)
    (tmp_path / "rife.onnx").write_bytes(b"onnx")
    monkeypatch.setenv("VACE_RIFE_ONNX", str(tmp_path / "rife.onnx"))
    assert tr("pose", video_url=VID, interpolator_model="rife").spec.temporal.interpolator == "rife"


def test_sync_mode_safety_and_expansion_fields():
    t = tr("pose", video_url=VID, sync_mode=True, acceleration="none", enable_safety_checker=True,
           enable_prompt_expansion=True)
    assert t.sync_mode is True
    assert t.spec.enable_safety_checker is True and t.spec.enable_prompt_expansion is True
    assert t.spec.acceleration == "none" and not t.ignored
    plain = tr("pose", video_url=VID).spec
    assert plain.enable_safety_checker is False and plain.enable_prompt_expansion is False


def test_acceleration_reaches_the_step_cache():
    assert tr("pose", video_url=VID).spec.acceleration == "regular"  # fal's default
    assert tr("pose", video_url=VID, acceleration="low").spec.acceleration == "low"


def test_model_mapping_rules():
    """tiny serves every id; a family mismatch is refused unless Settings.model_map maps it."""
    from server.dialects.common import check_served_model, served_note
    from server.settings import Settings

    def core(**kw):
        return Settings(**kw)

    wan22 = ("alibaba/wan2.2-vace-fun-a14b-pose", "wan2.2-vace-fun-a14b")
    assert check_served_model(core(model="tiny"), *wan22) is None
    assert check_served_model(core(model="wan2.2-vace-fun-a14b"), *wan22) is None
    refusal = check_served_model(core(model="wan2.1-vace-14b"), *wan22)
    assert refusal and "VACE_MODEL_MAP" in refusal and "wan2.1-vace-14b" in refusal
    mapped = core(model="wan2.1-vace-14b", model_map={"wan2.2-vace-fun-a14b": "wan2.1-vace-14b"})
    assert check_served_model(mapped, *wan22) is None
    assert "model mapping" in served_note(mapped, *wan22)
    by_id = core(model="wan2.1-vace-14b", model_map={"alibaba/wan2.2-vace-fun-a14b-pose": "wan2.1-vace-14b"})
    assert check_served_model(by_id, *wan22) is None
    # the Wan 2.2-shaped tiny model answers the Wan 2.2 ids (fal's and AI/ML's), not Wan 2.1's unless mapped
    fal22 = ("fal-ai/wan-22-vace-fun-a14b/depth", "wan2.2-vace-fun-a14b")
    fal21 = ("fal-ai/wan-vace-14b/depth", "wan2.1-vace-14b")
    assert check_served_model(core(model="tiny-two-expert"), *fal22) is None
    assert check_served_model(core(model="tiny-two-expert"), *wan22) is None
    assert "VACE_MODEL_MAP" in check_served_model(core(model="tiny-two-expert"), *fal21)
    assert check_served_model(core(model="tiny-two-expert", model_map={"wan2.1-vace-14b": "tiny-two-expert"}),
                              *fal21) is None
    assert "VACE_MODEL_MAP" in check_served_model(core(model="wan2.1-vace-14b"), *fal22)


def test_wan22_vace_fun_paths_share_the_wan_vace_14b_schemas():
    """`fal-ai/wan-22-vace-fun-a14b` has the five sub-paths (no base) with `wan-vace-14b`'s fields."""
    from server.dialects.fal.serving import split_app_path
    from server.errors import ApiError

    for sub in ("depth", "pose", "inpainting", "outpainting", "reframe"):
        app, endpoint = split_app_path(f"fal-ai/wan-22-vace-fun-a14b/{sub}")
        assert (app.app_id, app.family, endpoint) == ("fal-ai/wan-22-vace-fun-a14b", "wan2.2-vace-fun-a14b", sub)
    assert split_app_path("fal-ai/wan-vace-14b")[1] == ""
    for bad in ("fal-ai/wan-22-vace-fun-a14b", "fal-ai/wan-22-vace-fun-a14b/x", "fal-ai/wan-22-vace-fun-a14bx/pose"):
        with pytest.raises(ApiError) as exc:
            split_app_path(bad)
        assert exc.value.status_code == 404 and "fal-ai/wan-22-vace-fun-a14b/reframe" in exc.value.message


def test_missing_or_empty_video_and_orphan_masks_are_named():
    """An empty required URL or a mask without a video names the fal field (not a bare 'body' error)."""
    with pytest.raises(FieldError) as exc:
        tr("pose", video_url="")
    assert exc.value.field == "video_url" and "pose" in exc.value.message
    with pytest.raises(FieldError) as exc:
        tr("", source=None, mask_image_url="m.png")
    assert exc.value.field == "mask_image_url"
    with pytest.raises(FieldError) as exc:
        tr("", source=None, mask_video_url="m.mp4", task="inpainting")
    assert exc.value.field == "mask_video_url"


def test_probed_match_input_is_applied_once():
    """With a probed source the translation applies match_input_* itself, so the run path does not redo it
    (which would bypass server caps on num_frames); without a source the run path still applies them."""
    src = SourceInfo(num_frames=30, fps=25.0, width=160, height=96)
    s = tr("reframe", source=src, video_url=VID).spec
    assert (s.num_frames, s.fps) == (33, 25)
    assert not s.control.match_input_num_frames and not s.control.match_input_frames_per_second
    assert s.control.output_num_frames == 30  # generated at 33 (4k+1), returned as the input's 30
    s = tr("reframe", source=None, video_url=VID, resolution="240p", aspect_ratio="16:9").spec
    assert s.control.match_input_num_frames and s.control.match_input_frames_per_second


# ---- the routes over the real app and SQLite store, without workers (jobs stay queued) ----------------

@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    settings = Settings(data_dir=tmp_path, workers="0", api_keys=["k"], model="tiny")
    with TestClient(create_app(settings), headers={"Authorization": "Key k"}) as c:
        yield c


TEXT = {"prompt": "p", "resolution": "240p", "aspect_ratio": "16:9", "num_frames": 17}


def test_sub_path_request_routes_and_fal_404s(client):
    """status/result/cancel also answer with the sub-endpoint kept; unknown fal paths are 404s with detail."""
    rid = client.post("/fal-ai/wan-vace-14b/pose", json=dict(TEXT, video_url=VID, resolution="240p")).json()[
        "request_id"]
    r = client.get(f"/fal-ai/wan-vace-14b/pose/requests/{rid}/status", params={"logs": "1"})
    assert r.status_code == 202 and r.json()["status"] == "IN_QUEUE" and isinstance(r.json()["logs"], list)
    r = client.get(f"/fal-ai/wan-vace-14b/pose/requests/{rid}")
    assert r.status_code == 400 and r.json()["detail"] == "Request is still in progress"
    assert client.get(f"/fal-ai/wan-vace-14b/face/requests/{rid}/status").status_code == 404
    r = client.put(f"/fal-ai/wan-vace-14b/depth/requests/{rid}/cancel")
    assert r.status_code == 202 and r.json() == {"status": "CANCELLATION_REQUESTED"}
    r = client.put(f"/fal-ai/wan-vace-14b/requests/{rid}/cancel")
    assert r.status_code == 400 and r.json() == {"status": "ALREADY_COMPLETED"}
    for path in ("/fal-ai/other/requests/x/status", "/fal-ai/wan-vace-14b/requests/x/status/stream", "/run/x"):
        r = client.get(path)
        assert r.status_code == 404 and r.headers["x-fal-request-id"] and "not found" in r.json()["detail"]


def test_body_and_webhook_errors_are_located(client):
    """A non-object body is loc ["body"]; a bad fal_webhook is loc ["query", "fal_webhook"]; both 422."""
    for body in ([], "s", 3):
        r = client.post("/fal-ai/wan-vace-14b", json=body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"], r.text
    for hook in ("ftp://x/y", "http://169.254.169.254/hook"):
        r = client.post("/fal-ai/wan-vace-14b", json=TEXT, params={"fal_webhook": hook})
        assert r.status_code == 422 and r.headers["x-fal-request-id"]
        assert r.json()["detail"][0]["loc"] == ["query", "fal_webhook"], r.text
    r = client.post("/fal-ai/wan-vace-14b/pose", json={"prompt": "p", "video_url": ""})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "video_url"], r.text


def test_validation_locs_are_pydantic_shaped(client):
    """NaN/Infinity are 'not finite' (not a misleading range error); list indices are ints in `loc`;
    pydantic's 'Value error, ' prefix is dropped."""
    for field, raw in (("guidance_scale", "NaN"), ("shift", "Infinity")):
        body = '{"prompt": "p", "' + field + '": ' + raw + '}'
        r = client.post("/fal-ai/wan-vace-14b", content=body, headers={"content-type": "application/json"})
        d = r.json()["detail"][0]
        assert r.status_code == 422 and d["loc"] == ["body", field] and d["type"] == "finite_number", r.text
    r = client.post("/fal-ai/wan-vace-14b", json=dict(TEXT, ref_image_urls=["https://example.com/a.png", 1]))
    assert r.json()["detail"][0]["loc"] == ["body", "ref_image_urls", 1], r.text
    r = client.post("/fal-ai/wan-vace-14b", json=dict(TEXT, ref_image_urls=["data:image/png;base64,!!"]))
    assert r.json()["detail"][0]["loc"] == ["body", "ref_image_urls", 0], r.text
    r = client.post("/fal-ai/wan-vace-14b", json=dict(TEXT, ref_image_urls=[VID] * 6))
    d = r.json()["detail"][0]
    assert d["loc"] == ["body", "ref_image_urls"] and d["msg"].startswith("at most 5"), r.text


def test_unreachable_remote_video_is_accepted_and_noted(tmp_path):
    """As at fal and the AI/ML API, a remote video that cannot be fetched at submit is not a submit error: the
    job is queued (default geometry, noted in its logs) and fails or succeeds when the worker fetches it.
    Refused hosts stay submit-time errors."""
    import socket

    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connection refused
    url = f"http://127.0.0.1:{port}/v.mp4"
    settings = Settings(data_dir=tmp_path, workers="0", api_keys=["k"], model="tiny", allowed_hosts=["127.0.0.1"])
    with TestClient(create_app(settings), headers={"Authorization": "Key k"}) as c:
        r = c.post("/fal-ai/wan-vace-14b/pose", json={"prompt": "p", "video_url": url})
        assert r.status_code == 200, r.text
        logs = c.get(r.json()["status_url"].replace(str(c.base_url), ""), params={"logs": 1}).json()["logs"]
        assert any("could not be fetched at submit" in x["message"] for x in logs), logs
        r = c.post("/v2/video/generations", json={"model": "alibaba/wan2.2-vace-fun-a14b-reframe", "video_url": url},
                   headers={"Authorization": "Bearer k"})
        assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        r = c.post("/fal-ai/wan-vace-14b/pose", json={"prompt": "p", "video_url": "http://10.0.0.1/v.mp4"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "video_url"]
