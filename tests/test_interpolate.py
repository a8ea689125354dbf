"""Temporal downsample planning and frame interpolation (flow default, RIFE via ONNX, cross-fade baseline)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.media_helpers import held_out_psnr, psnr
from vace_local.core.errors import InputError
from vace_local.core.spec import JobSpec, TemporalOptions
from vace_local.engine.interpolate import (
    TemporalPlan,
    interpolate_clip,
    plan_for_spec,
    plan_temporal,
    write_frames_zip,
)

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


def textured(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth random texture (optical flow needs structure), uint8 RGB."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)


def shifted_clip(n: int, dx: int = 2) -> np.ndarray:
    big = textured(64, 96 + dx * n, seed=1)
    return np.stack([big[:, i * dx: i * dx + 96] for i in range(n)])


@pytest.mark.parametrize(
    ("n", "d", "gen"), [(17, 1, 9), (81, 1, 41), (81, 2, 29), (81, 3, 21), (241, 5, 41), (49, 4, 13), (21, 2, 9)]
)
def test_plan_covers_the_requested_frames(n, d, gen):
    p = plan_temporal(n, 16, downsample=d)
    assert p.gen_frames == gen
    assert p.gen_frames % 4 == 1 and p.gen_frames < n
    assert p.bundle_frames == (p.gen_frames - 1) * p.stride + 1 >= n
    assert p.output_frames == n and p.stride <= d + 1


def test_plan_lowers_a_useless_factor_and_auto_picks_by_fps():
    assert plan_temporal(17, 16, downsample=5).stride == 4  # strides 4..6 all generate 5 frames: take 4
    assert plan_temporal(49, 16, downsample=4).gen_frames == 13
    assert not plan_temporal(81, 16).active
    assert plan_temporal(81, 30, auto=True, auto_min_fps=15).stride == 2
    assert plan_temporal(81, 50, auto=True, auto_min_fps=15).stride == 3
    assert plan_temporal(81, 16, auto=True, auto_min_fps=15).stride == 1
    assert plan_temporal(81, 30, downsample=1, auto=True, auto_min_fps=5).stride == 2  # explicit wins
    extra = plan_temporal(17, 16, extra=2)
    assert (extra.output_frames, extra.output_fps, extra.active) == (49, 48, True)


def test_plan_from_spec_builds_generation_and_bundle_specs():
    spec = JobSpec(num_frames=33, fps=16, temporal=TemporalOptions(temporal_downsample_factor=1))
    p = plan_for_spec(spec)
    assert (p.stride, p.gen_frames, p.bundle_frames) == (2, 17, 33)
    assert p.generation_spec(spec).num_frames == 17 and p.generation_spec(spec).fps == 8
    assert p.bundle_spec(spec).num_frames == 33
    assert spec.num_frames == 33  # the original is untouched


def test_clip_with_downsample_factor_1_has_the_requested_frame_count():
    """Generate the planned frames, restore: the job gets exactly the frames it asked for."""
    from vace_local.core.bundle import ControlBundle

    p = plan_temporal(17, 16, downsample=1)
    bundle = ControlBundle.blank(p.bundle_frames, 32, 48)
    sub = p.subsample(bundle)
    sub.check(p.gen_frames, 32, 48)
    generated = shifted_clip(p.gen_frames)[:, :32, :48]
    out = p.restore(generated)
    assert out.shape == (17, 32, 48, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0], generated[0]) and np.array_equal(out[2], generated[1])


def test_interpolate_clip_lengths_and_endpoints():
    clip = shifted_clip(4)
    for factor in (1, 2, 3, 6):
        out = interpolate_clip(clip, factor, "crossfade")
        assert len(out) == 3 * factor + 1
        assert np.array_equal(out[::factor], clip)


def test_crossfade_midpoint_is_the_average():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 200, np.uint8)
    mid = interpolate_clip(np.stack([a, b]), 2, "crossfade")[1]
    assert int(mid.mean()) == 100


def test_flow_recovers_a_translation():
    """A texture sliding 4 px per frame: the flow midpoint matches the true frame, the blend does not."""
    clip = shifted_clip(3, dx=4)
    truth = clip[1][8:-8, 12:-12]
    flow = interpolate_clip(clip[::2], 2, "flow")[1][8:-8, 12:-12]
    fade = interpolate_clip(clip[::2], 2, "crossfade")[1][8:-8, 12:-12]
    assert psnr(flow, truth) > 30
    assert psnr(flow, truth) > psnr(fade, truth) + 5


def test_flow_beats_crossfade_on_a_real_video():
    """Held-out frames of the VACE boxing-cats clip (640x360, 33 frames, every 2nd frame dropped).

    Recorded in docs/PERFORMANCE.md: flow 23.2 dB vs cross-fade 21.2 dB.
    """
    import cv2

    path = FIXTURES / "vace" / "test.mp4"
    if not path.is_file():
        pytest.skip(f"fixture {path} absent (shared/fixtures not mounted)")
    from tests.media_helpers import read_video

    clip = read_video(path, indices=list(range(33)))
    frames = np.stack([cv2.resize(f, (640, 360), interpolation=cv2.INTER_AREA) for f in clip.frames])
    flow = held_out_psnr(frames, 2, "flow")
    fade = held_out_psnr(frames, 2, "crossfade")
    print(f"held-out PSNR: flow {flow:.2f} dB, cross-fade {fade:.2f} dB")
    assert flow > fade + 1.0


def test_rife_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VACE_RIFE_ONNX", str(tmp_path / "missing.onnx"))
    with pytest.raises(InputError) as exc:
        interpolate_clip(shifted_clip(2), 2, "rife")
    assert exc.value.field == "interpolator_model" and "VACE_RIFE_ONNX" in exc.value.message


def _tiny_rife_onnx(path: Path) -> Path:
    """A stand-in RIFE graph (img0, img1, timestep) → img0·(1−t) + img1·t, built with onnx.helper."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    img = ["N", 3, "H", "W"]
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["one", "timestep"], ["omt"]),
            helper.make_node("Mul", ["img0", "omt"], ["a"]),
            helper.make_node("Mul", ["img1", "timestep"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["out"]),
        ],
        "tiny_rife",
        [helper.make_tensor_value_info("img0", TensorProto.FLOAT, img),
         helper.make_tensor_value_info("img1", TensorProto.FLOAT, img),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1, 1, 1, 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, img)],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_rife_onnx_backend_runs_through_the_real_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("VACE_RIFE_ONNX", str(_tiny_rife_onnx(tmp_path / "rife.onnx")))
    clip = shifted_clip(3)[:, :50, :70]  # not a multiple of 32: exercises padding/cropping
    out = interpolate_clip(clip, 2, "rife")
    ref = interpolate_clip(clip, 2, "crossfade")
    assert out.shape == (5, 50, 70, 3)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_frames_zip_holds_every_frame(tmp_path):
    import cv2

    clip = shifted_clip(5)
    path = write_frames_zip(clip, tmp_path / "frames.zip")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names == [f"frame_{i:05d}.png" for i in range(5)]
        back = cv2.imdecode(np.frombuffer(zf.read(names[3]), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(back, clip[3])


def test_inactive_plan_is_a_no_op():
    p = TemporalPlan(stride=1, bundle_frames=17, gen_frames=17, num_frames=17, extra=0, fps=16)
    clip = shifted_clip(17)
    assert p.restore(clip) is clip
