"""The one run path shared by the CLI and the server worker, as named stages:
load → fetch → plan → preprocess → (prompt expansion) → generate → restore → (safety check) → encode.

`run_job` never leaves a half-written output: frames are encoded to a temporary name and renamed into place
only after the encode succeeded; a cancelled or failed job leaves nothing in `out_dir`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vace_local.core.errors import JobCancelled
from vace_local.core.events import CancelFn, Progress, ProgressFn, cancel_scope, never_cancel, no_progress
from vace_local.core.spec import MAX_SEED, TASKS_USING_ANNOTATOR_WEIGHTS, JobSpec
from vace_local.run.plan import JobPlan, plan_job

if TYPE_CHECKING:
    import numpy as np

    from vace_local.core.bundle import ControlBundle
    from vace_local.core.inputs import ResolvedInputs
    from vace_local.engine.engine import Engine
    from vace_local.engine.prompt_expand import ExpanderOptions
    from vace_local.engine.safety_check import SafetyOptions
    from vace_local.run.long_video import WindowStore


#: Content type of each output kind, decided where the files are written (the server publishes them as is).
CONTENT_TYPES: dict[str, str] = {"video": "video/mp4", "control": "video/mp4", "mask": "video/mp4",
                                 "frames_zip": "application/zip", "metadata": "application/json"}


@dataclass(frozen=True)
class OutputFile:
    """One file a run wrote: what it is and how to serve it."""

    kind: str  # "video" | "frames_zip" | "control" | "mask" | "metadata"
    path: Path
    content_type: str


@dataclass
class RunResult:
    video_path: Path
    metadata_path: Path
    seed: int
    width: int
    height: int
    num_frames: int
    fps: float
    model: str
    tiny: bool
    timings: dict[str, float] = field(default_factory=dict)
    #: Extra files written beside the video (e.g. "control", "mask" previews).
    extras: dict[str, Path] = field(default_factory=dict)
    #: The prompt the text encoder saw (the expanded one when prompt expansion ran).
    prompt: str = ""
    #: SafetyReport.as_dict() when the job asked for the check, else None.
    safety: dict[str, Any] | None = None
    #: ExpansionReport.as_dict() when the job asked for prompt expansion, else None.
    prompt_expansion: dict[str, Any] | None = None
    #: Lines for the job log (safety / expansion outcomes).
    notes: list[str] = field(default_factory=list)
    #: A long job's windows: start, end, overlap, seed, prompt, resumed (empty for a one-window job).
    windows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outputs(self) -> list[OutputFile]:
        """Every file written, in order: the video, the extras, the metadata, each with its kind and type."""
        files = [("video", self.video_path), *self.extras.items(), ("metadata", self.metadata_path)]
        return [OutputFile(kind, path, CONTENT_TYPES[kind]) for kind, path in files]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["video_path"] = str(self.video_path)
        d["metadata_path"] = str(self.metadata_path)
        d["extras"] = {k: str(v) for k, v in self.extras.items()}
        return d


def resolve_seed(seed: int) -> int:
    """-1 means random; the seed actually used is always reported back."""
    return random.SystemRandom().randint(0, MAX_SEED) if seed < 0 else seed


class Stages:
    """Runs each named stage of a job: cancel check first, then its progress event, then the work, timed under
    its key in `timings` (the keys the server records per stage), with `should_cancel` as the `checkpoint()`
    check of the loops inside it."""

    def __init__(self, on_progress: ProgressFn, should_cancel: CancelFn) -> None:
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, key: str, progress: Progress | None = None, *, cancellable: bool = True) -> Iterator[None]:
        if cancellable and self.should_cancel():
            raise JobCancelled("job cancelled")
        if progress is not None:
            self.on_progress(progress)
        t = time.perf_counter()
        with cancel_scope(self.should_cancel):
            yield
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t

    def close(self) -> None:
        self.timings["total"] = time.perf_counter() - self.started


@dataclass
class _Job:
    """What the stages pass on: the plan, the inputs, the bundle, the frames and the reports."""

    plan: JobPlan
    resolved: ResolvedInputs
    seed: int
    bundle: ControlBundle | None = None
    frames: np.ndarray | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    expansion: Any = None  # ExpansionReport
    safety: Any = None  # SafetyReport
    notes: list[str] = field(default_factory=list)
    #: One record per window (plan, resumed or denoised, its sampling) for a windowed job.
    windows: list[dict[str, Any]] = field(default_factory=list)
    #: A long job encoded window by window: the encoder its frames went to (then `frames` is None).
    streamed: Any = None  # vace_local.core.media.VideoWriter
    _extended: np.ndarray | None = None

    @property
    def streams(self) -> bool:
        """A long job whose frames go straight to the encoder: nothing after generation needs them all."""
        spec = self.plan.spec
        return (self.plan.windowed and not self.plan.temporal.active and not spec.enable_safety_checker
                and not spec.output.frames_zip)

    def extend_frames(self) -> np.ndarray:
        """The clip being extended at the job's size and fps (uint8), decoded once."""
        if self._extended is None:
            from preprocessors.geometry import cover_crop
            from vace_local.core.media import open_video, read_frames

            spec, ext = self.plan.spec, self.plan.extend
            info, reader = open_video(ext.source, "extend")
            self._extended = read_frames(info, reader, ext.source_ids,
                                         lambda f: cover_crop(f, spec.height, spec.width))
        return self._extended


def run_job(
    spec: JobSpec,
    out_dir: Path,
    *,
    engine: Engine | None = None,
    on_progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    name: str = "output",
    safety: SafetyOptions | None = None,
    expander: ExpanderOptions | None = None,
    window_store: WindowStore | None = None,
) -> RunResult:
    """Run one job end to end and write `<out_dir>/<name>.mp4` and `<name>.json`.

    `engine` is the process's loaded model (the worker keeps one); when None it is loaded (and cached)
    for `spec.model`. `safety` / `expander` configure the safety checker and prompt expander a job may ask
    for (defaults: their default model ids, looked up in the local cache only). `window_store` keeps the
    finished windows of a long job: run again with the same store, the job resumes at its first unfinished
    window (a random seed is taken from the store). Raises `InputError` for bad inputs, `JobCancelled` when
    `should_cancel` turned true.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Stages(on_progress, should_cancel)
    stored_seed = window_store.stored_seed() if window_store is not None and spec.seed < 0 else None
    seed = stored_seed if stored_seed is not None else resolve_seed(spec.seed)
    engine = _load(stage, spec.model, engine)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        resolved = _fetch(stage, spec, work)
        spec = _fetch_loras(stage, spec)
        job = _Job(_plan(stage, spec, resolved, seed), resolved, seed)
        _preprocess(stage, job, engine)
        if spec.enable_prompt_expansion:
            _expand_prompt(stage, job, expander, engine)
        _generate(stage, job, engine, window_store, work / f"{name}.mp4")
        _restore(stage, job)
        if spec.enable_safety_checker:
            _check_safety(stage, job, safety, engine)
        files = _encode(stage, job, work, name)
        stage.close()
        result = _publish(job, engine, files, work, out_dir, name, stage.timings)
        on_progress(Progress("done", job.plan.spec.num_inference_steps, job.plan.spec.num_inference_steps))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the stages, in order ------------------------------------------------------------------------------------
def _load(stage: Stages, model: str, engine: Engine | None) -> Engine:
    with stage("load", None if engine else Progress("load", message=f"loading {model}"), cancellable=False):
        if engine is None:
            from vace_local.engine.engine import get_engine

            engine = get_engine(model)
    return engine


def _fetch(stage: Stages, spec: JobSpec, work: Path) -> ResolvedInputs:
    from vace_local.core.inputs import fetch_inputs
    from vace_local.core.sandbox import vet_inputs

    with stage("fetch", Progress("fetch")):
        resolved = fetch_inputs(spec.inputs, work / "inputs")
        vet_inputs(resolved, should_cancel=stage.should_cancel)  # decoded first in a limited child: sandbox.py
    return resolved


def _fetch_loras(stage: Stages, spec: JobSpec) -> JobSpec:
    """`spec.loras` paths as local files (CLI: a local path, VACE_LORA_DIR, a URL or a Hugging Face file; the
    server's worker has already resolved them to files under its own rules)."""
    if not spec.loras:
        return spec
    from vace_local.core.config import vace_settings
    from vace_local.core.inputs import FETCH_DEADLINE_S, FETCH_TIMEOUT_S, MAX_INPUT_BYTES
    from vace_local.core.lora_sources import LoraFiles
    from vace_local.engine.tiny import default_cache_dir

    def download(url: str, dest: Path, field: str) -> Path:
        from vace_local.core.http_guard import fetch_url

        return fetch_url(url, dest, field, max_bytes=MAX_INPUT_BYTES, timeout_s=FETCH_DEADLINE_S,
                         read_timeout_s=FETCH_TIMEOUT_S, should_cancel=stage.should_cancel)

    files = LoraFiles(default_cache_dir() / "loras", download, lora_dir=vace_settings().lora_dir,
                      allow_local_paths=True)
    with stage("fetch"):
        loras = [ref.model_copy(update={"path": str(files.resolve(ref, f"loras[{i}].path"))})
                 for i, ref in enumerate(spec.loras)]
    return spec.model_copy(update={"loras": loras})


def _plan(stage: Stages, spec: JobSpec, resolved: ResolvedInputs, seed: int) -> JobPlan:
    """match_input_*, the temporal and the window plan (timed under `preprocess`, the key clients already read)."""
    with stage("preprocess"):
        return plan_job(spec, resolved.video, seed=seed, extend=resolved.extend)


def _preprocess(stage: Stages, job: _Job, engine: Engine) -> None:
    from preprocessors import build_bundle

    spec = job.plan.spec
    with stage("preprocess", Progress("preprocess", message=f"task {spec.task}")):
        annotators_dir = None  # the default weights folder
        if engine.is_tiny and spec.task in TASKS_USING_ANNOTATOR_WEIGHTS:
            from preprocessors.tiny import tiny_annotators_dir
            from vace_local.engine.tiny import default_cache_dir

            annotators_dir = tiny_annotators_dir(default_cache_dir())  # smoke mode: tiny random-weight annotators
        if job.streams and job.resolved.video is None and not spec.output.save_control:
            job.bundle = _lazy_bundle(job, annotators_dir)  # built window by window: memory stays flat
            return
        bundle = build_bundle(job.plan.bundle_spec, job.resolved, annotators_dir)
        job.bundle = job.plan.temporal.subsample(bundle)
        gen = job.plan.generation
        job.bundle.check(gen.num_frames, gen.height, gen.width)


def _lazy_bundle(job: _Job, annotators_dir: Path | None) -> Any:
    """A control without an input video, built per window: gray / mask 1 with the first and last images where
    they fall (exact: nothing is sampled over the job's length)."""
    from preprocessors import build_bundle
    from vace_local.run.long_video import LazyBundle

    spec, total = job.plan.bundle_spec, job.plan.bundle_spec.num_frames

    def build(a: int, b: int) -> Any:
        resolved = job.resolved.model_copy(update={"first_image": job.resolved.first_image if a == 0 else None,
                                                   "last_image": job.resolved.last_image if b == total else None})
        return build_bundle(spec.model_copy(update={"num_frames": b - a}), resolved, annotators_dir)

    first = build(0, min(total, 1))
    info = dict(first.info, first_image=bool(job.resolved.first_image), last_image=bool(job.resolved.last_image),
                built="per window")
    return LazyBundle(build, first.reference_images, info)


def _expand_prompt(stage: Stages, job: _Job, options: ExpanderOptions | None, engine: Engine) -> None:
    """The job's prompt, and each window's own prompt of a schedule, expanded once each."""
    with stage("prompt_expansion", Progress("preprocess", message="prompt expansion")):
        job.expansion = _expand(job.plan.spec.prompt, options, engine)
        job.notes.append(job.expansion.message)
        expanded = {job.plan.spec.prompt: job.expansion.prompt}
        windows = []
        for w in job.plan.windows:
            if w.prompt not in expanded:
                report = _expand(w.prompt, options, engine)
                expanded[w.prompt] = report.prompt
                job.notes.append(f"window {w.index + 1}: {report.message}")
            windows.append(replace(w, prompt=expanded[w.prompt]))
        job.plan = replace(job.plan, windows=tuple(windows), generation=job.plan.generation.model_copy(
            update={"prompt": job.expansion.prompt}))


def _generate(stage: Stages, job: _Job, engine: Engine, store: WindowStore | None, video: Path) -> None:
    gen, plan = job.plan.generation, job.plan
    steps = engine.effective_spec(gen).num_inference_steps
    if not plan.windowed:
        with stage("generate", Progress("generate", 0, steps)):
            out = engine.sample(gen, job.bundle, seed=job.seed, on_progress=stage.on_progress,
                                should_cancel=stage.should_cancel)
        job.frames, job.sampling = out.uint8(), out.stats.as_dict()
        return
    from vace_local.run.long_video import run_windows

    prefix = job.extend_frames()[-plan.extend.prefix:] if plan.extend else None
    if store is not None:
        store.begin(_store_plan(job))
    sink = _encoder_sink(job, video) if job.streams else None
    message = f"{len(plan.windows)} windows of {gen.window_frames} frames"
    try:
        with stage("generate", Progress("generate", 0, steps * len(plan.windows), message=message)):
            run = run_windows(engine, gen, job.bundle, list(plan.windows), timeline_frames=plan.timeline_frames,
                              offset=plan.extend.prefix if plan.extend else 0, prefix=prefix,
                              on_progress=stage.on_progress, should_cancel=stage.should_cancel, store=store,
                              sink=sink)
    finally:
        if job.streamed is not None:  # also on a cancel: the encoder process ends, the work dir is removed
            job.streamed.close()
    job.frames, job.sampling, job.windows = run.frames, run.sampling, run.windows
    job.notes.append(f"long video: {len(plan.windows)} windows of {gen.window_frames} frames, each keeping "
                     f"{gen.overlap_frames}+ frames of the one before, colour correction {gen.color_correction:g}")
    resumed = run.sampling["windows_resumed"]
    if resumed:
        job.notes.append(f"resumed: {resumed} of {len(plan.windows)} windows taken from storage, not denoised "
                         "again")


def _encoder_sink(job: _Job, video: Path) -> Any:
    """Frames of the timeline → the output encoder, as they become final: the clip first for an extension's
    `full` output, its kept tail skipped, the match_input / 4k+1 padding trimmed off."""
    from vace_local.core.media import VideoWriter

    spec, plan = job.plan.spec, job.plan
    job.streamed = VideoWriter(video, plan.output_fps, spec.output.video_quality, spec.output.video_write_mode)
    if plan.extend is not None and plan.extend.output == "full":
        job.streamed.write(job.extend_frames())
    first = plan.extend.prefix if plan.extend else 0
    end = plan.keep_frames or plan.timeline_frames
    state = {"at": 0}

    def sink(frames: np.ndarray) -> None:
        a = state["at"]
        state["at"] += len(frames)
        part = frames[max(0, first - a): max(0, end - a)]
        if len(part):
            job.streamed.write(part)

    return sink


def _store_plan(job: _Job) -> dict[str, Any]:
    """What a stored window must have been made under to be reused (JSON-native: compared after a round trip)."""
    gen = job.plan.generation
    return json.loads(json.dumps({"seed": job.seed, "windows": job.plan.windows_info(),
                                  "spec": gen.model_dump(mode="json", exclude={"seed", "inputs"})}))


def _restore(stage: Stages, job: _Job) -> None:
    """Interpolate back to the job's frame count (and num_interpolated_frames), then trim match_input padding."""
    if job.streamed is not None:  # encoded window by window, already trimmed
        return
    temporal = job.plan.temporal
    if temporal.active:
        message = f"interpolating {len(job.frames)} → {temporal.output_frames} frames"
        with stage("interpolate", Progress("encode", message=message)):
            job.frames = temporal.restore(job.frames, job.plan.spec.temporal.interpolator)
    job.frames = job.plan.trim(job.frames)
    if job.plan.extend is not None and job.plan.extend.output == "full":
        import numpy as np

        job.frames = np.concatenate([job.extend_frames(), job.frames])


def _check_safety(stage: Stages, job: _Job, options: SafetyOptions | None, engine: Engine) -> None:
    with stage("safety_check"):
        job.frames, job.safety = _safety(job.frames, job.resolved, options, engine)
        job.notes.append(job.safety.message)


def _encode(stage: Stages, job: _Job, work: Path, name: str) -> dict[str, Path]:
    """Write the video and the extras under temporary names in `work`; returns {kind: path}."""
    from vace_local.core.media import write_mask_video, write_video
    from vace_local.engine.interpolate import write_frames_zip

    spec, gen_fps = job.plan.spec, job.plan.generation.fps
    with stage("encode", Progress("encode")):
        files = {"video": work / f"{name}.mp4"}
        if job.streamed is None:
            write_video(job.frames, files["video"], fps=job.plan.output_fps, quality=spec.output.video_quality,
                        write_mode=spec.output.video_write_mode)
        if spec.output.frames_zip:
            files["frames_zip"] = write_frames_zip(job.frames, work / f"{name}.frames.zip")
        if spec.output.save_control:
            files["control"] = work / f"{name}.control.mp4"
            write_video((job.bundle.frames * 255.0 + 0.5).astype("uint8"), files["control"], fps=gen_fps)
            files["mask"] = work / f"{name}.mask.mp4"
            write_mask_video(job.bundle.masks, files["mask"], fps=gen_fps)
    return files


def _publish(job: _Job, engine: Engine, files: dict[str, Path], work: Path, out_dir: Path, name: str,
             timings: dict[str, float]) -> RunResult:
    """Write the metadata, then move every file into `out_dir` (the video and metadata last)."""
    spec, gen = job.plan.spec, job.plan.generation
    extras: dict[str, Path] = {}
    for kind, tmp in files.items():
        if kind != "video":
            extras[kind] = out_dir / tmp.name
            tmp.replace(extras[kind])
    result = RunResult(
        video_path=out_dir / f"{name}.mp4", metadata_path=out_dir / f"{name}.json", seed=job.seed,
        width=spec.width, height=spec.height, fps=job.plan.output_fps,
        num_frames=job.streamed.frames if job.streamed is not None else int(job.frames.shape[0]),
        model=engine.model_name, tiny=engine.is_tiny, timings=timings, extras=extras, prompt=gen.prompt,
        notes=job.notes, safety=job.safety.as_dict() if job.safety else None,
        prompt_expansion=job.expansion.as_dict() if job.expansion else None,
        windows=[{k: v for k, v in w.items() if k != "sampling"} for w in job.windows],
    )
    metadata = {
        "spec": spec.model_dump(mode="json"),
        "seed": job.seed,
        "prompt_used": gen.prompt,
        "negative_prompt_used": spec.effective_negative_prompt,
        "model": engine.describe(),
        "sampling": job.sampling,  # effective steps, cache skips, overrides
        "control": job.bundle.info,
        "windows": _windows_metadata(job),
        "extend": job.plan.extend.as_dict() if job.plan.extend else None,
        "safety_checker": result.safety if result.safety else {"status": "not_requested"},
        "prompt_expansion": result.prompt_expansion if result.prompt_expansion else {"status": "not_requested"},
        "result": result.to_dict(),
    }
    if engine.is_tiny:
        metadata["warning"] = "tiny random-weight smoke model: the output is noise"
    meta_tmp = work / f"{name}.json"
    meta_tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    files["video"].replace(result.video_path)
    meta_tmp.replace(result.metadata_path)
    return result


def _windows_metadata(job: _Job) -> list[dict[str, Any]]:
    """Each window's plan (start, end, overlap, seed, prompt) and, once run, whether it was resumed."""
    return job.windows or [dict(w.as_dict(), resumed=False) for w in job.plan.windows]


def _expand(prompt: str, options: ExpanderOptions | None, engine: Engine):  # noqa: ANN202 - ExpansionReport
    """Expand with the configured LM (a tiny engine's default: the tiny expander, `vace_local.engine.tiny`)."""
    from vace_local.engine.prompt_expand import DEFAULT_EXPANDER_MODEL, ExpanderOptions, expand_prompt
    from vace_local.engine.tiny import helper_model_id

    opts = options or ExpanderOptions.from_env()
    model = helper_model_id(opts.model, DEFAULT_EXPANDER_MODEL, engine.is_tiny)
    return expand_prompt(prompt, replace(opts, device=engine.device, model=model))


def _safety(frames, resolved, options: SafetyOptions | None, engine: Engine):  # noqa: ANN001, ANN202
    """Check the final frames (and input images when configured); returns (frames after the policy, report).
    A tiny engine's default classifier is the tiny one (`vace_local.engine.tiny`)."""
    from vace_local.engine.safety_check import DEFAULT_SAFETY_MODEL, SafetyOptions, apply_policy, check_output
    from vace_local.engine.tiny import helper_model_id

    opts = options or SafetyOptions.from_env()
    opts = replace(opts, device=engine.device, model=helper_model_id(opts.model, DEFAULT_SAFETY_MODEL, engine.is_tiny))
    images = [(f"reference_images[{i}]", p) for i, p in enumerate(resolved.reference_images)]
    images += [(n, getattr(resolved, n)) for n in ("first_image", "last_image") if getattr(resolved, n)]
    report = check_output(frames, images, opts)
    return apply_policy(frames, report), report
