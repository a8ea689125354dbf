"""`vace-local preprocess`: write what the model will see (control.mp4, mask.mp4, side-by-side preview.mp4,
reference_N.png) and bundle.json, the facts needed to check every conditioning rule from outside."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from pydantic import ValidationError

from vace_local.core.errors import VaceError
from vace_local.core.spec import TASKS

if TYPE_CHECKING:
    from vace_local.core.bundle import ControlBundle
    from vace_local.core.spec import JobSpec


def preprocess(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    task: Annotated[str, typer.Option(help=" | ".join(TASKS))] = "none",
    video: Annotated[str | None, typer.Option(help="Source video (path, URL or data URI).")] = None,
    mask_video: Annotated[str | None, typer.Option(help="Mask video (white = generate).")] = None,
    mask_image: Annotated[str | None, typer.Option(help="First-frame / static mask image.")] = None,
    ref: Annotated[list[str] | None, typer.Option("--ref", help="Reference image (repeatable).")] = None,
    first_image: Annotated[str | None, typer.Option(help="Image for the first frame.")] = None,
    last_image: Annotated[str | None, typer.Option(help="Image for the last frame.")] = None,
    size: Annotated[str, typer.Option(help="WIDTH*HEIGHT (multiples of 16).")] = "832*480",
    num_frames: Annotated[int, typer.Option(help="4k+1 frames (past --window-frames: made in windows).")] = 81,
    fps: Annotated[int, typer.Option(help="Job frame rate.")] = 16,
    window_frames: Annotated[int, typer.Option(help="Frames per denoising window (4k+1).")] = 81,
    overlap_frames: Annotated[int, typer.Option(help="Frames each window keeps from the one before.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the first window (window k: seed + k); -1: not fixed.")] = -1,
    control: Annotated[str | None, typer.Option(help="JSON object of control options, e.g. "
                                                     "'{\"mask_tracker\": \"static\"}'.")] = None,
) -> None:
    """Build the control video, mask and reference images for a job without running the model."""
    from preprocessors import build_bundle, plan_timing
    from vace_local.core.inputs import fetch_inputs
    from vace_local.core.media import write_mask_video, write_video
    from vace_local.core.spec import JobSpec

    try:
        w, h = (int(v) for v in size.lower().replace("x", "*").split("*"))
        spec = JobSpec(task=task, width=w, height=h, num_frames=num_frames, fps=fps, window_frames=window_frames,
                       overlap_frames=overlap_frames, seed=seed,
                       inputs={"video": video, "mask_video": mask_video, "mask_image": mask_image,
                               "reference_images": ref or [], "first_image": first_image, "last_image": last_image},
                       control=json.loads(control) if control else {})
    except (ValidationError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            resolved = fetch_inputs(spec.inputs, Path(tmp))
            spec = plan_timing(spec, resolved)
            bundle = build_bundle(spec, resolved)
    except VaceError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    control_u8 = (bundle.frames * 255.0 + 0.5).astype(np.uint8)
    write_video(control_u8, out / "control.mp4", fps=spec.fps)
    write_mask_video(bundle.masks, out / "mask.mp4", fps=spec.fps)
    mask_u8 = np.repeat((bundle.masks[..., None] * 255).astype(np.uint8), 3, axis=-1)
    write_video(np.concatenate([control_u8, mask_u8], axis=2), out / "preview.mp4", fps=spec.fps)
    refs = []
    for i, r in enumerate(bundle.reference_images):
        from PIL import Image

        refs.append(f"reference_{i}.png")
        Image.fromarray((r * 255.0 + 0.5).astype(np.uint8)).save(out / refs[-1])
    (out / "bundle.json").write_text(json.dumps(bundle_report(spec, bundle, refs), indent=2, default=str))
    typer.echo(f"control: {out / 'control.mp4'}\nmask:    {out / 'mask.mp4'}\npreview: {out / 'preview.mp4'}\n"
               f"bundle:  {out / 'bundle.json'}")


def bundle_report(spec: JobSpec, bundle: ControlBundle, reference_files: list[str]) -> dict[str, Any]:
    """What bundle.json holds, so every conditioning rule can be checked from outside (docs/CONDITIONING.md).

    The job geometry after `plan_timing`, its window plan (start, end, overlap, seed, prompt of each window),
    the control options, the files written, the masked share, and the whole bundle info (sampled source frame
    ids, padding, mask pairing, tracker, annotator backends...).
    """
    from vace_local.core.windows import spec_windows

    return {
        "task": spec.task,
        "width": spec.width,
        "height": spec.height,
        "num_frames": spec.num_frames,
        "fps": spec.fps,
        "window_frames": spec.window_frames,
        "overlap_frames": spec.overlap_frames,
        "windows": [w.as_dict() for w in spec_windows(spec, seed=spec.seed if spec.seed >= 0 else None)],
        "control_options": spec.control.model_dump(mode="json"),
        "files": {"control": "control.mp4", "mask": "mask.mp4", "preview": "preview.mp4",
                  "reference_images": reference_files},
        "masked_fraction": float(bundle.masks.mean()),
        **bundle.info,
    }


app = typer.Typer(add_completion=False)
app.command()(preprocess)
