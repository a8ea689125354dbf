"""`build_bundle`: from resolved inputs and a task, the exact control video, masks and reference images.

Rules (docs/CONDITIONING.md, with their official sources): mask 1 = generate, 0 = keep, binary; generated regions are
gray 0.5; no video → gray + mask 1; video without mask → mask 1; frames cover-resized + centre-cropped;
a clip with enough frames spread over the whole job (official keep_last), a shorter one padded at the end with
gray / mask 1 up to exactly num_frames; a mask video paired with the video frame by frame over their common
length. Every rule, its source and its test: docs/CONDITIONING.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from preprocessors import images
from preprocessors.geometry import cover_crop, stretch_to, to_unit
from preprocessors.video import sample_indices
from vace_local.core.bundle import GRAY, ControlBundle
from vace_local.core.errors import InputError
from vace_local.core.inputs import ResolvedInputs
from vace_local.core.media import VideoInfo, iter_frames, open_video, probe_video, read_frames
from vace_local.core.spec import TASKS, JobSpec, input_gaps
from vace_local.core.timing import InputTiming, match_input_timing, with_timing

#: How build_bundle names a missing input in its errors (a file, whatever form the user gave it in).
_INPUT_WORDS = {"video": "a video", "mask_video": "mask_video", "mask_image": "mask_image"}


def input_timing(spec: JobSpec, video: Path | None) -> InputTiming | None:
    """The match_input_* timing of `spec` against its (local) input video; None when nothing is to match."""
    c = spec.control
    if video is None or not (c.match_input_num_frames or c.match_input_frames_per_second):
        return None
    frames, fps, _, _ = probe_video(video, "video")
    return match_input_timing(spec.num_frames, spec.fps, match_frames=c.match_input_num_frames,
                              match_fps=c.match_input_frames_per_second, source_frames=frames, source_fps=fps)


def plan_timing(spec: JobSpec, resolved: ResolvedInputs) -> JobSpec:
    """Apply `match_input_frames_per_second` / `match_input_num_frames`: a copy with the input's fps/length.

    The rule is `vace_local.core.timing.match_input_timing`: fps rounded to an integer within the
    spec's range; the frame count the clip's length at the job fps, rounded up to the next legal 4k+1 (the
    padding is gray / mask 1) and clamped to the allowed range.
    """
    return with_timing(spec, input_timing(spec, Path(resolved.video) if resolved.video else None))


def build_bundle(spec: JobSpec, resolved: ResolvedInputs, annotators_dir: Path | None = None) -> ControlBundle:
    """The bundle for `spec.task`, matching (num_frames, height, width) exactly.

    `annotators_dir`: the annotator / tracker weights folder (None: the default, see `preprocessors.weights`).
    """
    F, H, W = spec.num_frames, spec.height, spec.width
    info: dict[str, Any] = {"task": spec.task}
    refs = images.reference_images([Path(p) for p in (resolved.reference_images or [])], H, W)

    if resolved.video is None:
        for gap in input_gaps(spec.task, dict(resolved)):
            raise InputError(gap.field, gap.message(_INPUT_WORDS))
        bundle = ControlBundle.blank(F, H, W)
        info["source"] = "none"
    else:
        bundle = _from_video(spec, resolved, info, annotators_dir)

    _apply_end_frames(spec, resolved, bundle, info)
    bundle.reference_images = refs
    info["reference_images"] = len(refs)
    bundle.info = info
    bundle.check(F, H, W)
    return bundle


def _from_video(spec: JobSpec, resolved: ResolvedInputs, info: dict[str, Any],
                annotators_dir: Path | None) -> ControlBundle:
    F, H, W = spec.num_frames, spec.height, spec.width
    vinfo, vr = open_video(resolved.video, "video")
    task = spec.task
    if TASKS[task].control == "annotator" and not spec.control.preprocess:
        info["preprocess"] = False  # the video already is the annotator's output
        task = "none"
    rule = TASKS[task]
    usable = vinfo.num_frames
    if resolved.mask_video and rule.uses_masks:
        usable = _paired_length(Path(resolved.mask_video), vinfo, info)
    idx = sample_indices(usable, vinfo.fps, spec.fps, F)
    info.update(
        source_fps=vinfo.fps, source_frames=vinfo.num_frames, source_size=[vinfo.width, vinfo.height],
        source_rotation=vinfo.rotation,
        time_sampling=_sampling_name(usable, len(idx), F),
        sampled_frame_ids=idx,
        frames_from_video=len(idx), padded_frames=F - len(idx),
        padding={"frames": F - len(idx), "at": "end", "first_padded_frame": len(idx)} if len(idx) < F else None,
    )

    if rule.control == "canvas":
        from preprocessors.outpaint import outpaint_frames

        frames, masks = outpaint_frames(spec, vinfo, vr, idx, info)
    else:
        control = None
        if rule.control == "video":
            rgb = read_frames(vinfo, vr, idx, lambda f: cover_crop(f, H, W))  # (n, H, W, 3) uint8
        else:  # depth / pose / face run on the source frame, then are cropped like the video (official order)
            from preprocessors.annotators import annotate

            crops: list[np.ndarray] = []

            def source_frames() -> Iterator[np.ndarray]:
                """One decode serves both: the annotator's source frames and the job-size crops kept aside."""
                for frame in iter_frames(vinfo, vr, idx):
                    crops.append(cover_crop(frame, H, W))
                    yield frame

            control = annotate(task, source_frames(), info, (H, W), annotators_dir)  # float32 [0, 1]
            rgb = np.stack(crops)
        masks = _user_masks(spec, resolved, vinfo, idx, rgb, info, annotators_dir)
        if control is None:  # the video's own frames; an inpainting mask's region is generated afresh
            frames = to_unit(rgb)
            if rule.gray_masked:
                frames[masks > 0.5] = GRAY
        elif masks is None:
            frames = control
        else:  # repaint + control composition: orig where kept, control where generated
            m = masks[..., None]
            frames = to_unit(rgb) * (1.0 - m) + control * m
        if masks is None:
            masks = np.ones(rgb.shape[:3], dtype=np.float32)
    return _pad(frames.astype(np.float32), masks.astype(np.float32), F)


def _sampling_name(usable: int, sampled: int, num_frames: int) -> str:
    """How the clip was mapped onto the job (docs/CONDITIONING.md, time sampling)."""
    if usable >= num_frames:
        return "keep_last"  # spread over the whole clip, nothing padded
    return "short_clip_padded" if sampled < num_frames else "keep_last_repeating"  # slow clip: frames repeat


def _pad(frames: np.ndarray, masks: np.ndarray, num_frames: int) -> ControlBundle:
    """Pad short clips at the end with gray frames and mask 1 (generate)."""
    bundle = ControlBundle.blank(num_frames, frames.shape[1], frames.shape[2])
    n = min(len(frames), num_frames)
    bundle.frames[:n] = frames[:n]
    bundle.masks[:n] = masks[:n]
    return bundle


def _user_masks(
    spec: JobSpec, resolved: ResolvedInputs, vinfo: VideoInfo, idx: list[int], rgb: np.ndarray, info: dict[str, Any],
    annotators_dir: Path | None = None,
) -> np.ndarray | None:
    """Masks for the sampled frames from a mask video, or a tracked / static mask image; None if neither."""
    H, W = spec.height, spec.width
    if resolved.mask_video:
        info["mask_source"] = "mask_video"
        return _mask_video(Path(resolved.mask_video), idx, H, W, (vinfo.height, vinfo.width))
    if resolved.mask_image:
        first = images.mask_image(Path(resolved.mask_image), vinfo.width, vinfo.height, H, W)
        from preprocessors.tracking import choose_tracker

        tracker, reason = (choose_tracker(spec.control.mask_tracker, annotators_dir) if TASKS[spec.task].track_mask
                           else ("static", f"task '{spec.task}': the mask image holds on every frame"))
        info.update(mask_source="mask_image", mask_tracker=tracker, mask_tracker_reason=reason)
        if tracker == "static" or len(rgb) == 1:
            return np.repeat(first[None], len(rgb), axis=0)
        from preprocessors.tracking import track_mask, track_sam2_on_source

        if tracker == "sam2":  # official: on the uncropped source frames, then cropped like the video
            masks = track_sam2_on_source(vinfo, idx, Path(resolved.mask_image), H, W, annotators_dir)
            masks[0] = first
        else:
            masks = track_mask(rgb, first, backend=tracker, annotators_dir=annotators_dir)
        area = masks.reshape(len(masks), -1).mean(axis=1)
        info["mask_area_first_last"] = [float(area[0]), float(area[-1])]
        return masks
    return None


def _paired_length(path: Path, vinfo: VideoInfo, info: dict[str, Any]) -> int:
    """Official pairing (`load_video_pair`): video and mask video are used over their common length, by index.

    A mask of another length is not refused: the longer of the two is cut (recorded in the bundle info).
    """
    minfo = open_video(path, "mask_video")[0]
    stretch = images.check_mask_shape("mask_video", minfo.width, minfo.height, vinfo.width, vinfo.height)
    common = min(minfo.num_frames, vinfo.num_frames)
    info["mask_pairing"] = {"video_frames": vinfo.num_frames, "mask_frames": minfo.num_frames, "paired_frames": common}
    if (minfo.width, minfo.height) != (vinfo.width, vinfo.height):
        info["mask_pairing"].update(mask_size=f"{minfo.width}x{minfo.height}",
                                    video_size=f"{vinfo.width}x{vinfo.height}", mask_stretch=round(stretch, 4))
    return common


def mask_video_frame(frame: np.ndarray, height: int, width: int, video_hw: tuple[int, int] | None = None) -> np.ndarray:
    """One mask-video frame → 0/1 mask: its first channel, mapped onto the video's frame (`video_hw`, when its
    size differs) and cropped with the video's box, then > 0.5 (official).

    A red-on-black mask is therefore a mask (the mean of RGB would put red at 85/255, below mid-gray).
    """
    first = np.ascontiguousarray(frame[..., 0], dtype=np.float32)
    if video_hw is not None:
        first = stretch_to(first, *video_hw)
    first = cover_crop(first, height, width)
    return (first > 127.5).astype(np.float32)


def _mask_video(path: Path, idx: list[int], H: int, W: int, video_hw: tuple[int, int]) -> np.ndarray:
    """The mask video's frames with the same indices as the video's (paired by index, as official VACE), each
    cropped with the video's box (a mask of another size first mapped onto the video's frame)."""
    minfo, mvr = open_video(path, "mask_video")
    return read_frames(minfo, mvr, idx, lambda f: mask_video_frame(f, H, W, video_hw))


def _apply_end_frames(spec: JobSpec, resolved: ResolvedInputs, bundle: ControlBundle, info: dict[str, Any]) -> None:
    """First/last images become real frames at positions 0 / F-1 by the VACE composition rule.

    Where the image is kept (mask 0) its pixels replace the task's frame; where it is generated (transparent
    pixels in `content_aware` mode, mask 1) the task's own frame stays; the mask is the product of both.
    """
    H, W = spec.height, spec.width
    mode = spec.control.transparency_mode
    for field, pos in (("first_image", 0), ("last_image", spec.num_frames - 1)):
        p = getattr(resolved, field, None)
        if p:
            frame, mask = images.frame_image(Path(p), field, H, W, mode)
            keep = mask < 0.5
            bundle.frames[pos][keep] = frame[keep]
            bundle.masks[pos] *= mask
            info[field] = True
