"""Long video (issue 21): the window plan, the extension conditioning at the pipeline's input, colour correction on
known drift, the prompt schedule, clip extension, and resume after an interrupted run (denoiser calls counted)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from vace_local.core.bundle import ControlBundle
from vace_local.core.errors import JobCancelled
from vace_local.core.events import Progress
from vace_local.core.spec import JobSpec
from vace_local.core.timing import match_input_timing
from vace_local.core.windows import plan_windows, spec_windows
from vace_local.run.long_video import DirWindowStore, LabStats, delta_e, from_lab, run_windows, to_lab

SMALL = dict(model="tiny", prompt="a cat", width=32, height=32, num_inference_steps=2)


# -- the plan ---------------------------------------------------------------------------------------------------
def _check_plan(windows: list, total: int, window: int, overlap: int) -> None:
    """Every plan: windows of exactly `window` frames (or one short job), in order, covering 0..total, each
    keeping at least `overlap` frames of the one before."""
    assert windows[0].start == 0 and windows[-1].end == total
    if total <= window:
        assert len(windows) == 1 and windows[0].frames == total
        return
    for prev, w in zip(windows, windows[1:], strict=False):
        assert w.frames == window and w.start > prev.start
        assert w.overlap == prev.end - w.start >= overlap


@pytest.mark.parametrize(("total", "starts"), [
    (81, [0]),  # exactly one window
    (85, [0, 4]),  # just above one window: the last window moves back, keeping 77 frames
    (146, [0, 65]),  # an exact multiple of the step
    (257, [0, 65, 130, 176]),  # the example: the last window keeps 35
    (961, [0, 65, 130, 195, 260, 325, 390, 455, 520, 585, 650, 715, 780, 845, 880]),
])
def test_window_plan_edges(total: int, starts: list[int]) -> None:
    windows = plan_windows(total, 81, 16, seed=7)
    assert [w.start for w in windows] == starts
    assert [w.seed for w in windows] == [7 + i for i in range(len(starts))]
    _check_plan(windows, total, 81, 16)


@pytest.mark.parametrize("window", [17, 21, 81, 241])
@pytest.mark.parametrize("overlap", [1, 4, 8, 13])
def test_window_plan_rules_hold_for_every_length(window: int, overlap: int) -> None:
    for total in range(17, 1000, 4):
        _check_plan(plan_windows(total, window, overlap, seed=None), total, window, overlap)


def test_match_input_long_video_is_planned_whole() -> None:
    """A 30 s clip at 30 fps with match_input_num_frames: all of it (481 frames at 16 fps), in windows; at its
    own fps (match_input_frames_per_second) the same clip is 901 frames."""
    t = match_input_timing(81, 16, match_frames=True, match_fps=False, source_frames=900, source_fps=30.0)
    assert t.num_frames == 481
    spec = JobSpec(**SMALL, num_frames=t.num_frames)
    assert len(spec_windows(spec)) == 8  # 1 + ceil((481 - 81) / 65)
    t30 = match_input_timing(81, 16, match_frames=True, match_fps=True, source_frames=900, source_fps=30.0)
    assert (t30.num_frames, t30.fps) == (901, 30)
    capped = match_input_timing(81, 16, match_frames=True, match_fps=False, source_frames=9000, source_fps=30.0)
    assert capped.num_frames == 961 and any("VACE_MAX_FRAMES" in n for n in capped.notes)


def test_prompt_schedule_picks_the_prompt_in_force_at_each_window() -> None:
    spec = JobSpec(**SMALL, num_frames=257, prompts=[{"start_frame": 100, "prompt": "b"},
                                                     {"start_frame": 200, "prompt": "c"}])
    # first new frames: 0, 81, 146, 211
    assert [w.prompt for w in spec_windows(spec)] == ["a cat", "a cat", "b", "c"]


@pytest.mark.parametrize(("update", "field", "words"), [
    ({"window_frames": 80}, "window_frames", "4k+1"),
    ({"overlap_frames": 78}, "overlap_frames", "window_frames - 4"),
    ({"num_frames": 965}, "num_frames", "VACE_MAX_FRAMES"),
    ({"prompts": [{"start_frame": 300, "prompt": "x"}]}, "prompts", "past the job's last frame"),
    ({"prompts": [{"start_frame": 3, "prompt": "x"}, {"start_frame": 3, "prompt": "y"}]}, "prompts", "same"),
    ({"extend_frames": 40}, "extend", "go together"),
    ({"color_correction": 1.5}, "color_correction", "less than or equal"),
])
def test_bad_window_fields_name_the_field(update: dict, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as err:
        JobSpec(**{**SMALL, "num_frames": 257, **update})
    assert field in str(err.value) and words in str(err.value)


def test_server_maximum_comes_from_vace_max_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    JobSpec(**SMALL, num_frames=961)
    monkeypatch.setenv("VACE_MAX_FRAMES", "1921")
    JobSpec(**SMALL, num_frames=1921)
    monkeypatch.setenv("VACE_MAX_FRAMES", "241")
    with pytest.raises(ValidationError, match="at most 241"):
        JobSpec(**SMALL, num_frames=245)


# -- conditioning at the pipeline's input -------------------------------------------------------------------------
class _Recorder:
    """Records what WanVACEPipeline.prepare_video_latents receives: the video and mask after diffusers' own
    preprocessing, i.e. exactly what the VAE encodes into the VACE context."""

    def __init__(self, pipe: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.original = pipe.prepare_video_latents

        def record(video: Any, mask: Any, reference_images: Any = None, *args: Any, **kwargs: Any) -> Any:
            self.calls.append({"video": ((video[0].permute(1, 2, 3, 0).float().numpy() + 1.0) * 127.5),
                               "mask": mask[0, 0].float().numpy(),
                               "refs": len(reference_images[0]) if reference_images else 0})
            return self.original(video, mask, reference_images, *args, **kwargs)

        pipe.prepare_video_latents = record


@pytest.fixture(scope="module")
def tiny_engine():
    from vace_local.engine.engine import get_engine

    return get_engine("tiny")


def test_next_window_is_conditioned_on_the_frames_already_made(tmp_path: Path, tiny_engine: Any,
                                                               fixtures_dir: Path) -> None:
    """Window k+1's control frames at the pipeline's input: its first `overlap` frames are window k's last
    frames (mask 0, kept), the rest its slice of the job's control video (mask 1); the reference image goes to
    every window."""
    from preprocessors import build_bundle
    from vace_local.core.inputs import fetch_inputs
    from vace_local.run.job import run_job

    rec = _Recorder(tiny_engine.pipe)
    try:
        spec = JobSpec(**SMALL, num_frames=33, window_frames=17, overlap_frames=4, seed=2, task="none",
                       inputs={"video": str(fixtures_dir / "vace" / "test.mp4"),
                               "reference_images": [str(fixtures_dir / "vace" / "girl.png")]})
        store = DirWindowStore(tmp_path / "windows")
        res = run_job(spec, tmp_path / "out", engine=tiny_engine, window_store=store)
    finally:
        tiny_engine.pipe.prepare_video_latents = rec.original
    meta = json.loads(res.metadata_path.read_text())
    windows = meta["windows"]
    assert [(w["start"], w["end"], w["overlap"]) for w in windows] == [(0, 17, 0), (13, 30, 4), (16, 33, 14)]
    assert len(rec.calls) == 3 and all(c["refs"] == 1 for c in rec.calls)
    job_bundle = build_bundle(spec, fetch_inputs(spec.inputs, tmp_path / "in"))
    made = [store.load(i) for i in range(3)]
    timeline = np.zeros((33, 32, 32, 3), np.uint8)
    for w, frames in zip(windows, made, strict=True):
        timeline[w["start"] + w["overlap"]: w["end"]] = frames[w["overlap"]:]
    for w, call in zip(windows, rec.calls, strict=True):
        ov, s, e = w["overlap"], w["start"], w["end"]
        kept = call["video"][:ov]
        assert np.abs(kept - timeline[s: s + ov]).max(initial=0.0) < 1e-3  # exactly the frames already made
        assert (call["mask"][:ov] == 0).all() and (call["mask"][ov:] == 1).all()
        control = job_bundle.frames[s + ov: e] * 255.0
        assert np.abs(call["video"][ov:] - control).max() < 1e-3  # the job's own control slice
    # window 2 (index 1) keeps window 1's last 4 frames as it made them
    assert np.abs(rec.calls[1]["video"][:4] - made[0][-4:]).max() < 1e-3
    assert res.num_frames == 33


# -- colour correction on known drift -----------------------------------------------------------------------------
@dataclass
class _Stats:
    def as_dict(self) -> dict[str, Any]:
        return {"forwards": 1}


@dataclass
class _Out:
    frames: np.ndarray
    stats: _Stats


class DriftingModel:
    """A controlled generator with a known colour drift: it continues its kept frames (their Lab offset from the
    true scene, read at its input), jumps by `jump` Lab units at each new window and drifts by `ramp` across
    it, as the VAE round trip and VACE do at every join (Wan2GP #268, #2132)."""

    def __init__(self, scene: np.ndarray, jump: np.ndarray, ramp: np.ndarray) -> None:
        self.scene, self.scene_lab = scene, to_lab(scene)
        self.jump, self.ramp = jump, ramp
        self.calls: list[tuple[int, int]] = []

    def effective_spec(self, spec: JobSpec) -> JobSpec:
        return spec

    def sample(self, spec: JobSpec, bundle: ControlBundle, *, seed: int, on_progress: Any,
               should_cancel: Any) -> _Out:
        kept = int((bundle.masks.reshape(len(bundle.masks), -1).max(axis=1) == 0).sum())
        start = int(bundle.info["window"]["start"])
        n = spec.num_frames
        offset = np.zeros(3)
        if kept:
            offset = LabStats.of(to_lab(bundle.frames[:kept])).mean - LabStats.of(
                self.scene_lab[start: start + kept]).mean
        j = np.arange(n)[:, None] / (n - 1)
        shift = offset + (self.jump if kept else 0) + self.ramp * j  # (n, 3)
        lab = self.scene_lab[start: start + n] + shift[:, None, None, :].astype(np.float32)
        self.calls.append((start, kept))
        return _Out(from_lab(lab).astype(np.float32), _Stats())


def _scene(frames: int, size: int = 48) -> np.ndarray:
    """A textured, slowly panning scene (uint8-exact floats in [0, 1])."""
    rng = np.random.default_rng(0)
    tex = rng.random((size, size * 3, 3)).astype(np.float32)
    import cv2

    tex = cv2.GaussianBlur(tex, (0, 0), 3) * 0.6 + 0.2
    return np.stack([tex[:, t // 2: t // 2 + size] for t in range(frames)]).astype(np.float32)


def _drift_run(strength: float, anchor_weight: float | None = None, blend: bool = False) -> tuple[Any, Any]:
    total, window, overlap = 101, 21, 5
    scene = _scene(total)
    model = DriftingModel(scene, jump=np.array([3.0, 2.5, -3.0]), ramp=np.array([1.5, -1.0, 1.5]))
    spec = JobSpec(**{**SMALL, "width": 48, "height": 48}, num_frames=total, window_frames=window,
                   overlap_frames=overlap, color_correction=strength)
    windows = spec_windows(spec, seed=1)
    bundle = ControlBundle.blank(total, 48, 48)
    kwargs = {} if anchor_weight is None else {"anchor_weight": anchor_weight}
    run = run_windows(model, spec, bundle, windows, timeline_frames=total, on_progress=lambda p: None,
                      should_cancel=lambda: False, blend=blend, **kwargs)
    return run, windows


def _join_jumps(frames: np.ndarray, windows: list) -> list[float]:
    return [delta_e(frames[w.start + w.overlap - 1: w.start + w.overlap], frames[w.start + w.overlap:
                                                                                 w.start + w.overlap + 1])
            for w in windows[1:]]


def test_colour_correction_removes_join_drift_and_stays_anchored() -> None:
    """≥ 80 % less colour difference across every join, the last window within ΔE 2 of the first; correcting
    towards the previous window only (anchor 0) lets the drift carry forward."""
    raw, windows = _drift_run(0.0)
    fixed, _ = _drift_run(1.0)
    chained, _ = _drift_run(1.0, anchor_weight=0.0)
    blended, _ = _drift_run(1.0, blend=True)
    before, after = _join_jumps(raw.frames, windows), _join_jumps(fixed.frames, windows)
    first, last = windows[0], windows[-1]

    def drift(run: Any) -> float:
        return delta_e(run.frames[first.start: first.end], run.frames[last.start + last.overlap: last.end])

    figures = {"join_dE_before": [round(x, 2) for x in before], "join_dE_after": [round(x, 2) for x in after],
               "join_dE_blended": [round(x, 2) for x in _join_jumps(blended.frames, windows)],
               "last_vs_first_dE": {"none": round(drift(raw), 2), "previous_only": round(drift(chained), 2),
                                    "anchored": round(drift(fixed), 2), "anchored_blend": round(drift(blended), 2)}}
    print(json.dumps(figures))
    for b, a in zip(before, after, strict=True):
        assert a <= 0.2 * b, figures
    assert drift(fixed) < 2.0, figures
    assert drift(chained) > 2 * drift(fixed) and drift(raw) > 5 * drift(fixed), figures


def test_colour_correction_strength_zero_changes_nothing() -> None:
    raw, windows = _drift_run(0.0)
    # the first window is never corrected; with strength 0 each window's new frames are as decoded
    assert len(windows) == 6 and raw.frames.dtype == np.uint8


# -- resume ------------------------------------------------------------------------------------------------------
def _count_forwards(engine: Any) -> tuple[dict[str, int], Any]:
    counter = {"n": 0}

    def hook(*_: Any) -> None:
        counter["n"] += 1

    return counter, engine.pipe.transformer.register_forward_hook(hook)


def test_interrupted_job_resumes_at_its_first_unfinished_window(tmp_path: Path, tiny_engine: Any) -> None:
    """Stopped during window 3 of 4, run again with the same store: windows 1-2 are not denoised again (the
    transformer's forward calls are counted), and the random seed is the stored one."""
    from vace_local.run.job import run_job

    spec = JobSpec(**{**SMALL, "width": 16, "height": 16}, num_frames=53, window_frames=17, overlap_frames=4, seed=-1)
    counter, handle = _count_forwards(tiny_engine)
    per_window: list[int] = []
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.message == "window 2/4, step 0/2":
            per_window.append(counter["n"])  # window 1's forwards

    def cancel_in_window_3() -> bool:
        return any(p.message.startswith("window 3/4, step 1") for p in seen)

    try:
        store = DirWindowStore(tmp_path / "w")
        with pytest.raises(JobCancelled):
            run_job(spec, tmp_path / "cut", engine=tiny_engine, window_store=store, on_progress=progress,
                    should_cancel=cancel_in_window_3)
        assert sorted(p.name for p in store.root.glob("window_*.npy")) == ["window_0000.npy", "window_0001.npy"]
        first = [store.load(i) for i in range(2)]
        counter["n"] = 0
        resumed = run_job(spec, tmp_path / "again", engine=tiny_engine, window_store=store)
        resumed_calls = counter["n"]
    finally:
        handle.remove()
    meta = json.loads(resumed.metadata_path.read_text())
    assert [w["resumed"] for w in meta["windows"]] == [True, True, False, False]
    print(json.dumps({"forwards_per_window": per_window[0], "forwards_after_resume": resumed_calls}))
    assert per_window[0] > 0 and resumed_calls == 2 * per_window[0]  # windows 3 and 4 only
    assert meta["seed"] == store.stored_seed() and meta["sampling"]["windows_resumed"] == 2
    assert all(np.array_equal(a, store.load(i)) for i, a in enumerate(first)) and resumed.num_frames == 53


def test_store_of_another_plan_is_not_reused(tmp_path: Path) -> None:
    store = DirWindowStore(tmp_path)
    store.begin({"seed": 1, "windows": []})
    store.save(0, np.zeros((17, 8, 8, 3), np.uint8))
    assert store.load(0) is not None and store.stored_seed() == 1
    store.begin({"seed": 2, "windows": []})
    assert store.load(0) is None and store.stored_seed() == 2


# -- every dialect: hosted limits by default, long video as an opt-in extension -----------------------------------
def test_dialects_take_long_video_as_an_opt_in_extension() -> None:
    from server.dialects.aiml.serving import aiml_to_jobspec, parse_aiml_request
    from server.dialects.common import SourceInfo
    from server.dialects.fal.serving import fal_to_jobspec, parse_fal_request
    from server.dialects.openai.schemas import VideoCreateRequest
    from server.dialects.openai.serving import frames_for
    from server.dialects.wavespeed.schemas import WanVaceInput
    from server.dialects.wavespeed.serving import to_spec

    for body in ({"prompt": "x", "duration": 16}, {"prompt": "x", "duration": 61, "long_video": True}):
        with pytest.raises(ValidationError) as err:
            WanVaceInput.model_validate(body)
        assert "duration" in str(err.value) and "VACE_MAX_FRAMES" in str(err.value)
    assert to_spec(WanVaceInput.model_validate({"prompt": "x", "duration": 16, "long_video": True}))[0].num_frames \
        == 257
    ext = to_spec(WanVaceInput.model_validate({"prompt": "x", "duration": 5, "extend": "https://a.invalid/c.mp4"}))[0]
    assert (ext.inputs.extend, ext.extend_frames, ext.extend_output) == ("https://a.invalid/c.mp4", 80, "full")
    src = SourceInfo(num_frames=81, fps=16.0, width=1280, height=720)
    with pytest.raises(ValidationError, match="long_video"):
        parse_fal_request("pose", {"prompt": "x", "video_url": "https://a.invalid/v.mp4", "num_frames": 257})
    fal = parse_fal_request("", {"prompt": "x", "num_frames": 257, "long_video": True})
    assert fal_to_jobspec("", fal, model="tiny", source=src).spec.num_frames == 257
    aiml = {"model": "alibaba/wan2.2-vace-fun-a14b-depth", "video_url": "https://a.invalid/v.mp4", "prompt": "x",
            "num_frames": 257}
    with pytest.raises(ValidationError, match="long_video"):
        parse_aiml_request(aiml)
    tr = aiml_to_jobspec(parse_aiml_request({**aiml, "long_video": True}), model="tiny", source=src)
    assert tr.spec.num_frames == 257
    assert frames_for(VideoCreateRequest(prompt="x", seconds="16").seconds) == 257  # OpenAI: no opt-in needed
    assert len(spec_windows(JobSpec(**SMALL, num_frames=257))) == 4


def test_cli_writes_a_257_frame_video_whose_metadata_lists_its_windows(tmp_path: Path) -> None:
    """The issue's command (at 16×16, one step)."""
    from typer.testing import CliRunner

    from vace_local.cli import app
    from vace_local.core.media import probe_video

    result = CliRunner().invoke(app, [
        "generate", "--model", "tiny", "--num-frames", "257", "--window-frames", "81", "--overlap-frames", "16",
        "--size", "16x16", "--steps", "1", "--seed", "9", "--prompt", "a cat", "--prompt-schedule", "150:a dog",
        "--color-correction", "0.5", "--out", str(tmp_path), "--name", "long", "-q"])
    assert result.exit_code == 0, result.output
    assert probe_video(tmp_path / "long.mp4")[0] == 257
    meta = json.loads((tmp_path / "long.json").read_text())
    assert [(w["start"], w["end"], w["overlap"], w["seed"], w["prompt"]) for w in meta["windows"]] == [
        (0, 81, 0, 9, "a cat"), (65, 146, 16, 10, "a cat"), (130, 211, 16, 11, "a cat"), (176, 257, 35, 12, "a dog")]
    assert meta["spec"]["color_correction"] == 0.5 and meta["result"]["num_frames"] == 257


def test_clip_extension_keeps_the_clip_tail_and_adds_frames(tmp_path: Path, tiny_engine: Any,
                                                            fixtures_dir: Path) -> None:
    """`inputs.extend` + `extend_frames`: the first window keeps the clip's last `overlap_frames` frames (at the
    pipeline's input, mask 0); `full` returns clip + continuation, `continuation` only the new frames."""
    from vace_local.core.media import probe_video
    from vace_local.run.job import run_job

    clip = str(fixtures_dir / "vace" / "test2.mp4")  # 25 frames at 25 fps → 16 frames at 16 fps
    rec = _Recorder(tiny_engine.pipe)
    try:
        spec = JobSpec(**{**SMALL, "width": 16, "height": 16}, seed=1, window_frames=17, overlap_frames=4,
                       inputs={"extend": clip}, extend_frames=20)
        full = run_job(spec, tmp_path / "full", engine=tiny_engine)
        cont = run_job(spec.model_copy(update={"extend_output": "continuation"}), tmp_path / "cont",
                       engine=tiny_engine)
    finally:
        tiny_engine.pipe.prepare_video_latents = rec.original
    meta = json.loads(full.metadata_path.read_text())
    assert meta["extend"] == {"source_frames": 16, "kept_frames": 4, "new_frames": 20, "output": "full"}
    assert [(w["start"], w["end"], w["overlap"]) for w in meta["windows"]] == [(0, 17, 4), (7, 24, 10)]
    first = rec.calls[0]
    assert (first["mask"][:4] == 0).all() and (first["mask"][4:] == 1).all()
    assert probe_video(full.video_path)[0] == 36 and probe_video(cont.video_path)[0] == 20


def test_schedule_entries_no_window_uses_are_refused() -> None:
    """A prompt no window would take (inside a one-window job, or shadowed by the next entry) is an error naming
    it and the windows' first new frames, never accepted and silently unused."""
    from vace_local.core.errors import InputError
    from vace_local.run.plan import plan_job

    with pytest.raises(InputError, match=r"prompts\[0\].*first new frame.*0 \(window_frames 81"):
        plan_job(JobSpec(**SMALL, prompts=[{"start_frame": 40, "prompt": "b"}]), None)
    with pytest.raises(InputError, match=r"prompts\[0\].*0, 81, 146, 211"):
        plan_job(JobSpec(**SMALL, num_frames=257, prompts=[{"start_frame": 100, "prompt": "b"},
                                                           {"start_frame": 120, "prompt": "c"}]), None)
    with pytest.raises(ValidationError, match="extend_output"):
        JobSpec(**SMALL, extend_output="continuation")


def test_stored_specs_validate_again() -> None:
    """The worker validates the stored spec (every field set): long-video fields must survive the round trip."""
    for spec in (JobSpec(**SMALL, num_frames=257, prompts=[{"start_frame": 100, "prompt": "b"}]),
                 JobSpec(**SMALL, inputs={"extend": "a.mp4"}, extend_frames=20, extend_output="continuation")):
        assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
