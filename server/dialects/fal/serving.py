"""fal `fal-ai/wan-vace-14b` (and `fal-ai/wan-22-vace-fun-a14b`) requests translated into a `JobSpec` (the AI/ML
dialect translates through here too), and the submit path that validates, probes, translates and queues one
(`create_fal_job`).

The translation is pure code (no HTTP, no job store). It needs facts about the input video (size, fps, frame
count) for `resolution="auto"`, `aspect_ratio="auto"` and the `match_input_*` switches; the submit path probes
the resolved video and passes them in as a `SourceInfo`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from server.auth import request_owner
from server.body_guard import read_json
from server.dialects.common import (
    HOSTED_MAX_FRAMES,
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
from server.dialects.fal.render import fal_invalid, field_error
from server.dialects.fal.schemas import (
    FAL_APPS,
    FAL_SCHEMAS,
    FIELD_NAMES,
    NAME,
    FalApp,
    FalBaseRequest,
    FalOutpaintingRequest,
    FalReframeRequest,
)
from server.dialects.fal.schemas import FalRequest as _Common
from server.errors import ApiError
from server.jobs import JobRecord
from server.services import Api
from vace_local.core.config import vace_settings
from vace_local.core.errors import InputError, Problem
from vace_local.core.spec import (
    TASKS,
    ControlOptions,
    JobInputs,
    JobSpec,
    OutputOptions,
    TemporalOptions,
    input_gaps,
    round_side,
    task_needs_mask,
)
from vace_local.core.timing import match_input_timing

log = logging.getLogger("vace.server.fal")


#: Short side per tier (multiples of 16; 360p → 352, 580p → 576).
SHORT_SIDE = {"240p": 240, "360p": 352, "480p": 480, "580p": 576, "720p": 720}
#: Landscape 16:9 sizes; 480p is Wan's own 832x480 and 240p its half.
LANDSCAPE = {"240p": (416, 240), "360p": (640, 352), "480p": (832, 480), "580p": (1024, 576), "720p": (1280, 720)}
#: Without an input video, "auto" resolution means Wan's native 480p.
DEFAULT_TIER = "480p"


# --- geometry and timing (shared with the AI/ML dialect, whose fields mirror fal's) -------------------------

def auto_tier(source: SourceInfo | None) -> str:
    """Largest tier whose short side the input reaches (240p at least, 720p at most)."""
    if source is None:
        return DEFAULT_TIER
    short = min(source.width, source.height)
    best = "240p"
    for tier, side in SHORT_SIDE.items():
        if short >= side:
            best = tier
    return best


def output_size(
    resolution: str, aspect_ratio: str, source: SourceInfo | None, canvas_aspect: float | None = None
) -> tuple[int, int]:
    """(width, height), multiples of 16. `canvas_aspect` (w/h) overrides the source's for "auto" aspect
    (outpainting grows the canvas, so its output follows the expanded shape)."""
    tier = auto_tier(source) if resolution == "auto" else resolution
    if aspect_ratio == "16:9":
        return LANDSCAPE[tier]
    if aspect_ratio == "9:16":
        w, h = LANDSCAPE[tier]
        return h, w
    short = SHORT_SIDE[tier]
    if aspect_ratio == "1:1":
        return short, short
    aspect = canvas_aspect or (source.width / source.height if source else LANDSCAPE[tier][0] / short)
    if abs(aspect - 16 / 9) < 0.02:
        return LANDSCAPE[tier]
    if abs(aspect - 9 / 16) < 0.01:
        w, h = LANDSCAPE[tier]
        return h, w
    if aspect >= 1:
        return round_side(short * aspect), short
    return short, round_side(short / aspect)


def timing(
    num_frames: int, fps: int, match_frames: bool, match_fps: bool, source: SourceInfo | None, notes: list[str],
    long_video: bool = False,
) -> tuple[int, int, int | None]:
    """(num_frames, fps, output_num_frames) after the match_input_* switches, by the engine's rule
    (`vace_local.core.timing.match_input_timing`); output_num_frames is the count to trim the output back to.
    A matched length stops at the hosted 241 frames unless the request opted into `long_video`."""
    t = match_input_timing(num_frames, fps, match_frames=match_frames and source is not None,
                           match_fps=match_fps and source is not None,
                           source_frames=source.num_frames if source else 0, source_fps=source.fps if source else 0.0,
                           max_frames=None if long_video else HOSTED_MAX_FRAMES,
                           cap_hint="" if long_video else " (the hosted limit; send long_video: true for all of it)")
    notes.extend(t.notes)
    return t.num_frames, t.fps, t.keep_frames


def temporal_options(req: Any, notes: list[str]) -> TemporalOptions:
    """fal's downsample/interpolation extras. 'film' is served by the built-in optical-flow interpolator, and so
    is 'rife' when no RIFE weights are installed: both are valid fal values, so a fal client never fails on them."""
    k = req.num_interpolated_frames
    if getattr(req, "temporal_upsample_factor", None) is not None and not k:
        k = req.temporal_upsample_factor
    used = bool(k or req.temporal_downsample_factor or req.enable_auto_downsample)
    interp = "flow"
    if req.interpolator_model == "rife":
        rife = vace_settings().rife_path
        if rife.is_file():
            interp = "rife"
        elif used:
            notes.append(f"interpolator_model 'rife': no RIFE weights at {rife} (VACE_RIFE_ONNX), "
                         "served by the built-in optical-flow interpolator")
    if req.interpolator_model == "film" and used:
        notes.append("interpolator_model 'film' is served by the built-in optical-flow interpolator")
    return TemporalOptions(
        num_interpolated_frames=k,
        temporal_downsample_factor=req.temporal_downsample_factor,
        enable_auto_downsample=req.enable_auto_downsample,
        auto_downsample_min_fps=req.auto_downsample_min_fps,
        interpolator=interp,
    )


def outpaint_aspect(source: SourceInfo | None, left: bool, right: bool, top: bool, bottom: bool,
                    ratio: float) -> float | None:
    """Aspect (w/h) of the expanded canvas, matching the annotator's int(ratio·side) per expanded side."""
    if source is None:
        return None
    w = source.width + int(ratio * source.width) * (int(left) + int(right))
    h = source.height + int(ratio * source.height) * (int(top) + int(bottom))
    return w / h


# --- fal → JobSpec -----------------------------------------------------------------------------------------

def fal_task(endpoint: str, req: _Common) -> str:
    """The JobSpec task of a request; the base endpoint without a video is text/reference-to-video."""
    if endpoint:
        return endpoint
    assert isinstance(req, FalBaseRequest)
    if not req.video_url:
        return "none"
    if "task" not in req.model_fields_set and (req.mask_video_url or req.mask_image_url):
        return "inpainting"
    return req.task


def fal_to_jobspec(endpoint: str, req: _Common, *, model: str, source: SourceInfo | None = None) -> Translation:
    """Translate a validated fal request of `endpoint` ("" = base) into a JobSpec for `model`.

    Raises pydantic.ValidationError (field-named) when the combination is invalid for the JobSpec.
    """
    notes: list[str] = []
    task = fal_task(endpoint, req)
    num_frames, fps, trim = timing(req.num_frames, req.frames_per_second, req.match_input_num_frames,
                                   req.match_input_frames_per_second, source, notes, req.long_video)

    canvas_aspect = None
    # With a probed source the switches are applied here (the counts above, logged at submit); the run path
    # re-applies them only when the route could not probe, so server-side caps on num_frames still hold.
    control: dict[str, Any] = {
        "transparency_mode": req.transparency_mode,
        "match_input_num_frames": req.match_input_num_frames and source is None,
        "match_input_frames_per_second": req.match_input_frames_per_second and source is None,
        "output_num_frames": trim,
    }
    if TASKS[task].control == "annotator" and hasattr(req, "preprocess"):
        control["preprocess"] = req.preprocess
    if isinstance(req, FalOutpaintingRequest):
        control.update(expand_left=req.expand_left, expand_right=req.expand_right, expand_top=req.expand_top,
                       expand_bottom=req.expand_bottom, expand_ratio=req.expand_ratio)
        canvas_aspect = outpaint_aspect(source, req.expand_left, req.expand_right, req.expand_top,
                                        req.expand_bottom, req.expand_ratio)
    if isinstance(req, FalReframeRequest):
        control.update(zoom_factor=req.zoom_factor, trim_borders=req.trim_borders)
    width, height = output_size(req.resolution, req.aspect_ratio, source, canvas_aspect)

    mask_video = getattr(req, "mask_video_url", None)
    mask_image = getattr(req, "mask_image_url", None)
    if mask_video and mask_image:
        # Precedence as each endpoint documents it: the base endpoint prefers the mask image,
        # the inpainting endpoint the mask video.
        if endpoint == "":
            notes.append("mask_video_url ignored: mask_image_url is given")
            mask_video = None
        else:
            notes.append("mask_image_url ignored: mask_video_url is given")
            mask_image = None
    gaps = input_gaps(task, {"video": req.video_url, "mask_video": mask_video, "mask_image": mask_image})
    for gap in sorted(gaps, key=lambda g: g.rule != "task_needs_video"):  # a missing video_url is named first
        raise FieldError(FIELD_NAMES[gap.field], gap.message(FIELD_NAMES))
    inputs = JobInputs(
        video=req.video_url,
        mask_video=mask_video if task_needs_mask(task) or endpoint == "" else None,
        mask_image=mask_image if task_needs_mask(task) or endpoint == "" else None,
        reference_images=list(getattr(req, "ref_image_urls", None) or []),
        first_image=req.first_frame_url,
        last_image=req.last_frame_url,
    )
    spec = JobSpec(
        model=model,
        task=task,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or None,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        flow_shift=req.shift,
        sampler=req.sampler,
        acceleration=req.acceleration,
        seed=-1 if req.seed is None else req.seed,
        inputs=inputs,
        control=ControlOptions(**control),
        temporal=temporal_options(req, notes),
        output=OutputOptions(video_quality=req.video_quality, video_write_mode=req.video_write_mode,
                             frames_zip=req.return_frames_zip),
        enable_safety_checker=req.enable_safety_checker,
        enable_prompt_expansion=req.enable_prompt_expansion,
        loras=req.loras,
    )
    return Translation(spec=spec, sync_mode=req.sync_mode, notes=notes)


def parse_fal_request(endpoint: str, body: Any) -> _Common:
    """Validate a request body against the endpoint's schema (raises pydantic.ValidationError)."""
    if endpoint not in FAL_SCHEMAS:
        raise KeyError(endpoint)
    return FAL_SCHEMAS[endpoint].model_validate(body)


# --- submit ------------------------------------------------------------------------------------------------

def served_apps_text() -> str:
    return ", ".join(f"{a.app_id}/{e}" if e else a.app_id for a in FAL_APPS.values() for e in a.endpoints)


def split_app_path(app_path: str) -> tuple[FalApp, str]:
    """`fal-ai/<app>[/sub]` → the app and its sub-endpoint ("" = base); ApiError 404 for anything else
    (`fal-ai/wan-22-vace-fun-a14b` has no base endpoint, as at fal)."""
    p = app_path.strip("/")
    for app in FAL_APPS.values():
        if p == app.app_id or p.startswith(app.app_id + "/"):
            sub = p[len(app.app_id) + 1:]
            if sub in app.endpoints:
                return app, sub
    raise ApiError(404, f"Application '{p}' not found; served here: {served_apps_text()}", error_type="not_found")


async def _read_json(request: Request) -> Any:
    try:
        return await read_json(request, empty={})  # off the event loop; a body may be ~400 MB of base64
    except RecursionError:
        raise field_error("body", "request body is nested too deeply to parse", etype="json_invalid") from None
    except ValueError as e:
        raise ApiError(422, f"body: request body is not valid JSON ({e})", error_type="validation_error",
                       problems=[Problem("body", f"invalid JSON: {e}", "json_invalid")]) from None


async def create_fal_job(request: Request, api: Api, app_path: str) -> JobRecord:
    """Validate a submit against its endpoint's schema, probe the input video when the size or timing follows
    it, translate, and queue the job; every refusal is fal's 422 naming the field (or a 404 for the app)."""
    app, endpoint = split_app_path(app_path)
    app_id = app.app_id + (f"/{endpoint}" if endpoint else "")
    problem = check_served_model(api.config, app_id, app.family)
    if problem:
        raise ApiError(404, problem, error_type="model_not_served")
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise field_error("body", "must be a JSON object", etype="dict_type")
    try:
        req = parse_fal_request(endpoint, body)
    except ValidationError as e:
        raise fal_invalid(pydantic_problems(e)) from None
    base = api.files.base_url(request)
    source, probe_note = None, None
    if needs_source(req):
        try:
            source, local_ref, probe_note = await probe_source(api, base, req.video_url, "video_url",
                                                               request_owner(request))
        except InputError as e:
            raise field_error(e.field, e.message) from None
        req = req.model_copy(update={"video_url": local_ref})
    try:
        tr: Translation = fal_to_jobspec(endpoint, req, model=api.config.model, source=source)
    except FieldError as e:
        raise field_error(e.field, e.message) from None
    except ValidationError as e:
        raise fal_invalid(pydantic_problems(e, FIELD_NAMES)) from None
    webhook = request.query_params.get("fal_webhook") or None
    if webhook is not None:
        try:
            api.jobs.check_webhook_url(webhook, "fal_webhook")
        except ApiError as e:
            raise fal_invalid([replace(p, location="query") for p in e.problems]) from None
    # Only the normalised spec is stored (not the raw body): unknown fields are named in a bounded log line.
    unknown = unknown_fields_note(set(body) - set(type(req).model_fields))
    logs = [served_note(api.config, app_id, app.family), *([probe_note] if probe_note else []), *tr.notes,
            *([unknown] if unknown else [])]
    try:
        job = await api.jobs.submit(
            tr.spec, dialect=NAME, model_id=app_id, base_url=base, webhook_url=webhook, field_names=FIELD_NAMES,
            logs=logs, extra={"endpoint": endpoint, "sync_mode": tr.sync_mode, "ignored": tr.ignored},
            owner=request_owner(request),
        )
    except ApiError as e:
        if e.status_code == 400 and e.problems:
            raise fal_invalid(e.problems) from None
        raise
    log.info("fal job %s for %s (%s)", job.id, app_id, "; ".join(logs))
    return job
