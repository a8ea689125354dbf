"""The temporal plan through the real run path: tiny model on CPU, real preprocessing and encoding."""

from __future__ import annotations

import json
import zipfile

from vace_local.core.media import probe_video
from vace_local.core.spec import JobSpec, OutputOptions, TemporalOptions
from vace_local.run.job import run_job


def test_downsample_factor_1_gives_the_requested_frame_count(tmp_path):
    spec = JobSpec(model="tiny", prompt="a cat", width=64, height=64, num_frames=17, fps=16,
                   num_inference_steps=2, seed=1, temporal=TemporalOptions(temporal_downsample_factor=1),
                   output=OutputOptions(frames_zip=True))
    res = run_job(spec, tmp_path)
    assert res.num_frames == 17 and res.fps == 16
    n, fps, w, h = probe_video(res.video_path)
    assert (n, round(fps), w, h) == (17, 16, 64, 64)
    meta = json.loads(res.metadata_path.read_text())
    assert meta["control"]["temporal_stride"] == 2 and meta["control"]["generated_frames"] == 9
    assert "interpolate" in res.timings
    with zipfile.ZipFile(res.extras["frames_zip"]) as zf:
        assert len(zf.namelist()) == 17


def test_num_interpolated_frames_scales_frames_and_fps(tmp_path):
    spec = JobSpec(model="tiny", prompt="a cat", width=64, height=64, num_frames=17, fps=8,
                   num_inference_steps=2, seed=1, temporal=TemporalOptions(num_interpolated_frames=1))
    res = run_job(spec, tmp_path)
    assert (res.num_frames, res.fps) == (33, 16)
    n, fps, _, _ = probe_video(res.video_path)
    assert (n, round(fps)) == (33, 16)


def test_last_image_survives_temporal_downsampling(tmp_path, fixtures_dir):
    """The plan picks a stride that ends exactly on the job's last frame, so the last image is generated."""
    from preprocessors import build_bundle
    from vace_local.core.inputs import ResolvedInputs
    from vace_local.core.spec import JobSpec
    from vace_local.engine.interpolate import plan_for_spec

    last = fixtures_dir / "vace" / "test.jpg"
    spec = JobSpec(model="tiny", width=64, height=48, num_frames=33, inputs={"last_image": str(last)},
                   temporal={"temporal_downsample_factor": 2})
    plan = plan_for_spec(spec)
    assert plan.bundle_frames == 33 and plan.gen_frames < 33
    bundle = plan.subsample(build_bundle(plan.bundle_spec(spec), ResolvedInputs(last_image=last)))
    assert bundle.masks[-1].max() == 0.0  # the real last image, kept
    assert (bundle.masks[:-1] == 1.0).all()


def test_match_input_num_frames_returns_the_input_length(tmp_path):
    from tests.media_helpers import index_video
    from vace_local.core.media import probe_video
    from vace_local.core.spec import JobSpec
    from vace_local.run.job import run_job

    video = index_video(tmp_path / "in.mp4", 30, 16.0, width=64, height=48)
    spec = JobSpec(model="tiny", width=64, height=48, num_frames=17, num_inference_steps=1, seed=1,
                   inputs={"video": str(video)}, control={"match_input_num_frames": True})
    res = run_job(spec, tmp_path / "out")
    assert res.num_frames == 30 and probe_video(res.video_path)[0] == 30


def test_submit_matched_frame_count_is_trimmed_back(tmp_path):
    """fal probes at submit and applies match_input_num_frames itself: the job carries the count to return."""
    from server.dialects.common import SourceInfo
    from server.dialects.fal.serving import timing
    from tests.media_helpers import index_video
    from vace_local.core.media import probe_video
    from vace_local.core.spec import JobSpec
    from vace_local.run.job import run_job

    video = index_video(tmp_path / "in.mp4", 30, 25.0, width=64, height=48)
    n, fps, trim = timing(17, 16, True, True, SourceInfo(num_frames=30, fps=25.0, width=64, height=48), [])
    assert (n, fps, trim) == (33, 25, 30)
    spec = JobSpec(model="tiny", width=64, height=48, num_frames=n, fps=fps, num_inference_steps=1, seed=1,
                   inputs={"video": str(video)}, control={"output_num_frames": trim})
    res = run_job(spec, tmp_path / "out")
    assert res.num_frames == 30 and probe_video(res.video_path)[0] == 30
