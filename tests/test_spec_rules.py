"""The model's rules, kept once in vace_local.core.spec, and the places that used to spell them out themselves."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from vace_local.core.spec import (
    DTYPES,
    FP8_MODES,
    MAX_FRAMES,
    MIN_FRAMES,
    OFFLOAD_POLICIES,
    JobSpec,
    Task,
    round_frames_4k1,
    task_needs_mask,
    task_needs_video,
)


def test_round_up_is_the_smallest_legal_count_within_the_model_range() -> None:
    assert [round_frames_4k1(n) for n in (1, 17, 18, 50, 81, 240, 241, 500)] == [17, 17, 21, 53, 81, 241, 241, 241]
    # unbounded (the temporal plan generates as few as 5 frames)
    assert [round_frames_4k1(n, lo=None, hi=None) for n in (0, 1, 2, 5, 6, 9)] == [1, 1, 5, 5, 9, 9]


def test_round_down_keeps_under_a_cap() -> None:
    assert [round_frames_4k1(n, "down") for n in (10, 17, 20, 33, 36, 999)] == [17, 17, 17, 33, 33, 241]
    assert [round_frames_4k1(n, "down", lo=None, hi=None) for n in (2, 5, 8, 9)] == [1, 5, 5, 9]


@pytest.mark.parametrize("n", range(MIN_FRAMES, MAX_FRAMES + 1))
def test_every_rounded_count_is_accepted_by_the_spec(n: int) -> None:
    for mode in ("up", "down"):
        JobSpec(num_frames=round_frames_4k1(n, mode))


def test_spec_error_suggests_both_neighbours() -> None:
    with pytest.raises(ValidationError, match=r"num_frames must be of the form 4k\+1 \(e\.g\. 77 or 81\), got 80"):
        JobSpec(num_frames=80)


def test_task_table() -> None:
    assert [t for t in get_args(Task) if not task_needs_video(t)] == ["none"]
    assert [t for t in get_args(Task) if task_needs_mask(t)] == ["inpainting"]
    with pytest.raises(ValidationError, match="task 'pose' needs inputs.video"):
        JobSpec(task="pose")
    with pytest.raises(ValidationError, match="task 'inpainting' needs inputs.mask_video or inputs.mask_image"):
        JobSpec(task="inpainting", inputs={"video": "v.mp4"})


def test_engine_vocabularies_are_the_settings_and_engine_options() -> None:
    """The server settings and EngineOptions accept exactly the spec's words, and name the field otherwise."""
    from server.settings import Settings
    from vace_local.engine.engine import EngineOptions

    assert OFFLOAD_POLICIES == ("auto", "none", "model", "group", "sequential")
    assert DTYPES == ("auto", "bf16", "fp16", "fp32") and FP8_MODES == ("none", "storage", "linear")
    for policy in OFFLOAD_POLICIES:
        assert Settings(offload=policy).offload == EngineOptions(offload=policy).offload == policy
    for field, bad in (("offload", "disk"), ("dtype", "int8"), ("fp8", "int4")):
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: bad})
    with pytest.raises(ValueError, match="offload must be one of auto, none, model, group, sequential, got 'disk'"):
        EngineOptions(offload="disk")
