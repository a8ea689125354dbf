"""Long video: generate a job window by window (the plan is `vace_local.core.windows`), join without seams, resume.

Each window after the first is conditioned like VACE `firstclip` extension: its first `overlap` frames are the
frames already made (the previous window's last frames, or the tail of the clip being extended) with mask 0
(keep); the rest is the window's slice of the job's control video and mask (gray + mask 1 for text-to-video).
Reference images go to every window. After decoding, the window's colours are matched in CIELAB to what came
before (mean and spread per channel over the overlap, a Reinhard transfer as in Wan2GP's
`match_and_blend_colors`) and, towards the window's end, to the first window (the anchor), so drift does not
carry forward from window to window. The overlap is then taken from the earlier side: those frames were already
made and conditioned the window, so nothing that was shown as kept changes. The measured choice and figures are
in docs/CONDITIONING.md (Long video).

Finished windows go to a `WindowStore`; a job that is run again with the same plan takes them from there instead
of denoising them again (the server keeps the store in the job's storage, so another box can take over).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vace_local.core.bundle import ControlBundle
from vace_local.core.errors import JobCancelled
from vace_local.core.events import CancelFn, Progress, ProgressFn
from vace_local.core.spec import JobSpec
from vace_local.core.windows import Window

#: Frames whose statistics stand for the first window (its last frames), when the overlap is shorter.
ANCHOR_FRAMES = 16
#: How far a window's end is pulled to the first window's colours (times the job's colour-correction strength).
ANCHOR_WEIGHT = 1.0


# -- colour --------------------------------------------------------------------------------------------------
def to_lab(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) RGB, uint8 or float in [0, 1] → float32 CIELAB (L 0..100)."""
    import cv2

    rgb = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2LAB) for f in rgb])


def from_lab(lab: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_LAB2RGB) for f in lab]).clip(0.0, 1.0)


@dataclass(frozen=True)
class LabStats:
    """Mean and spread per L, a, b channel of some frames."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, lab: np.ndarray) -> LabStats:
        flat = lab.reshape(-1, 3).astype(np.float64)
        return cls(flat.mean(axis=0), flat.std(axis=0))

    def lerp(self, other: LabStats, w: float) -> LabStats:
        return LabStats(self.mean + (other.mean - self.mean) * w, self.std + (other.std - self.std) * w)


def delta_e(a: np.ndarray, b: np.ndarray) -> float:
    """CIE76 ΔE between the mean colours of two sets of frames (RGB)."""
    return float(np.linalg.norm(LabStats.of(to_lab(a)).mean - LabStats.of(to_lab(b)).mean))


def correct_window(frames: np.ndarray, overlap: int, reference: LabStats, anchor: LabStats | None,
                   strength: float, anchor_frames: int = ANCHOR_FRAMES,
                   anchor_weight: float = ANCHOR_WEIGHT) -> np.ndarray:
    """Match a new window's colours to what came before; returns float frames in [0, 1].

    Frame j is mapped channel by channel from its window's statistics to target statistics
    (`(x - m_src) · s_tgt / s_src + m_tgt`, Reinhard in Lab). Over the overlap the source is the window's own
    overlap and the target `reference`, the frames already made there (so the join matches). Towards the end
    both move linearly to the window's last frames and `anchor`, the first window's last frames (so the window
    does not carry the drift forward); without an anchor the overlap's transform holds throughout.
    `strength` blends the result with the frames as decoded.
    """
    if strength <= 0.0:
        return frames
    lab = to_lab(frames)
    n = len(lab)
    src_o = LabStats.of(lab[:overlap])
    src_t = LabStats.of(lab[max(overlap, n - anchor_frames):])
    tgt_t = reference.lerp(anchor, anchor_weight) if anchor is not None else reference
    span = max(1, n - overlap)
    out = np.empty_like(lab)
    for j in range(n):
        # Without an anchor the overlap's transform holds for the whole window (colour changes inside it stay).
        w = 0.0 if j < overlap or anchor is None else (j - overlap + 1) / span
        src, tgt = src_o.lerp(src_t, w), reference.lerp(tgt_t, w)
        scale = np.where(src.std > 1e-3, tgt.std / np.maximum(src.std, 1e-3), 1.0)
        out[j] = ((lab[j] - src.mean) * scale + tgt.mean).astype(np.float32)
    corrected = from_lab(out)
    return (frames + (corrected - frames) * strength).astype(np.float32)


# -- resume --------------------------------------------------------------------------------------------------
class WindowStore(Protocol):
    """Where finished windows are kept for a resume: `begin(plan)` names the job's plan (a window is only reused
    under the same plan)."""

    def begin(self, plan: dict[str, Any]) -> None: ...

    def load(self, index: int) -> np.ndarray | None: ...

    def save(self, index: int, frames: np.ndarray) -> None: ...

    def stored_seed(self) -> int | None: ...


@dataclass
class DirWindowStore:
    """Windows as `window_NNNN.npy` (uint8 frames, lossless) plus `plan.json` in a folder.

    `fetch(name)` gives a local copy of a file stored elsewhere (None: not stored), `published(path)` is called
    after each file is written (the server publishes it to its storage). Defaults: the folder is the storage.
    """

    root: Path
    fetch: Callable[[str], Path | None] | None = None
    published: Callable[[Path], None] | None = None

    def _file(self, name: str) -> Path | None:
        p = self.root / name
        if p.is_file():
            return p
        return self.fetch(name) if self.fetch else None

    def _stored_plan(self) -> dict[str, Any] | None:
        p = self._file("plan.json")
        try:
            return json.loads(p.read_text()) if p else None
        except (OSError, ValueError):
            return None

    def stored_seed(self) -> int | None:
        plan = self._stored_plan()
        return int(plan["seed"]) if plan and isinstance(plan.get("seed"), int) else None

    def begin(self, plan: dict[str, Any]) -> None:
        if self._stored_plan() != plan:  # another plan (or none): nothing stored can be reused
            self.root.mkdir(parents=True, exist_ok=True)
            for old in self.root.glob("window_*.npy"):
                old.unlink()
            self._write("plan.json", lambda fh: fh.write(json.dumps(plan, sort_keys=True).encode()))

    def load(self, index: int) -> np.ndarray | None:
        p = self._file(f"window_{index:04d}.npy")
        if p is None:
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def save(self, index: int, frames: np.ndarray) -> None:
        self._write(f"window_{index:04d}.npy", lambda fh: np.save(fh, frames, allow_pickle=False))

    def _write(self, name: str, write: Callable[[Any], None]) -> None:
        """Write under a temporary name and rename, so a kill mid-write never leaves a half window."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / name
        tmp = final.with_name(f".{name}.tmp")
        with open(tmp, "wb") as fh:  # through a handle: np.save would add .npy to a bare path
            write(fh)
        tmp.replace(final)
        if self.published:
            self.published(final)


# -- the window loop -----------------------------------------------------------------------------------------
@dataclass
class LazyBundle:
    """A job's control built window by window (`build(a, b)`: its frames a..b as a ControlBundle), so a long
    job never holds its whole control video; used where that is exact (no input video to sample over time)."""

    build: Callable[[int, int], ControlBundle]
    reference_images: list[np.ndarray]
    info: dict[str, Any]

    def slice(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        part = self.build(a, b)
        return part.frames, part.masks


def _control_slice(bundle: ControlBundle | LazyBundle, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(bundle, LazyBundle):
        return bundle.slice(a, b)
    return bundle.frames[a:b], bundle.masks[a:b]


def window_bundle(bundle: ControlBundle | LazyBundle, w: Window, kept: np.ndarray, offset: int) -> ControlBundle:
    """Window `w`'s conditioning: its first `overlap` frames are `kept`, the frames already made there (mask 0),
    the rest its slice of the job's control video and mask; the job's reference images. `bundle` holds
    timeline frames from `offset` on (an extended clip's kept tail comes before it)."""
    keep_end = w.start + w.overlap
    control, control_masks = _control_slice(bundle, keep_end - offset, w.end - offset)
    frames = np.empty((w.frames, *control.shape[1:]), dtype=np.float32)
    masks = np.empty((w.frames, *control_masks.shape[1:]), dtype=np.float32)
    if w.overlap:
        frames[: w.overlap] = kept.astype(np.float32) / 255.0
        masks[: w.overlap] = 0.0
    frames[w.overlap:] = control
    masks[w.overlap:] = control_masks
    return ControlBundle(frames, masks, bundle.reference_images, dict(bundle.info, window=w.as_dict()))


class _Timeline:
    """The frames made so far. With a `sink`, frames no later window reads are handed on in order and dropped,
    so memory holds about one window whatever the job's length; without one, all are kept."""

    def __init__(self, sink: Callable[[np.ndarray], None] | None) -> None:
        self.sink = sink
        self.frames: dict[int, np.ndarray] = {}
        self.flushed = 0

    def get(self, a: int, b: int) -> np.ndarray:
        return np.stack([self.frames[i] for i in range(a, b)])

    def put(self, a: int, frames: np.ndarray) -> None:
        for i, f in enumerate(frames):
            self.frames[a + i] = f

    def flush(self, upto: int) -> None:
        """Frames before `upto` are final: hand them to the sink."""
        if self.sink is None or upto <= self.flushed:
            return
        self.sink(np.stack([self.frames.pop(i) for i in range(self.flushed, upto)]))
        self.flushed = upto

    def all(self, total: int) -> np.ndarray | None:
        if self.sink is not None:
            self.flush(total)
            return None
        return self.get(0, total)


def _uint8(frames: np.ndarray) -> np.ndarray:
    return (frames * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


@dataclass
class WindowRun:
    """What the window loop made: the timeline's frames and a record per window for the metadata."""

    #: (T, H, W, 3) uint8, or None when the frames went to a sink.
    frames: np.ndarray | None
    windows: list[dict[str, Any]]
    sampling: dict[str, Any]


def run_windows(engine: Any, gen: JobSpec, bundle: ControlBundle | LazyBundle, windows: list[Window], *,
                timeline_frames: int, offset: int = 0, prefix: np.ndarray | None = None, on_progress: ProgressFn,
                should_cancel: CancelFn, store: WindowStore | None = None, anchor_weight: float = ANCHOR_WEIGHT,
                blend: bool = False, sink: Callable[[np.ndarray], None] | None = None) -> WindowRun:
    """Generate `windows` in order on `engine` (an Engine or a parallel GroupEngine) and join them.

    `prefix`: the frames the timeline starts with (the tail of a clip being extended; the anchor of the colour
    correction). Windows found in `store` (same plan) are taken from it and not denoised again; each new one is
    saved there as soon as it is made. Progress is one bar over every window's steps. `blend` cross-fades the
    overlap instead of keeping the earlier frames (measured against it in tests/test_long_video.py). `sink`
    receives the timeline's frames in order as soon as no later window needs them (then `frames` is None).
    """
    made = _Timeline(sink)
    if prefix is not None:
        made.put(0, prefix)
    steps = engine.effective_spec(gen).num_inference_steps
    total = steps * len(windows)
    strength = gen.color_correction
    anchor = LabStats.of(to_lab(prefix[-ANCHOR_FRAMES:])) if prefix is not None and len(prefix) else None
    anchor_prompt = windows[0].prompt
    records: list[dict[str, Any]] = []
    sampling: dict[str, Any] = {}
    for w in windows:
        if should_cancel():  # a cancel between windows lands before the next window's work
            raise JobCancelled("job cancelled between windows")
        done = w.index * steps
        label = f"window {w.index + 1}/{len(windows)}"
        record = w.as_dict()
        frames_u8 = store.load(w.index) if store is not None else None
        if frames_u8 is not None and frames_u8.shape == (w.frames, gen.height, gen.width, 3):
            record["resumed"] = True
            on_progress(Progress("generate", done + steps, total, message=f"{label}: taken from storage"))
        else:
            def window_progress(p: Progress, done: int = done, label: str = label) -> None:
                if p.stage == "generate" and p.total:
                    p = Progress("generate", done + p.step, total, message=f"{label}, step {p.step}/{p.total}")
                on_progress(p)

            on_progress(Progress("generate", done, total, message=f"{label}, step 0/{steps}"))
            spec_w = gen.model_copy(update={"num_frames": w.frames, "prompt": w.prompt})
            kept = made.get(w.start, w.start + w.overlap) if w.overlap else np.zeros((0,), np.uint8)
            out = engine.sample(spec_w, window_bundle(bundle, w, kept, offset), seed=w.seed,
                                on_progress=window_progress, should_cancel=should_cancel)
            frames = out.frames
            if w.overlap and strength > 0:
                reference = LabStats.of(to_lab(kept))
                frames = correct_window(frames, w.overlap, reference,
                                        anchor if w.prompt == anchor_prompt else None, strength,
                                        anchor_weight=anchor_weight)
            frames_u8 = _uint8(frames)
            if store is not None:
                store.save(w.index, frames_u8)
            record["resumed"] = False
            record["sampling"] = out.stats.as_dict()
            _add_sampling(sampling, record["sampling"])
        if blend and w.overlap:
            ramp = (np.arange(1, w.overlap + 1, dtype=np.float32) / (w.overlap + 1))[:, None, None, None]
            old = made.get(w.start, w.start + w.overlap).astype(np.float32)
            made.put(w.start, (old + (frames_u8[: w.overlap] - old) * ramp + 0.5).astype(np.uint8))
        made.put(w.start + w.overlap, frames_u8[w.overlap:])
        if anchor is None or w.prompt != anchor_prompt:  # the first window (or a new prompt) sets the anchor
            anchor, anchor_prompt = LabStats.of(to_lab(made.get(max(0, w.end - ANCHOR_FRAMES), w.end))), w.prompt
        records.append(record)
        if w.index + 1 < len(windows):
            made.flush(windows[w.index + 1].start)
    sampling["windows_denoised"] = sum(1 for r in records if not r["resumed"])
    sampling["windows_resumed"] = sum(1 for r in records if r["resumed"])
    return WindowRun(made.all(timeline_frames), records, sampling)


def _add_sampling(total: dict[str, Any], one: dict[str, Any]) -> None:
    """Settings from the first window run; counts (steps, forwards) summed over the windows run."""
    for key, value in one.items():
        if key in ("computed_steps", "skipped_steps", "forwards", "text_encode_s") and key in total:
            total[key] = round(total[key] + value, 4)
        elif key == "skipped_step_indices":
            total.setdefault(key, []).append(value)
        else:
            total.setdefault(key, value)
