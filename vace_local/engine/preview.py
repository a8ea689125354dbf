"""Live previews of a running denoise: the current denoised estimate, projected linearly to RGB, as a small
animated strip.

Why x0 and not the step callback's latent: the pipeline's `callback_on_step_end` sees the post-step latent, which
is still mostly noise early on. For flow matching the model predicts a velocity `v` and the denoised estimate is
`x0 = x_t − σ_t·v` (what UniPC / DPM++ compute internally as `x0_pred`), so the tap wraps the job's scheduler
`step(v, t, x_t)`: it sees the guided prediction, the sample and (through `step_index`) σ_t, whatever the sampler,
the expert (Wan 2.2) or the step cache did. At the last Euler step σ_next = 0, so x0 is exactly the final latent.

The projection is Wan 2.1's published latent→RGB factors (ComfyUI `comfy/latent_formats.py`, class `Wan21`; also
Wan2GP's `RGB_factors.py`): one 16×3 matrix and a bias per latent pixel, then `(rgb + 1) / 2`. The pipeline's
latents are already in that normalised space (`(z − mean) / std`), and Wan 2.2 A14B / VACE Fun use the same
VAE, so no extra weights are needed. Reference-image latent frames (at the front) are skipped.

A run opts in with `preview_scope(every, write)` around it (the worker, the CLI); the engine reads the scope
(a ContextVar, like `events.cancel_scope`), so nothing in between threads a callback through.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Wan 2.1 latent → RGB (rows: latent channels 0…15; columns R, G, B), ComfyUI `latent_formats.Wan21`.
WAN21_LATENT_RGB: tuple[tuple[float, float, float], ...] = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_LATENT_RGB_BIAS: tuple[float, float, float] = (-0.1835, -0.0868, -0.3360)
#: Seconds of video per latent frame (the Wan VAE packs 4 frames into one), at the models' 16 fps.
LATENT_FRAME_S = 4 / 16


def latent_to_rgb(latents: Any) -> np.ndarray:
    """Pipeline-space latents `[B, 16, F, H, W]` (batch 0 is used) or `[16, F, H, W]` → uint8 `[F, H, W, 3]`."""
    import torch

    x = latents[0] if latents.ndim == 5 else latents
    x = x.detach().float()
    factors = torch.tensor(WAN21_LATENT_RGB, dtype=torch.float32, device=x.device)
    bias = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=torch.float32, device=x.device)
    rgb = torch.einsum("cfhw,cr->fhwr", x, factors) + bias
    return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu().numpy()


def flow_x0(sample: Any, velocity: Any, sigma: Any) -> Any:
    """The flow-matching denoised estimate `x0 = x_t − σ_t·v`."""
    return sample - sigma * velocity


@dataclass(frozen=True)
class Preview:
    """One preview: the step it was taken after, the RGB strip, and the latents it came from (refs skipped)."""

    step: int
    total: int
    frames: np.ndarray  # uint8 [F, H/8, W/8, 3]
    x0: Any  # the denoised estimate, [B, 16, F, H/8, W/8]
    latents: Any  # the scheduler's output for this step (x_{t_next}); the final latent after the last step


PreviewFn = Callable[[Preview], None]


@dataclass(frozen=True)
class PreviewSink:
    every: int
    write: PreviewFn


_sink: ContextVar[PreviewSink | None] = ContextVar("vace_preview", default=None)


@contextmanager
def preview_scope(every: int, write: PreviewFn) -> Iterator[None]:
    """Runs inside this scope call `write` with a preview every `every` steps and after the last (0: none)."""
    token = _sink.set(PreviewSink(every, write) if every > 0 else None)
    try:
        yield
    finally:
        _sink.reset(token)


def current_sink() -> PreviewSink | None:
    return _sink.get()


def attach_preview(scheduler: Any, total: int, skip_frames: int) -> SchedulerTap | None:
    """Tap a job's fresh scheduler when the current run asked for previews (`preview_scope`); else None.
    The engine makes a new scheduler per job, so the tap goes with it."""
    sink = current_sink()
    return SchedulerTap(scheduler, total, skip_frames, sink).__enter__() if sink else None


class SchedulerTap:
    """While entered, wraps `scheduler.step` (an instance attribute over the class method) to emit previews."""

    def __init__(self, scheduler: Any, total: int, skip_frames: int, sink: PreviewSink) -> None:
        self.scheduler, self.total, self.skip, self.sink = scheduler, total, skip_frames, sink
        self.count = 0
        self.seconds = 0.0  # time spent making previews (not in the scheduler itself)

    def __enter__(self) -> SchedulerTap:
        self._orig = self.scheduler.step
        self.scheduler.step = self._step
        return self

    def __exit__(self, *exc: object) -> None:
        self.scheduler.__dict__.pop("step", None)

    def _step(self, model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._orig(model_output, timestep, sample, *args, **kwargs)
        self.count += 1
        if self.count % self.sink.every == 0 or self.count == self.total:
            import time

            t = time.perf_counter()
            sigma = self.scheduler.sigmas[self.scheduler.step_index - 1].to(sample.device, sample.dtype)
            x0 = flow_x0(sample, model_output, sigma)[:, :, self.skip:]
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            self.sink.write(Preview(self.count, self.total, latent_to_rgb(x0), x0, prev[:, :, self.skip:]))
            self.seconds += time.perf_counter() - t
        return out


def write_strip(frames: np.ndarray, path: Path) -> Path:
    """The preview frames as a looping animated WebP (one latent frame per 0.25 s), replaced atomically so a
    reader never sees half a file."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=int(LATENT_FRAME_S * 1000),
                   loop=0, quality=80, method=0)
    os.replace(tmp, path)
    return path
