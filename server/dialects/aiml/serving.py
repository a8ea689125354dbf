"""AI/ML API requests: validated against their model's schema, renamed into the equivalent fal request and
translated by the fal code (so both dialects produce identical jobs), then queued (`create_generation`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from server.auth import request_owner
from server.body_guard import read_json
from server.dialects.aiml.schemas import (
    AIML_MODEL_PREFIX,
    AIML_MODELS,
    AIML_SCHEMAS,
    FIELD_NAMES,
    NAME,
    REQUESTED_FAMILY,
    AimlRequest,
)
from server.dialects.common import (
    FieldError,
    SourceInfo,
    Translation,
    check_served_model,
    needs_source,
    probe_source,
    pydantic_problems,
    served_note,
    unknown_fields_note,
)
from server.dialects.fal.serving import fal_to_jobspec, parse_fal_request
from server.errors import ApiError
from server.jobs import JobRecord
from server.services import Api
from vace_local.core.errors import InputError, Problem

log = logging.getLogger("vace.server.aiml")

#: AI/ML name → fal name, for the fields whose names differ.
_RENAMES = {"image_list": "ref_image_urls", "image_url": "first_frame_url", "last_image_url": "last_frame_url"}
#: fal names the shared translation may report → AI/ML names.
_FROM_FAL = {v: k for k, v in _RENAMES.items()}
#: AI/ML fields with no fal counterpart (or a different meaning) that must not reach the fal schema.
_DROP = {"model", "sync_mode"}


def aiml_task(model: str) -> str:
    return model.removeprefix(AIML_MODEL_PREFIX)


def parse_aiml_request(body: Any) -> AimlRequest:
    """Validate against the schema of the body's `model` (KeyError for an unknown model id)."""
    model = body.get("model") if isinstance(body, dict) else None
    if model not in AIML_SCHEMAS:
        raise KeyError(model)
    return AIML_SCHEMAS[model].model_validate(body)


def aiml_to_jobspec(req: AimlRequest, *, model: str, source: SourceInfo | None = None) -> Translation:
    """Rename into the equivalent fal request of the same task, then translate with the fal code."""
    task = aiml_task(req.model)
    data = req.model_dump(exclude=_DROP, exclude_none=True)
    fal_body = {_RENAMES.get(k, k): v for k, v in data.items()}
    fal_req = parse_fal_request(task, fal_body)
    tr = fal_to_jobspec(task, fal_req, model=model, source=source)
    tr.sync_mode = False
    return tr


def invalid(problems: Problem | list[Problem]) -> ApiError:
    """A field error as the AI/ML API words it (`Body validation error! field: rule; …`, see render_error)."""
    return ApiError.invalid(problems, 400, show_got=False, more=False)


async def _read_json(request: Request) -> dict[str, Any]:
    try:
        body = await read_json(request, empty={})  # off the event loop; up to ~400 MB of base64
    except RecursionError:
        raise invalid(Problem("body", "request body is nested too deeply to parse", "json_invalid")) from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON ({e})", error_type="validation_error") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", error_type="validation_error")
    return body


async def create_generation(request: Request, api: Api) -> JobRecord:
    """Validate a `POST /v2/video/generations` body, probe the input video when the size or timing follows it,
    translate and queue the job; refusals are 400s naming the field (404 for a model not served)."""
    body = await _read_json(request)
    try:
        req = parse_aiml_request(body)
    except KeyError:
        raise invalid(Problem("model", f"must be one of {', '.join(AIML_MODELS)} (got {body.get('model')!r})",
                              "enum")) from None
    except ValidationError as e:
        raise invalid(pydantic_problems(e)) from None
    problem = check_served_model(api.config, req.model, REQUESTED_FAMILY)
    if problem:
        raise ApiError(404, problem, error_type="model_not_served")
    base = api.files.base_url(request)
    source, probe_note = None, None
    if needs_source(req):
        try:
            source, local_ref, probe_note = await probe_source(api, base, req.video_url, "video_url",
                                                               request_owner(request))
        except InputError as e:
            raise ApiError.invalid(Problem(e.field, e.message), error_type="invalid_input") from None
        req = req.model_copy(update={"video_url": local_ref})
    try:
        tr = aiml_to_jobspec(req, model=api.config.model, source=source)
    except FieldError as e:
        raise invalid(Problem(_FROM_FAL.get(e.field, e.field), e.message)) from None
    except ValidationError as e:
        raise invalid(pydantic_problems(e, FIELD_NAMES)) from None
    # Only the normalised spec is stored (not the raw body): unknown fields are named in a bounded log line.
    unknown = unknown_fields_note(set(body) - set(type(req).model_fields))
    logs = [served_note(api.config, req.model, REQUESTED_FAMILY), *([probe_note] if probe_note else []), *tr.notes,
            *([unknown] if unknown else [])]
    job = await api.jobs.submit(tr.spec, dialect=NAME, model_id=req.model, base_url=base, field_names=FIELD_NAMES,
                                logs=logs, extra={"ignored": tr.ignored}, owner=request_owner(request))
    log.info("aiml job %s for %s (%s)", job.id, req.model, "; ".join(logs))
    return job
