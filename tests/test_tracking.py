"""Flow mask tracking: synthetic moving shape (IoU) and the boxing-cats fixture (mask stays on the cat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from preprocessors import build_bundle
from preprocessors.testing import LocalInputs, moving_square
from preprocessors.tracking import track_mask
from vace_local.errors import InputError
from vace_local.spec import JobSpec

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
    s = JobSpec(task="inpainting", width=416, height=240, num_frames=81, inputs={"video": "v", "mask_image": "m"})
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
