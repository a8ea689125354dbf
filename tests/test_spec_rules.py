"""The model's rules, kept once in vace_local.core.spec, and the places that used to spell them out themselves."""

from __future__ import annotations

from itertools import combinations
from typing import get_args

import pytest
from pydantic import ValidationError

from vace_local.core.inputs import Fetcher, MediaRef, ResolvedInputs, walk_inputs
from vace_local.core.spec import (
    DTYPES,
    FP8_MODES,
    MAX_FRAMES,
    MAX_SIDE,
    MEDIA_FIELDS,
    MIN_FRAMES,
    OFFLOAD_POLICIES,
    TASKS,
    JobInputs,
    JobSpec,
    Task,
    input_gaps,
    round_frames_4k1,
    round_side,
    side_problem,
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


def test_media_inputs_are_declared_once() -> None:
    """JobInputs and ResolvedInputs are one declaration; what MEDIA_FIELDS says a task requires is what the
    spec refuses without it."""
    names = [f.name for f in MEDIA_FIELDS]
    assert names == list(JobInputs.model_fields) == list(ResolvedInputs.model_fields)
    assert {f.name: (f.kind, f.many) for f in MEDIA_FIELDS} == {
        "video": ("video", False), "mask_video": ("video", False), "mask_image": ("image", False),
        "reference_images": ("image", True), "first_image": ("image", False), "last_image": ("image", False),
        "extend": ("video", False)}
    video = next(f for f in MEDIA_FIELDS if f.name == "video")
    for task in TASKS:
        refused = True
        try:
            JobSpec(task=task, inputs={"mask_image": "m.png", "video": None} if task_needs_mask(task) else {})
            refused = False
        except ValidationError:
            pass
        assert refused == (task in video.required_by), task


MASKS = ("video", "mask_video", "mask_image")


@pytest.mark.parametrize("task", list(TASKS))
def test_every_entry_point_applies_the_same_task_input_rules(task: str) -> None:
    """For every task and every combination of video and masks, the spec, the OpenAI dialect (which takes every
    task) and the fal translation (its endpoints) refuse exactly when `input_gaps` finds a gap, naming the field."""
    from server.dialects.common import FieldError
    from server.dialects.fal.schemas import FAL_ENDPOINTS
    from server.dialects.fal.serving import fal_to_jobspec, parse_fal_request
    from server.dialects.openai.serving import parse_request, to_spec
    from server.errors import ApiError

    for n in range(4):
        for given in combinations(MASKS, n):
            values = {k: f"https://e.com/{k}" for k in given}
            gaps = input_gaps(task, values)
            try:
                JobSpec(task=task, inputs=values)
                assert not gaps, (task, given)
            except ValidationError as e:
                assert gaps and gaps[0].message() in str(e), (task, given, str(e))
            try:
                to_spec(parse_request({"prompt": "x", "task": task, **values}), None)
                assert not gaps, (task, given)
            except ApiError as e:
                want = gaps[0].field if gaps[0].rule in ("mask_needs_video", "task_ignores_mask") else "task"
                assert e.problems[0].field == want, (task, given, e.message)
            if task not in FAL_ENDPOINTS or task in ("", "none"):
                continue
            body = {"prompt": "x", "video_url": values.get("video", ""),
                    **{f"{k}_url": v for k, v in values.items() if k != "video"}}
            try:
                req = parse_fal_request(task, body)
                taken = {k: v for k, v in values.items() if k == "video" or getattr(req, f"{k}_url", None)}
                fal_to_jobspec(task, req, model="tiny")
                assert not input_gaps(task, {"video": body["video_url"], **taken}), (task, given)
            except FieldError as e:
                assert e.field.removesuffix("_url") in MASKS, (task, given, e.field)
            except ValidationError:  # the endpoint has no mask fields
                assert set(given) - {"video"}, (task, given)


@pytest.mark.parametrize("task", [t for t, rule in TASKS.items() if not rule.uses_masks])
def test_a_mask_the_task_would_not_use_is_refused_naming_it(task: str) -> None:
    """Canvas tasks (outpainting, reframe) make their own mask: a given mask would be silently dropped, so every
    entry point refuses it, naming the mask field in its own words."""
    from server.dialects.openai.serving import parse_request, to_spec
    from server.errors import ApiError

    for mask in ("mask_video", "mask_image"):
        values = {"video": "https://e.com/v.mp4", mask: "https://e.com/m"}
        assert [(g.rule, g.field) for g in input_gaps(task, values)] == [("task_ignores_mask", mask)]
        with pytest.raises(ValidationError, match=f"task '{task}' does not use inputs.{mask}"):
            JobSpec(task=task, inputs=values)
        with pytest.raises(ApiError) as e:
            to_spec(parse_request({"prompt": "x", "task": task, **values}), None)
        assert e.value.problems[0].field == mask and "inpainting" in e.value.message
    assert not input_gaps(task, {"video": "https://e.com/v.mp4"})


def test_frame_sides_are_one_rule() -> None:
    """The spec accepts a side exactly when `side_problem` has nothing to say; every rounded side is legal, and
    the OpenAI size parser and fal's sizes follow the same rule."""
    from server.dialects.fal.serving import SHORT_SIDE, SourceInfo, output_size
    from server.dialects.openai.schemas import parse_size

    for x in range(0, MAX_SIDE + 40, 4):
        ok = side_problem(x) is None
        try:
            JobSpec(width=x)
            assert ok, x
        except ValidationError:
            assert not ok, x
        try:
            parse_size(f"{x}x480")
            assert ok, x
        except ValueError as e:
            assert not ok and "multiple of 16" in str(e), x
        for mode in ("nearest", "down"):
            assert side_problem(round_side(x * 1.37, mode)) is None
    assert (round_side(23.9), round_side(24), round_side(31.9, "down"), round_side(9999)) == (16, 32, 16, MAX_SIDE)
    for tier in SHORT_SIDE:
        for w, h in ((4000, 300), (300, 4000), (1000, 999)):
            size = output_size(tier, "auto", SourceInfo(width=w, height=h, fps=16.0, num_frames=81))
            assert all(side_problem(v) is None for v in size), (tier, w, h, size)


def test_one_walk_hands_every_value_to_the_fetcher_by_its_form() -> None:
    seen: list[tuple[str, str, str, str]] = []

    def record(form: str):  # noqa: ANN202
        def fetch(ref: MediaRef) -> str:
            seen.append((form, ref.label, ref.kind, ref.stem))
            return f"/local/{ref.stem}"
        return fetch

    inputs = JobInputs(video=" DATA:video/mp4;base64,AAAA", mask_image="HTTPS://e.com/m.png",
                       reference_images=["file:///r0.png", "http://e.com/r1.png"], extend="/clips/c.mp4")
    out = walk_inputs(inputs, Fetcher(data_uri=record("data"), url=record("url"), path=record("path")),
                      ResolvedInputs)
    assert seen == [("data", "video", "video", "video"), ("url", "mask_image", "image", "mask_image"),
                    ("path", "reference_images[0]", "image", "reference_images_0"),
                    ("url", "reference_images[1]", "image", "reference_images_1"),
                    ("path", "extend", "video", "extend")]
    assert str(out.video) == "/local/video" and [str(p) for p in out.reference_images] == [
        "/local/reference_images_0", "/local/reference_images_1"]
    assert out.mask_video is None and out.first_image is None
