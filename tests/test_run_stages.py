"""The run path's seams: one match_input rule for submit and run, the engine's stats as a return value, outputs
that carry their kind and content type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.dialects.common import SourceInfo
from server.dialects.fal.serving import timing
from tests.media_helpers import index_video
from vace_local.core.bundle import ControlBundle
from vace_local.core.media import probe_video
from vace_local.core.spec import JobSpec
from vace_local.engine.engine import get_engine
from vace_local.run.job import run_job
from vace_local.run.plan import plan_job

SMALL = dict(model="tiny", prompt="a cat", width=64, height=48, num_frames=17, num_inference_steps=2, seed=1)


@pytest.mark.parametrize(("frames", "fps"), [(31, 24.0), (60, 30.0), (30, 25.0), (50, 10.0)])
@pytest.mark.parametrize(("match_frames", "match_fps"), [(True, False), (True, True), (False, True)])
def test_submit_and_run_path_decide_match_input_alike(tmp_path: Path, frames: int, fps: float, match_frames: bool,
                                                      match_fps: bool) -> None:
    """fal sizes a probed job at submit; an unprobed job is sized by the run path. Both follow one rule, so the
    frame count, fps and returned length do not depend on whether the submit could fetch the video."""
    video = index_video(tmp_path / "in.mp4", frames, fps, width=64, height=48)
    n, real_fps, w, h = probe_video(video)
    submit = timing(17, 16, match_frames, match_fps, SourceInfo(num_frames=n, fps=real_fps, width=w, height=h), [])
    spec = JobSpec(**SMALL, inputs={"video": str(video)},
                   control={"match_input_num_frames": match_frames, "match_input_frames_per_second": match_fps})
    plan = plan_job(spec, video)
    assert (plan.spec.num_frames, plan.spec.fps, plan.keep_frames) == submit


def test_run_path_returns_the_frames_that_came_from_the_input(tmp_path: Path) -> None:
    """31 frames at 24 fps played at 16 fps last 20.7 frames: 21 generated, all from the input, none trimmed
    (the old submit rule floored to 20 and trimmed one real frame away)."""
    video = index_video(tmp_path / "in.mp4", 31, 24.0, width=64, height=48)
    spec = JobSpec(**SMALL, inputs={"video": str(video)}, control={"match_input_num_frames": True})
    res = run_job(spec, tmp_path / "out")
    assert res.num_frames == probe_video(res.video_path)[0] == 21
    assert timing(17, 16, True, False, SourceInfo(num_frames=31, fps=24.0, width=64, height=48), []) == (21, 16, None)


def test_engine_sample_returns_its_stats() -> None:
    engine = get_engine("tiny")
    spec = JobSpec(**{**SMALL, "num_inference_steps": 3})
    gen = engine.sample(spec, ControlBundle.blank(17, 48, 64), seed=1)
    assert gen.frames is not None and gen.frames.dtype == np.float32 and gen.frames.shape == (17, 48, 64, 3)
    stats = gen.stats
    assert (stats.num_inference_steps, stats.cache.computed, stats.cache.forwards) == (3, 3, 6)  # CFG: 2 per step
    assert stats.as_dict()["forwards"] == 6 and stats.as_dict() == engine.last_run
    assert np.array_equal(gen.uint8(), engine.generate(spec, ControlBundle.blank(17, 48, 64), seed=1))


def test_outputs_carry_their_kind_and_content_type(tmp_path: Path) -> None:
    spec = JobSpec(**SMALL, output={"frames_zip": True, "save_control": True})
    res = run_job(spec, tmp_path)
    assert [(o.kind, o.content_type) for o in res.outputs] == [
        ("video", "video/mp4"), ("frames_zip", "application/zip"), ("control", "video/mp4"),
        ("mask", "video/mp4"), ("metadata", "application/json")]
    assert all(o.path.parent == tmp_path and o.path.is_file() for o in res.outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(o.path.name for o in res.outputs)
    meta = json.loads(res.metadata_path.read_text())
    assert meta["sampling"]["forwards"] == 4 and meta["sampling"]["num_inference_steps"] == 2
    assert set(res.timings) >= {"load", "fetch", "preprocess", "generate", "encode", "total"}
