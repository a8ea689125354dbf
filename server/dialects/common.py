"""What every dialect shares: the `Dialect` record and default error envelope, the prompt cap, the served-model
check, probing the input video at submit (fal and AI/ML), and what the safety checker and prompt expander did
for a job, read from the worker's `job.result`.

The dialects render the checker / expander facts under their own field names; a job whose outputs were not
checked answers `None` (JSON null), never a guessed `false`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError

from server import media_refs
from server.errors import ApiError, user_field
from server.files import Files
from server.jobs import JobRecord
from server.services import Api, DialectConfig
from vace_local.core.errors import InputError, Problem, problems_from_pydantic
from vace_local.core.media_limits import MediaLimits
from vace_local.core.sandbox import vet_file_async
from vace_local.core.spec import MAX_FRAMES, MAX_JOB_LORAS, JobSpec, LoraRef, max_job_frames

#: Longest prompt / negative prompt any dialect accepts (the UMT5 text encoder reads only the first 512 tokens
#: anyway); a longer one is a 4xx naming the field, so it is never stored, logged or polled back.
PROMPT_MAX_CHARS = 20_000

LORAS_DESCRIPTION = (
    "vace-local extension (no hosted VACE endpoint has it): LoRAs for this job only, in fal's Wan LoRA form "
    "`[{path, scale, transformer, weight_name}]`. They are loaded as adapters on the resident model and switched "
    "per job, never by reloading it; the next job without them runs without. `path`: an http(s) URL, a Hugging "
    "Face `owner/repo/file.safetensors`, or a file name in the server's LoRA folder (VACE_LORA_DIR). "
    "Distillation LoRAs may carry num_inference_steps / guidance_scale / flow_shift, applied to this job only. "
    f"At most {MAX_JOB_LORAS}."
)


def loras_field() -> list[LoraRef]:
    """The `loras` field every dialect's request has (same type, limit and description)."""
    return Field(default_factory=list, max_length=MAX_JOB_LORAS, description=LORAS_DESCRIPTION)


def loras_from_text(v: Any) -> Any:
    """A `loras` validator (mode="before") for form bodies: the list may arrive as one JSON text."""
    if isinstance(v, str):
        import json

        try:
            return json.loads(v) if v.strip() else []
        except ValueError:
            raise ValueError("must be a JSON list of {path, scale, transformer, weight_name} objects") from None
    return v


#: The hosted APIs' longest clip (fal / AI/ML num_frames, WaveSpeed 10 s = 161 frames). Longer is a vace-local
#: extension a request opts into with `long_video: true`, up to this server's VACE_MAX_FRAMES.
HOSTED_MAX_FRAMES = MAX_FRAMES
LONG_VIDEO_DESCRIPTION = ("vace-local extension: allow a clip longer than the hosted limit, up to this server's "
                          "VACE_MAX_FRAMES (default 961 frames = 60 s at 16 fps), made of overlapping 81-frame "
                          "windows with colour correction")


def long_video_limit(frames: int, long_video: bool, hosted_frames: int, say: Callable[[int], str]) -> None:
    """A length validator: the hosted limit unless the request opted into long video, then the server's."""
    limit = max_job_frames()
    if frames > hosted_frames and not long_video:
        raise ValueError(f"must be at most {say(hosted_frames)} (the hosted limit); longer video is a vace-local "
                         f"extension: send \"long_video\": true for up to {say(limit)} (VACE_MAX_FRAMES)")
    if frames > limit:
        raise ValueError(f"must be at most {say(limit)} (this server's VACE_MAX_FRAMES)")


#: The unknown-fields note names at most this many fields, each cut to NOTE_NAME_CHARS.
NOTE_MAX_NAMES = 8
NOTE_NAME_CHARS = 40


def unknown_fields_note(names: Iterable[str]) -> str | None:
    """The job-log line for ignored unknown fields, bounded whatever the request sent (their values are never
    kept): `ignored unknown fields: a, b, … (+N more)`; None when there are none."""
    names = sorted(names)
    if not names:
        return None
    shown = [n if len(n) <= NOTE_NAME_CHARS else n[:NOTE_NAME_CHARS] + "…" for n in names[:NOTE_MAX_NAMES]]
    more = f" (+{len(names) - NOTE_MAX_NAMES} more)" if len(names) > NOTE_MAX_NAMES else ""
    return f"ignored unknown fields: {', '.join(shown)}{more}"


def not_blank(cls: type, v: str) -> str:
    """A `prompt` validator: the text must say something (not empty, not only whitespace)."""
    if not v.strip():
        raise ValueError("must not be empty or only whitespace")
    return v


# ---- the dialect record -------------------------------------------------------------------------------


def default_render_error(request: Request, err: ApiError) -> Response:
    return JSONResponse({"detail": err.message, "error_type": err.error_type}, status_code=err.status_code)


@dataclass
class Dialect:
    name: str
    router: APIRouter
    render_error: Callable[[Request, ApiError], Response] = default_render_error
    #: Builds the JSON body POSTed to the job's webhook when it finishes; None = no webhooks.
    render_webhook: Callable[[JobRecord, Files], dict[str, Any]] | None = None
    #: Path prefixes owned by this dialect, used to render errors for requests that matched no route.
    path_prefixes: tuple[str, ...] = ()
    #: True for dialects with a path catch-all route; included after all others.
    catch_all: bool = False


# ---- translation results (fal and AI/ML share fal's translation) --------------------------------------------

class FieldError(ValueError):
    """A request field that passed its own schema but cannot be used in combination (named for the 422)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class SourceInfo:
    """What the route learned by probing the resolved input video."""

    num_frames: int
    fps: float
    width: int
    height: int


@dataclass
class Translation:
    """A JobSpec plus the dialect-only facts the routes need (and the notes shown in the status logs)."""

    spec: JobSpec
    sync_mode: bool = False
    notes: list[str] = field(default_factory=list)
    #: Accepted fields that have no local effect (kept for the job record).
    ignored: dict[str, Any] = field(default_factory=dict)


# ---- served model (fal, AI/ML and OpenAI ask for model ids) ---------------------------------------------

#: The tiny smoke models' stand-ins: `tiny` answers every model id; `tiny-two-expert` has Wan 2.2's shape (two
#: experts, a boundary) and answers the Wan 2.2 ids as that family would (other ids need a mapping, like a real one).
TINY_FAMILIES: dict[str, str | None] = {"tiny": None, "tiny-two-expert": "wan2.2-vace-fun-a14b"}


def served_family(settings: Any) -> str | None:
    """The Wan family the served model is (its own name for a built-in one; None = answers every family)."""
    return TINY_FAMILIES.get(settings.model, settings.model)


def check_served_model(config: DialectConfig, model_id: str, family: str) -> str | None:
    """None when the served model answers `model_id`, else the reason it does not. Returns a log note
    via `served_note`. `tiny` serves every id, `tiny-two-expert` the Wan 2.2 ids; `Settings.model_map` maps an
    id or family to the served model."""
    served = config.model
    if served_family(config) in (None, family):
        return None
    mapping = getattr(config, "model_map", {}) or {}
    if mapping.get(model_id) == served or mapping.get(family) == served:
        return None
    return (f"model '{model_id}' ({family}) is not served here: this server runs '{served}'. Map it with "
            f"VACE_MODEL_MAP='{{\"{family}\": \"{served}\"}}' to answer it with the served model")


def served_note(config: DialectConfig, model_id: str, family: str) -> str:
    served = config.model
    if served_family(config) in (None, family):
        return f"model: {model_id} served by {served}"
    return f"model: {model_id} ({family}) answered with the served model '{served}' (model mapping)"


# ---- input video probing at submit (fal and AI/ML: auto resolution / aspect, match_input_*) ----------------

async def _file_chunks(path: Path):  # noqa: ANN202 - async generator
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


#: Longest a submit waits to fetch a remote input video for probing; beyond it the worker fetches it.
SUBMIT_PROBE_TIMEOUT_S = 30.0


async def probe_source(api: Api, base: str, value: str, field: str,
                       owner: str | None = None) -> tuple[SourceInfo | None, str, str | None]:
    """Make the input video local (stored as an upload), probe it; returns its facts, the reference to submit
    instead (our own file URL, so the worker does not download it again) and None.

    A refused reference (scheme, literal private/loopback host, bad data URI) or content that is not a readable
    video raises InputError. A remote video that cannot be fetched now (network error, HTTP error, slow host)
    does not: like fal and the AI/ML API, the request is accepted and the job fails (or succeeds) when the
    worker fetches it; then this returns (None, value, note) and the size/timing use the defaults.

    The video is probed in a sandboxed child process (`vace_local.core.sandbox`), never here: a crafted header can
    make a decoder abort or allocate tens of GB, which must cost one 4xx, not the API process."""
    # may decode a data URI: on the slow pool
    ref = await api.offload.slow(api.inputs.resolve_input_reference, value, field, base, "video", owner)
    if ref.lower().startswith(("http://", "https://")):
        with tempfile.TemporaryDirectory(dir=api.files.data_dir / "cache") as tmp:
            dest = Path(tmp) / "video"
            s = api.config
            try:
                await api.offload.slow(media_refs.download, ref, dest, field, allowed=s.allowed_hosts,
                                    max_bytes=s.max_download_bytes,
                                    timeout_s=min(s.download_timeout_s, SUBMIT_PROBE_TIMEOUT_S))
            except InputError as e:
                return None, value, (f"{field} could not be fetched at submit ({e.message}); the worker fetches "
                                     "it, and resolution/aspect_ratio 'auto' use the defaults")
            ext = media_refs.check_file(dest, field, "video")
            # already bounded by the download limit: a video the client sent as a URL is not an upload
            info = await api.uploads.save(_file_chunks(dest), f"{field}.{ext}", media_refs.mime_of(ext), owner=owner,
                                          field_name=field, max_bytes=s.max_download_bytes)
        local = str(info.path)
    else:
        local = ref
    limits = MediaLimits.from_env()
    limits = replace(limits, timeout_s=min(limits.timeout_s, SUBMIT_PROBE_TIMEOUT_S))
    facts = await vet_file_async(local, field, "video", decode=False, limits=limits)
    return (SourceInfo(num_frames=facts.num_frames, fps=facts.fps, width=facts.width, height=facts.height),
            api.files.local_url(base, local), None)


def needs_source(body: Any) -> bool:
    return bool(getattr(body, "video_url", None)) and (
        body.resolution == "auto" or body.aspect_ratio == "auto" or body.match_input_num_frames
        or body.match_input_frames_per_second
    )


# ---- safety checker and prompt expansion -------------------------------------------------------------


def _safety(job: JobRecord) -> dict[str, Any]:
    return (job.result or {}).get("safety") or {}


def nsfw_flag(job: JobRecord) -> bool | None:
    """True / False when the safety checker classified the output; None when nothing was checked."""
    s = _safety(job)
    return bool(s.get("flagged")) if s.get("status") == "checked" else None


def safety_requested(job: JobRecord) -> bool:
    return bool(job.spec.get("enable_safety_checker"))


def safety_note(job: JobRecord) -> str | None:
    """The checker's one-line outcome when it did not check (not installed), changed the output, or was the tiny
    smoke-test classifier."""
    s = _safety(job)
    if s.get("status") == "not_installed" or s.get("action") == "replaced_with_black" or s.get("tiny"):
        return str(s.get("message") or "")
    return None


def prompt_used(job: JobRecord) -> str:
    """The prompt the model was conditioned on: the expanded one when prompt expansion ran."""
    return str((job.result or {}).get("prompt") or job.spec.get("prompt", ""))


def expansion_note(job: JobRecord) -> str | None:
    """The expander's outcome when it was asked for but did not expand (not installed / empty output), or was the
    tiny smoke-test expander."""
    e = (job.result or {}).get("prompt_expansion") or {}
    return str(e.get("message")) if e and (e.get("status") != "expanded" or e.get("tiny")) else None


def windows_field(job: JobRecord) -> dict[str, Any]:
    """vace-local extension on a long job's result: `windows`, the plan it was made of (start, end, overlap,
    seed, prompt, resumed of each window); absent for a one-window job."""
    windows = (job.result or {}).get("windows")
    return {"windows": windows} if windows else {}


def check_fields(job: JobRecord) -> dict[str, Any]:
    """Extra output fields for the safety check / prompt expansion (fal's name `has_nsfw_concepts`, null where
    nothing was checked), present only when the request asked; shared with the AI/ML dialect's `meta`."""
    fields: dict[str, Any] = dict(windows_field(job))
    if safety_requested(job):
        fields["has_nsfw_concepts"] = [nsfw_flag(job)]
    if note := safety_note(job):
        fields["safety_checker"] = note
    if note := expansion_note(job):
        fields["prompt_expansion"] = note
    return fields


# ---- errors -------------------------------------------------------------------------------------------


def pydantic_problems(exc: ValidationError, field_names: dict[str, str] | None = None) -> list[Problem]:
    """A request's or spec's pydantic errors as Problems named in the dialect's fields (the shared formatter,
    `vace_local.core.errors.problems_from_pydantic`, without pydantic's "Value error, " wording)."""
    return problems_from_pydantic(exc.errors(), lambda path: user_field(path, field_names))
