"""The run path and the CLI as a user meets them: files on disk, seeds, bad specs, cancel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imageio_ffmpeg import get_ffmpeg_exe
from typer.testing import CliRunner

from tests.conftest import ROOT
from tests.media_helpers import read_video
from vace_local.cli import app
from vace_local.core.errors import JobCancelled
from vace_local.core.media import probe_video
from vace_local.core.spec import JobSpec
from vace_local.run.job import run_job

SMALL = dict(model="tiny", prompt="a cat", width=64, height=48, num_frames=17, num_inference_steps=2)


def test_generate_script_writes_playable_mp4_and_metadata(tmp_path: Path) -> None:
    """A new user's first command: scripts/generate.py with the tiny model."""
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", "tiny", "--prompt", "a cat boxing",
           "--size", "64*48", "--num-frames", "21", "--fps", "12", "--steps", "2", "--seed", "5",
           "--out", str(tmp_path), "--name", "clip"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny" in proc.stderr and "noise" in proc.stderr  # it says it's a smoke model
    video, meta = tmp_path / "clip.mp4", tmp_path / "clip.json"
    assert f"video:    {video}" in proc.stdout
    n, fps, w, h = probe_video(video)
    assert (n, fps, w, h) == (21, 12.0, 64, 48)
    probe = subprocess.run([get_ffmpeg_exe(), "-hide_banner", "-i", str(video)], capture_output=True, text=True)
    assert "h264" in probe.stderr and "yuv420p" in probe.stderr
    data = json.loads(meta.read_text())
    assert data["seed"] == 5 and data["spec"]["num_frames"] == 21
    assert data["model"]["tiny"] is True and "noise" in data["warning"]
    assert set(data["result"]["timings"]) >= {"fetch", "preprocess", "generate", "encode", "total"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "clip.mp4"]  # no temp leftovers


def test_seed_minus_one_reports_the_seed_used_and_reproduces(tmp_path: Path) -> None:
    first = run_job(JobSpec(**SMALL, seed=-1), tmp_path / "a")
    assert 0 <= first.seed <= 2**31 - 1
    meta = json.loads(first.metadata_path.read_text())
    assert meta["seed"] == first.seed and meta["spec"]["seed"] == -1
    again = run_job(JobSpec(**SMALL, seed=first.seed), tmp_path / "b")
    a, b = read_video(first.video_path).frames, read_video(again.video_path).frames
    assert np.array_equal(a, b)


def test_reference_image_job_and_control_previews(tmp_path: Path, fixtures_dir: Path) -> None:
    spec = JobSpec(**SMALL, seed=1, inputs={"reference_images": [str(fixtures_dir / "vace" / "girl.png")]},
                   output={"save_control": True})
    res = run_job(spec, tmp_path)
    assert set(res.extras) == {"control", "mask"}
    assert probe_video(res.extras["control"])[0] == 17
    ctl = read_video(res.extras["control"]).frames
    assert abs(float(ctl.mean()) - 127.5) < 2.0  # no video: gray control
    assert read_video(res.extras["mask"]).frames.min() > 250  # and mask all ones (white)


def test_raw_control_video_task_none(tmp_path: Path, fixtures_dir: Path) -> None:
    spec = JobSpec(**SMALL, seed=1, task="none", inputs={"video": str(fixtures_dir / "wan22" / "pose_skeleton.mp4")})
    res = run_job(spec, tmp_path)
    n, fps, w, h = probe_video(res.video_path)
    assert (n, w, h) == (17, 64, 48) and fps == 16.0


def test_cancel_leaves_nothing_behind(tmp_path: Path) -> None:
    calls = {"n": 0}

    def should_cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 4  # after fetch/preprocess checks, during denoising

    with pytest.raises(JobCancelled):
        run_job(JobSpec(**{**SMALL, "num_inference_steps": 4}, seed=1), tmp_path, should_cancel=should_cancel)
    assert list(tmp_path.iterdir()) == []


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--size", "830*480"], "width"),
        (["--num-frames", "80"], "num_frames"),
        (["--steps", "0"], "num_inference_steps"),
        (["--sampler", "heun"], "sampler"),
        (["--ref", "a.png"] * 6, "reference_images"),
        (["--context-scale", "3"], "context_scale"),
        (["--seed", "-2"], "seed"),
    ],
)
def test_bad_specs_name_the_field_and_write_nothing(tmp_path: Path, args: list[str], field: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--model", "tiny", "--prompt", "x", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert not out.exists()


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    result = runner.invoke(app, ["generate", "--model", str(missing), "--size", "64*48", "--num-frames", "17",
                                 "--out", str(out)])
    assert result.exit_code == 1
    assert "not found" in result.output and str(missing) in result.output
    assert not out.exists()


def test_missing_hub_model_says_how_to_fetch_it(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--model", "wan2.1-vace-1.3b", "--size", "64*48", "--num-frames",
                                 "17", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "vace-local download wan2.1-vace-1.3b" in result.output


def test_unreadable_input_names_the_input(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-video.mp4"
    bad.write_text("hello")
    result = runner.invoke(app, ["generate", "--model", "tiny", "--size", "64*48", "--num-frames", "17",
                                 "--steps", "1", "--video", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "video" in result.output
    assert not any((tmp_path / "o").glob("*.mp4"))


def test_fast_path_flags_reach_the_engine_and_metadata(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--model", "tiny", "--size", "64*48", "--num-frames", "17", "--steps",
                                 "2", "--seed", "3", "--cfg-batch", "--attention", "sdpa", "--step-cache-threshold",
                                 "0", "--out", str(tmp_path), "--name", "fast", "-q"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "fast.json").read_text())
    assert meta["model"]["fast_path"]["cfg_batch"] is True
    assert meta["sampling"]["num_inference_steps"] == 2 and meta["sampling"]["step_cache_threshold"] == 0


def test_bad_fp8_mode_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--model", "tiny", "--fp8", "int4", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "fp8" in result.output
    assert not (tmp_path / "o").exists()


def test_tiny_model_runs_annotator_tasks_on_tiny_annotators(tmp_path: Path, fixtures_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Smoke mode covers preprocessing too: a pose job runs with no downloaded annotator weights."""
    monkeypatch.delenv("VACE_ANNOTATORS_DIR", raising=False)
    spec = JobSpec(**SMALL, seed=1, task="pose", inputs={"video": str(fixtures_dir / "wan22" / "talking_person.mp4")},
                   output={"save_control": True})
    res = run_job(spec, tmp_path)
    meta = json.loads(res.metadata_path.read_text())
    assert meta["control"]["task"] == "pose"
    assert probe_video(res.video_path)[0] == 17
    import os

    from vace_local.engine.tiny import default_cache_dir

    assert meta["control"]["annotator"] == "dwpose-onnx"  # the tiny DWPose files, passed to the annotator
    assert (default_cache_dir() / "tiny" / "annotators" / ".tiny-complete-v2").is_file()
    assert "VACE_ANNOTATORS_DIR" not in os.environ  # the folder is passed explicitly, the environment untouched


def test_cancel_lands_inside_preprocessing_frame_loop(tmp_path: Path, fixtures_dir: Path) -> None:
    """A cancel sent while frames are being decoded / annotated stops the run there, not after preprocessing."""
    import time
    import traceback

    from vace_local.core.events import Progress

    state: dict[str, float] = {}

    def on_progress(p: Progress) -> None:
        if p.stage == "preprocess":
            state.setdefault("preprocess_at", time.monotonic())

    def should_cancel() -> bool:
        if "preprocess_at" in state and "cancel_at" not in state:
            state["cancel_at"] = time.monotonic()  # the user presses cancel as preprocessing starts
        return "cancel_at" in state

    spec = JobSpec(**{**SMALL, "num_frames": 81}, seed=1, task="depth",
                   inputs={"video": str(fixtures_dir / "wan22" / "talking_person.mp4")})
    with pytest.raises(JobCancelled) as err:
        run_job(spec, tmp_path, on_progress=on_progress, should_cancel=should_cancel)
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert "iter_frames" in frames, frames  # raised from the frame loop, not from the check after build_bundle
    assert time.monotonic() - state["cancel_at"] < 2.0
    assert list(tmp_path.iterdir()) == []


def test_preview_every_saves_the_live_preview(tmp_path: Path) -> None:
    """`--preview-every N` keeps <name>.preview.webp up to date: after the run it is the last step's x0 strip."""
    from PIL import Image

    result = runner.invoke(app, ["generate", "--model", "tiny", "--size", "64*48", "--num-frames", "17", "--steps",
                                 "3", "--preview-every", "2", "--out", str(tmp_path), "--name", "pv", "-q"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "pv.preview.webp"
    assert f"preview:  {path}" in result.output
    with Image.open(path) as im:
        assert im.format == "WEBP" and im.n_frames == 5 and im.size == (64 // 8, 48 // 8)
    result = runner.invoke(app, ["generate", "--model", "tiny", "--size", "64*48", "--num-frames", "17", "--steps",
                                 "1", "--out", str(tmp_path), "--name", "none", "-q"])
    assert result.exit_code == 0 and not (tmp_path / "none.preview.webp").exists()  # off by default on the CLI
