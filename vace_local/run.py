"""The one run path shared by the CLI and the server worker: fetch → preprocess → generate → encode.

`run_job` never leaves a half-written output: frames are encoded to a temporary name and renamed into place
only after the encode succeeded; a cancelled or failed job leaves nothing in `out_dir`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vace_local.errors import JobCancelled
from vace_local.events import CancelFn, Progress, ProgressFn, cancel_scope, never_cancel, no_progress
from vace_local.spec import MAX_SEED, JobSpec

if TYPE_CHECKING:
    from vace_local.engine import Engine
    from vace_local.prompt_expand import ExpanderOptions
    from vace_local.safety_check import SafetyOptions


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["video_path"] = str(self.video_path)
        d["metadata_path"] = str(self.metadata_path)
        d["extras"] = {k: str(v) for k, v in self.extras.items()}
        return d


def resolve_seed(seed: int) -> int:
    """-1 means random; the seed actually used is always reported back."""
    return random.SystemRandom().randint(0, MAX_SEED) if seed < 0 else seed


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
) -> RunResult:
    """Run one job end to end and write `<out_dir>/<name>.mp4` and `<name>.json`.

    `engine` is the process's loaded model (the worker keeps one); when None it is loaded (and cached)
    for `spec.model`. `safety` / `expander` configure the safety checker and prompt expander a job may ask
    for (defaults: their default model ids, looked up in the local cache only). Raises `InputError` for bad
    inputs, `JobCancelled` when `should_cancel` turned true.
    """
    from preprocessors import build_bundle, plan_timing
    from vace_local.engine import get_engine
    from vace_local.inputs import fetch_inputs
    from vace_local.interpolate import get_interpolator, plan_for_spec, write_frames_zip
    from vace_local.media import write_mask_video, write_video
    from vace_local.sandbox import vet_inputs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    seed = resolve_seed(spec.seed)

    def check_cancel() -> None:
        if should_cancel():
            raise JobCancelled("job cancelled")

    t0 = time.perf_counter()
    if engine is None:
        on_progress(Progress("load", message=f"loading {spec.model}"))
        engine = get_engine(spec.model)
    timings["load"] = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        check_cancel()
        t = time.perf_counter()
        on_progress(Progress("fetch"))
        resolved = fetch_inputs(spec.inputs, work / "inputs")
        vet_inputs(resolved, should_cancel=should_cancel)  # decoded first in a limited child: see sandbox.py
        timings["fetch"] = time.perf_counter() - t

        check_cancel()
        t = time.perf_counter()
        on_progress(Progress("preprocess", message=f"task {spec.task}"))
        annotators_dir = None  # the default weights folder
        if engine.is_tiny and spec.task not in ("none", "outpainting", "reframe"):
            from preprocessors.tiny import tiny_annotators_dir
            from vace_local.tiny import default_cache_dir

            annotators_dir = tiny_annotators_dir(default_cache_dir())  # smoke mode: tiny random-weight annotators
        spec = plan_timing(spec, resolved)  # match_input_* may change num_frames / fps
        # --- temporal plan (vace_local.interpolate): generate every stride-th frame, interpolate back ---
        tplan = plan_for_spec(spec)
        if tplan.active:
            get_interpolator(spec.temporal.interpolator)  # a missing RIFE model fails before generating
        gen_spec = tplan.generation_spec(spec)
        with cancel_scope(should_cancel):  # decode / annotate / track loops call events.checkpoint() per frame
            bundle = tplan.subsample(build_bundle(tplan.bundle_spec(spec), resolved, annotators_dir))
        bundle.check(gen_spec.num_frames, spec.height, spec.width)
        # --- end temporal plan ---
        timings["preprocess"] = time.perf_counter() - t

        notes: list[str] = []
        expansion = None
        if spec.enable_prompt_expansion:
            check_cancel()
            t = time.perf_counter()
            on_progress(Progress("preprocess", message="prompt expansion"))
            expansion = _expand(spec.prompt, expander, engine.device)
            notes.append(expansion.message)
            gen_spec = gen_spec.model_copy(update={"prompt": expansion.prompt})
            timings["prompt_expansion"] = time.perf_counter() - t

        check_cancel()
        t = time.perf_counter()
        on_progress(Progress("generate", 0, engine.effective_spec(gen_spec).num_inference_steps))
        frames = engine.generate(gen_spec, bundle, seed=seed, on_progress=on_progress,
                                 should_cancel=should_cancel)
        timings["generate"] = time.perf_counter() - t
        # --- temporal plan: interpolate back to the job's frame count (and num_interpolated_frames) ---
        if tplan.active:
            check_cancel()
            t = time.perf_counter()
            on_progress(Progress("encode", message=f"interpolating {len(frames)} → {tplan.output_frames} frames"))
            frames = tplan.restore(frames, spec.temporal.interpolator)
            timings["interpolate"] = time.perf_counter() - t
        out_fps = tplan.output_fps
        # match_input_num_frames padded the job up to 4k+1: give back exactly the input's frame count.
        keep = bundle.info.get("frames_from_video") if spec.control.match_input_num_frames else None
        keep = spec.control.output_num_frames or keep  # a dialect that matched at submit says how many
        if keep and not spec.temporal.num_interpolated_frames and keep < len(frames):
            frames = frames[:keep]
        # --- end temporal plan ---
        safety_report = None
        if spec.enable_safety_checker:
            check_cancel()
            t = time.perf_counter()
            frames, safety_report = _safety(frames, resolved, safety, engine.device)
            notes.append(safety_report.message)
            timings["safety_check"] = time.perf_counter() - t

        check_cancel()
        t = time.perf_counter()
        on_progress(Progress("encode"))
        tmp_video = work / f"{name}.mp4"
        write_video(frames, tmp_video, fps=out_fps, quality=spec.output.video_quality,
                    write_mode=spec.output.video_write_mode)
        extras_tmp: dict[str, Path] = {}
        if spec.output.frames_zip:
            extras_tmp["frames_zip"] = write_frames_zip(frames, work / f"{name}.frames.zip")
        if spec.output.save_control:
            extras_tmp["control"] = work / f"{name}.control.mp4"
            write_video((bundle.frames * 255.0 + 0.5).astype("uint8"), extras_tmp["control"], fps=gen_spec.fps)
            extras_tmp["mask"] = work / f"{name}.mask.mp4"
            write_mask_video(bundle.masks, extras_tmp["mask"], fps=gen_spec.fps)
        timings["encode"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0

        video_path = out_dir / f"{name}.mp4"
        meta_path = out_dir / f"{name}.json"
        extras: dict[str, Path] = {}
        for key, tmp in extras_tmp.items():
            extras[key] = out_dir / tmp.name
            tmp.replace(extras[key])
        result = RunResult(
            video_path=video_path, metadata_path=meta_path, seed=seed, width=spec.width, height=spec.height,
            num_frames=int(frames.shape[0]), fps=out_fps, model=engine.model_name, tiny=engine.is_tiny,
            timings=timings, extras=extras, prompt=gen_spec.prompt, notes=notes,
            safety=safety_report.as_dict() if safety_report else None,
            prompt_expansion=expansion.as_dict() if expansion else None,
        )
        metadata = {
            "spec": spec.model_dump(mode="json"),
            "seed": seed,
            "prompt_used": gen_spec.prompt,
            "negative_prompt_used": spec.effective_negative_prompt,
            "model": engine.describe(),
            "sampling": dict(getattr(engine, "last_run", {}) or {}),  # effective steps, cache skips, overrides
            "control": bundle.info,
            "safety_checker": result.safety if result.safety else {"status": "not_requested"},
            "prompt_expansion": result.prompt_expansion if result.prompt_expansion else {"status": "not_requested"},
            "result": result.to_dict(),
        }
        if engine.is_tiny:
            metadata["warning"] = "tiny random-weight smoke model: the output is noise"
        meta_tmp = work / f"{name}.json"
        meta_tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
        tmp_video.replace(video_path)
        meta_tmp.replace(meta_path)
        on_progress(Progress("done", spec.num_inference_steps, spec.num_inference_steps))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _expand(prompt: str, options: ExpanderOptions | None, device: str):  # noqa: ANN202 - ExpansionReport
    from dataclasses import replace

    from vace_local.prompt_expand import ExpanderOptions, expand_prompt

    return expand_prompt(prompt, replace(options or ExpanderOptions.from_env(), device=device))


def _safety(frames, resolved, options: SafetyOptions | None, device: str):  # noqa: ANN001, ANN202
    """Check the final frames (and input images when configured); returns (frames after the policy, report)."""
    from dataclasses import replace

    from vace_local.safety_check import SafetyOptions, apply_policy, check_output

    opts = replace(options or SafetyOptions.from_env(), device=device)
    images = [(f"reference_images[{i}]", p) for i, p in enumerate(resolved.reference_images)]
    images += [(n, getattr(resolved, n)) for n in ("first_image", "last_image") if getattr(resolved, n)]
    report = check_output(frames, images, opts)
    return apply_policy(frames, report), report
