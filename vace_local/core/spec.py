"""`JobSpec`: the one internal contract every entry point (CLI, each API dialect) builds.

Dialects translate their own field names and ranges into this model; the engine, the job store and the
worker only ever see a `JobSpec`. Validation messages name the field and the rule, because they are shown
to API users verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The engine options' words live with the settings registry; re-exported here for the contract's readers.
from vace_local.core.config import (  # noqa: F401
    DEFAULT_MAX_JOB_FRAMES,
    DEFAULT_MODEL,
    DTYPES,
    FP8_MODES,
    OFFLOAD_POLICIES,
    DtypeName,
    Fp8Mode,
    MemoryPolicy,
    OffloadPolicy,
    vace_settings,
)

#: The official Wan 2.1 negative prompt (`sample_neg_prompt`); diffusers would silently use "" instead.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

MAX_REFERENCE_IMAGES = 5
#: One denoising window: the model's own range (fal's 17..241); longer jobs are made of windows (windows.py).
MIN_FRAMES, MAX_FRAMES = 17, 241
#: The longest job `VACE_MAX_FRAMES` may ask for (10 minutes at 16 fps; its default, DEFAULT_MAX_JOB_FRAMES, is 60 s).
HARD_MAX_FRAMES = 9601
#: The trained clip length: a job longer than its `window_frames` (default) is generated in windows.
DEFAULT_WINDOW_FRAMES, DEFAULT_OVERLAP_FRAMES = 81, 16
MAX_SEED = 2**31 - 1
#: The Wan VAE's compression: 4 frames in time (after the first), 8×8 pixels in space.
VAE_STRIDE = (4, 8, 8)
#: Frame sides in pixels: multiples of 16 (the VAE's 8× times the transformer's 2×2 patches), 16..2048.
SIDE_MULTIPLE, MIN_SIDE, MAX_SIDE = 16, 16, 2048


def latent_tokens(width: int, height: int, num_frames: int, patch: tuple[int, int, int] = (1, 2, 2),
                  num_refs: int = 0) -> int:
    """The transformer's sequence length: latent frames (each reference image adds one) × patches per frame."""
    frames = (num_frames - 1) // VAE_STRIDE[0] + 1 + num_refs
    lat_h, lat_w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
    return (frames // patch[0]) * (lat_h // patch[1]) * (lat_w // patch[2])


def side_problem(v: int) -> str | None:
    """Why `v` cannot be a frame side (the rule in words), or None when it can."""
    if not MIN_SIDE <= v <= MAX_SIDE or v % SIDE_MULTIPLE:
        return f"must be a multiple of {SIDE_MULTIPLE} within {MIN_SIDE}..{MAX_SIDE}"
    return None


def round_side(x: float, mode: Literal["nearest", "down"] = "nearest") -> int:
    """The legal frame side nearest to `x` (or the largest at most `x`), within MIN_SIDE..MAX_SIDE."""
    k = int(x // SIDE_MULTIPLE) if mode == "down" else int(x / SIDE_MULTIPLE + 0.5)
    return min(MAX_SIDE, max(MIN_SIDE, k * SIDE_MULTIPLE))


Task = Literal["none", "depth", "depthv2", "pose", "face", "inpainting", "outpainting", "reframe"]
Sampler = Literal["unipc", "dpm++", "euler"]
TransparencyMode = Literal["content_aware", "white", "black"]
MaskTracker = Literal["auto", "flow", "sam2", "static"]
VideoQuality = Literal["low", "medium", "high", "maximum"]
VideoWriteMode = Literal["fast", "balanced", "small"]
#: Step-cache presets (fal's `acceleration`; WaveSpeed's enable_fast_mode → "regular"). See step_cache.py.
Acceleration = Literal["none", "low", "regular"]


# -- the task table: what each task needs and how its control video is made ------------------------------
@dataclass(frozen=True)
class TaskRule:
    """One task's rules. The spec checks a job's inputs against them (`input_gaps`), the dialects phrase the
    same gaps in their own words, and the preprocessors (preprocessors/build.py) build the control from them."""

    #: `video`: the input video's own frames; `annotator`: an annotator's output of them (depth maps,
    #: skeletons; `annotator` names the family in preprocessors.annotators); `canvas`: the clip placed on the
    #: job's canvas (preprocessors/outpaint.py).
    control: Literal["video", "annotator", "canvas"]
    #: The control signal comes from `inputs.video`, so a job without one is refused.
    needs_video: bool = True
    #: Only a masked region is repainted: `inputs.mask_video` or `inputs.mask_image` is required.
    needs_mask: bool = False
    #: For `annotator` control: the annotator family that makes it (`preprocessors.annotators.annotate`).
    annotator: str | None = None
    #: The masked region of the video is gray (generated afresh), not kept under a control signal.
    gray_masked: bool = False
    #: A mask image is tracked through the clip (SAM2 or flow); else it holds on every frame.
    track_mask: bool = True
    #: The task applies `mask_video` / `mask_image` (canvas tasks make their own mask).
    uses_masks: bool = True


TASKS: dict[str, TaskRule] = {
    "none": TaskRule("video", needs_video=False, track_mask=False),
    "depth": TaskRule("annotator", annotator="depth"),
    "depthv2": TaskRule("annotator", annotator="depth"),
    "pose": TaskRule("annotator", annotator="pose"),
    "face": TaskRule("annotator", annotator="pose"),
    "inpainting": TaskRule("video", needs_mask=True, gray_masked=True),
    "outpainting": TaskRule("canvas", uses_masks=False),
    "reframe": TaskRule("canvas", uses_masks=False),
}
if tuple(TASKS) != get_args(Task):  # the Literal is for pydantic and type checkers; the table is the rules
    raise RuntimeError("spec.TASKS and spec.Task must list the same tasks")

#: Tasks whose control signal is derived from `inputs.video` (everything but text/image-only `none`).
TASKS_NEEDING_VIDEO: frozenset[str] = frozenset(t for t, r in TASKS.items() if r.needs_video)
#: Tasks that repaint only a masked region, so they need `inputs.mask_video` or `inputs.mask_image`.
TASKS_NEEDING_MASK: frozenset[str] = frozenset(t for t, r in TASKS.items() if r.needs_mask)
#: Tasks whose control video is an annotator's output (depth maps, skeletons); with `control.preprocess` off
#: the given video already is that output.
TASKS_ANNOTATED: frozenset[str] = frozenset(t for t, r in TASKS.items() if r.control == "annotator")
#: Tasks that run annotator or tracker weights: the annotated ones and inpainting's mask tracker.
TASKS_USING_ANNOTATOR_WEIGHTS: frozenset[str] = TASKS_ANNOTATED | TASKS_NEEDING_MASK


def max_job_frames() -> int:
    """The longest job this process accepts: `VACE_MAX_FRAMES` (default 961), clamped to 17..9601.

    The server sets it from its settings (`VACE_MAX_FRAMES` / `--max-frames`) in the API and worker processes;
    the CLI reads the same variable."""
    value = vace_settings().max_frames
    value = max(MIN_FRAMES, min(HARD_MAX_FRAMES, value))
    return value - (value - 1) % 4  # a legal 4k+1 count


def task_needs_video(task: str) -> bool:
    return task in TASKS_NEEDING_VIDEO


def task_needs_mask(task: str) -> bool:
    return task in TASKS_NEEDING_MASK


@dataclass(frozen=True)
class InputGap:
    """A task input rule that a job's media inputs break; `field` is the JobInputs field it is about."""

    rule: Literal["mask_needs_video", "task_needs_video", "task_needs_mask", "task_ignores_mask"]
    field: str
    task: str

    def message(self, names: Mapping[str, str] | None = None) -> str:
        """The rule in words, naming inputs by `names` (a dialect's words for the JobInputs fields `video`,
        `mask_video`, `mask_image`; None: `inputs.<field>`)."""
        def n(f: str) -> str:
            return f"inputs.{f}" if names is None else names.get(f, f)

        if self.rule == "mask_needs_video":
            return f"a mask needs {n('video')} to apply to"
        if self.rule == "task_needs_video":
            return f"task '{self.task}' needs {n('video')}"
        if self.rule == "task_ignores_mask":
            return (f"task '{self.task}' does not use {n(self.field)}: it masks the canvas it adds itself "
                    "(send a mask with task 'inpainting')")
        return f"task '{self.task}' needs {n('mask_video')} or {n('mask_image')}"


def input_gaps(task: str, given: Mapping[str, object]) -> list[InputGap]:
    """The input rules `task` breaks with the media inputs `given` (JobInputs names → values; empty = absent):
    a mask without a video first, then what the task needs, then a mask the task would not use (TASKS). Every
    entry point checks these."""
    has = {k for k, v in given.items() if v}
    rule = TASKS[task]
    gaps = []
    if "video" not in has:
        mask = next((m for m in ("mask_video", "mask_image") if m in has), None)
        if mask is not None:
            gaps.append(InputGap("mask_needs_video", mask, task))
        if rule.needs_video:
            gaps.append(InputGap("task_needs_video", "video", task))
    if rule.needs_mask and not has & {"mask_video", "mask_image"}:
        gaps.append(InputGap("task_needs_mask", "mask_video", task))
    if not rule.uses_masks and "video" in has:
        gaps += [InputGap("task_ignores_mask", m, task) for m in ("mask_video", "mask_image") if m in has]
    return gaps


# -- frame counts ------------------------------------------------------------------------------------------
FrameRounding = Literal["up", "down"]


def round_frames_4k1(n: int, mode: FrameRounding = "up", *, lo: int | None = MIN_FRAMES,
                     hi: int | None = MAX_FRAMES) -> int:
    """A frame count the model accepts: the VAE compresses time 4x around the first frame, so it needs 4k+1.

    `up` (the smallest 4k+1 >= n) pads rather than drops input frames; `down` (the largest 4k+1 <= n) keeps
    under a cap. The result is then clamped to [lo, hi] (the model's 17..241 by default; None: no bound);
    bounds that are themselves 4k+1 keep the result legal.
    """
    k = -(-(n - 1) // 4) if mode == "up" else (n - 1) // 4
    out = 4 * k + 1
    if lo is not None:
        out = max(lo, out)
    if hi is not None:
        out = min(hi, out)
    return out


MediaKind = Literal["image", "video"]


@dataclass(frozen=True)
class Media:
    """What a media input field holds: the kind of media (content is sniffed for it at submit and in the worker,
    and decoded as it in the sandbox)."""

    kind: MediaKind


@dataclass(frozen=True)
class MediaField:
    """One media input of a job, as the input walker (vace_local.core.inputs.walk_inputs) sees it."""

    name: str
    kind: MediaKind
    #: A list of values (reference_images), each named `name[i]` in errors.
    many: bool

    @property
    def required_by(self) -> frozenset[str]:
        """Tasks that refuse a job without this input (the masks: either one)."""
        if self.name == "video":
            return TASKS_NEEDING_VIDEO
        return TASKS_NEEDING_MASK if self.name in ("mask_video", "mask_image") else frozenset()

    @property
    def used_by(self) -> frozenset[str]:
        """Tasks that act on this input (canvas tasks make their own mask)."""
        if self.name in ("mask_video", "mask_image"):
            return frozenset(t for t, r in TASKS.items() if r.uses_masks)
        return frozenset(TASKS)


Ref = TypeVar("Ref", str, Path)


class MediaInputs(BaseModel, Generic[Ref]):
    """A job's media inputs, declared once: references as the user gave them (`JobInputs`) or local files
    (`vace_local.core.inputs.ResolvedInputs`). Each field's `Media` says what it must hold; `MEDIA_FIELDS`
    lists them for every walker (the API's submit checks, the worker, the CLI, the sandbox)."""

    model_config = ConfigDict(extra="forbid")

    video: Annotated[Ref | None, Media("video")] = None
    mask_video: Annotated[Ref | None, Media("video")] = None
    mask_image: Annotated[Ref | None, Media("image")] = None
    reference_images: Annotated[list[Ref], Media("image")] = Field(default_factory=list)
    first_image: Annotated[Ref | None, Media("image")] = None
    last_image: Annotated[Ref | None, Media("image")] = None
    #: A clip to continue: its last `overlap_frames` frames condition the first window (`extend_frames`).
    extend: Annotated[Ref | None, Media("video")] = None


def _media_fields() -> tuple[MediaField, ...]:
    out = []
    for name, info in MediaInputs.model_fields.items():
        media = next(m for m in info.metadata if isinstance(m, Media))
        out.append(MediaField(name, media.kind, many=get_origin(info.annotation) is list))
    return tuple(out)


#: The media inputs, in declaration order: name, kind, list or single (see MediaField).
MEDIA_FIELDS: tuple[MediaField, ...] = _media_fields()


class JobInputs(MediaInputs[str]):
    """Media inputs: local paths, http(s) URLs or data URIs. Resolved to local files before preprocessing."""

    @field_validator("reference_images")
    @classmethod
    def _max_refs(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_REFERENCE_IMAGES:
            raise ValueError(f"at most {MAX_REFERENCE_IMAGES} reference images are allowed, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _masks_need_video(self) -> JobInputs:
        for gap in input_gaps("none", dict(self)):  # task "none" needs nothing: only the mask rule applies
            raise ValueError(f"{gap.field}: {gap.message()}")
        return self


class ControlOptions(BaseModel):
    """How the preprocessors build the control video; task-specific knobs live here."""

    model_config = ConfigDict(extra="forbid")

    #: False: the input video already is the control signal (fal's `preprocess=false`).
    preprocess: bool = True
    #: auto = SAM2.1 (the official tracker) when the sam2 package and its weights are present, else flow.
    mask_tracker: MaskTracker = "auto"
    expand_left: bool = False
    expand_right: bool = False
    expand_top: bool = False
    expand_bottom: bool = False
    expand_ratio: float = Field(0.25, ge=0.0, le=1.0)
    zoom_factor: float = Field(0.0, ge=0.0, le=0.9)
    trim_borders: bool = True
    transparency_mode: TransparencyMode = "content_aware"
    match_input_num_frames: bool = False
    match_input_frames_per_second: bool = False
    #: Exact frame count to return when it is not 4k+1: the job is generated at `num_frames` (the next 4k+1)
    #: and trimmed to this. Set by a dialect that applied `match_input_num_frames` itself at submit.
    output_num_frames: int | None = Field(None, ge=1)


class TemporalOptions(BaseModel):
    """Generate fewer frames, then interpolate back (fal's downsample / interpolation extras)."""

    model_config = ConfigDict(extra="forbid")

    #: New frames inserted between each pair of generated frames.
    num_interpolated_frames: int = Field(0, ge=0, le=5)
    #: Keep every (d+1)-th input frame for generation; d frames are interpolated back afterwards.
    temporal_downsample_factor: int = Field(0, ge=0, le=5)
    enable_auto_downsample: bool = False
    auto_downsample_min_fps: float = Field(15.0, ge=1.0, le=60.0)
    interpolator: Literal["flow", "rife", "film"] = "flow"


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video_quality: VideoQuality = "high"
    video_write_mode: VideoWriteMode = "balanced"
    #: Also write every output frame as PNG into a zip beside the video (fal's return_frames_zip).
    frames_zip: bool = False
    #: Also write control.mp4 / mask.mp4 (what the model saw) beside the output.
    save_control: bool = False


MAX_JOB_LORAS = 4


class LoraRef(BaseModel):
    """One LoRA for one job (fal's Wan LoRA convention; a vace-local extension on every VACE endpoint).

    Loaded as an adapter on the resident model and active for this job only (vace_local.engine.lora.AdapterPool).
    """

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, max_length=2048, description=(
        "http(s) URL of a .safetensors file, a Hugging Face `owner/repo/file.safetensors` (or `owner/repo` with "
        "weight_name), or the name of a file in the server's LoRA folder (VACE_LORA_DIR); the CLI also takes a "
        "local path"))
    scale: float = Field(1.0, ge=0.0, le=4.0, description="LoRA strength (fal's range 0-4)")
    transformer: Literal["high", "low", "both"] = Field(
        "both", description="Wan 2.2 expert: high-noise (transformer), low-noise (transformer_2) or both; "
        "single-expert models take high or both")
    weight_name: str | None = Field(None, max_length=512, description="file inside a Hugging Face repo `path`")
    #: Distillation LoRAs (CausVid, lightx2v): the schedule they need, for this job only.
    num_inference_steps: int | None = Field(None, ge=1, le=100, description=(
        "vace-local: steps this LoRA needs (distillation LoRAs); overrides the job's for this job only"))
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0, description=(
        "vace-local: guidance this LoRA needs (distillation LoRAs: 1); this job only"))
    flow_shift: float | None = Field(None, gt=0.0, le=30.0, description="vace-local: flow shift this LoRA needs")

    def overrides(self) -> dict[str, float | int]:
        return {k: v for k in ("num_inference_steps", "guidance_scale", "flow_shift")
                if (v := getattr(self, k)) is not None}


class PromptAt(BaseModel):
    """One entry of a prompt schedule: `prompt` for the windows whose first new frame is at or after
    `start_frame` (until the next entry)."""

    model_config = ConfigDict(extra="forbid")

    start_frame: int = Field(ge=0)
    prompt: str = Field(min_length=1)


ExtendOutput = Literal["full", "continuation"]


class JobSpec(BaseModel):
    """Everything needed to produce one video. Defaults follow the official VACE / WaveSpeed settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL
    task: Task = "none"
    prompt: str = ""
    negative_prompt: str | None = Field(
        None, description="None or empty → the official Wan negative prompt (see effective_negative_prompt)."
    )
    width: int = Field(832, ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(480, ge=MIN_SIDE, le=MAX_SIDE)
    num_frames: int = Field(81, ge=MIN_FRAMES, le=HARD_MAX_FRAMES)
    #: Frames per denoising window (4k+1); a longer job is generated as overlapping windows (windows.py).
    window_frames: int = Field(DEFAULT_WINDOW_FRAMES, ge=MIN_FRAMES, le=MAX_FRAMES)
    #: Frames each window keeps from the one before (mask 0): the join's conditioning.
    overlap_frames: int = Field(DEFAULT_OVERLAP_FRAMES, ge=1, le=MAX_FRAMES - 4)
    #: Colour correction of each window to the one before over the overlap, anchored to the first (0 = off).
    color_correction: float = Field(1.0, ge=0.0, le=1.0)
    #: Prompt schedule: each window uses the entry in force at its first new frame; none: `prompt` throughout.
    prompts: list[PromptAt] = Field(default_factory=list, max_length=256)
    #: With `inputs.extend`: frames to generate after the clip (instead of num_frames).
    extend_frames: int | None = Field(None, ge=1, le=HARD_MAX_FRAMES)
    #: With `inputs.extend`: return the clip followed by the continuation (`full`) or the continuation alone.
    extend_output: ExtendOutput = "full"
    fps: int = Field(16, ge=1, le=60)
    num_inference_steps: int = Field(30, ge=1, le=100)
    guidance_scale: float = Field(5.0, ge=0.0, le=20.0)
    guidance_scale_2: float | None = Field(None, ge=0.0, le=20.0)
    flow_shift: float = Field(16.0, gt=0.0, le=30.0)
    sampler: Sampler = "unipc"
    context_scale: float | list[Annotated[float, Field(ge=0.0, le=2.0)]] = Field(1.0)
    #: Fast mode: skip denoising steps whose prediction barely changes (VACE-correct step cache).
    acceleration: Acceleration = "none"
    #: Explicit step-cache threshold (0 = never skip); overrides the `acceleration` preset when set.
    step_cache_threshold: float | None = Field(None, ge=0.0, le=1.0)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    inputs: JobInputs = Field(default_factory=JobInputs)
    control: ControlOptions = Field(default_factory=ControlOptions)
    temporal: TemporalOptions = Field(default_factory=TemporalOptions)
    output: OutputOptions = Field(default_factory=OutputOptions)
    #: Classify sampled output frames with the safety checker (vace_local/engine/safety_check.py).
    enable_safety_checker: bool = False
    #: Rewrite the prompt with the prompt-expander LM before text encoding (vace_local/engine/prompt_expand.py).
    enable_prompt_expansion: bool = False
    #: LoRAs for this job only, as adapters on the resident model (no reload); see LoraRef.
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_JOB_LORAS)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int, info) -> int:  # noqa: ANN001
        if v % SIDE_MULTIPLE:
            raise ValueError(f"{info.field_name} must be a multiple of {SIDE_MULTIPLE}, got {v}")
        return v

    @field_validator("num_frames", "window_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int, info) -> int:  # noqa: ANN001
        if v % 4 != 1:
            lo = round_frames_4k1(v, "down", lo=None, hi=None)
            raise ValueError(f"{info.field_name} must be of the form 4k+1 (e.g. {lo} or {lo + 4}), got {v}")
        if info.field_name == "num_frames" and v > max_job_frames():
            raise ValueError(f"num_frames must be at most {max_job_frames()} (this server's VACE_MAX_FRAMES), "
                             f"got {v}")
        return v

    @field_validator("extend_frames")
    @classmethod
    def _extend_limit(cls, v: int | None) -> int | None:
        if v is not None and v > max_job_frames():
            raise ValueError(f"extend_frames must be at most {max_job_frames()} (this server's VACE_MAX_FRAMES), "
                             f"got {v}")
        return v

    @field_validator("context_scale")
    @classmethod
    def _scalar_range(cls, v: float | list[float]) -> float | list[float]:
        if isinstance(v, float | int) and not 0.0 <= v <= 2.0:
            raise ValueError(f"context_scale must be within 0..2, got {v}")
        if isinstance(v, list) and not v:
            raise ValueError("context_scale list must not be empty")
        return v

    @model_validator(mode="after")
    def _windows(self) -> JobSpec:
        if self.overlap_frames > self.window_frames - 4:
            raise ValueError(f"overlap_frames must be at most window_frames - 4 ({self.window_frames - 4}): each "
                             f"window makes at least 4 new frames, got {self.overlap_frames}")
        for p in self.prompts:
            if p.start_frame >= self.output_frames_planned:
                raise ValueError(f"prompts: start_frame {p.start_frame} is past the job's last frame "
                                 f"({self.output_frames_planned - 1})")
        if len({p.start_frame for p in self.prompts}) != len(self.prompts):
            raise ValueError("prompts: two entries have the same start_frame")
        if (self.extend_frames is None) != (self.inputs.extend is None):
            raise ValueError("inputs.extend and extend_frames go together: the clip to continue and how many "
                             "frames to add")
        if self.extend_output != "full" and self.inputs.extend is None:  # (a stored spec carries every field)
            raise ValueError("extend_output: only with inputs.extend (a clip to continue)")
        if self.inputs.extend and "num_frames" in self.model_fields_set and self.num_frames != 81:
            raise ValueError("num_frames: with inputs.extend the length is extend_frames; leave num_frames out")
        return self

    @property
    def output_frames_planned(self) -> int:
        """Frames of generated timeline the prompt schedule counts in: extend_frames, else num_frames."""
        return self.extend_frames if self.extend_frames is not None else self.num_frames

    @model_validator(mode="after")
    def _task_inputs(self) -> JobSpec:
        for gap in input_gaps(self.task, dict(self.inputs)):
            if gap.rule != "mask_needs_video":  # JobInputs refused that one already
                raise ValueError(gap.message())
        return self

    @property
    def effective_negative_prompt(self) -> str:
        return self.negative_prompt or OFFICIAL_NEGATIVE_PROMPT
