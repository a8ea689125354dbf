"""Command line: `vace-local generate | download | ...` (scripts/generate.py runs the same `generate`).

Flags mirror `JobSpec`; a JSON spec file can provide the rest. Validation errors name the field and exit 2
before anything is loaded or written.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from vace_local.core.config import EngineSettings, engine_flags, vace_settings
from vace_local.core.errors import VaceError, problems_from_pydantic, problems_text
from vace_local.core.spec import TASKS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run the Wan VACE video models locally.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def _check_settings() -> None:
    """A bad `VACE_*` value stops every command at once, naming the variable (not a traceback mid-run)."""
    try:
        vace_settings()
    except ValueError as exc:
        _fail(str(exc))


def format_validation_error(exc: ValidationError) -> str:
    """The spec's broken rules in one line, by the formatter the HTTP dialects share (a rule about the whole
    spec is named `spec`)."""
    problems = [p if p.field else replace(p, field="spec") for p in problems_from_pydantic(exc.errors())]
    return problems_text(problems, show_got=False, more=False)


def _parse_size(size: str) -> tuple[int, int]:
    for sep in ("*", "x", "X"):
        if sep in size:
            w, h = size.split(sep, 1)
            try:
                return int(w), int(h)
            except ValueError:
                break
    _fail(f"size: expected WIDTH*HEIGHT such as 832*480, got {size!r}")
    raise AssertionError  # unreachable


def _parse_context_scale(value: str) -> float | list[float]:
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError:
        _fail(f"context_scale: expected a number or comma-separated numbers, got {value!r}")
        raise
    return values[0] if len(values) == 1 else values


def _parse_prompt_at(value: str) -> dict[str, object]:
    frame, sep, prompt = value.partition(":")
    if not sep or not frame.strip().isdigit() or not prompt.strip():
        _fail(f"prompts: expected FRAME:PROMPT such as '97:a dog runs', got {value!r}")
    return {"start_frame": int(frame), "prompt": prompt.strip()}


@engine_flags(env_help=False)
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What should happen in the video.")] = "",
    model: Annotated[str, typer.Option(help="Built-in name, Hugging Face repo id, local dir, or 'tiny'.")] = "",
    task: Annotated[str, typer.Option(help=" | ".join(TASKS))] = "",
    negative_prompt: Annotated[str | None, typer.Option(help="Default: the official Wan negative prompt.")] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT or WIDTH*HEIGHT, e.g. 832x480 "
                                                  "(multiples of 16).")] = None,
    num_frames: Annotated[int | None, typer.Option(help="4k+1 (81 = 5 s at 16 fps), up to VACE_MAX_FRAMES (961); "
                                                        "past --window-frames it is made in windows.")] = None,
    window_frames: Annotated[int | None, typer.Option(help="Frames per denoising window, 4k+1 within 17..241 "
                                                           "(default 81, the trained length).")] = None,
    overlap_frames: Annotated[int | None, typer.Option(help="Frames each window keeps from the one before "
                                                            "(default 16).")] = None,
    color_correction: Annotated[float | None, typer.Option(help="Colour correction of each window, 0..1 (default 1; "
                                                                "0 = off).")] = None,
    prompt_schedule: Annotated[list[str] | None, typer.Option(
        "--prompt-schedule", help="FRAME:PROMPT, repeatable: the prompt of the windows from that frame on.")] = None,
    extend: Annotated[str | None, typer.Option(help="A video to continue (path, URL or data URI).")] = None,
    extend_frames: Annotated[int | None, typer.Option(help="Frames to add after --extend.")] = None,
    extend_output: Annotated[str | None, typer.Option(help="full (the clip + its continuation, default) | "
                                                           "continuation")] = None,
    resume_dir: Annotated[Path | None, typer.Option(help="Keep a long job's finished windows here; the same "
                                                         "command again resumes at the first unfinished one.")] = None,
    fps: Annotated[int | None, typer.Option(help="Output frames per second.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps.")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="CFG scale (0..20).")] = None,
    guidance_scale_2: Annotated[float | None, typer.Option(help="CFG of the low-noise expert (Wan 2.2).")] = None,
    flow_shift: Annotated[float | None, typer.Option(help="Timestep shift (official VACE: 16).")] = None,
    sampler: Annotated[str | None, typer.Option(help="unipc | dpm++ | euler")] = None,
    context_scale: Annotated[str | None, typer.Option(help="VACE strength 0..2, or one value per layer "
                                                           "(comma-separated).")] = None,
    seed: Annotated[int | None, typer.Option(help="-1 = random; the seed used is printed.")] = None,
    video: Annotated[str | None, typer.Option(help="Source/control video: path, URL or data URI.")] = None,
    mask_video: Annotated[str | None, typer.Option(help="Mask video (white = generate).")] = None,
    mask_image: Annotated[str | None, typer.Option(help="Mask image (white = generate).")] = None,
    ref: Annotated[list[str] | None, typer.Option("--ref", help="Reference image (repeat, up to 5, "
                                                                "in order).")] = None,
    first_image: Annotated[str | None, typer.Option(help="Image for the first frame.")] = None,
    last_image: Annotated[str | None, typer.Option(help="Image for the last frame.")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="JobSpec JSON; flags override it.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("outputs"),
    name: Annotated[str | None, typer.Option(help="Output file stem (default: generated from time).")] = None,
    save_control: Annotated[bool, typer.Option(help="Also write the control and mask videos.")] = False,
    engine: dict | None = None,  # the EngineSettings flags (--offload, --dtype, ... --lora): see engine_flags
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    download: Annotated[bool, typer.Option(help="Download missing Hub weights instead of failing.")] = False,
    acceleration: Annotated[str | None, typer.Option(help="Step cache: none | low | regular.")] = None,
    step_cache_threshold: Annotated[float | None, typer.Option(help="Explicit step-cache threshold "
                                                                    "(0 = never skip).")] = None,
    job_lora: Annotated[list[str] | None, typer.Option(
        "--job-lora", help="PATH_OR_URL[:scale[:high|low|both]]: a LoRA for this job only, loaded as an adapter "
        "(repeatable; the spec file's `loras` takes the same). PATH: a local file, a name in VACE_LORA_DIR, an "
        "http(s) URL or a Hugging Face owner/repo/file.safetensors.")] = None,
    safety_check: Annotated[bool, typer.Option(help="Classify the output with the safety checker "
                                                    "(`vace-local download safety`).")] = False,
    expand_prompt: Annotated[bool, typer.Option(help="Rewrite the prompt with the prompt expander first "
                                                     "(`vace-local download prompt-expander`).")] = False,
    preview_every: Annotated[int, typer.Option(min=0, help="Every N denoising steps (and after the last), save a "
                                                          "live preview of the denoised estimate as "
                                                          "<out>/<name>.preview.webp (0: none).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Generate one video and write <out>/<name>.mp4 plus <name>.json metadata."""
    _check_settings()  # also when run as scripts/generate.py (generate_app has no callback)
    from vace_local.core.spec import JobSpec

    base: dict = {}
    if spec_file is not None:
        try:
            base = json.loads(spec_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            _fail(f"--spec: cannot read JSON from {spec_file}: {exc}")
    overrides: dict = {
        "prompt": prompt or None, "model": model or None, "task": task or None,
        "negative_prompt": negative_prompt, "num_frames": num_frames, "fps": fps,
        "num_inference_steps": steps, "guidance_scale": guidance_scale, "guidance_scale_2": guidance_scale_2,
        "flow_shift": flow_shift, "sampler": sampler, "seed": seed, "acceleration": acceleration,
        "step_cache_threshold": step_cache_threshold, "window_frames": window_frames,
        "overlap_frames": overlap_frames, "color_correction": color_correction, "extend_frames": extend_frames,
        "extend_output": extend_output,
    }
    if prompt_schedule:
        overrides["prompts"] = [_parse_prompt_at(x) for x in prompt_schedule]
    if size is not None:
        overrides["width"], overrides["height"] = _parse_size(size)
    if context_scale is not None:
        overrides["context_scale"] = _parse_context_scale(context_scale)
    base.update({k: v for k, v in overrides.items() if v is not None})
    inputs = dict(base.get("inputs") or {})
    for key, value in (("video", video), ("mask_video", mask_video), ("mask_image", mask_image),
                       ("first_image", first_image), ("last_image", last_image), ("extend", extend)):
        if value is not None:
            inputs[key] = value
    if ref:
        inputs["reference_images"] = list(ref)
    base["inputs"] = inputs
    if save_control:
        base.setdefault("output", {})["save_control"] = True
    if safety_check:
        base["enable_safety_checker"] = True
    if expand_prompt:
        base["enable_prompt_expansion"] = True
    if job_lora:
        base["loras"] = [*base.get("loras", []), *(_parse_job_lora(x) for x in job_lora)]
    try:
        spec = JobSpec.model_validate(base)
    except ValidationError as exc:
        _fail(format_validation_error(exc))
        raise

    from vace_local.engine.engine import EngineOptions

    try:
        picked = EngineSettings.model_validate(engine or {})
    except ValidationError as exc:
        _fail(format_validation_error(exc))
        raise
    try:
        options = EngineOptions.from_settings(picked, device=device, allow_download=download)
    except ValueError as exc:
        _fail(str(exc))
        raise

    _run_with_progress(spec, options, out, name, quiet, resume_dir, preview_every)


def _parse_job_lora(text: str) -> dict:
    """`PATH[:scale[:high|low|both]]` → a `loras` entry (a ':' inside a URL or path stays in the path)."""
    from vace_local.engine.lora import is_number as _is_float

    parts = text.rsplit(":", 2)
    entry: dict = {"path": text}
    if len(parts) == 3 and parts[2] in ("high", "low", "both") and _is_float(parts[1]):
        entry = {"path": parts[0], "scale": float(parts[1]), "transformer": parts[2]}
    elif len(parts) >= 2 and _is_float(parts[-1]):
        entry = {"path": text.rsplit(":", 1)[0], "scale": float(parts[-1])}
    return entry


def _run_with_progress(spec, options, out: Path, name: str | None, quiet: bool,  # noqa: ANN001
                       resume_dir: Path | None = None, preview_every: int = 0) -> None:
    import time

    from tqdm import tqdm

    from vace_local.core.events import Progress
    from vace_local.engine.engine import get_engine
    from vace_local.engine.preview import Preview, preview_scope, write_strip
    from vace_local.run.job import run_job

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    bar: tqdm | None = None

    def on_progress(p: Progress) -> None:
        nonlocal bar
        if quiet:
            return
        if p.stage == "generate" and p.total:
            if bar is None:
                bar = tqdm(total=p.total, desc="denoising", unit="step", file=sys.stderr)
            bar.n = p.step
            if p.message:  # a long job: "window 2/4, step 13/30" on one bar over every window
                bar.set_postfix_str(p.message, refresh=False)
            bar.refresh()
        elif p.stage != "generate":
            if bar is not None:
                bar.close()
                bar = None
            typer.echo(f"[{p.stage}] {p.message}".rstrip(), err=True)

    stem = name or time.strftime("vace-%Y%m%d-%H%M%S")
    try:
        on_progress(Progress("load", message=f"loading {spec.model}"))
        engine = get_engine(spec.model, options)
        if engine.is_tiny:
            typer.secho("note: 'tiny' is a random-weight smoke model; its output is noise.", fg="yellow", err=True)
        store = None
        if resume_dir is not None:
            from vace_local.run.long_video import DirWindowStore

            store = DirWindowStore(resume_dir)
        preview_path = Path(out) / f"{stem}.preview.webp"

        def on_preview(p: Preview) -> None:
            write_strip(p.frames, preview_path)

        with preview_scope(preview_every, on_preview):
            result = run_job(spec, out, engine=engine, on_progress=on_progress, name=stem, window_store=store)
    except VaceError as exc:
        if bar is not None:
            bar.close()
        _fail(str(exc), code=1)
        raise
    typer.echo(f"video:    {result.video_path}")
    typer.echo(f"metadata: {result.metadata_path}")
    for key, path in result.extras.items():
        typer.echo(f"{key + ':':9} {path}")
    if preview_every and preview_path.is_file():
        typer.echo(f"preview:  {preview_path}")
    typer.echo(f"seed:     {result.seed}")
    for note in result.notes:
        typer.echo(f"note:     {note}")
    if result.tiny:
        typer.echo("(tiny smoke model: the video is noise)")


@app.command("download")
def download(
    what: Annotated[str, typer.Argument(help="A model name or Hugging Face repo id, 'annotators', 'safety' "
                                             "(VACE_SAFETY_MODEL) or 'prompt-expander' "
                                             "(VACE_PROMPT_EXPANDER_MODEL).")],
) -> None:
    """Fetch weights ahead of time into the Hugging Face cache (resumable)."""
    if what in ("safety", "prompt-expander"):
        from vace_local.engine.models import resolve_aux_model
        from vace_local.engine.prompt_expand import ExpanderOptions
        from vace_local.engine.safety_check import SafetyOptions

        model_id = SafetyOptions.from_env().model if what == "safety" else ExpanderOptions.from_env().model
        try:
            typer.echo(f"{what} ({model_id}): {resolve_aux_model(model_id, what, allow_download=True)}")
        except VaceError as exc:
            _fail(str(exc), code=1)
        return
    if what == "annotators":
        from preprocessors.weights import download_annotators

        typer.echo(f"annotators: {download_annotators(None)}")
        return
    from vace_local.engine.models import download_model

    try:
        typer.echo(f"{what}: {download_model(what)}")
    except VaceError as exc:
        _fail(str(exc), code=1)


app.command("generate")(generate)

from preprocessors.cli import preprocess  # noqa: E402 - the preprocessors package owns its command

app.command("preprocess")(preprocess)

from server.cli import serve  # noqa: E402 - the server package registers its own command

app.command("serve")(serve)

#: A one-command app for scripts/generate.py (same function, same flags).
generate_app = typer.Typer(add_completion=False)
generate_app.command()(generate)


def main() -> None:
    app()
