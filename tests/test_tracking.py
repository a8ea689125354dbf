"""Flow mask tracking: synthetic moving shape (IoU) and the boxing-cats fixture (mask stays on the cat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from preprocessors import build_bundle
from preprocessors.tracking import track_mask
from tests.media_helpers import LocalInputs, moving_square
from vace_local.core.errors import InputError
from vace_local.core.spec import JobSpec

FIX = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("speed", [(2.0, 1.0), (4.0, -1.5), (0.5, 0.25)])
def test_flow_tracks_moving_square(speed):
    frames, truth = moving_square(33, 256, 192, size=48, speed=speed)
    masks = track_mask(frames, truth[0], backend="flow")
    assert masks.shape == truth.shape and set(np.unique(masks)) <= {0.0, 1.0}
    ious = [iou(masks[i], truth[i]) for i in range(len(truth))]
    assert min(ious) >= 0.9, ious


def test_static_and_unknown_tracker():
    frames, truth = moving_square(5, 64, 48, size=12)
    static = track_mask(frames, truth[0], backend="static")
    assert all(np.array_equal(m, truth[0]) for m in static)
    with pytest.raises(InputError) as e:
        track_mask(frames, truth[0], backend="nope")
    assert e.value.field == "control.mask_tracker"


@pytest.mark.skipif(not (FIX / "vace" / "test.mp4").is_file(), reason="shared fixtures folder absent")
def test_flow_tracking_keeps_the_boxing_cat():
    # mask_test.png marks the left-hand cat on frame 0 (~20 % of the frame); the right cat fills the right side.
    s = JobSpec(task="inpainting", width=416, height=240, num_frames=81, inputs={"video": "v", "mask_image": "m"},
                control={"mask_tracker": "flow"})
    b = build_bundle(s, LocalInputs(video=FIX / "vace" / "test.mp4", mask_image=FIX / "vace" / "mask_test.png"))
    area = b.masks.mean(axis=(1, 2))
    assert 0.15 < area[0] < 0.25
    drift = area / area[0]
    # measured: area stays within 0.8x..1.5x of frame 0 over 81 frames (5 s)
    assert drift.min() > 0.6 and drift.max() < 1.8, drift
    for m in b.masks:
        xs = np.nonzero(m)[1]
        assert np.mean(xs < 0.6 * 416) > 0.8  # the mask stays on the left-hand cat
    assert np.all(b.frames[b.masks > 0.5] == 0.5)


@pytest.fixture(scope="module")
def tiny_sam2_dir(tmp_path_factory):
    from preprocessors import tiny, weights

    d = tmp_path_factory.mktemp("sam2-annotators")
    tiny.save_tiny_sam2(d / weights.FILES["sam2"])
    return d


def _square_clip(tmp_path: Path) -> LocalInputs:
    from PIL import Image

    from vace_local.core.media import write_video

    frames, truth = moving_square(9, 64, 64, size=20)
    video = write_video(frames, tmp_path / "v.mp4", fps=16, quality="maximum")
    Image.fromarray((truth[0] * 255).astype(np.uint8)).save(tmp_path / "m.png")
    return LocalInputs(video=video, mask_image=tmp_path / "m.png")


def test_sam2_tracks_through_build_bundle_on_tiny_weights(tiny_sam2_dir, tmp_path, monkeypatch):
    # random weights: the masks after frame 0 are noise; this checks the real loader, the predictor calls and
    # the output contract (one binary mask per frame at the job size, frame 0 = the user's mask)
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tiny_sam2_dir))
    inputs = _square_clip(tmp_path)
    s = JobSpec(task="inpainting", width=64, height=64, num_frames=17, inputs={"video": "v", "mask_image": "m"},
                control={"mask_tracker": "sam2"})
    b = build_bundle(s, inputs)  # 9-frame clip tracked, then padded to 17 with gray + mask 1
    b.check(17, 64, 64)
    assert set(np.unique(b.masks)) <= {0.0, 1.0}
    assert np.all(b.masks[9:] == 1) and np.all(b.frames[9:] == 0.5)
    _, truth = moving_square(9, 64, 64, size=20)
    assert np.array_equal(b.masks[0], truth[0])
    assert b.info["mask_tracker"] == "sam2" and b.info["mask_source"] == "mask_image"
    assert b.info["mask_area_first_last"][0] == pytest.approx(truth[0].mean())
    assert np.all(b.frames[b.masks > 0.5] == 0.5)  # tracked region grayed like any inpainting mask


def test_sam2_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    from vace_local.core.errors import ModelNotFoundError

    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tmp_path / "empty"))
    frames, truth = moving_square(5, 64, 64, size=12)
    with pytest.raises(ModelNotFoundError) as e:
        track_mask(frames, truth[0], backend="sam2")
    assert "sam2/sam2.1_hiera_large.pt" in str(e.value) and "vace-local download annotators" in str(e.value)


def test_sam2_checkpoint_not_matching_its_config_is_a_clear_error(tiny_sam2_dir, tmp_path, monkeypatch):
    # the tiny checkpoint without its config sidecar is read as Hiera-L: the loader must say so, not crash
    from preprocessors import weights
    from vace_local.core.errors import ModelNotFoundError

    rel = weights.FILES["sam2"]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes((tiny_sam2_dir / rel).read_bytes())
    monkeypatch.setenv("VACE_ANNOTATORS_DIR", str(tmp_path))
    frames, truth = moving_square(5, 64, 64, size=12)
    with pytest.raises(ModelNotFoundError) as e:
        track_mask(frames, truth[0], backend="sam2")
    assert "does not match configs/sam2.1/sam2.1_hiera_l.yaml" in str(e.value)
