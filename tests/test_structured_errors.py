"""Failures keep their field and rule as data from the worker to every dialect's envelope, and one pydantic-error
formatter serves the CLI and the server (real app, real SQLite store, no workers: the test plays the worker's
part with the worker's own exception mapper)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from server.app import create_app
from server.errors import map_exception
from server.settings import Settings
from server.states import JobStatus
from vace_local.cli import app as cli_app
from vace_local.core.errors import InputError
from vace_local.core.spec import JobSpec

TEXT = {"prompt": "p", "resolution": "240p", "aspect_ratio": "16:9", "num_frames": 17}
#: A worker-side message with the separators and quotes a text parser would trip on.
TRICKY = "HTTP 404 from 'https://cdn.example.com/a.png': not found; input 'video_url': retry later"


@pytest.fixture
def client(tmp_path: Path):
    settings = Settings(data_dir=tmp_path, workers="0", api_keys=["k"], model="tiny")
    with TestClient(create_app(settings), headers={"Authorization": "Key k"}) as c:
        yield c


def _fail_like_the_worker(client: TestClient, exc: BaseException) -> str:
    """Queue a fal job, claim it and record `exc` exactly as server/worker.py does; returns the request id."""
    rid = client.post("/fal-ai/wan-vace-14b", json=TEXT).json()["request_id"]
    store = client.app.state.services.store
    job = store.claim_next("w-test")
    assert job is not None and job.id == rid
    failure = map_exception(exc, job.extra.get("fields"))
    store.finish_job(rid, "w-test", status=JobStatus.FAILED, error=failure.message, error_type=failure.error_type,
                     error_detail=failure.detail or None)
    return rid


def test_fal_input_failure_keeps_field_and_full_message(client):
    """A worker-side InputError on a fal job: the result URL's 422 names the field (fal's name, index as an int)
    and keeps the whole message, however many ': ' and quotes it holds."""
    rid = _fail_like_the_worker(client, InputError("reference_images[1]", TRICKY))
    r = client.get(f"/fal-ai/wan-vace-14b/requests/{rid}")
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", "ref_image_urls", 1], "msg": TRICKY, "type": "value_error"}]
    status = client.get(f"/fal-ai/wan-vace-14b/requests/{rid}/status").json()
    assert status["error"] == f"input 'ref_image_urls[1]': {TRICKY}" and status["error_type"] == "input_error"


def test_fal_worker_validation_failure_is_per_field(client):
    """A spec the worker refuses with several broken rules: one fal `detail` item per field, in fal's names,
    read from `job.error_detail` (a text message cannot be split back into fields)."""
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"prompt": "p", "num_frames": 80, "flow_shift": -1.0,
                                "inputs": {"reference_images": ["a.png", 7]}})
    rid = _fail_like_the_worker(client, info.value)
    detail = client.get(f"/fal-ai/wan-vace-14b/requests/{rid}").json()["detail"]
    locs = {tuple(d["loc"]) for d in detail}
    assert {("body", "num_frames"), ("body", "shift"), ("body", "ref_image_urls", 1)} <= locs, detail
    assert len(detail) == len(info.value.errors()) and all(d["msg"] and d["type"] for d in detail)
    assert not any(d["msg"].startswith("Value error, ") for d in detail)


def test_webhook_body_carries_the_same_detail(client):
    """fal's webhook payload for a failed job has the per-field detail the result URL answers."""
    from server.dialects.fal.render import render_webhook

    rid = _fail_like_the_worker(client, InputError("video", TRICKY))
    core = client.app.state.services
    body = render_webhook(core.jobs.get_sync(rid), core.files)
    assert body["status"] == "ERROR"
    assert body["payload"]["detail"] == [{"loc": ["body", "video_url"], "msg": TRICKY, "type": "value_error"}]


def test_request_field_errors_come_from_problems(client):
    """A refused webhook URL (core's rule) is fal's query-rooted 422 and OpenAI's `param`: the same problem in
    two envelopes, the message without the field in front."""
    r = client.post("/fal-ai/wan-vace-14b", json=TEXT, params={"fal_webhook": "ftp://x/y"})
    assert r.status_code == 422
    assert r.json()["detail"] == [{"loc": ["query", "fal_webhook"], "msg": "must be an http(s) URL",
                                   "type": "value_error"}]
    r = client.post("/v1/videos", json={"prompt": "p", "seconds": "4", "reference_images": ["ftp://x/a.png"]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "reference_images[0]", err
    assert err["message"].startswith("reference_images[0]: ") and err["code"] == "invalid_value"


def test_cli_validation_message_is_the_shared_formatter(tmp_path: Path):
    """The CLI words a bad spec exactly as the shared formatter does (index paths `a[1]`, no "Value error, "),
    and writes nothing."""
    from vace_local.core.errors import problems_from_pydantic

    bad = {"prompt": "x", "model": "tiny", "num_frames": 80, "inputs": {"reference_images": ["a.png", 7]}}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(bad))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli_app, ["generate", "--spec", str(spec_file), "--out", str(out)])
    assert result.exit_code == 2, result.output
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(bad)
    problems = problems_from_pydantic(info.value.errors())
    text = " ".join(result.output.split())
    for p in problems:
        assert " ".join(p.text(show_got=False).split()) in text, (p, result.output)
    assert "inputs.reference_images[1]" in text and "Value error, " not in text
    assert not out.exists()
